//! Shared by the benchmarks: the Garage harness, timing with peak RSS, and the two
//! command lines compared (cacher and the aws CLI) pointed at the same node.

#![allow(dead_code)]

#[path = "../../tests/util/server.rs"]
pub mod server;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub use server::{Server, garage};

/// Wall time, CPU time (user + system) and peak resident memory of one child process,
/// and the CPU time the server spent meanwhile when measured with `measure_against`.
#[derive(Clone, Copy)]
pub struct Measure {
    pub secs: f64,
    pub cpu_secs: f64,
    pub max_rss_mib: f64,
    pub server_cpu_secs: f64,
}

// The child is reaped by wait4, which std's wait() cannot replace: it gives the rusage.
#[allow(clippy::zombie_processes)]
pub fn measure(cmd: &mut Command) -> Measure {
    let started = Instant::now();
    let child = cmd.spawn().expect("spawn");
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid pointers to locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let secs = started.elapsed().as_secs_f64();
    assert!(pid > 0, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed with status {status}"
    );
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Measure {
        secs,
        cpu_secs: seconds(usage.ru_utime) + seconds(usage.ru_stime),
        max_rss_mib: usage.ru_maxrss as f64 / 1024.0,
        server_cpu_secs: 0.0,
    }
}

/// `measure`, plus the CPU time the server of `g` spent during the run. Waits first
/// until the server is idle: after an upload Garage keeps working for seconds (block
/// references, metadata), and that work must not be billed to the next run.
pub fn measure_against(cmd: &mut Command, g: &Server) -> Measure {
    let mut before = server_cpu_secs(g);
    for _ in 0..60 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = server_cpu_secs(g);
        let busy = now - before;
        before = now;
        if busy < 0.05 {
            break;
        }
    }
    let m = measure(cmd);
    Measure {
        server_cpu_secs: server_cpu_secs(g) - before,
        ..m
    }
}

/// The run with the median wall time (its CPU time too), with the highest peak RSS of all.
pub fn median(mut v: Vec<Measure>) -> Measure {
    v.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let mid = v[v.len() / 2];
    Measure {
        max_rss_mib: v.iter().map(|m| m.max_rss_mib).fold(0.0, f64::max),
        ..mid
    }
}

/// Where benchmark files and Garage's data live: `$CACHER_BENCH_SCRATCH` when set (a
/// disk, for runs that store more than memory holds), else /dev/shm when present, so
/// the disk does not dominate. Sets TMPDIR so the Garage harness follows; call before
/// `garage()`.
pub fn scratch() -> PathBuf {
    let scratch = if let Some(dir) = std::env::var_os("CACHER_BENCH_SCRATCH") {
        PathBuf::from(dir)
    } else if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    // SAFETY: called at start-up, before any other thread reads the environment.
    unsafe { std::env::set_var("TMPDIR", &scratch) };
    scratch
}

/// Environment for the aws CLI against `g`, with the settings Garage needs.
pub fn aws_env(cmd: &mut Command, g: &Server, config_dir: &Path) {
    let config = config_dir.join("aws.conf");
    std::fs::write(
        &config,
        "[default]\nrequest_checksum_calculation = when_required\n\
         response_checksum_validation = when_required\ns3 =\n    addressing_style = path\n",
    )
    .expect("aws config");
    cmd.env("AWS_ACCESS_KEY_ID", &g.key_id)
        .env("AWS_SECRET_ACCESS_KEY", &g.secret)
        .env("AWS_DEFAULT_REGION", &g.region)
        .env("AWS_CONFIG_FILE", config)
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
}

/// `cacher ARGS -q` against `g`, with a clean environment: the binary this bench was
/// built with, or `$CACHER_BENCH_BIN` (a release build for another libc: its
/// allocator decides how much freed memory stays resident).
pub fn cacher(g: &Server, home: &Path, args: &[&str]) -> Command {
    let bin = std::env::var_os("CACHER_BENCH_BIN");
    cacher_at(
        bin.as_deref()
            .unwrap_or(env!("CARGO_BIN_EXE_cacher").as_ref()),
        g,
        home,
        args,
    )
}

/// The same with the binary at `bin` (a baseline build, to compare side by side).
pub fn cacher_at(bin: &std::ffi::OsStr, g: &Server, home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.args(args)
        .env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CACHER_ENDPOINT", &g.endpoint)
        .env("CACHER_BUCKET", &g.bucket)
        .env("CACHER_REGION", &g.region)
        .env("CACHER_S3_KEY_ID", &g.key_id)
        .env("CACHER_S3_SECRET", &g.secret);
    c
}

/// The version line of the aws CLI at `program` (a path, or a name looked up on PATH).
pub fn aws_version_of(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "aws not found".into())
}

/// The version line of the aws CLI on PATH.
pub fn aws_version() -> String {
    aws_version_of(Path::new("aws"))
}

/// The aws CLIs to compare against: Debian's awscli package (`/usr/bin/aws`, the
/// baseline the targets are set against) first, then the `aws` on PATH when it is a
/// different install (often a newer pip one). Panics when there is none.
pub fn aws_clis() -> Vec<PathBuf> {
    let debian = Path::new("/usr/bin/aws");
    let mut clis: Vec<PathBuf> = Vec::new();
    if debian.is_file() {
        clis.push(debian.to_path_buf());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("aws"))
        .find(|p| p.is_file());
    if let Some(found) = on_path {
        let same = |a: &Path, b: &Path| a.canonicalize().ok() == b.canonicalize().ok();
        if !clis.iter().any(|c| same(c, &found)) {
            clis.push(found);
        }
    }
    assert!(!clis.is_empty(), "no aws CLI: apt-get install awscli");
    clis
}

