//! Plain-file benchmark: a 1 GiB file uploaded and downloaded through `cacher` and
//! through `aws s3 cp`, against the same Garage node, alternating in one run.
//!
//! Run with `cargo bench --bench plain_transfer` (needs `garage` and `aws` on PATH).
//! Prints each tool's median time and peak RSS, and the speed-up ratios. Files and
//! Garage data live on /dev/shm when it exists, so the disk does not dominate.

#[path = "../tests/util/garage.rs"]
mod garage;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const SIZE: usize = 1024 * 1024 * 1024;
const ROUNDS: usize = 3;

/// Wall time and peak resident memory of one child process.
#[derive(Clone, Copy)]
struct Measure {
    secs: f64,
    max_rss_mib: f64,
}

// The child is reaped by wait4, which std's wait() cannot replace: it gives the rusage.
#[allow(clippy::zombie_processes)]
fn measure(cmd: &mut Command) -> Measure {
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
    Measure {
        secs,
        max_rss_mib: usage.ru_maxrss as f64 / 1024.0,
    }
}

fn median(mut v: Vec<Measure>) -> Measure {
    v.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let mid = v[v.len() / 2];
    Measure {
        secs: mid.secs,
        max_rss_mib: v.iter().map(|m| m.max_rss_mib).fold(0.0, f64::max),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .args([a, b])
        .status()
        .expect("cmp")
        .success()
}

/// Writes `SIZE` pseudo-random bytes in 1 MiB pieces, keeping this process small so
/// children's peak RSS (which starts from the parent's at fork) stays their own.
fn write_source(path: &Path) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut rng = fastrand::Rng::with_seed(42);
    let mut piece = vec![0u8; 1024 * 1024];
    for _ in 0..SIZE / piece.len() {
        rng.fill(&mut piece);
        file.write_all(&piece).expect("write source");
    }
    file.flush().expect("flush");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let scratch = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    // SAFETY: single-threaded here; Garage's data dir follows TMPDIR.
    unsafe { std::env::set_var("TMPDIR", &scratch) };
    let g = garage::garage();
    let dir = tempfile::tempdir_in(&scratch).expect("scratch dir");
    let src = dir.path().join("src.bin");
    write_source(&src);

    let aws_config = dir.path().join("aws.conf");
    std::fs::write(
        &aws_config,
        "[default]\nrequest_checksum_calculation = when_required\n\
         response_checksum_validation = when_required\ns3 =\n    addressing_style = path\n",
    )
    .expect("aws config");
    let aws = |args: &[&str]| {
        let mut c = Command::new("aws");
        c.args(["--endpoint-url", &g.endpoint])
            .args(args)
            .env("AWS_ACCESS_KEY_ID", &g.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &g.secret)
            .env("AWS_DEFAULT_REGION", &g.region)
            .env("AWS_CONFIG_FILE", &aws_config)
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .stdout(std::process::Stdio::null());
        c
    };
    let cacher = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cacher"));
        c.args(args)
            .arg("-q")
            .env_clear()
            .env("HOME", dir.path())
            .env("CACHER_ENDPOINT", &g.endpoint)
            .env("CACHER_BUCKET", &g.bucket)
            .env("CACHER_REGION", &g.region)
            .env("CACHER_S3_KEY_ID", &g.key_id)
            .env("CACHER_S3_SECRET", &g.secret);
        c
    };
    let aws_version = Command::new("aws")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "aws not found".into());

    let src_s = src.to_str().unwrap();
    let out = dir.path().join("out.bin");
    let out_s = out.to_str().unwrap();
    let s3_url = format!("s3://{}/bench/aws.bin", g.bucket);
    let (mut aws_up, mut aws_down, mut cacher_up, mut cacher_down) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        aws_up.push(measure(&mut aws(&["s3", "cp", src_s, &s3_url])));
        cacher_up.push(measure(&mut cacher(&[
            "upload",
            "bench/cacher.bin",
            src_s,
            "--force",
        ])));
        aws_down.push(measure(&mut aws(&["s3", "cp", &s3_url, out_s])));
        assert!(same_file(&src, &out), "aws download differs");
        std::fs::remove_file(&out).unwrap();
        cacher_down.push(measure(&mut cacher(&[
            "download",
            "bench/cacher.bin",
            out_s,
        ])));
        assert!(same_file(&src, &out), "cacher download differs");
        std::fs::remove_file(&out).unwrap();
        eprintln!("round {} of {ROUNDS} done", round + 1);
    }
    let (au, ad, cu, cd) = (
        median(aws_up),
        median(aws_down),
        median(cacher_up),
        median(cacher_down),
    );
    println!("1 GiB plain file, Garage on loopback, median of {ROUNDS} alternating rounds");
    println!("baseline: {aws_version}");
    println!(
        "{:<10} {:>12} {:>12} {:>14}",
        "", "aws s3 cp", "cacher", "speed-up"
    );
    println!(
        "{:<10} {:>11.2}s {:>11.2}s {:>13.2}x",
        "upload",
        au.secs,
        cu.secs,
        au.secs / cu.secs
    );
    println!(
        "{:<10} {:>11.2}s {:>11.2}s {:>13.2}x",
        "download",
        ad.secs,
        cd.secs,
        ad.secs / cd.secs
    );
    println!(
        "peak RSS   up {:.0} MiB / {:.0} MiB, down {:.0} MiB / {:.0} MiB (aws / cacher)",
        au.max_rss_mib, cu.max_rss_mib, ad.max_rss_mib, cd.max_rss_mib
    );
}
