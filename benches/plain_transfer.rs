//! Plain-file benchmark: a 1 GiB file uploaded and downloaded through `cacher` and
//! through `aws s3 cp`, against the same Garage node, alternating in one run.
//!
//! Run with `cargo bench --bench plain_transfer` (needs `garage` and `aws` on PATH).
//! Prints each tool's median time and peak RSS, and the speed-up ratios. Files and
//! Garage data live on /dev/shm when it exists, so the disk does not dominate.

mod common;

use common::{garage, measure, median};
use std::path::Path;
use std::process::Command;

const SIZE: usize = 1024 * 1024 * 1024;
const ROUNDS: usize = 3;

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
    let scratch = common::scratch();
    let g = garage();
    let dir = tempfile::tempdir_in(&scratch).expect("scratch dir");
    let src = dir.path().join("src.bin");
    write_source(&src);

    let aws = |args: &[&str]| {
        let mut c = Command::new("aws");
        c.args(["--endpoint-url", &g.endpoint])
            .args(args)
            .stdout(std::process::Stdio::null());
        common::aws_env(&mut c, g, dir.path());
        c
    };
    let cacher = |args: &[&str]| {
        let mut c = common::cacher(g, dir.path(), args);
        c.arg("-q");
        c
    };
    let aws_version = common::aws_version();

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
