//! Docker benchmark: an image of a few hundred MB and a rebuild whose last layer
//! changed, through `cacher docker` and through `docker save | zstd -T0 -3 | aws s3 cp -`
//! (and the inverse into `docker load`), against the same Garage node, in one run.
//!
//! Run with `cargo bench --bench docker_transfer` with a docker daemon running and
//! garage, aws, zstd on PATH. The first layer is the cargo registry tree that
//! `dir_transfer` builds under /dev/shm/cacher-bench-trees (run that bench first), the
//! last a few MB of fresh random bytes. `BENCH_BIG_IMAGE=1` adds a 2 GB image to check
//! that cacher's peak RSS stays bounded.

mod common;

use std::path::Path;
use std::process::Command;

use common::{
    Server, bash_aws, cacher_json, cacher_run, garage, mib, sent_row, stored_bytes, table_header,
    time_row,
};

/// Size of the last layer, the one a rebuild changes: incompressible bytes, as a
/// compiled application roughly is.
const APP_MIB: usize = 4;

fn docker(args: &[&str]) {
    let status = Command::new("docker")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("docker");
    assert!(status.success(), "docker {args:?} failed");
}

/// Builds `tag` from a context holding the tree `base_tree` (one layer) and `app.bin`
/// of `app_mib` random MiB (the last layer).
fn build(ctx: &Path, tag: &str, base_tree: Option<&str>, app_mib: usize, seed: u64) {
    let _ = std::fs::remove_dir_all(ctx);
    std::fs::create_dir_all(ctx).unwrap();
    let mut dockerfile = String::from("FROM scratch\n");
    if let Some(tree) = base_tree {
        let status = Command::new("cp")
            .args(["-a", tree, ctx.join("tree").to_str().unwrap()])
            .status()
            .expect("cp");
        assert!(status.success());
        dockerfile.push_str("COPY tree /tree\n");
    }
    // Written a MiB at a time: a child's peak RSS starts from this process's own.
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut app = std::io::BufWriter::new(std::fs::File::create(ctx.join("app.bin")).unwrap());
    let mut piece = vec![0u8; 1 << 20];
    for _ in 0..app_mib {
        rng.fill(&mut piece);
        std::io::Write::write_all(&mut app, &piece).unwrap();
    }
    std::io::Write::flush(&mut app).unwrap();
    dockerfile.push_str("COPY app.bin /app.bin\n");
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    let status = Command::new("docker")
        .args(["build", "-q", "-t", tag, ctx.to_str().unwrap()])
        .env("DOCKER_BUILDKIT", "0")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("docker build");
    assert!(status.success(), "build {tag}");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let scratch = common::scratch();
    let tree = scratch.join("cacher-bench-trees/a/registry");
    assert!(
        tree.is_dir(),
        "run `cargo bench --bench dir_transfer` first to build {}",
        tree.display()
    );
    let g = garage();
    let work = tempfile::tempdir_in(&scratch).expect("work dir");
    let home = work.path();
    let ctx = home.join("ctx");

    let big = std::env::var("BENCH_BIG_IMAGE").ok();
    if big.as_deref() != Some("only") {
        compare(g, home, &ctx, &tree);
    }
    if big.is_some() {
        big_image(g, home, &ctx);
    }
}

