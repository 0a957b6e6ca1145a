//! Scale benchmark: what an upload and gc cost when the prefix already holds many
//! chunks, as when a whole organisation shares one bucket and prefix.
//!
//! Each prefix is built synthetically from docs/format.md, as another tool could: tiny
//! packs (about 200 chunks each, as 8 MiB packs of 40 KiB compressed chunks hold),
//! index segments listing random chunk ids in them, and one manifest per 100 chunks.
//! Then, against the same Garage node and side by side with an empty prefix: the upload
//! of a small tree (50 files of 8 KiB), a cold upload of a larger tree, and `cacher gc`.
//! The cold uploads of a built prefix are paired with uploads of other fresh trees into
//! empty prefixes, the order alternating ([`COLD_ROUNDS`]).
//!
//! Run with `cargo bench --bench scale` (10^5 and 10^6 chunks, a 256 MiB cold tree);
//! `-- --chunks 100000,1000000,10000000 --cold-mib 1024` for the full table
//! (building 10^7 chunks takes several minutes and about 1 GB in Garage).
//!
//! `-- --files 1000000` measures a tree of that many small files instead (100 files of
//! 20 to 70 bytes per directory, as a node_modules holds): its cold upload, a warm
//! upload after five files changed, a restore into an empty directory and one in place
//! over the changed tree, each with its peak RSS. Peak RSS depends on the allocator:
//! `CACHER_BENCH_BIN=<static musl release build>` measures the binary users run.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cacher::chunk::Id;
use cacher::chunk::format::{ChunkRef, ChunkTable, Entry, EntryKind, Manifest, ManifestKind};
use cacher::chunk::store::{ChunkStore, MAX_SEGMENT_CHUNKS};
use cacher::store::Store;
use common::{Measure, Server, cacher, garage, measure, measure_against, median};
use futures::StreamExt;

/// Chunks a pack holds: 8 MiB of chunks averaging 40 KiB once compressed.
const CHUNKS_PER_PACK: usize = 200;
/// Chunks a synthetic manifest references: 10^7 chunks make 10^5 entries.
const CHUNKS_PER_ENTRY: usize = 100;
/// Uncompressed length recorded for each synthetic chunk.
const CHUNK_LEN: u32 = 64 * 1024;
/// Requests in flight while building a prefix.
const PUTS_IN_FLIGHT: usize = 64;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let arg = |name: &str| {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let sizes: Vec<usize> = arg("--chunks")
        .unwrap_or_else(|| "100000,1000000".into())
        .split(',')
        .map(|n| n.trim().parse().expect("--chunks N,N,..."))
        .collect();
    let cold_mib: usize = arg("--cold-mib").map_or(256, |n| n.parse().expect("--cold-mib N"));
    if let (Some(prefix), Some(chunks)) = (arg("--build-prefix"), arg("--build-chunks")) {
        return build_here(&prefix, chunks.parse().expect("--build-chunks N"));
    }

    let scratch = common::scratch();
    let g = garage();
    let work = tempfile::tempdir_in(&scratch).expect("work dir");
    let home = work.path();
    if let Some(files) = arg("--files") {
        return many_files(g, home, files.parse().expect("--files N"));
    }

    println!("small tree: 50 files of 8 KiB; cold tree: {cold_mib} MiB in 4 MiB files");
    println!(
        "{:>16} {:>12} {:>10} {:>10} {:>12} {:>14} {:>10} {:>10}",
        "chunks",
        "small up s",
        "vs empty",
        "RSS MiB",
        "cold up s",
        "vs empty",
        "RSS MiB",
        "gc s/RSS"
    );
    let empty = Row::measure(g, home, "scale-empty", "empty", cold_mib, false);
    empty.print("empty", None);
    for &chunks in &sizes {
        let prefix = format!("scale-{chunks}");
        let started = std::time::Instant::now();
        build_in_child(g, home, &prefix, chunks);
        eprintln!(
            "built {prefix}: {chunks} chunks, {} packs, {} entries in {:.0}s",
            chunks.div_ceil(CHUNKS_PER_PACK),
            chunks / CHUNKS_PER_ENTRY,
            started.elapsed().as_secs_f64()
        );
        // A tree uploaded before gc, uploaded again after: it must send nothing.
        let probe = make_tree(&home.join("probe"), 20, 64 * 1024, chunks as u64);
        let probe_upload = |key: &str| {
            // No tree state: the chunks are cut and looked up in the index.
            let _ = std::fs::remove_dir_all(home.join(".local/state"));
            let (_, stats) = common::cacher_json(
                g,
                home,
                &[
                    "dir",
                    "upload",
                    key,
                    probe.to_str().unwrap(),
                    "--prefix",
                    &prefix,
                ],
            );
            stats["chunks_new"].as_u64().expect("chunks_new")
        };
        assert!(probe_upload("probe-1") > 0);
        let before = Row::measure(g, home, &prefix, "before", cold_mib, true);
        let gc = measure(
            cacher(g, home, &["gc"])
                .env("CACHER_PREFIX", &prefix)
                .stderr(std::process::Stdio::null()),
        );
        before.print(&format!("{chunks} no gc"), Some((&empty, gc)));
        let after = Row::measure(g, home, &prefix, "after", cold_mib, true);
        after.print(&format!("{chunks} gc'd"), Some((&empty, gc)));
        for (name, known) in before.known(g, home, &prefix, cold_mib) {
            println!(
                "{:>16} {:>12} {:>10} {:>10} {:>12.2} {:>14} {:>10.0}",
                format!("{chunks} {name}"),
                "",
                "",
                "",
                known.secs,
                format!("{:+.2}s", known.secs - empty.cold.secs),
                known.max_rss_mib,
            );
        }
        let resent = probe_upload("probe-2");
        assert_eq!(resent, 0, "after gc, a tree the prefix holds sends nothing");
    }
    println!(
        "(gc s/RSS: the gc run between the two rows; after it, a tree uploaded before sent 0 chunks;"
    );
    println!(
        "known: the cold tree of the row before gc uploaded again after it, without a tree state;"
    );
    println!(
        "cold up s: mean of {COLD_ROUNDS} fresh trees, each round with another fresh tree uploaded into an empty prefix, the order alternating; vs empty compares the means)"
    );
}

