//! Directory benchmark: a real cargo registry tree, then the same after a dependency
//! bump, through `cacher dir` and through `tar | zstd -T0 -3 | aws s3 cp -` (and restic
//! when installed), against the same Garage node, in one run.
//!
//! Run with `cargo bench --bench dir_transfer` (needs garage, aws, zstd, tar on PATH and
//! crates.io for `cargo fetch`). The trees are built once under
//! /dev/shm/cacher-bench-trees: a CARGO_HOME after `cargo fetch` of a project using
//! common crates, with every crate unpacked as a build would; the bumped one adds a few
//! dependencies to the same lockfile.
//!
//! `-- --signed` measures instead what signing costs a cold upload of the larger corpus
//! (README "Signed entries"): uploads with and without a signing key, alternated, each
//! into a fresh prefix.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use common::{
    Server, bash_aws, cacher_json, cacher_run, garage, measure, mib, sent_row, stored_bytes,
    table_header, time_row,
};

const BASE_DEPS: &str = r#"
tokio = { version = "1", features = ["full"] }
serde = { version = "1", features = ["derive"] }
serde_json = "1"
clap = { version = "4", features = ["derive"] }
reqwest = { version = "0.12", default-features = false, features = ["rustls-tls"] }
regex = "1"
rayon = "1"
anyhow = "1"
thiserror = "2"
tracing = "0.1"
tracing-subscriber = "0.3"
chrono = "0.4"
syn = { version = "2", features = ["full"] }
aws-sdk-s3 = { version = "1", default-features = false }
axum = "0.8"
tonic = "0.12"
prost = "0.13"
image = "0.25"
diesel = { version = "2", features = ["postgres", "sqlite"] }
actix-web = "4"
"#;
/// A lockfile bump of one crate, as a dependency bot would make.
const ONE_CRATE: (&str, &str) = ("serde_json", "1.0.120");
/// A larger change: three new direct dependencies and what they pull in.
const NEW_DEPS: &str = r#"
indicatif = "0.18"
clap_complete = "4"
toml = "0.8"
"#;

fn sh(script: &str) {
    let status = Command::new("bash")
        .args(["-c", script])
        .status()
        .expect("bash");
    assert!(status.success(), "failed: {script}");
}

/// Builds the registry trees once: A, B (A with one crate bumped), C (B plus new
/// dependencies). Returns their paths.
fn trees(scratch: &Path) -> [String; 3] {
    let base = scratch.join("cacher-bench-trees");
    if !base.join("ready-v2").exists() {
        let base = base.display();
        let (krate, old) = ONE_CRATE;
        let unpack = "for c in \"$H\"/registry/cache/*/*.crate; do \
             d=$(dirname \"$c\" | sed 's#/cache/#/src/#'); n=$(basename \"$c\" .crate); \
             [ -d \"$d/$n\" ] || { mkdir -p \"$d\"; tar -xzf \"$c\" -C \"$d\"; }; done";
        sh(&format!(
            "set -e; rm -rf {base}; mkdir -p {base}/proj/src; cd {base}/proj; \
             echo 'fn main() {{}}' > src/main.rs; \
             printf '[package]\\nname = \"p\"\\nversion = \"0.1.0\"\\nedition = \"2021\"\\n[dependencies]\\n%s' '{BASE_DEPS}' > Cargo.toml; \
             export CARGO_HOME={base}/a; cargo generate-lockfile -q; \
             cargo update -q -p {krate} --precise {old}; cargo fetch -q; H={base}/a; {unpack}; \
             cp -a {base}/a {base}/b; export CARGO_HOME={base}/b; \
             cargo update -q -p {krate}; cargo fetch -q; H={base}/b; {unpack}; \
             cp -a {base}/b {base}/c; export CARGO_HOME={base}/c; \
             printf '%s' '{NEW_DEPS}' >> Cargo.toml; cargo fetch -q; H={base}/c; {unpack}; \
             touch {base}/ready-v2"
        ));
    }
    ["a", "b", "c"].map(|t| base.join(t).join("registry").display().to_string())
}

