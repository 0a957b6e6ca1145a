//! Plain-file benchmark: a 1 GiB file uploaded and downloaded through `cacher` and
//! through `aws s3 cp`, against the same Garage node, alternating in one run; then a
//! small cached file downloaded from a bucket 20 ms away (`-- --small-only`: that
//! alone).
//!
//! Run with `cargo bench --bench plain_transfer` (needs `garage`, and Debian's awscli
//! or another `aws` on PATH; with both, both are measured). Prints each tool's median
//! time and peak RSS, the speed-up ratios and their range over the rounds. Files and
//! Garage data live on /dev/shm when it exists, so the disk does not dominate.

mod common;

use common::{Measure, Server, garage, measure_against, median};
use std::path::Path;
use std::process::Command;

const SIZE: usize = 1024 * 1024 * 1024;
const ROUNDS: usize = 5;

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

/// Times of one tool over the rounds.
#[derive(Default)]
struct Runs {
    up: Vec<Measure>,
    down: Vec<Measure>,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let scratch = common::scratch();
    let g = garage();
    let dir = tempfile::tempdir_in(&scratch).expect("scratch dir");
    let src = dir.path().join("src.bin");

    let clis = common::aws_clis();
    let aws_at = |g: &Server, cli: &Path, args: &[&str]| {
        let mut c = Command::new(cli);
        c.args(["--endpoint-url", &g.endpoint])
            .args(args)
            .stdout(std::process::Stdio::null());
        common::aws_env(&mut c, g, dir.path());
        c
    };
    let aws = |cli: &Path, args: &[&str]| aws_at(g, cli, args);
    let cacher_at = |g: &Server, args: &[&str]| {
        let mut c = common::cacher(g, dir.path(), args);
        c.arg("-q");
        c
    };
    let cacher = |args: &[&str]| cacher_at(g, args);
    if std::env::args().any(|a| a == "--small-only") {
        small_far(g, &clis, &aws_at, &cacher_at, dir.path());
        return;
    }
    write_source(&src);

    let src_s = src.to_str().unwrap();
    let out = dir.path().join("out.bin");
    let out_s = out.to_str().unwrap();
    let download_and_check = |cmd: &mut Command, who: &str| {
        let m = measure_against(cmd, g);
        assert!(same_file(&src, &out), "{who} download differs");
        std::fs::remove_file(&out).unwrap();
        m
    };
    let mut baselines: Vec<Runs> = clis.iter().map(|_| Runs::default()).collect();
    let mut ours = Runs::default();
    for round in 0..ROUNDS {
        for (i, (cli, runs)) in clis.iter().zip(&mut baselines).enumerate() {
            let url = format!("s3://{}/bench/aws{i}.bin", g.bucket);
            runs.up.push(measure_against(
                &mut aws(cli, &["s3", "cp", src_s, &url]),
                g,
            ));
            runs.down.push(download_and_check(
                &mut aws(cli, &["s3", "cp", &url, out_s]),
                "aws",
            ));
        }
        ours.up.push(measure_against(
            &mut cacher(&["upload", "bench/cacher.bin", src_s, "--force"]),
            g,
        ));
        ours.down.push(download_and_check(
            &mut cacher(&["download", "bench/cacher.bin", out_s]),
            "cacher",
        ));
        eprintln!("round {} of {ROUNDS} done", round + 1);
    }