/// Builds a prefix in a child process (this benchmark run with `--build-prefix`): a
/// child's peak RSS starts from its parent's, so the parent must stay small for the
/// figures of the cacher runs it measures to mean anything.
fn build_in_child(g: &Server, home: &Path, prefix: &str, chunks: usize) {
    let status = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args([
            "--build-prefix",
            prefix,
            "--build-chunks",
            &chunks.to_string(),
        ])
        .env("HOME", home)
        .env("CACHER_ENDPOINT", &g.endpoint)
        .env("CACHER_BUCKET", &g.bucket)
        .env("CACHER_REGION", &g.region)
        .env("CACHER_S3_KEY_ID", &g.key_id)
        .env("CACHER_S3_SECRET", &g.secret)
        .status()
        .expect("run the prefix builder");
    assert!(status.success(), "building {prefix} failed");
}

/// The child's side of [`build_in_child`].
fn build_here(prefix: &str, chunks: usize) {
    let (store, config) = open_store();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(build_prefix(store, &config, prefix, chunks));
}

/// The store to build prefixes in, through cacher's own S3 client, from the settings
/// [`build_in_child`] passes.
fn open_store() -> (Arc<dyn Store>, cacher::config::Config) {
    let home = PathBuf::from(std::env::var("HOME").expect("HOME"));
    let env = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} unset"));
    let key_file = home.join("key");
    let secret_file = home.join("secret");
    std::fs::write(&key_file, env("CACHER_S3_KEY_ID")).unwrap();
    std::fs::write(&secret_file, env("CACHER_S3_SECRET")).unwrap();
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(home.join("none.toml"), "").unwrap();
    let args = cacher::cli::GlobalArgs {
        config: Some(home.join("none.toml").display().to_string()),
        endpoint: Some(env("CACHER_ENDPOINT")),
        region: Some(env("CACHER_REGION")),
        bucket: Some(env("CACHER_BUCKET")),
        key_file: Some(key_file.display().to_string()),
        secret_file: Some(secret_file.display().to_string()),
        ..Default::default()
    };
    let config = cacher::config::Config::resolve(&args).expect("config");
    let store = cacher::store::s3::S3Store::new(&config).expect("store");
    (Arc::new(store), config)
}

fn random_id(rng: &mut fastrand::Rng) -> Id {
    let mut id = [0u8; 32];
    rng.fill(&mut id);
    Id(id)
}

