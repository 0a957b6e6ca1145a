//! Messages to the user on stderr: status lines, warnings, request logs and progress.
//!
//! Results go to stdout from the commands; everything here goes to stderr so scripts
//! can capture stdout cleanly. The level is set once at start-up from `-q`/`-v`.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How much to say on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Errors and warnings only.
    Quiet,
    /// Plus one summary line per transfer.
    Normal,
    /// Plus a line per storage request.
    Verbose,
}

static LEVEL: OnceLock<Level> = OnceLock::new();
static JSON: OnceLock<bool> = OnceLock::new();

/// Sets the level, and whether results go to stdout as JSON; later calls are ignored.
pub fn init(level: Level, json: bool) {
    let _ = LEVEL.set(level);
    let _ = JSON.set(json);
}

/// Whether `--json` asked for machine-readable results on stdout.
pub fn json_enabled() -> bool {
    *JSON.get().unwrap_or(&false)
}

/// Writes one line of a command's output to stdout. A stdout closed early (`| head`)
/// is an error for the caller to return: `main` then ends the command quietly.
pub fn line(text: impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "{text}")
}

/// Prints one result as a line of JSON on stdout (`--json`); see docs/json.md.
pub fn json(value: serde_json::Value) {
    // The exit code says the result too: a reader gone early is not an error here.
    let _ = line(value);
}

fn level() -> Level {
    *LEVEL.get().unwrap_or(&Level::Normal)
}

/// A status line (skipped, restored, summary); hidden by `-q`.
pub fn status(msg: impl AsRef<str>) {
    if level() >= Level::Normal {
        eprintln!("cacher: {}", msg.as_ref());
    }
}

/// Set once the job is cancelled.
static CANCELLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records that the job was cancelled (Ctrl-C, SIGTERM), so work still running on
/// other threads stops before changing anything the user sees.
pub fn cancel() {
    CANCELLED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether the job was cancelled.
pub fn cancelled() -> bool {
    CANCELLED.load(std::sync::atomic::Ordering::SeqCst)
}

/// A non-fatal problem the user should know about; always shown.
pub fn warn(msg: impl AsRef<str>) {
    eprintln!("cacher: warning: {}", msg.as_ref());
}

/// Whether request logging is on, to skip building messages nobody sees.
pub fn verbose_enabled() -> bool {
    level() >= Level::Verbose
}

/// A request log line, shown with `-v`.
pub fn verbose(msg: impl AsRef<str>) {
    if verbose_enabled() {
        eprintln!("cacher: [v] {}", msg.as_ref());
    }
}

/// Formats a byte count as `12.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Formats a transfer rate from bytes and elapsed time.
pub fn human_rate(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    format!("{}/s", human_bytes((bytes as f64 / secs) as u64))
}

/// Byte counter of one transfer, drawn as a progress bar (bytes, rate, ETA) when stderr
/// is a terminal and nothing at all otherwise, so CI logs get only the summary line.
pub struct Progress {
    bar: indicatif::ProgressBar,
    started: Instant,
}

impl Progress {
    /// Starts counting a transfer of `total` bytes (0 when unknown).
    pub fn new(label: impl Into<String>, total: u64) -> Progress {
        let draw = level() >= Level::Normal && std::io::stderr().is_terminal();
        let target = if draw {
            indicatif::ProgressDrawTarget::stderr_with_hz(5)
        } else {
            indicatif::ProgressDrawTarget::hidden()
        };
        let template = if total > 0 {
            "cacher: {msg} [{bar:30}] {bytes} / {total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "cacher: {msg} {spinner} {bytes} {bytes_per_sec}"
        };
        let style = indicatif::ProgressStyle::with_template(template)
            .expect("valid progress template")
            .progress_chars("=> ");
        let bar = indicatif::ProgressBar::with_draw_target((total > 0).then_some(total), target)
            .with_style(style)
            .with_message(label.into());
        Progress {
            bar,
            started: Instant::now(),
        }
    }

    /// Records `n` more bytes done.
    pub fn add(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Starts counting again from zero (a transfer started over).
    pub fn reset(&self) {
        self.bar.set_position(0);
    }

    /// Bytes counted so far.
    pub fn done(&self) -> u64 {
        self.bar.position()
    }

    /// Time since the transfer started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Removes the bar, for a caller that prints its own summary.
    pub fn clear(&self) {
        self.bar.finish_and_clear();
    }

    /// Wraps a reader or writer so every byte through it counts.
    pub fn counted<T>(self: &std::sync::Arc<Self>, inner: T) -> Counted<T> {
        Counted {
            inner,
            progress: self.clone(),
        }
    }

    /// Clears the progress line and prints the summary: `<verb> <key>: size in time (rate)`.
    pub fn finish(&self, verb: &str, key: &str, extra: &str) {
        self.clear();
        let bytes = self.done();
        let elapsed = self.elapsed();
        status(format!(
            "{verb} {key}: {} in {:.2}s ({}){extra}",
            human_bytes(bytes),
            elapsed.as_secs_f64(),
            human_rate(bytes, elapsed)
        ));
    }
}

/// A reader or writer whose bytes count towards a [`Progress`].
pub struct Counted<T> {
    inner: T,
    progress: std::sync::Arc<Progress>,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }
}

impl<W: std::io::Write> std::io::Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<T> Counted<T> {
    /// The wrapped reader or writer.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

/// The error and its causes on one line, without repeating a cause its parent quotes.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}