/// cacher against the baseline on the two versions of the app image.
fn compare(g: &Server, home: &Path, ctx: &Path, tree: &Path) {
    let (e, bucket) = (&g.endpoint, &g.bucket);
    build(
        ctx,
        "cacher-bench/app:v1",
        Some(tree.to_str().unwrap()),
        APP_MIB,
        1,
    );
    build(
        ctx,
        "cacher-bench/app:v2",
        Some(tree.to_str().unwrap()),
        APP_MIB,
        2,
    );
    let _ = std::fs::remove_dir_all(ctx);
    println!(
        "image: one layer of a 401 MiB cargo registry tree, one of {APP_MIB} MiB random bytes; v2 changes the last layer"
    );
    println!(
        "baseline: docker save | zstd -T0 -3 | {}",
        common::aws_version()
    );

    let base_up = |tag: &str, name: &str| {
        bash_aws(
            g,
            home,
            &format!(
                "docker save {tag} | zstd -q -T0 -3 | aws --endpoint-url {e} s3 cp - s3://{bucket}/base/{name}.tar.zst"
            ),
        )
    };
    let base_up_1 = base_up("cacher-bench/app:v1", "v1");
    let (cacher_up_1, line_1) = cacher_run(
        g,
        home,
        &["docker", "upload", "bench/v1", "cacher-bench/app:v1"],
    );
    let base_up_2 = base_up("cacher-bench/app:v2", "v2");
    let (cacher_up_2, line_2) = cacher_run(
        g,
        home,
        &["docker", "upload", "bench/v2", "cacher-bench/app:v2"],
    );

    // Restores of v2 while v1 (which shares the registry layer) is loaded, as on a
    // runner that kept yesterday's image, then into a daemon holding neither.
    let base_restore = || {
        bash_aws(
            g,
            home,
            &format!(
                "aws --endpoint-url {e} s3 cp s3://{bucket}/base/v2.tar.zst - | zstd -q -d | docker load"
            ),
        )
    };
    let cacher_restore = || {
        cacher_json(
            g,
            home,
            &["docker", "download", "bench/v2", "cacher-bench/app:v2"],
        )
    };
    docker(&["rmi", "cacher-bench/app:v2"]);
    let base_warm = base_restore();
    docker(&["rmi", "cacher-bench/app:v2"]);
    let (cacher_warm, warm_stats) = cacher_restore();
    docker(&["rmi", "cacher-bench/app:v1", "cacher-bench/app:v2"]);
    let base_cold = base_restore();
    docker(&["rmi", "cacher-bench/app:v2"]);
    let (cacher_cold, cold_stats) = cacher_restore();

    let base_v2 = stored_bytes(g, home, "base/v2.tar.zst");
    println!("cacher upload v1: {line_1}");
    println!("cacher upload v2: {line_2}");
    println!();
    table_header("save+zstd+aws");
    time_row("upload v1 (cold)", base_up_1.secs, cacher_up_1.secs);
    time_row("upload v2 (last layer)", base_up_2.secs, cacher_up_2.secs);
    sent_row("  bytes sent for v2", base_v2, &line_2);
    time_row("restore v2, v1 loaded", base_warm.secs, cacher_warm.secs);
    time_row(
        "restore v2, nothing loaded",
        base_cold.secs,
        cacher_cold.secs,
    );
    let fetched = |stats: &serde_json::Value| stats["new_bytes"].as_u64().unwrap_or(0);
    println!(
        "restore v2 with v1 loaded / into an empty daemon: {:.2}x the time; fetched {:.1} MiB of chunks \
         vs {:.1} MiB (the new layer is {APP_MIB} MiB; layers the daemon had: {})",
        cacher_warm.secs / cacher_cold.secs,
        mib(fetched(&warm_stats)),
        mib(fetched(&cold_stats)),
        warm_stats["layers"],
    );
    println!(
        "peak RSS MiB: cacher up {:.0} / {:.0}, restore {:.0} / {:.0}",
        cacher_up_1.max_rss_mib,
        cacher_up_2.max_rss_mib,
        cacher_warm.max_rss_mib,
        cacher_cold.max_rss_mib
    );
    docker(&["rmi", "cacher-bench/app:v2"]);
}

/// Peak RSS of cacher on a 2 GiB image, which must stay bounded.
fn big_image(g: &Server, home: &Path, ctx: &Path) {
    {
        build(ctx, "cacher-bench/big:v1", None, 2048, 3);
        let _ = std::fs::remove_dir_all(ctx);
        let (up, _) = cacher_run(
            g,
            home,
            &["docker", "upload", "bench/big", "cacher-bench/big:v1"],
        );
        docker(&["rmi", "cacher-bench/big:v1"]);
        let (down, _) = cacher_run(
            g,
            home,
            &["docker", "download", "bench/big", "cacher-bench/big:v1"],
        );
        println!(
            "2 GiB image: cacher upload {:.2}s peak RSS {:.0} MiB; restore {:.2}s peak RSS {:.0} MiB",
            up.secs, up.max_rss_mib, down.secs, down.max_rss_mib
        );
        docker(&["rmi", "cacher-bench/big:v1"]);
    }
}