/// Writes `chunks` chunks into `prefix` as an upload would have left them: packs,
/// index segments of at most [`MAX_SEGMENT_CHUNKS`], one manifest per
/// [`CHUNKS_PER_ENTRY`] chunks (a file of their length).
async fn build_prefix(
    store: Arc<dyn Store>,
    config: &cacher::config::Config,
    prefix: &str,
    chunks: usize,
) {
    let transfer = cacher::transfer::Transfer::new(store.clone(), config);
    let chunk_store = ChunkStore::new(Arc::new(transfer), prefix);
    let mut rng = fastrand::Rng::with_seed(chunks as u64);
    let packs: Vec<(Id, Vec<u8>)> = (0..chunks.div_ceil(CHUNKS_PER_PACK))
        .map(|_| {
            let mut bytes = vec![0u8; 64];
            rng.fill(&mut bytes);
            (Id::of(&bytes), bytes)
        })
        .collect();
    let pack_keys: Vec<(String, Vec<u8>)> = packs
        .iter()
        .map(|(id, bytes)| (chunk_store.pack_key(id), bytes.clone()))
        .collect();
    put_all(&store, pack_keys).await;

    let mut manifests = Vec::new();
    for first in (0..chunks).step_by(MAX_SEGMENT_CHUNKS) {
        let count = MAX_SEGMENT_CHUNKS.min(chunks - first);
        let segment = ChunkTable {
            packs: packs.iter().map(|(id, _)| *id).collect(),
            chunks: (first..first + count)
                .map(|i| ChunkRef {
                    id: random_id(&mut rng),
                    pack: (i / CHUNKS_PER_PACK) as u32,
                    offset: 0,
                    stored_len: 32,
                    len: CHUNK_LEN,
                })
                .collect(),
        };
        for (n, refs) in segment.chunks.chunks(CHUNKS_PER_ENTRY).enumerate() {
            let mut used: Vec<u32> = refs.iter().map(|c| c.pack).collect();
            used.dedup();
            let table = ChunkTable {
                packs: used.iter().map(|&p| packs[p as usize].0).collect(),
                chunks: refs
                    .iter()
                    .map(|c| ChunkRef {
                        pack: used.iter().position(|&p| p == c.pack).unwrap() as u32,
                        ..*c
                    })
                    .collect(),
            };
            let stream_len = u64::from(CHUNK_LEN) * refs.len() as u64;
            let manifest = Manifest {
                kind: ManifestKind::Dir,
                created: 0,
                label: "synthetic".into(),
                stream_len,
                table,
                entries: vec![Entry {
                    path: b"f".to_vec(),
                    kind: EntryKind::File { size: stream_len },
                    mode: 0o644,
                    mtime: 0,
                    mtime_nsec: 0,
                }],
            };
            let key = format!("{prefix}/entries/{:08}", first / CHUNKS_PER_ENTRY + n);
            manifests.push((key, manifest.encode()));
        }
        chunk_store
            .write_index(&segment, MAX_SEGMENT_CHUNKS)
            .await
            .expect("segment");
    }
    put_all(&store, manifests).await;
}

async fn put_all(store: &Arc<dyn Store>, objects: Vec<(String, Vec<u8>)>) {
    futures::stream::iter(objects)
        .map(|(key, bytes)| {
            let store = store.clone();
            async move {
                let body = cacher::store::Body::Bytes(bytes.into());
                store.put(&key, body, &Default::default()).await
            }
        })
        .buffer_unordered(PUTS_IN_FLIGHT)
        .for_each(|put| async move { put.expect("put") })
        .await;
}

/// A tree of `files` files of `size` random bytes, different for every `seed`.
fn make_tree(dir: &Path, files: usize, size: usize, seed: u64) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; size];
    for i in 0..files {
        rng.fill(&mut data);
        std::fs::write(dir.join(format!("f{i:04}")), &data).unwrap();
    }
    dir.to_path_buf()
}

/// Uploads `tree` into `prefix` under `key` with an empty state directory (so no file
/// is skipped as unchanged), once the server is idle: Garage works for seconds after a
/// build or a gc, which must not be billed to the upload.
fn upload_stateless(g: &Server, home: &Path, prefix: &str, tree: &Path, key: &str) -> Measure {
    upload_stateless_with(cacher(g, home, &[]), g, home, prefix, tree, key)
}

