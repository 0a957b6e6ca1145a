//! Messages to the user on stderr: status lines, warnings, request logs and progress.
//!
//! Results go to stdout from the commands; everything here goes to stderr so scripts
//! can capture stdout cleanly. The level is set once at start-up from `-q`/`-v`.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Prints one result as a line of JSON on stdout (`--json`); see docs/json.md.
pub fn json(value: serde_json::Value) {
    println!("{value}");
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

/// Byte counter of one transfer; redraws a progress line when stderr is a terminal.
pub struct Progress {
    label: String,
    total: u64,
    done: AtomicU64,
    started: Instant,
    last_draw: std::sync::Mutex<Instant>,
    draw: bool,
}

impl Progress {
    /// Starts counting a transfer of `total` bytes (0 when unknown).
    pub fn new(label: impl Into<String>, total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            label: label.into(),
            total,
            done: AtomicU64::new(0),
            started: now,
            last_draw: std::sync::Mutex::new(now),
            draw: level() >= Level::Normal && std::io::stderr().is_terminal(),
        }
    }

    /// Records `n` more bytes done.
    pub fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if !self.draw {
            return;
        }
        let mut last = self.last_draw.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < Duration::from_millis(200) {
            return;
        }
        *last = Instant::now();
        let total = if self.total > 0 {
            format!(" / {}", human_bytes(self.total))
        } else {
            String::new()
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[Kcacher: {} {}{total} {}",
            self.label,
            human_bytes(done),
            human_rate(done, self.started.elapsed())
        );
        let _ = err.flush();
    }

    /// Bytes counted so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Time since the transfer started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Clears the progress line and prints the summary: `<verb> <key>: size in time (rate)`.
    pub fn finish(&self, verb: &str, key: &str, extra: &str) {
        if self.draw {
            eprint!("\r\x1b[K");
        }
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