/// CPU seconds (user + system) the Garage process of `g` has used so far, read from
/// /proc: the difference around a run is the server's share of that run's work.
pub fn server_cpu_secs(g: &Server) -> f64 {
    let config = g.dir.join("garage.toml");
    let config = config.to_string_lossy();
    let pid = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            std::fs::read(p.join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&*config))
                .unwrap_or(false)
        })
        .expect("the server's process");
    let stat = std::fs::read_to_string(pid.join("stat")).expect("server stat");
    // Fields after the command name, which may hold spaces: utime and stime are the
    // 14th and 15th of the line.
    let fields: Vec<&str> = stat.rsplit_once(") ").expect("stat").1.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf only reads a system constant.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Seconds since `t`.
pub fn since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Sum of object sizes under `prefix` (recursive `cacher list --root`).
pub fn stored_bytes(g: &Server, home: &Path, prefix: &str) -> u64 {
    // `size` in the JSON lines is the object's; the text listing shows an entry's
    // content length instead.
    let out = cacher(
        g,
        home,
        &["list", "--root", "--recursive", "--json", prefix],
    )
    .output()
    .expect("list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["size"].as_u64())
        .sum()
}

/// Runs cacher; returns the measure and the last line it printed on stderr (the
/// stats line).
pub fn cacher_run(g: &Server, home: &Path, args: &[&str]) -> (Measure, String) {
    let log = home.join("cacher.log");
    let mut cmd = cacher(g, home, args);
    cmd.stderr(std::fs::File::create(&log).expect("log"))
        .stdout(std::process::Stdio::null());
    let m = measure(&mut cmd);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    (m, text.lines().last().unwrap_or("").to_string())
}

/// Measures a bash pipeline (the baseline) with the aws CLI set up for `g`.
pub fn bash_aws(g: &Server, dir: &Path, script: &str) -> Measure {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &format!("set -eo pipefail; {script}")])
        .stdout(std::process::Stdio::null());
    aws_env(&mut cmd, g, dir);
    measure(&mut cmd)
}

/// Width of the label column of the comparison tables.
const LABEL: usize = 28;

/// Prints the header of a comparison table: labels, then `baseline`, cacher and ratio.
pub fn table_header(baseline: &str) {
    println!(
        "{:<LABEL$} {baseline:>13} {:>12} {:>8}",
        "", "cacher", "ratio"
    );
}

/// A row of two times and their ratio (cacher / baseline).
pub fn time_row(name: &str, base_secs: f64, cacher_secs: f64) {
    println!(
        "{name:<LABEL$} {base_secs:>12.2}s {cacher_secs:>11.2}s {:>8.3}",
        cacher_secs / base_secs
    );
}

/// A row of rounds run side by side (`base[i]` beside `cacher[i]`): the median times;
/// as the ratio, the median of the rounds' own ratios (each from two runs seconds
/// apart, so less noisy than a ratio of the medians), and their range.
pub fn rounds_row(name: &str, base: &[Measure], cacher: &[Measure]) {
    let mut ratios: Vec<f64> = base
        .iter()
        .zip(cacher)
        .map(|(b, c)| c.secs / b.secs)
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "{name:<LABEL$} {:>12.2}s {:>11.2}s {:>8.3}   (times: medians of {} rounds; ratio: the rounds' median, range {:.3}-{:.3})",
        median(base.to_vec()).secs,
        median(cacher.to_vec()).secs,
        ratios[ratios.len() / 2],
        ratios.len(),
        ratios[0],
        ratios[ratios.len() - 1],
    );
}

/// A row of bytes sent: the baseline's count and what cacher's stats line says it sent.
pub fn sent_row(name: &str, base_bytes: u64, cacher_stats_line: &str) {
    let sent = cacher_stats_line
        .split("sent ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("?");
    println!("{name:<LABEL$} {:>10.2}MiB {sent:>12}", mib(base_bytes));
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// Runs cacher with `--json`; returns the measure and the `stats` of its record.
pub fn cacher_json(g: &Server, home: &Path, args: &[&str]) -> (Measure, serde_json::Value) {
    let out = home.join("cacher.json");
    let mut cmd = cacher(g, home, args);
    cmd.arg("--json")
        .stdout(std::fs::File::create(&out).expect("json out"))
        .stderr(std::process::Stdio::null());
    let m = measure(&mut cmd);
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let record: serde_json::Value = serde_json::from_str(text.trim()).expect("a JSON record");
    (m, record["stats"].clone())
}

/// `g` as a runner far from it sees it: through a proxy on loopback that holds every
/// byte back `one_way` in each direction, so each round trip costs twice that (the
/// bandwidth stays loopback's). For figures where round trips, not local work, decide.
pub fn far(g: &Server, one_way: std::time::Duration) -> Server {
    use std::net::{TcpListener, TcpStream};
    let target = g.endpoint.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the delaying proxy");
    let addr = listener.local_addr().expect("proxy address");
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            for s in [&client, &server] {
                let _ = s.set_nodelay(true);
            }
            let (c2, s2) = (client.try_clone(), server.try_clone());
            if let (Ok(c2), Ok(s2)) = (c2, s2) {
                std::thread::spawn(move || delayed_copy(client, s2, one_way));
                std::thread::spawn(move || delayed_copy(server, c2, one_way));
            }
        }
    });
    Server {
        endpoint: format!("http://{addr}"),
        ..g.clone()
    }
}

/// Copies `from` to `to`, each read written `delay` after it arrived, in order.
fn delayed_copy(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    delay: std::time::Duration,
) {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (due, data) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if tx
            .send((Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}