/// [`upload_stateless`] through `command` (`cacher` without arguments yet).
fn upload_stateless_with(
    mut command: std::process::Command,
    g: &Server,
    home: &Path,
    prefix: &str,
    tree: &Path,
    key: &str,
) -> Measure {
    let state = tempfile::tempdir_in(home).unwrap();
    measure_against(
        command
            .args(["dir", "upload", key, tree.to_str().unwrap()])
            .env("CACHER_PREFIX", prefix)
            .env("CACHER_STATE_DIR", state.path())
            .stderr(std::process::Stdio::null()),
        g,
    )
}

/// Cold uploads in a row of a built prefix, in rounds: a fresh tree uploaded into this
/// prefix, another into an empty one, the order alternating, and the mean times
/// compared. A single upload against the empty row's, minutes earlier, mixed in
/// whatever Garage was doing then. One tree for both would not do: Garage stores a
/// block once, so the second copy's upload wrote nothing and ran 0.7-1.8 s faster.
/// Each round stores twice the tree: `CACHER_BENCH_SCRATCH` puts Garage on a disk.
const COLD_ROUNDS: usize = 4;

/// One prefix's figures.
struct Row {
    small: Measure,
    /// The cold uploads into this prefix: the median run, with the highest peak RSS.
    cold: Measure,
    /// Every paired round's times: (into this prefix, into an empty one).
    cold_rounds: Vec<(f64, f64)>,
    /// What made the last cold tree: [`Row::known`] uploads the same bytes again.
    cold_seed: u64,
}

impl Row {
    /// Uploads into `prefix`: a fresh small tree three times (the median counts), and
    /// cold trees, [`COLD_ROUNDS`] of them `paired` with empty prefixes, else one.
    /// Fresh trees each time, so nothing is already stored.
    fn measure(
        g: &Server,
        home: &Path,
        prefix: &str,
        tag: &str,
        cold_mib: usize,
        paired: bool,
    ) -> Row {
        let upload = |tree: &Path, key: &str| upload_stateless(g, home, prefix, tree, key);
        let small = median(
            (0..3)
                .map(|i| {
                    let seed = fastrand::u64(..);
                    let tree = make_tree(&home.join("small"), 50, 8 * 1024, seed);
                    upload(&tree, &format!("small-{tag}-{i}"))
                })
                .collect(),
        );
        let (mut cold, mut cold_empty, mut cold_seed) = (Vec::new(), Vec::<Measure>::new(), 0);
        for round in 0..if paired { COLD_ROUNDS } else { 1 } {
            let key = format!("cold-{tag}-{round}");
            let into_empty = || {
                let tree = make_tree(&home.join("cold"), cold_mib / 4, 4 << 20, fastrand::u64(..));
                let empty = format!("scale-pair-{tag}-{round}");
                let took = upload_stateless(g, home, &empty, &tree, &key);
                let _ = std::fs::remove_dir_all(&tree);
                took
            };
            if paired && round % 2 == 0 {
                cold_empty.push(into_empty());
            }
            cold_seed = fastrand::u64(..);
            let tree = make_tree(&home.join("cold"), cold_mib / 4, 4 << 20, cold_seed);
            cold.push(upload(&tree, &key));
            let _ = std::fs::remove_dir_all(&tree);
            if paired && round % 2 == 1 {
                cold_empty.push(into_empty());
            }
        }
        let cold_rounds = match paired {
            true => cold
                .iter()
                .zip(&cold_empty)
                .map(|(c, e)| (c.secs, e.secs))
                .collect(),
            false => Vec::new(),
        };
        Row {
            small,
            cold_rounds,
            cold: median(cold),
            cold_seed,
        }
    }

    /// Uploads this row's cold tree again, without a tree state: every chunk is known
    /// to the prefix. After gc its chunks are spread over every segment's id range, the
    /// most segments an upload can need. With `$CACHER_BENCH_BASELINE_BIN`, that binary
    /// uploads it too, right after.
    fn known(
        &self,
        g: &Server,
        home: &Path,
        prefix: &str,
        cold_mib: usize,
    ) -> Vec<(String, Measure)> {
        let tree = make_tree(&home.join("cold"), cold_mib / 4, 4 << 20, self.cold_seed);
        let mut runs = vec![(
            "known".to_string(),
            upload_stateless(g, home, prefix, &tree, "known-again"),
        )];
        if let Some(bin) = std::env::var_os("CACHER_BENCH_BASELINE_BIN") {
            let command = common::cacher_at(&bin, g, home, &[]);
            let baseline = upload_stateless_with(command, g, home, prefix, &tree, "known-base");
            runs.push(("known, baseline".to_string(), baseline));
        }
        let _ = std::fs::remove_dir_all(&tree);
        runs
    }