/// The larger corpus of the warm-path figures (about 0.9 GB, 45k+ files): the one-crate
/// bump tree B next to a copy of this machine's own `~/.cargo/registry`; its bumped
/// version has C's registry in place of B's. Built once; returns (base, bumped).
fn large_trees(scratch: &Path) -> Option<(String, String)> {
    let base = scratch.join("cacher-bench-trees");
    let home_registry = std::env::var("HOME").ok()? + "/.cargo/registry";
    if !Path::new(&home_registry).is_dir() {
        return None;
    }
    if !base.join("large-ready-v1").exists() {
        let base = base.display();
        sh(&format!(
            "set -e; rm -rf {base}/large; mkdir -p {base}/large/base {base}/large/bumped; \
             cp -a {base}/b/registry {base}/large/base/project; \
             cp -a {home_registry} {base}/large/base/home; \
             cp -a {base}/c/registry {base}/large/bumped/project; \
             cp -a {base}/large/base/home {base}/large/bumped/home; \
             touch {base}/large-ready-v1"
        ));
    }
    let at = |t: &str| base.join("large").join(t).display().to_string();
    Some((at("base"), at("bumped")))
}

/// `args` of a cacher command run under `prefix`.
fn with_prefix(prefix: &str, args: &[&str]) -> Vec<String> {
    ["--prefix", prefix]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect()
}

/// Rounds of the warm path's headline rows (the median is printed, and each round's
/// ratio).
const WARM_ROUNDS: usize = 3;