    println!("1 GiB plain file, Garage on loopback, median of {ROUNDS} alternating rounds");
    for (i, cli) in clis.iter().enumerate() {
        println!(
            "baseline {}: {} ({})",
            i + 1,
            common::aws_version_of(cli),
            cli.display()
        );
    }
    let ours_up = median(ours.up.clone());
    let ours_down = median(ours.down.clone());
    println!(
        "{:<22} {:>7} {:>7} {:>8} {:>13} {:>11} {:>11} {:>12}",
        "", "aws", "cacher", "speed-up", "rounds' range", "client CPU", "server CPU", "peak RSS"
    );
    for (i, runs) in baselines.iter().enumerate() {
        for (what, base, mine, mine_median) in [
            ("upload", &runs.up, &ours.up, ours_up),
            ("download", &runs.down, &ours.down, ours_down),
        ] {
            let base_median = median(base.clone());
            // Each round's own ratio shows how much of the median is noise.
            let ratios: Vec<f64> = base
                .iter()
                .zip(mine)
                .map(|(b, m)| b.secs / m.secs)
                .collect();
            let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ratios.iter().copied().fold(0.0, f64::max);
            println!(
                "{:<22} {:>6.2}s {:>6.2}s {:>7.2}x {:>6.2}x-{:.2}x {:>5.1}/{:.1}s {:>5.1}/{:.1}s {:>4.0}/{:.0} MiB",
                format!("{what} vs baseline {}", i + 1),
                base_median.secs,
                mine_median.secs,
                base_median.secs / mine_median.secs,
                lo,
                hi,
                base_median.cpu_secs,
                mine_median.cpu_secs,
                base_median.server_cpu_secs,
                mine_median.server_cpu_secs,
                base_median.max_rss_mib,
                mine_median.max_rss_mib,
            );
        }
    }
    small_far(g, &clis, &aws_at, &cacher_at, dir.path());
    // Client and server share the machine's cores, so their CPU seconds over the core
    // count bound how fast a transfer can be here, whatever the client does.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "CPU columns: aws / cacher (median run); server = Garage during the run. \
         With {cores} cores shared, cacher's runs could take no less than \
         {:.2}s up and {:.2}s down (all CPU / cores).",
        (ours_up.cpu_secs + ours_up.server_cpu_secs) / cores,
        (ours_down.cpu_secs + ours_down.server_cpu_secs) / cores,
    );
}

/// The common cache hit, a small file (a lockfile's worth of a tool, 200 KiB), with the
/// bucket 20 ms away (round trip; through a delaying proxy): the number of requests
/// decides, not the bytes. `aws s3 cp` makes a HEAD, then a GET.
fn small_far(
    g: &Server,
    clis: &[std::path::PathBuf],
    aws_at: &dyn Fn(&Server, &Path, &[&str]) -> Command,
    cacher_at: &dyn Fn(&Server, &[&str]) -> Command,
    scratch: &Path,
) {
    let far = common::far(g, std::time::Duration::from_millis(10));
    let src = scratch.join("small.bin");
    std::fs::write(
        &src,
        fastrand::Rng::with_seed(7)
            .u8(..)
            .to_string()
            .repeat(200 * 1024),
    )
    .expect("small file");
    let (src_s, out) = (src.to_str().unwrap(), scratch.join("small-out.bin"));
    let out_s = out.to_str().unwrap();
    common::measure(&mut cacher_at(
        g,
        &["upload", "bench/small.bin", src_s, "--force"],
    ));
    let mut ours = Vec::new();
    let mut theirs: Vec<Vec<Measure>> = clis.iter().map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for (cli, runs) in clis.iter().zip(&mut theirs) {
            let url = format!("s3://{}/bench/small.bin", g.bucket);
            runs.push(common::measure(&mut aws_at(
                &far,
                cli,
                &["s3", "cp", &url, out_s],
            )));
            assert!(same_file(&src, &out), "aws small download differs");
        }
        ours.push(common::measure(&mut cacher_at(
            &far,
            &["download", "bench/small.bin", out_s],
        )));
        assert!(same_file(&src, &out), "cacher small download differs");
    }
    let mine = median(ours).secs;
    println!("200 KiB cached file, the bucket 20 ms away, median of {ROUNDS} rounds:");
    println!("  cacher download: {mine:.3}s");
    for (i, runs) in theirs.into_iter().enumerate() {
        let base = median(runs).secs;
        println!(
            "  aws s3 cp (baseline {}): {base:.3}s, {:.1}x cacher's time",
            i + 1,
            base / mine
        );
    }
}