    /// The cold upload's time: the mean of the paired rounds, else the one run.
    fn cold_secs(&self) -> f64 {
        match self.cold_rounds.len() {
            0 => self.cold.secs,
            n => self.cold_rounds.iter().map(|(c, _)| c).sum::<f64>() / n as f64,
        }
    }

    fn print(&self, name: &str, against: Option<(&Row, Measure)>) {
        let vs = |mine: f64, theirs: Option<f64>| {
            theirs.map_or("".to_string(), |t| format!("{:+.2}s", mine - t))
        };
        let empty = against.map(|(row, _)| row);
        let gc = against.map_or(String::new(), |(_, gc)| {
            format!("{:.1}/{:.0}", gc.secs, gc.max_rss_mib)
        });
        println!(
            "{name:>16} {:>12.2} {:>10} {:>10.0} {:>12.2} {:>14} {:>10.0} {:>10}",
            self.small.secs,
            vs(self.small.secs, empty.map(|r| r.small.secs)),
            self.small.max_rss_mib,
            self.cold_secs(),
            match self.cold_rounds.is_empty() {
                true => vs(self.cold.secs, empty.map(|r| r.cold.secs)),
                false => {
                    let (mine, theirs): (Vec<f64>, Vec<f64>) =
                        self.cold_rounds.iter().copied().unzip();
                    let (mine, theirs) = (mine.iter().sum::<f64>(), theirs.iter().sum::<f64>());
                    let n = self.cold_rounds.len() as f64;
                    format!(
                        "{:+.2}s {:+.0}%",
                        (mine - theirs) / n,
                        100.0 * (mine / theirs - 1.0)
                    )
                }
            },
            self.cold.max_rss_mib,
            gc,
        );
        if !self.cold_rounds.is_empty() {
            let rounds: Vec<String> = (self.cold_rounds.iter())
                .map(|(c, e)| format!("{c:.2}/{e:.2}"))
                .collect();
            println!(
                "{:>16} cold rounds, this prefix/empty: {}",
                "",
                rounds.join(", ")
            );
        }
    }
}

/// The `--files` table: one tree of `files` small files, uploaded and restored.
fn many_files(g: &Server, home: &Path, files: usize) {
    let tree = home.join("tree");
    let per_dir = 100;
    for d in 0..files.div_ceil(per_dir) {
        let dir = tree
            .join(format!("pkg{:04}/lib", d / 100))
            .join(format!("m{d:06}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..per_dir.min(files - d * per_dir) {
            let body = format!(
                "module.exports = {{ d: {d}, f: {f} }};{}\n",
                "/".repeat(f % 50)
            );
            std::fs::write(dir.join(format!("index{f:03}.js")), body).unwrap();
        }
    }
    let tree_arg = tree.to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        measure_against(
            cacher(g, home, args)
                .env("CACHER_PREFIX", "files")
                .stderr(std::process::Stdio::null()),
            g,
        )
    };
    let out = home.join("out");
    let out_arg = out.to_str().unwrap().to_string();
    let cold = run(&["dir", "upload", "cold", &tree_arg]);
    let restore = run(&["dir", "download", "cold", &out_arg]);
    for d in 0..5 {
        let file = out.join(format!("pkg0000/lib/m{d:06}/index001.js"));
        let mut body = std::fs::read(&file).unwrap();
        body.extend_from_slice(b"// changed\n");
        std::fs::write(&file, body).unwrap();
    }
    let warm = run(&["dir", "upload", "bumped", &out_arg]);
    let in_place = run(&["dir", "download", "cold", &out_arg]);
    println!("{files} files of 20 to 70 bytes, {per_dir} per directory");
    println!("{:>32} {:>8} {:>9}", "", "s", "RSS MiB");
    for (name, m) in [
        ("upload, no tree state", cold),
        ("restore into an empty dir", restore),
        ("upload after 5 files changed", warm),
        ("restore over the changed tree", in_place),
    ] {
        println!("{name:>32} {:>8.2} {:>9.0}", m.secs, m.max_rss_mib);
    }
}