/// Work proportional to the change: a job restores yesterday's entry, its build
/// brings in the bumped tree (`cp -au` stands in for cargo: it writes new and newer
/// files only), then uploads under the new key; and a warm runner restores the bumped
/// entry into a DIR still holding yesterday's tree.
fn warm_path(g: &Server, home: &Path, name: &str, base: &str, bumped: &str) {
    let (e, bucket) = (&g.endpoint, &g.bucket);
    let files = |t: &str| {
        let out = Command::new("find")
            .args([t, "-type", "f"])
            .output()
            .expect("find");
        out.stdout.iter().filter(|b| **b == b'\n').count()
    };
    println!();
    println!(
        "warm path on {name}: {} MiB, {} files; the bump changes {:+} bytes",
        du(bumped) >> 20,
        files(bumped),
        du(bumped) as i64 - du(base) as i64
    );
    let out = home.join(format!("warm-{name}"));
    let out_s = out.display().to_string();
    let reset = || {
        let _ = std::fs::remove_dir_all(&out);
    };
    let (base_key, bumped_key) = (format!("warm/{name}/base"), format!("warm/{name}/bumped"));
    let run = |prefix: &str, args: &[&str]| {
        let args = with_prefix(prefix, args);
        cacher_json(
            g,
            home,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    // The headline rows run in rounds, the loop beside cacher in each: one run of each
    // varies by ±15 % here. Each upload round has a prefix of its own (per tree, too)
    // holding the base entry, so each is the first to send the bump's new chunks. The
    // bytes printed are the last round's: every round reads and sends the same.
    let (mut baseline_ups, mut warm_ups, mut stats) = (Vec::new(), Vec::new(), Value::Null);
    for round in 0..WARM_ROUNDS {
        let prefix = format!("warm-{name}-{round}");
        run(&prefix, &["dir", "upload", &base_key, base]);
        reset();
        run(&prefix, &["dir", "download", &base_key, &out_s]);
        sh(&format!("cp -au {bumped}/. {out_s}/"));
        baseline_ups.push(bash_aws(
            g,
            home,
            &format!(
                "tar -C {out_s} -cf - . | zstd -q -T0 -3 | aws --endpoint-url {e} s3 cp - s3://{bucket}/base/warm-{name}.tar.zst"
            ),
        ));
        let (warm_up, round_stats) = run(&prefix, &["dir", "upload", &bumped_key, &out_s]);
        warm_ups.push(warm_up);
        stats = round_stats;
    }
    let (baseline_up, warm_up) = (
        common::median(baseline_ups.clone()),
        common::median(warm_ups.clone()),
    );
    let first = format!("warm-{name}-0");
    let read = stats["disk_bytes"].as_u64().unwrap_or(0);
    let stream = stats["stream_bytes"].as_u64().unwrap_or(1);

    // The same bump with only the new files written (`cp -an`): cargo also rewrote
    // index cache files with the same bytes above, which an upload must read.
    // In a prefix of its own too, so it also sends the new chunks.
    let new_only_prefix = format!("warm-{name}-new-only");
    run(&new_only_prefix, &["dir", "upload", &base_key, base]);
    reset();
    run(&new_only_prefix, &["dir", "download", &base_key, &out_s]);
    sh(&format!("cp -an {bumped}/. {out_s}/"));
    let (new_only_up, new_only) = run(&new_only_prefix, &["dir", "upload", &bumped_key, &out_s]);

    let (mut restores_empty, mut restores_over) = (Vec::new(), Vec::new());
    let (mut empty_stats, mut over_stats) = (Value::Null, Value::Null);
    for _ in 0..WARM_ROUNDS {
        reset();
        let (restore_empty, round_stats) = run(&first, &["dir", "download", &bumped_key, &out_s]);
        restores_empty.push(restore_empty);
        empty_stats = round_stats;
        reset();
        run(&first, &["dir", "download", &base_key, &out_s]);
        let (restore_over, round_stats) = run(&first, &["dir", "download", &bumped_key, &out_s]);
        restores_over.push(restore_over);
        over_stats = round_stats;
    }
    let (restore_empty, restore_over) = (
        common::median(restores_empty.clone()),
        common::median(restores_over.clone()),
    );
    let same = Command::new("diff")
        .args(["-r", "-q", bumped, &out_s])
        .status()
        .expect("diff")
        .success();
    assert!(
        same,
        "the restore over the old tree differs from the bumped tree"
    );
    // What any warm upload of this tree costs at least: the tree just restored,
    // uploaded again unchanged; and the system calls of a scan alone.
    let unchanged_key = format!("{bumped_key}-unchanged");
    let (unchanged_up, unchanged) = run(&first, &["dir", "upload", &unchanged_key, &out_s]);
    assert_eq!(unchanged["disk_bytes"].as_u64(), Some(0), "{unchanged}");
    let (walked, walk_secs) = stat_walk(&out);
    // Every file written anew with its own bytes, as `npm ci` leaves node_modules: all
    // read, checked against the record, nothing cut.
    sh(&format!("find {out_s} -type f -exec touch {{}} +"));
    let rewritten_key = format!("{bumped_key}-rewritten");
    let (rewritten_up, rewritten) = run(&first, &["dir", "upload", &rewritten_key, &out_s]);
    reset();

    table_header("tar+zstd+aws");
    common::rounds_row("upload after restore+bump", &baseline_ups, &warm_ups);
    println!(
        "  read {:.2} MiB of {:.1} MiB ({:.2}%; {:.2} MiB of it only checked against the record), {} files unchanged, sent {:.2} MiB",
        mib(read),
        mib(stream),
        100.0 * read as f64 / stream as f64,
        mib(stats["checked_bytes"].as_u64().unwrap_or(0)),
        stats["unchanged_files"],
        mib(stats["wire_bytes"].as_u64().unwrap_or(0))
    );
    time_row("  same, new files only", baseline_up.secs, new_only_up.secs);
    let new_read = new_only["disk_bytes"].as_u64().unwrap_or(0);
    println!(
        "  read {:.2} MiB of {:.1} MiB ({:.2}%), {} files unchanged",
        mib(new_read),
        mib(stream),
        100.0 * new_read as f64 / stream as f64,
        new_only["unchanged_files"],
    );
    time_row(
        "  same, nothing changed",
        baseline_up.secs,
        unchanged_up.secs,
    );
    time_row(
        "  same, every file rewritten",
        baseline_up.secs,
        rewritten_up.secs,
    );
    println!(
        "  read {:.2} MiB, {:.2} MiB of it only checked against the record",
        mib(rewritten["disk_bytes"].as_u64().unwrap_or(0)),
        mib(rewritten["checked_bytes"].as_u64().unwrap_or(0)),
    );
    println!(
        "  a walk on one thread that lists every directory and stats each of the {walked} entries: {:.1} ms ({:.3}x)",
        walk_secs * 1000.0,
        walk_secs / baseline_up.secs
    );
    common::rounds_row("restore over old / empty", &restores_empty, &restores_over);
    println!(
        "  received {:.2} MiB into empty, {:.2} MiB over the old tree, where it wrote {:.2} MiB",
        mib(empty_stats["wire_bytes"].as_u64().unwrap_or(0)),
        mib(over_stats["wire_bytes"].as_u64().unwrap_or(0)),
        mib(over_stats["disk_bytes"].as_u64().unwrap_or(0)),
    );
    println!(
        "peak RSS MiB: warm upload {:.0}, restore into empty {:.0}, over the old tree {:.0}",
        warm_up.max_rss_mib, restore_empty.max_rss_mib, restore_over.max_rss_mib
    );
}

/// The warm path as a runner 20 ms (round trip) from its bucket sees it: the same
/// upload after restore + bump, and restores of the bumped entry into an empty DIR and
/// over the old tree, each with the loop it replaces, through [`common::far`]. The
/// trees are restored beforehand from near, under a prefix of their own (nothing of
/// the near runs is reused).
fn warm_path_far(g: &Server, home: &Path, name: &str, base: &str, bumped: &str) {
    let far = common::far(g, std::time::Duration::from_millis(10));
    let (e, bucket) = (&far.endpoint, &far.bucket);
    let out = home.join(format!("far-{name}"));
    let out_s = out.display().to_string();
    let reset = || {
        let _ = std::fs::remove_dir_all(&out);
    };
    let run = |server: &Server, args: &[&str]| {
        let args = with_prefix("far", args);
        cacher_json(
            server,
            home,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let (base_key, bumped_key) = (format!("{name}/base"), format!("{name}/bumped"));
    run(g, &["dir", "upload", &base_key, base]);
    reset();
    run(g, &["dir", "download", &base_key, &out_s]);
    sh(&format!("cp -au {bumped}/. {out_s}/"));
    let archive = format!("s3://{bucket}/far/{name}.tar.zst");
    let baseline_up = bash_aws(
        &far,
        home,
        &format!(
            "tar -C {out_s} -cf - . | zstd -q -T0 -3 | aws --endpoint-url {e} s3 cp - {archive}"
        ),
    );
    let (warm_up, up_stats) = run(&far, &["dir", "upload", &bumped_key, &out_s]);
    // The save step of a job whose key was a hit: the loop's check is one HEAD.
    let baseline_skip = bash_aws(
        &far,
        home,
        &format!(
            "aws --endpoint-url {e} s3api head-object --bucket {bucket} --key far/{name}.tar.zst"
        ),
    );
    let (skipped, _) = run(&far, &["dir", "upload", &bumped_key, &out_s]);
    reset();
    std::fs::create_dir_all(&out).unwrap();
    let baseline_down = bash_aws(
        &far,
        home,
        &format!("aws --endpoint-url {e} s3 cp {archive} - | zstd -q -d | tar -C {out_s} -xf -"),
    );
    reset();
    let (restore_empty, _) = run(&far, &["dir", "download", &bumped_key, &out_s]);
    reset();
    run(g, &["dir", "download", &base_key, &out_s]);
    let (restore_over, over_stats) = run(&far, &["dir", "download", &bumped_key, &out_s]);
    let same = Command::new("diff")
        .args(["-r", "-q", bumped, &out_s])
        .status()
        .expect("diff")
        .success();
    assert!(
        same,
        "the restore over the old tree differs from the bumped tree"
    );
    reset();

    println!();
    println!("warm path on {name}, the bucket 20 ms away (round trip; through a delaying proxy)");
    table_header("tar+zstd+aws");
    time_row("upload after restore+bump", baseline_up.secs, warm_up.secs);
    println!(
        "  sent {:.2} MiB",
        mib(up_stats["wire_bytes"].as_u64().unwrap_or(0))
    );
    time_row("upload of a cached key", baseline_skip.secs, skipped.secs);
    println!("  (skipped; the loop's check: aws s3api head-object)");
    time_row("restore into empty", baseline_down.secs, restore_empty.secs);
    time_row(
        "restore over the old tree",
        baseline_down.secs,
        restore_over.secs,
    );
    println!(
        "  received {:.2} MiB; {:.3}x the restore into an empty DIR",
        mib(over_stats["wire_bytes"].as_u64().unwrap_or(0)),
        restore_over.secs / restore_empty.secs
    );
}

/// Walks `dir` on this thread as a scan's system calls do and nothing more: each
/// directory opened through its parent's handle and listed, each entry stat'ed by
/// name. The entries seen and the seconds taken.
fn stat_walk(dir: &Path) -> (u64, f64) {
    use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
    fn walk(fd: rustix::fd::OwnedFd, seen: &mut u64) {
        let mut listing = Dir::new(fd).expect("list a directory");
        let mut names = Vec::new();
        for item in &mut listing {
            let name = item.expect("a directory entry").file_name().to_owned();
            if !matches!(name.to_bytes(), b"." | b"..") {
                names.push(name);
            }
        }
        let parent = listing.fd().expect("the directory's handle");
        for name in names {
            let st = rustix::fs::statat(parent, &name, AtFlags::SYMLINK_NOFOLLOW).expect("stat");
            *seen += 1;
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let sub = rustix::fs::openat(parent, &name, flags, Mode::empty()).expect("open");
                walk(sub, seen);
            }
        }
    }
    let started = std::time::Instant::now();
    let root = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
        .expect("open the tree");
    let mut seen = 0;
    walk(root, &mut seen);
    (seen, common::since(started))
}

/// A node_modules-shaped tree of small files (about 3,000 packages, 60k+ files), built
/// once. npm cannot reach a registry here, so it is synthetic: each package has a
/// package.json, README, LICENSE, an index and 10-25 modules of JavaScript-like text,
/// one in twenty a larger bundle; names and sizes are drawn from a fixed seed.
fn node_modules(scratch: &Path) -> String {
    let root = scratch.join("cacher-bench-trees").join("node_modules");
    let ready = scratch
        .join("cacher-bench-trees")
        .join("node-modules-ready-v1");
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&root);
        let mut rng = fastrand::Rng::with_seed(7);
        let words = [
            "function",
            "return",
            "const",
            "let",
            "var",
            "if",
            "else",
            "for",
            "while",
            "module",
            "exports",
            "require",
            "this",
            "null",
            "undefined",
            "true",
            "false",
            "new",
            "typeof",
            "value",
            "options",
            "callback",
            "error",
            "result",
            "length",
            "push",
            "map",
            "filter",
            "prototype",
            "Object",
            "Array",
            "String",
            "Promise",
            "async",
            "await",
            "=>",
            "{",
            "}",
            "(",
            ")",
            ";",
            "=",
            "===",
            "!==",
            "+",
            ".",
            ",",
            "[",
            "]",
            "\n",
            "\n  ",
            "\n    ",
        ];
        let text = |rng: &mut fastrand::Rng, len: usize| {
            let mut out = String::with_capacity(len + 16);
            while out.len() < len {
                out.push_str(words[rng.usize(..words.len())]);
                out.push(' ');
            }
            out
        };
        for p in 0..3000 {
            let name = format!("pkg-{p:04}-{}", rng.u32(..));
            let dir = root.join(&name);
            std::fs::create_dir_all(dir.join("lib")).unwrap();
            let json = format!(
                "{{\n  \"name\": \"{name}\",\n  \"version\": \"{}.{}.{}\",\n  \"main\": \"index.js\",\n  \"license\": \"MIT\"\n}}\n",
                rng.u8(..9),
                rng.u8(..30),
                rng.u8(..20)
            );
            std::fs::write(dir.join("package.json"), json).unwrap();
            std::fs::write(dir.join("README.md"), {
                let n = 500 + rng.usize(..3000);
                text(&mut rng, n)
            })
            .unwrap();
            std::fs::write(
                dir.join("LICENSE"),
                "MIT License\n\nPermission is hereby granted, free of charge...\n".repeat(8),
            )
            .unwrap();
            std::fs::write(dir.join("index.js"), {
                let n = 300 + rng.usize(..4000);
                text(&mut rng, n)
            })
            .unwrap();
            for m in 0..10 + rng.usize(..16) {
                std::fs::write(dir.join("lib").join(format!("m{m}.js")), {
                    let n = 200 + rng.usize(..6000);
                    text(&mut rng, n)
                })
                .unwrap();
            }
            if rng.usize(..20) == 0 {
                std::fs::create_dir_all(dir.join("dist")).unwrap();
                std::fs::write(dir.join("dist/bundle.js"), {
                    let n = 20_000 + rng.usize(..200_000);
                    text(&mut rng, n)
                })
                .unwrap();
            }
        }
        std::fs::write(&ready, "").unwrap();
    }
    root.display().to_string()
}

/// Cold restores of a many-small-files tree: `aws s3 cp | zstd -d | tar -x` against
/// `cacher dir download` into an empty DIR, after a cold upload of each.
fn cold_small_files(g: &Server, home: &Path, tree: &str) {
    let (e, bucket) = (&g.endpoint, &g.bucket);
    let files = Command::new("find")
        .args([tree, "-type", "f"])
        .output()
        .expect("find");
    let files = files.stdout.iter().filter(|b| **b == b'\n').count();
    println!();
    println!(
        "node_modules-shaped tree: {} MiB, {files} files",
        du(tree) >> 20
    );
    let out = home.join("nm-out");
    let out_s = out.display().to_string();
    let reset = || {
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
    };
    let base_up = bash_aws(
        g,
        home,
        &format!(
            "tar -C {tree} -cf - . | zstd -q -T0 -3 | aws --endpoint-url {e} s3 cp - s3://{bucket}/base/nm.tar.zst"
        ),
    );
    let (cacher_up, _) = cacher_run(g, home, &["dir", "upload", "nm/a", tree]);
    reset();
    let base_down = bash_aws(
        g,
        home,
        &format!(
            "aws --endpoint-url {e} s3 cp s3://{bucket}/base/nm.tar.zst - | zstd -q -d | tar -C {out_s} -xf -"
        ),
    );
    let _ = std::fs::remove_dir_all(&out);
    let (cacher_down, _) = cacher_run(g, home, &["dir", "download", "nm/a", &out_s]);
    let same = Command::new("diff")
        .args(["-r", "-q", tree, &out_s])
        .status()
        .expect("diff")
        .success();
    assert!(same, "restored node_modules differs");
    let _ = std::fs::remove_dir_all(&out);
    table_header("tar+zstd+aws");
    time_row("cold upload", base_up.secs, cacher_up.secs);
    time_row("restore into empty", base_down.secs, cacher_down.secs);
    println!(
        "peak RSS MiB: cacher up {:.0}, restore {:.0}; baseline up {:.0}, restore {:.0}",
        cacher_up.max_rss_mib, cacher_down.max_rss_mib, base_up.max_rss_mib, base_down.max_rss_mib
    );
}

/// What signing adds to a cold `dir upload` of `tree`: three uploads with a signing key
/// and three without, alternated, each into its own prefix with no tree state (so
/// every byte is read and every chunk sent), and the signature alone, timed in process
/// over a manifest of the size the signed upload wrote.
fn signed_upload(g: &Server, home: &Path, tree: &str) {
    let key = home.join("bench.key");
    cacher_run(g, home, &["keygen", key.to_str().unwrap()]);
    println!();
    println!("signed cold upload of {tree} ({} MiB)", du(tree) >> 20);
    let upload = |i: usize, signed: bool| {
        let state = tempfile::tempdir_in(home).unwrap();
        let prefix = format!("signed-{signed}-{i}");
        let mut cmd = common::cacher(g, home, &["dir", "upload", "tree", tree]);
        cmd.env("CACHER_PREFIX", &prefix)
            .env("CACHER_STATE_DIR", state.path())
            .stderr(std::process::Stdio::null());
        if signed {
            cmd.env("CACHER_SIGNING_KEY", &key);
        }
        (measure(&mut cmd).secs, prefix)
    };
    let (mut plain, mut signed, mut prefix) = (Vec::new(), Vec::new(), String::new());
    for i in 0..3 {
        plain.push(upload(i, false).0);
        let (secs, p) = upload(i, true);
        signed.push(secs);
        prefix = p;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, s) = (median(&mut plain), median(&mut signed));
    println!("  unsigned: {plain:.2?} s, median {p:.2} s");
    println!(
        "  signed:   {signed:.2?} s, median {s:.2} s ({:+.1}%)",
        (s / p - 1.0) * 100.0
    );
    // The signature itself: sha256 of the manifest and one ed25519 signature.
    let manifest_len = manifest_size(g, home, &prefix);
    let signer = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let manifest = vec![0x5au8; manifest_len as usize];
    let started = std::time::Instant::now();
    for _ in 0..10 {
        use ed25519_dalek::Signer;
        use sha2::Digest;
        let sha = hex::encode(sha2::Sha256::digest(&manifest));
        let _ = signer.sign(&cacher::sign::statement("tree", manifest_len, &sha));
    }
    let sign_secs = started.elapsed().as_secs_f64() / 10.0;
    println!(
        "  the signature alone (sha256 of the {} KiB manifest, one ed25519 signature): {:.2} ms, {:.3}% of the unsigned upload",
        manifest_len >> 10,
        sign_secs * 1e3,
        sign_secs / p * 100.0
    );
}

/// The size of the manifest `tree` under `prefix`, as `cacher list --json` shows it.
fn manifest_size(g: &Server, home: &Path, prefix: &str) -> u64 {
    let out = common::cacher(g, home, &["list", "--json"])
        .env("CACHER_PREFIX", prefix)
        .output()
        .expect("cacher list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["name"] == "tree")
        .and_then(|v| v["size"].as_u64())
        .expect("the manifest is listed")
}

fn du(path: &str) -> u64 {
    let out = Command::new("du").args(["-sb", path]).output().expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn restic_available() -> bool {
    Command::new("restic").arg("version").output().is_ok()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let scratch = common::scratch();
    let [tree_a, tree_b, tree_c] = trees(&scratch);
    let g = garage();
    let work = tempfile::tempdir_in(&scratch).expect("work dir");
    let home = work.path();
    let e = &g.endpoint;
    let bucket = &g.bucket;
    let out = home.join("out");
    let out_s = out.display().to_string();
    let reset_out = || {
        let _ = std::fs::remove_dir_all(&out);
    };

    let (size_a, size_b, size_c) = (du(&tree_a), du(&tree_b), du(&tree_c));
    println!(
        "trees: A {} MiB; B = A with {} bumped ({:+} bytes); C = B plus new dependencies ({:+} bytes)",
        size_a >> 20,
        ONE_CRATE.0,
        size_b as i64 - size_a as i64,
        size_c as i64 - size_b as i64
    );
    println!("baseline: tar | zstd -T0 -3 | {}", common::aws_version());
    if std::env::args().any(|a| a == "--signed") {
        let tree = large_trees(&scratch).map_or(tree_b.clone(), |(base, _)| base);
        return signed_upload(g, home, &tree);
    }
    let node_modules = node_modules(&scratch);
    if std::env::args().any(|a| a == "--warm-only") {
        warm_path(g, home, "registry", &tree_b, &tree_c);
        warm_path_far(g, home, "registry", &tree_b, &tree_c);
        if let Some((base, bumped)) = large_trees(&scratch) {
            warm_path(g, home, "large", &base, &bumped);
        }
        cold_small_files(g, home, &node_modules);
        return;
    }

    let base_up = |name: &str, tree: &str| {
        bash_aws(
            g,
            home,
            &format!(
                "tar -C {tree} -cf - . | zstd -q -T0 -3 | aws --endpoint-url {e} s3 cp - s3://{bucket}/base/{name}.tar.zst"
            ),
        )
    };
    // Cold upload of A, then the bumps B and C, each after the one before.
    let base_up_a = base_up("a", &tree_a);
    let (cacher_up_a, line_a) = cacher_run(g, home, &["dir", "upload", "bench/a", &tree_a]);
    let base_up_b = base_up("b", &tree_b);
    let (cacher_up_b, line_b) = cacher_run(g, home, &["dir", "upload", "bench/b", &tree_b]);
    let base_up_c = base_up("c", &tree_c);
    let (cacher_up_c, line_c) = cacher_run(g, home, &["dir", "upload", "bench/c", &tree_c]);
    reset_out();
    std::fs::create_dir_all(&out).unwrap();
    let base_down = bash_aws(
        g,
        home,
        &format!(
            "aws --endpoint-url {e} s3 cp s3://{bucket}/base/b.tar.zst - | zstd -q -d | tar -C {out_s} -xf -"
        ),
    );
    reset_out();
    let (cacher_down, line_down) = cacher_run(g, home, &["dir", "download", "bench/b", &out_s]);
    let same = Command::new("diff")
        .args(["-r", "-q", &tree_b, &out_s])
        .status()
        .expect("diff")
        .success();
    assert!(same, "restored tree differs from B");
    reset_out();

    let base_bytes = |n: &str| stored_bytes(g, home, &format!("base/{n}.tar.zst"));
    let (base_a, base_b, base_c) = (base_bytes("a"), base_bytes("b"), base_bytes("c"));
    let cacher_bytes = stored_bytes(g, home, ".cacher/") + stored_bytes(g, home, "bench/");
    println!("cacher upload A: {line_a}");
    println!("cacher upload B: {line_b}");
    println!("cacher upload C: {line_c}");
    println!("cacher restore B: {line_down}");
    println!();
    table_header("tar+zstd+aws");
    time_row("cold upload A", base_up_a.secs, cacher_up_a.secs);
    time_row(
        "upload B (one-crate bump)",
        base_up_b.secs,
        cacher_up_b.secs,
    );
    sent_row("  bytes sent for B", base_b, &line_b);
    time_row("upload C (new deps)", base_up_c.secs, cacher_up_c.secs);
    sent_row("  bytes sent for C", base_c, &line_c);
    time_row("restore B", base_down.secs, cacher_down.secs);
    println!(
        "{:<28} {:>10.2}MiB {:>9.2}MiB {:>8.3}",
        "bytes stored A+B+C",
        mib(base_a + base_b + base_c),
        mib(cacher_bytes),
        cacher_bytes as f64 / (base_a + base_b + base_c) as f64
    );
    println!("{:<28} {:>10.2}MiB  (tar.zst of A alone)", "", mib(base_a));
    println!(
        "peak RSS MiB: cacher up A {:.0}, up B {:.0}, up C {:.0}, restore {:.0}; baseline pipeline up {:.0}, restore {:.0}",
        cacher_up_a.max_rss_mib,
        cacher_up_b.max_rss_mib,
        cacher_up_c.max_rss_mib,
        cacher_down.max_rss_mib,
        base_up_a.max_rss_mib,
        base_down.max_rss_mib
    );

    warm_path(g, home, "registry", &tree_b, &tree_c);
    warm_path_far(g, home, "registry", &tree_b, &tree_c);
    if let Some((base, bumped)) = large_trees(&scratch) {
        warm_path(g, home, "large", &base, &bumped);
    }
    cold_small_files(g, home, &node_modules);

    if restic_available() {
        let repo = format!("s3:{e}/{bucket}/restic");
        let restic = |args: &str| {
            let mut cmd = Command::new("bash");
            cmd.args([
                "-c",
                &format!(
                    "set -e; restic -q -r {repo} -o s3.region={} {args}",
                    g.region
                ),
            ])
            .env("RESTIC_PASSWORD", "bench")
            .env("AWS_ACCESS_KEY_ID", &g.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &g.secret)
            .env("AWS_DEFAULT_REGION", &g.region);
            cmd
        };
        let ok = restic("init")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            let up_a = measure(&mut restic(&format!("backup {tree_a}")));
            let up_b = measure(&mut restic(&format!("backup {tree_b}")));
            let down = measure(&mut restic(&format!("restore latest --target {out_s}")));
            println!(
                "restic (dedup anchor): cold upload A {:.2}s, upload B {:.2}s, restore B {:.2}s, stored {:.1} MiB",
                up_a.secs,
                up_b.secs,
                down.secs,
                mib(stored_bytes(g, home, "restic/"))
            );
        } else {
            println!("restic: could not init a repository on Garage; skipped");
        }
    } else {
        println!("restic: not installed; skipped");
    }
}
