//! `cacher dir upload|download|exists`: directory trees on the chunk store.
//!
//! `download` prints the key it restored on stdout (the requested key, or the fallback
//! entry it chose), so a script can tell an exact hit from a fallback hit.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{Context, bail};
use futures::StreamExt;
use rayon::prelude::*;

use super::{Outcome, WriteMode, heal};
use crate::archive::{self, ScannedFile, Tree};
use crate::chunk::Id;
use crate::chunk::format::{Entry, EntryKind, Manifest, ManifestKind};
use crate::chunk::gc::mark_used;
use crate::chunk::paths;
use crate::chunk::store::{
    ChunkStore, IndexReading, Indexing, Known, Landing, Location, Piece, Sent, Stats, Stored,
    download_stats_line, is_broken, now_secs, seal, table_of, upload_stats_line,
};
use crate::cli::{DirCommand, DirDownloadArgs, DirUploadArgs, input_error};
use crate::config::Config;
use crate::exclude::Exclude;
use crate::key::{full_key, has_arch_suffix, join_prefix};
use crate::restore::Restorer;
use crate::state::{self, TreeState};
use crate::task::OwnedTask;
use crate::transfer::Transfer;
use crate::tree_stream::{ReadReport, StaleState, cut_tree};
use crate::ui;
use crate::update::{self, TreeUpdate};

pub async fn run(config: &Config, cmd: &DirCommand) -> anyhow::Result<Outcome> {
    crate::memory::map_large_tables();
    match cmd {
        DirCommand::Upload(args) => upload(config, args).await,
        DirCommand::Download(args) => download(config, args).await,
        DirCommand::Exists(args) => super::exists::run(config, &args.key).await,
    }
}

/// The chunk store under the configured prefix.
pub(super) async fn chunk_store(config: &Config) -> anyhow::Result<ChunkStore> {
    let transfer = Arc::new(Transfer::open(config).await?);
    Ok(ChunkStore::new(transfer, &config.prefix.value))
}

/// The chunk store to upload `key` into, whether the upload creates the key or
/// replaces it, and the index of the prefix being read meanwhile; or `None` when `key`
/// is cached and may stay (see [`upload_mode`]).
pub(super) async fn chunk_store_for_upload(
    config: &Config,
    key: &str,
    force: bool,
    command: &str,
) -> anyhow::Result<Option<(ChunkStore, WriteMode, IndexReading)>> {
    let chunks = chunk_store(config).await?;
    let index = chunks.start_reading_index();
    let Some(mode) = upload_mode(&chunks, key, force, command).await? else {
        return Ok(None); // dropping `index` stops the read
    };
    Ok(Some((chunks, mode, index)))
}

/// Whether an upload of `key` creates it or replaces it; `None` when it is cached and
/// `force` is off (said as `command` would say it). An entry that cannot be restored
/// (its manifest does not decode, or a pack it references is gone) does not count as
/// cached: it is replaced, and the user is told; so is an entry the configured trust
/// refuses, when this upload signs.
async fn upload_mode(
    chunks: &ChunkStore,
    key: &str,
    force: bool,
    command: &str,
) -> anyhow::Result<Option<WriteMode>> {
    if force {
        return Ok(Some(WriteMode::Replace));
    }
    // One GET answers both whether the key is there and what it holds: on a hit, a
    // HEAD before it was a round trip more.
    let unrestorable = match chunks.fetch(key).await {
        Ok(None) => return Ok(Some(WriteMode::Create)),
        Ok(Some(Stored::Manifest(m))) => match Exclude::new(&m.exclusions()) {
            Err(why) => Some(why),
            Ok(_) => missing_pack(chunks, &m.table.packs).await?,
        },
        Ok(_) => None,
        Err(e) if is_broken(&e) => Some(format!("{e:#}")),
        Err(e) if crate::sign::is_untrusted(&e) && chunks.transfer().trust().can_sign() => {
            super::say_replacing(&e);
            return Ok(Some(WriteMode::Replace));
        }
        Err(e) if crate::sign::is_untrusted(&e) => None,
        Err(e) => return Err(e),
    };
    if let Some(why) = unrestorable {
        ui::status(format!("{key} cannot be restored ({why}); replacing it"));
        return Ok(Some(WriteMode::Replace));
    }
    super::say_skipped(key, command);
    Ok(None)
}

/// A pack of `wanted` that is gone from the bucket, said as a reason. A few packs are
/// looked up one HEAD each, all at once (where the bucket is far, one after another
/// took a round trip each: most of a skipped upload); many, through the listing of all
/// packs (fewer requests), each pack absent from it looked up once more, as another
/// job may have written it since.
async fn missing_pack(
    chunks: &ChunkStore,
    wanted: &[crate::chunk::Id],
) -> anyhow::Result<Option<String>> {
    let suspects: Vec<crate::chunk::Id> = if wanted.len() <= SKIP_CHECK_HEADS {
        wanted.to_vec()
    } else {
        let listed = chunks.list_packs().await?;
        wanted
            .iter()
            .filter(|p| !listed.contains_key(p))
            .copied()
            .collect()
    };
    let mut heads = futures::stream::iter(suspects)
        .map(|pack| async move {
            Ok::<_, crate::store::StoreError>((pack, chunks.pack_info(&pack).await?))
        })
        .buffer_unordered(SKIP_CHECK_HEADS);
    while let Some(found) = heads.next().await {
        if let (pack, None) = found? {
            return Ok(Some(format!("pack {pack} is missing from the bucket")));
        }
    }
    Ok(None)
}

/// How far ahead of the store's clock a runner's may be for `--fallback` to order
/// candidates by when they were made (see [`restore_fallback`]).
const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(600);

/// Packs of an existing entry the skip check looks up one HEAD each; beyond, it lists.
const SKIP_CHECK_HEADS: usize = 16;

async fn upload(config: &Config, args: &DirUploadArgs) -> anyhow::Result<Outcome> {
    let key = full_key(config, &args.key)?;
    if args.dirs.len() > paths::MAX_PATHS {
        return Err(input_error(format!(
            "{} paths; one entry holds at most {}",
            args.dirs.len(),
            paths::MAX_PATHS
        )));
    }
    // A path that is not there is the job's mistake, not the cache's (--on-error).
    let mut canonical: Vec<(PathBuf, &PathBuf)> = Vec::with_capacity(args.dirs.len());
    for dir in &args.dirs {
        let is_file = || std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_file());
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) if is_file() => {}
            Ok(_) => {
                let what = "is not a directory or a regular file (not a symlink)";
                return Err(input_error(format!("{} {what}", dir.display())));
            }
            Err(e) => return Err(input_error(format!("cannot read {}: {e}", dir.display()))),
        }
        // The label lists the paths one per line.
        if dir.as_os_str().as_bytes().contains(&b'\n') {
            return Err(input_error(format!(
                "{} has a newline in its name",
                dir.display()
            )));
        }
        let real = dir
            .canonicalize()
            .map_err(|e| input_error(format!("{}: {e}", dir.display())))?;
        if let Some((_, other)) = canonical
            .iter()
            .find(|(seen, _)| real.starts_with(seen) || seen.starts_with(&real))
        {
            return Err(input_error(format!(
                "{} and {} overlap: give each path once, none inside another",
                other.display(),
                dir.display()
            )));
        }
        canonical.push((real, dir));
    }
    let exclude = Arc::new(Exclude::new(&args.exclude).map_err(input_error)?);
    // The label holds the paths and the patterns, each after a separator but the
    // first, within what readers accept.
    let label_len: usize = args
        .dirs
        .iter()
        .map(|d| archive::source_label(d).len())
        .chain(args.exclude.iter().map(|p| p.len()))
        .map(|len| len + 1)
        .sum::<usize>()
        - 1;
    if label_len > crate::chunk::format::MAX_PATH {
        return Err(input_error(format!(
            "the paths and --exclude patterns take {label_len} bytes; one entry's take at most {}",
            crate::chunk::format::MAX_PATH
        )));
    }
    let started = Instant::now();
    // Stamps taken after this moment may be recorded (see `state::record`).
    let taken = SystemTime::now();
    // The trees are scanned and their states read while the bucket is asked whether the
    // key is cached and what it holds: on a warm tree the scan is most of the upload.
    // On threads of their own, so a skipped upload does not wait for them.
    let (scanning, loading): (Vec<_>, Vec<_>) = args
        .dirs
        .iter()
        .map(|dir| {
            let (scan_dir, state_dir, exclude) = (dir.clone(), dir.clone(), exclude.clone());
            let scanning = on_thread(move || archive::scan_path(&scan_dir, &exclude));
            let loading = on_thread(move || TreeState::load(&state_dir));
            ((dir, scanning), loading)
        })
        .unzip();
    let chunks = chunk_store(config).await?;
    // What the bucket holds is read beside the look at the key: where the bucket is
    // far, each is a few round trips.
    let index = chunks.start_reading_index();
    // Stopped when dropped: a skipped or failed upload needs neither.
    let knowing = OwnedTask::spawn({
        let chunks = chunks.clone();
        async move {
            let mut states = Vec::with_capacity(loading.len());
            for state in loading {
                states.push(state.await?);
            }
            // The entries the trees came from hold most of what they reuse.
            let likely: Vec<&crate::chunk::format::ChunkTable> =
                states.iter().flatten().map(|s| &s.table).collect();
            let known = chunks.known(&likely, index).await?;
            anyhow::Ok((states, known))
        }
    });
    let Some(mode) = upload_mode(&chunks, &key, args.force, "dir upload").await? else {
        return Ok(Outcome::Success);
    };
    let (states, known) = knowing.await??;
    let known = Arc::new(known);
    let mut trees = Vec::with_capacity(scanning.len());
    for ((dir, scanning), state) in scanning.into_iter().zip(states) {
        trees.push((dir, Arc::new(scanning.await??), state));
    }
    for pattern in exclude.unused() {
        ui::warn(format!(
            "--exclude '{pattern}' matched nothing in {} (patterns are relative to each DIR)",
            source_labels(&args.dirs).replace('\n', ", ")
        ));
    }
    let total = trees
        .iter()
        .flat_map(|(_, tree, _)| &tree.files)
        .map(|f| f.size())
        .sum();
    let progress = Arc::new(ui::Progress::new(format!("uploading {key}"), total));
    let mut parts = Vec::with_capacity(trees.len());
    // The packs of one path land while the next is cut, the last one's while the
    // manifest is sealed: one path's packs at a time, as `jobs` says (its index
    // segments, a few requests, may still be on their way).
    let mut landing: Option<(&PathBuf, Landing)> = None;
    let mut landed = 0;
    let mut indexing = Vec::with_capacity(trees.len());
    let last = trees.len() - 1;
    for (i, (dir, tree, state)) in trees.into_iter().enumerate() {
        if let Some((dir, previous)) = landing.take() {
            let (bytes, index) = land(previous, dir, &key, &progress).await?;
            landed += bytes;
            indexing.push(index);
        }
        let sent = send_with_retry(&chunks, &tree, state, &known, &progress).await;
        let (sent, read, next) = sent
            .inspect_err(|_| progress.clear())
            .with_context(|| format!("upload of {} to {key} failed", dir.display()))?;
        landing = Some((dir, next));
        if i < last {
            // Its packs land before the next path is cut, which may reuse them.
            known.learn(&sent.table);
        }
        // The cutter is done with the tree (its batches ended), so this moves it.
        let Tree {
            entries,
            files,
            single_file,
            ..
        } = Arc::unwrap_or_clone(tree);
        parts.push(SentPart {
            file: single_file,
            dir: dir.clone(),
            entries,
            files,
            sent,
            read,
        });
    }
    let failed = |e: anyhow::Error| e.context(format!("upload to {key} failed"));
    let (mut manifest, sent, reads) = entry_of(parts)?;
    manifest.add_exclusions(exclude.patterns());
    // Sealed while the last packs are on their way, published once they are in.
    let (sealed, manifest) = seal(manifest, sent, &key).map_err(failed)?;
    let file_count = reads.iter().map(|(_, files, _)| files.len()).sum();
    let mut read_stats = Stats::default();
    for (_, _, read) in &reads {
        read_stats.unchanged_files += read.unchanged_files;
        read_stats.unchanged_bytes += read.unchanged_bytes;
        read_stats.disk_bytes += read.bytes_read;
        read_stats.checked_bytes += read.checked_bytes;
    }
    // The tree states are encoded while the last packs and the manifest are written,
    // and written once the manifest is.
    let recorded_key = key.clone();
    let records =
        tokio::task::spawn_blocking(move || prepare_states(manifest, reads, &recorded_key, taken));
    if let Some((dir, last)) = landing {
        let (bytes, index) = land(last, dir, &key, &progress).await?;
        landed += bytes;
        indexing.push(index);
    }
    let (published, indexed) = tokio::join!(
        chunks.put_sealed(sealed, &key, mode == WriteMode::Create),
        futures::future::join_all(indexing.into_iter().map(Indexing::wait))
    );
    landed += indexed.iter().sum::<u64>();
    progress.clear();
    let Some(mut stats) = published.map_err(failed)? else {
        super::say_concurrent(&key, "dir upload");
        return Ok(Outcome::Success);
    };
    // The segments' retries too, which went on beside the manifest's.
    stats.retries = chunks.transfer().retries();
    for record in records.await?? {
        record.write();
    }
    stats.wire_bytes += landed;
    stats.add(&read_stats);
    ui::status(upload_stats_line(
        &key,
        Some(file_count),
        &stats,
        started.elapsed(),
    ));
    report("dir upload", &key, "uploaded", None, Some(&stats));
    Ok(Outcome::Success)
}

/// Waits for the packs of `dir`'s part of the upload to `key`; the bytes they took,
/// and its index segments still on their way.
async fn land(
    landing: Landing,
    dir: &Path,
    key: &str,
    progress: &ui::Progress,
) -> anyhow::Result<(u64, Indexing)> {
    landing
        .wait()
        .await
        .inspect_err(|_| progress.clear())
        .with_context(|| format!("upload of {} to {key} failed", dir.display()))
}

/// One path of an upload once its chunks are sent.
struct SentPart {
    dir: PathBuf,
    /// A single file (scanned as a tree of itself), not a directory.
    file: bool,
    entries: Vec<Entry>,
    files: Vec<ScannedFile>,
    sent: Sent,
    read: ReadReport,
}

/// The manifest to publish for `parts` (one directory: an ordinary one; several
/// paths: [`paths::combine`]), what was sent for it, and per path what the tree
/// states need.
#[allow(clippy::type_complexity)]
fn entry_of(
    mut parts: Vec<SentPart>,
) -> anyhow::Result<(Manifest, Sent, Vec<(PathBuf, Vec<ScannedFile>, ReadReport)>)> {
    if let [only] = &parts[..]
        && !only.file
    {
        let SentPart {
            dir,
            entries,
            files,
            sent,
            read,
            ..
        } = parts.pop().expect("one part");
        let manifest = Manifest {
            kind: ManifestKind::Dir,
            created: now_secs(),
            label: archive::source_label(&dir),
            stream_len: 0,
            table: Default::default(),
            entries,
        };
        return Ok((manifest, sent, vec![(dir, files, read)]));
    }
    let mut stats = Stats::default();
    let mut sub = Vec::with_capacity(parts.len());
    let mut reads = Vec::with_capacity(parts.len());
    for part in parts {
        stats.add(&part.sent.stats);
        // A file is scanned as a tree of itself: its one entry is the path's.
        let entries = part.entries;
        let root = match (part.file, entries.first()) {
            (true, Some(only)) => only.clone(),
            _ => archive::root_entry(&part.dir)?,
        };
        sub.push(paths::Part {
            label: archive::source_label(&part.dir),
            root,
            manifest: Manifest {
                kind: ManifestKind::Dir,
                created: 0,
                label: String::new(),
                stream_len: part.sent.stats.stream_bytes,
                table: part.sent.table,
                entries,
            },
        });
        reads.push((part.dir, part.files, part.read));
    }
    let mut manifest = paths::combine(&sub, now_secs());
    let table = std::mem::take(&mut manifest.table);
    Ok((manifest, Sent { stats, table }, reads))
}

/// The tree state of each directory uploaded as (part of) `manifest`; files get none.
fn prepare_states(
    manifest: Manifest,
    reads: Vec<(PathBuf, Vec<ScannedFile>, ReadReport)>,
    key: &str,
    taken: SystemTime,
) -> anyhow::Result<Vec<state::Record>> {
    let manifests = match manifest.kind {
        ManifestKind::Paths => paths::split(key, &manifest)?
            .into_iter()
            .map(|p| (!p.is_file()).then_some(p.manifest))
            .collect(),
        _ => vec![Some(manifest)],
    };
    let mut records = Vec::new();
    for ((dir, files, read), manifest) in reads.into_iter().zip(manifests) {
        let (Some(manifest), Ok(canonical)) = (manifest, dir.canonicalize()) else {
            continue;
        };
        let stamps = files
            .into_iter()
            .zip(&read.trusted)
            .map(|(f, trusted)| trusted.then_some(f.stamp))
            .collect();
        records.extend(state::Record::prepare(
            &canonical, key, &manifest, stamps, taken,
        ));
    }
    Ok(records)
}

/// [`send_tree`], once more without `state` when a file the state vouched for turned
/// out changed while it was read.
async fn send_with_retry(
    chunks: &ChunkStore,
    tree: &Arc<Tree>,
    state: Option<TreeState>,
    known: &Arc<Known>,
    progress: &Arc<ui::Progress>,
) -> anyhow::Result<(Sent, ReadReport, Landing)> {
    let sent = send_tree(chunks, tree, state.as_ref(), known, progress).await;
    match &sent {
        Err(e) if e.downcast_ref::<StaleState>().is_some() => {
            ui::verbose(e.to_string());
            drop(state);
            progress.reset();
            send_tree(chunks, tree, None, known, progress).await
        }
        _ => sent,
    }
}

/// Runs `f` on a thread of its own (not tokio's blocking pool, which the runtime waits
/// for on exit); its result arrives through the receiver.
fn on_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::sync::oneshot::Receiver<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// Cuts the files of a scanned tree and starts sending the chunks the bucket lacks,
/// reading only what `state` cannot vouch for: what was sent, what was read, and the
/// packs still on their way.
async fn send_tree(
    chunks: &ChunkStore,
    tree: &Arc<Tree>,
    state: Option<&TreeState>,
    known: &Arc<Known>,
    progress: &Arc<ui::Progress>,
) -> anyhow::Result<(Sent, ReadReport, Landing)> {
    let (pieces, report) = cut_tree(tree.clone(), state, known.clone(), progress.clone());
    let (sent, landing) = chunks.start_sending(pieces, known.clone()).await?;
    let report = report.lock().expect("report lock").clone();
    Ok((sent, report, landing))
}

/// The `--json` record of a chunked transfer (docs/json.md).
pub(super) fn report(
    command: &str,
    key: &str,
    result: &str,
    restored: Option<&str>,
    stats: Option<&crate::chunk::store::Stats>,
) {
    if ui::json_enabled() {
        ui::json(serde_json::json!({
            "command": command, "key": key, "result": result, "restored": restored, "stats": stats,
        }));
    }
}

async fn download(config: &Config, args: &DirDownloadArgs) -> anyhow::Result<Outcome> {
    let key = full_key(config, &args.key)?;
    let chunks = chunk_store(config).await?;
    let started = Instant::now();
    let early = match &args.dirs[..] {
        [dir] => EarlySurvey::start(dir),
        _ => EarlySurvey::none(),
    };
    let mut restored = None;
    if let Some((info, stored)) = heal(&key, chunks.fetch_with_info(&key).await)?.flatten() {
        match &stored {
            Stored::Plain(_) => {
                bail!("{key} is a plain file, not a directory entry (use `cacher download`)")
            }
            Stored::Manifest(m) if m.kind == ManifestKind::Docker => {
                bail!("{key} holds a docker image, not a directory tree")
            }
            _ => {}
        }
        if let Some(stats) = heal(
            &key,
            restore(&chunks, &key, stored, args, &early, started).await,
        )? {
            mark_used(chunks.transfer(), chunks.layout(), &info).await;
            restored = Some((key.clone(), stats));
        }
    }
    if restored.is_none() {
        restored = restore_fallback(config, &chunks, args, &early, started).await?;
    }
    let Some((restored_key, stats)) = restored else {
        ui::status(format!("{key} is not cached"));
        report("dir download", &key, "miss", None, None);
        return Ok(Outcome::Miss);
    };
    let result = if restored_key == key {
        "hit"
    } else {
        "fallback"
    };
    report(
        "dir download",
        &key,
        result,
        Some(&restored_key),
        stats.as_ref(),
    );
    if !ui::json_enabled() {
        let prefix_len = match config.prefix.value.as_str() {
            "" => 0,
            p => p.len() + 1,
        };
        ui::line(&restored_key[prefix_len..])?;
    }
    Ok(Outcome::Success)
}

/// Restores the entry `stored` (read from `key`) into `dir`; the stats of a chunked one.
async fn restore(
    chunks: &ChunkStore,
    key: &str,
    stored: Stored,
    args: &DirDownloadArgs,
    early: &EarlySurvey,
    started: Instant,
) -> anyhow::Result<Option<Stats>> {
    match (stored, &args.dirs[..]) {
        (Stored::Manifest(manifest), dirs) => {
            restore_entry(chunks, key, *manifest, dirs, args.delete, early, started)
                .await
                .map(Some)
        }
        (Stored::Legacy(info), [dir]) => {
            let transfer = chunks.transfer().clone();
            let dir = dir.to_path_buf();
            let reader = transfer.stream_object(info);
            tokio::task::spawn_blocking(move || extract_legacy(reader, &dir))
                .await?
                .with_context(|| format!("cannot extract the tar.zst under {key}"))?;
            ui::status(format!(
                "restored {key} (legacy tar.zst) in {:.2}s",
                started.elapsed().as_secs_f64()
            ));
            Ok(None)
        }
        (Stored::Legacy(_), dirs) => {
            bail!(
                "{key} is a tar.zst of one directory, not {} paths",
                dirs.len()
            )
        }
        (Stored::Plain(_), _) => bail!("{key} is a plain file, not a directory entry"),
    }
}

/// Restores a directory entry into `dirs`: one directory into the one given; an entry
/// of several paths ([`paths`]) path by path into as many, in order, each as an entry
/// of its own (so each is all old or all new if a later one fails).
async fn restore_entry(
    chunks: &ChunkStore,
    key: &str,
    manifest: Manifest,
    dirs: &[PathBuf],
    mirror: bool,
    early: &EarlySurvey,
    started: Instant,
) -> anyhow::Result<Stats> {
    // What the upload left out is the job's, not the entry's: a restore leaves it alone.
    let keep = Exclude::new(&manifest.exclusions())
        .map_err(|why| crate::chunk::store::broken(format!("{key}: {why}")))?;
    let to = |dir| Destination {
        dir,
        mirror,
        keep: &keep,
        record: true,
        early,
    };
    match (manifest.kind, dirs) {
        (ManifestKind::Dir, [dir]) => {
            restore_manifest(chunks, key, manifest, None, to(dir), started).await
        }
        (ManifestKind::Dir, _) => {
            bail!("{key} holds one directory, not {} paths", dirs.len())
        }
        (ManifestKind::Paths, _) => {
            // Paths map to places by position: only the paths it was made from (as
            // the label spells them) may take it, or a file could land where a
            // directory is. Any other is a miss, as a changed `path:` is for actions/cache.
            let given = source_labels(dirs);
            if manifest.sources() != given {
                return Err(crate::chunk::store::broken(format!(
                    "{key} was made from the paths ({}), not ({})",
                    manifest.sources().replace('\n', ", "),
                    given.replace('\n', ", ")
                )));
            }
            let parts = paths::split(key, &manifest)?;
            drop(manifest);
            // A pack gone would fail a later path after earlier ones were replaced:
            // found first, it is a miss with every path untouched.
            let packs: Vec<crate::chunk::Id> = parts
                .iter()
                .flat_map(|p| p.manifest.table.packs.iter().copied())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if let Some(why) = missing_pack(chunks, &packs).await? {
                return Err(crate::chunk::store::broken(format!("{key}: {why}")));
            }
            let mut total = Stats::default();
            for (i, (part, dir)) in parts.into_iter().zip(dirs).enumerate() {
                let stats = match part.is_file() {
                    true => restore_file(chunks, key, part.manifest, dir).await?,
                    false => {
                        let m = part.manifest;
                        restore_manifest(chunks, key, m, Some(i), to(dir), started).await?
                    }
                };
                total.add(&stats);
            }
            Ok(total)
        }
        (ManifestKind::Docker, _) => bail!("{key} holds a docker image, not a directory tree"),
    }
}

/// Restores the one file `manifest` holds to `dest` (built beside it, then renamed in);
/// no tree state is kept for a single file.
async fn restore_file(
    chunks: &ChunkStore,
    key: &str,
    mut manifest: Manifest,
    dest: &Path,
) -> anyhow::Result<Stats> {
    let Some(name) = dest.file_name() else {
        bail!("{} names no file", dest.display());
    };
    manifest.entries[0].path = name.as_bytes().to_vec();
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let to = Destination {
        dir: parent,
        mirror: false,
        keep: &Exclude::default(),
        record: false,
        early: &EarlySurvey::none(),
    };
    let stats = restore_whole(chunks, key, manifest, to)
        .await
        .with_context(|| format!("cannot restore {}", dest.display()))?;
    Ok(stats)
}

/// Where and how a directory is restored.
#[derive(Clone, Copy)]
struct Destination<'a> {
    dir: &'a Path,
    /// Remove what the entry lacks at the top of `dir` too (`--delete`).
    mirror: bool,
    /// Paths the entry was uploaded without, left as they are in `dir`.
    keep: &'a Exclude,
    /// Record a tree state of `dir` (not when it only receives a single file).
    record: bool,
    /// What `dir` was found to hold while the entry was fetched, if that was looked at.
    early: &'a EarlySurvey,
}

/// The survey of a DIR's recorded tree ([`update::survey`]), taken on a thread of its
/// own from the start of a download: the `stat` of every recorded file costs about as
/// much as fetching the entry, and needs only the record. A miss does not wait for it.
struct EarlySurvey {
    dir: PathBuf,
    pending: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<Option<update::Survey>>>>,
}

impl EarlySurvey {
    /// Starts surveying `dir`, if it holds a recorded tree.
    fn start(dir: &Path) -> EarlySurvey {
        let surveyed = dir.to_path_buf();
        let pending = on_thread(move || {
            TreeState::load(&surveyed).map(|state| update::survey(&surveyed, state))
        });
        EarlySurvey {
            dir: dir.to_path_buf(),
            pending: std::sync::Mutex::new(Some(pending)),
        }
    }

    /// No survey taken early.
    fn none() -> EarlySurvey {
        EarlySurvey {
            dir: PathBuf::new(),
            pending: std::sync::Mutex::new(None),
        }
    }

    /// The survey of `dir` (`None` inside when it holds no usable record), once: the
    /// first restore into it takes it (a later one, after a failed attempt, looks
    /// again); `None` when it was not looked at.
    async fn take(&self, dir: &Path) -> Option<Option<update::Survey>> {
        if dir != self.dir {
            return None;
        }
        let pending = self.pending.lock().expect("survey lock").take()?;
        pending.await.ok()
    }
}

/// Restores a chunked entry into `to.dir`: in place when it holds a tree cacher
/// recorded (only what differs is fetched and written), else built whole beside what
/// is there and swapped in. Either way the directory ends the same, and its new tree
/// state is recorded.
async fn restore_manifest(
    chunks: &ChunkStore,
    key: &str,
    manifest: Manifest,
    part: Option<usize>,
    to: Destination<'_>,
    started: Instant,
) -> anyhow::Result<Stats> {
    let dir = to.dir;
    let files = manifest
        .entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::File { .. }))
        .count();
    let early = to.early.take(dir).await;
    let survey = match early {
        Some(Some(survey)) => Some(survey),
        _ => {
            let (dest, stream_len, keep) =
                (dir.to_path_buf(), manifest.stream_len, to.keep.clone());
            // Loaded already when the early look found no usable record.
            let load = early.is_none();
            tokio::task::spawn_blocking(move || {
                load.then(|| TreeState::load(&dest))
                    .flatten()
                    .or_else(|| seed_state(&dest, stream_len, &keep))
                    .map(|state| update::survey(&dest, state))
            })
            .await?
        }
    };
    let restored = match survey {
        Some(survey) => {
            let updated = restore_in_place(chunks, key, manifest, survey, to).await;
            match updated {
                // Unless the entry itself is at fault (or the job was cancelled), the
                // record or DIR may be: files someone else owns, a record gone stale.
                // The tree is then built whole, as without a record.
                // A failure the whole restore shares (no room, names the filesystem
                // folds) is reported once, by it.
                // Not when DIR holds paths the entry excludes: a whole restore would
                // take them with the directories it replaces.
                Err(e) if !is_broken(&e) && !ui::cancelled() => {
                    TreeState::forget(dir);
                    let (keep, walked) = (to.keep.clone(), dir.to_path_buf());
                    let held = tokio::task::spawn_blocking(move || keep.holds_excluded(&walked));
                    if held.await? {
                        return Err(e.context(format!(
                            "cannot restore {key}; {} holds paths it excludes, so it cannot be built whole either",
                            dir.display()
                        )));
                    }
                    // Read again rather than kept: a copy held through the update
                    // would cost as much memory as the manifest (90 MB for 10^6 files).
                    let why = || format!("could not update {} in place ({e:#})", dir.display());
                    let fetched = chunks.fetch(key).await.with_context(why)?;
                    let manifest = match (fetched, part) {
                        (Some(Stored::Manifest(m)), None) if m.kind == ManifestKind::Dir => *m,
                        (Some(Stored::Manifest(m)), Some(i)) if m.kind == ManifestKind::Paths => {
                            let mut parts = paths::split(key, &m).with_context(why)?;
                            match i < parts.len() {
                                true => parts.swap_remove(i).manifest,
                                false => bail!("{}, and {key} changed meanwhile", why()),
                            }
                        }
                        _ => bail!("{}, and {key} changed meanwhile", why()),
                    };
                    let whole = restore_whole(chunks, key, manifest, to).await;
                    if whole.is_ok() {
                        ui::warn(format!(
                            "could not update {} in place ({e:#}); restored it whole",
                            dir.display()
                        ));
                    }
                    whole
                }
                other => other,
            }
        }
        None => restore_whole(chunks, key, manifest, to).await,
    };
    let stats = restored.with_context(|| format!("cannot restore {key}"))?;
    ui::status(download_stats_line(
        key,
        Some(files),
        &stats,
        started.elapsed(),
    ));
    Ok(stats)
}

/// A tree state for a DIR that holds files but no record (a runner whose state
/// directory was wiped, a tree another tool restored): its files are read and cut here
/// as an upload would cut them, nothing sent, so that a restore over them fetches and
/// writes only what differs. Not for a DIR holding far more than the entry (then
/// probably something else), and `None` when anything fails: the restore then builds
/// the tree whole. But for an entry that excludes paths (`keep`) DIR is always
/// updated in place, which leaves them alone: without a usable read, from a record of
/// nothing, so every file is written.
fn seed_state(dir: &Path, stream_len: u64, keep: &Exclude) -> Option<TreeState> {
    let non_empty = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .any(|e| !crate::temp::is_temp_name(e.file_name().as_encoded_bytes()));
    if !non_empty {
        return None;
    }
    let taken = SystemTime::now();
    let read = read_state(dir, stream_len, keep, taken);
    if read.is_some() || keep.is_empty() {
        return read;
    }
    Some(TreeState::of_nothing(dir.canonicalize().ok()?))
}

/// The record [`seed_state`] makes by reading DIR, when it holds at most about as
/// much as the entry.
fn read_state(dir: &Path, stream_len: u64, keep: &Exclude, taken: SystemTime) -> Option<TreeState> {
    let tree = archive::scan(dir, keep).ok()?;
    let held: u64 = tree.files.iter().map(|f| f.size()).sum();
    if held > stream_len.saturating_mul(2).max(64 * 1024 * 1024) {
        ui::verbose(format!(
            "{} holds {} in files, far more than the entry: not reading it",
            dir.display(),
            ui::human_bytes(held)
        ));
        return None;
    }
    let progress = Arc::new(ui::Progress::new(
        format!("reading {}", dir.display()),
        held,
    ));
    let tree = Arc::new(tree);
    let (pieces, report) = cut_tree(tree.clone(), None, Arc::default(), progress.clone());
    let mut chunks = Vec::new();
    for batch in pieces {
        let batch = batch.ok()?;
        chunks.par_extend(batch.par_iter().map(|piece| match piece {
            Piece::Cut(data) => (Id::of(data), data.len() as u32),
            Piece::Reused { id, loc } => (*id, loc.len),
        }));
    }
    progress.clear();
    // Only ids and lengths matter to an update; these chunks are in no pack.
    let nowhere = |len| Location {
        pack: Id([0; 32]),
        offset: 0,
        stored_len: 0,
        len,
    };
    let trusted = report.lock().ok()?.trusted.clone();
    let Tree { entries, files, .. } = Arc::unwrap_or_clone(tree);
    let stamps = files
        .iter()
        .zip(trusted)
        .map(|(f, ok)| ok.then_some(f.stamp))
        .collect();
    let manifest = Manifest {
        kind: ManifestKind::Dir,
        created: 0,
        label: String::new(),
        stream_len: held,
        table: table_of(chunks.into_iter().map(|(id, len)| (id, nowhere(len)))),
        entries,
    };
    ui::verbose(format!(
        "{} had no tree state: read {} to restore over what it holds",
        dir.display(),
        ui::human_bytes(held)
    ));
    Some(TreeState::new(
        dir.canonicalize().ok()?,
        &manifest,
        stamps,
        taken,
    ))
}

/// Builds the tree in a temp dir inside `dir` and swaps it in ([`Restorer`]), then
/// records its tree state. Its top-level entries replace same-named ones whole, so an
/// entry that excludes paths is only restored this way into an empty `dir` (see
/// [`seed_state`]).
async fn restore_whole(
    chunks: &ChunkStore,
    key: &str,
    manifest: Manifest,
    to: Destination<'_>,
) -> anyhow::Result<Stats> {
    let dir = to.dir;
    let (dest, entries, needed) = (dir.to_path_buf(), manifest.entries, manifest.stream_len);
    let manifest = Manifest {
        entries: Vec::new(),
        ..manifest
    };
    let (mirror, record) = (to.mirror, to.record);
    let restorer = tokio::task::spawn_blocking(move || {
        let mut restorer = Restorer::create(&dest, entries, needed)?;
        if mirror {
            restorer.mirror();
        }
        anyhow::Ok(restorer)
    })
    .await??;
    let progress = Arc::new(ui::Progress::new(
        format!("restoring {key}"),
        manifest.stream_len,
    ));
    let restored = chunks
        .restore_in_order(&manifest.table, progress.counted(restorer))
        .await;
    progress.clear();
    let (restorer, mut stats) =
        restored.with_context(|| format!("{} left untouched", dir.display()))?;
    stats.disk_bytes = stats.stream_bytes;
    let restorer = restorer.into_inner();
    let (dest, key) = (dir.to_path_buf(), key.to_string());
    tokio::task::spawn_blocking(move || {
        let finished = restorer.finish()?;
        let restored = Manifest {
            entries: finished.entries,
            ..manifest
        };
        if let (true, Ok(dir)) = (record, dest.canonicalize()) {
            state::record(&dir, &key, &restored, finished.stamps, finished.done_at);
        }
        Ok(stats)
    })
    .await?
}

/// Updates the tree `state` records in `dir` to the entry ([`TreeUpdate`]), then
/// records the new tree state.
async fn restore_in_place(
    chunks: &ChunkStore,
    key: &str,
    manifest: Manifest,
    survey: update::Survey,
    to: Destination<'_>,
) -> anyhow::Result<Stats> {
    let dir = to.dir;
    let dest = dir.to_path_buf();
    let (plan, mut manifest) = tokio::task::spawn_blocking(move || {
        let plan = update::plan(&dest, survey, &manifest);
        (plan, manifest)
    })
    .await?;
    let needed = plan.table.clone();
    let mut stats = Stats::default();
    ui::verbose(format!(
        "{} holds {} files of {key} already, and {} more to compare where the entry's chunks differ; fetching {} chunks of {}",
        dir.display(),
        plan.kept_files(),
        plan.compare_files(),
        needed.chunks.len(),
        manifest.table.chunks.len()
    ));
    let (dest, entries) = (dir.to_path_buf(), std::mem::take(&mut manifest.entries));
    let (mirror, keep) = (to.mirror, to.keep.clone());
    let updater =
        tokio::task::spawn_blocking(move || TreeUpdate::create(&dest, entries, plan, mirror, keep))
            .await??;
    let progress = Arc::new(ui::Progress::new(
        format!("restoring {key}"),
        needed.chunks.iter().map(|c| u64::from(c.len)).sum(),
    ));
    let restored = chunks
        .restore_in_order(&needed, progress.counted(updater))
        .await;
    progress.clear();
    let (updater, fetched) =
        restored.with_context(|| format!("{} left untouched", dir.display()))?;
    stats.chunks = manifest.table.chunks.len() as u64;
    stats.chunks_new = fetched.chunks_new;
    stats.packs = fetched.packs;
    stats.wire_bytes = fetched.wire_bytes;
    stats.retries = fetched.retries;
    stats.stream_bytes = manifest.stream_len;
    let updater = updater.into_inner();
    let (dest, key) = (dir.to_path_buf(), key.to_string());
    tokio::task::spawn_blocking(move || {
        let updated = updater.finish()?;
        stats.unchanged_files = updated.kept_files;
        stats.unchanged_bytes = updated.kept_bytes;
        stats.disk_bytes = updated.written_bytes;
        manifest.entries = updated.entries;
        if let Ok(dir) = dest.canonicalize() {
            // The files it renamed into place were stamped there just now.
            state::settle(&updated.stamps);
            state::record(&dir, &key, &manifest, updated.stamps, SystemTime::now());
        }
        Ok(stats)
    })
    .await?
}

/// Restores the newest usable entry under the first fallback prefix that has one.
/// Usable: a directory entry made from the same directory as DIR (unless
/// `--fallback-any-path`), carrying this platform's suffix when keys get one; a
/// broken or untrusted candidate is skipped with a warning. Newest by when the entry
/// was made (its manifest's creation time, which a signature covers; the upload time
/// of an object without one): putting back an older signed manifest makes it look
/// uploaded now, which must not make it the one restored.
async fn restore_fallback(
    config: &Config,
    chunks: &ChunkStore,
    args: &DirDownloadArgs,
    early: &EarlySurvey,
    started: Instant,
) -> anyhow::Result<Option<(String, Option<Stats>)>> {
    let source = source_labels(&args.dirs);
    let several = args.dirs.len() > 1;
    let base = join_prefix(&config.prefix.value, "");
    let uploaded = |o: &crate::store::ObjectInfo| o.modified.unwrap_or(SystemTime::UNIX_EPOCH);
    for prefix in &args.fallback {
        let full = join_prefix(&config.prefix.value, prefix);
        let mut candidates = chunks.list_entries(&full).await?;
        candidates.sort_by_key(|o| std::cmp::Reverse(uploaded(o)));
        let mut unread = candidates
            .into_iter()
            .filter(|o| !config.arch_suffix.value || has_arch_suffix(&o.key[base.len()..]))
            .peekable();
        // Candidates read and usable, with when each was made. An entry is made before
        // it is uploaded (by the runner's clock, which may be ahead of the store's by
        // up to CLOCK_SKEW), so once the next unread one was uploaded well before the
        // newest of these was made, none left can be newer.
        // (made, uploaded): entries made in the same second go by upload time.
        let mut usable: Vec<((SystemTime, SystemTime), crate::store::ObjectInfo, Stored)> =
            Vec::new();
        loop {
            let newest = (0..usable.len()).max_by_key(|&i| usable[i].0);
            let bound = unread.peek().map(|o| uploaded(o) + CLOCK_SKEW);
            if let Some(i) = newest.filter(|&i| bound.is_none_or(|b| b < usable[i].0.0)) {
                let (_, info, stored) = usable.swap_remove(i);
                let key = info.key.clone();
                ui::status(format!("fallback: restoring {key}"));
                if let Some(stats) = heal(
                    &key,
                    restore(chunks, &key, stored, args, early, started).await,
                )? {
                    mark_used(chunks.transfer(), chunks.layout(), &info).await;
                    return Ok(Some((key, stats)));
                }
                continue;
            }
            let Some(candidate) = unread.next() else {
                break;
            };
            let key = &candidate.key;
            let Some((info, stored)) = heal(key, chunks.fetch_with_info(key).await)?.flatten()
            else {
                continue;
            };
            let fits = fallback_fits(chunks, &stored, &source, several, args.fallback_any_path);
            if let Err(why) = fits.await {
                ui::verbose(format!("fallback: skipping {key}: {why}"));
                continue;
            }
            let made = match &stored {
                Stored::Manifest(m) => {
                    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(m.created)
                }
                _ => uploaded(&candidate),
            };
            usable.push(((made, uploaded(&candidate)), info, stored));
        }
    }
    Ok(None)
}

/// Whether a fallback candidate may be restored into a directory whose source label is
/// `source`; the reason when not.
async fn fallback_fits(
    chunks: &ChunkStore,
    stored: &Stored,
    source: &str,
    several: bool,
    any_path: bool,
) -> Result<(), String> {
    let paths_of = |label: &str| label.split('\n').count();
    match stored {
        Stored::Manifest(m) if m.kind == ManifestKind::Docker => Err("a docker image".into()),
        Stored::Manifest(m) if several && m.kind == ManifestKind::Dir => {
            Err("an entry of one directory".into())
        }
        // Paths map to places by position, so their labels must match (see
        // `restore_entry`); with --fallback-any-path only their number.
        Stored::Manifest(m) if m.kind == ManifestKind::Paths && m.sources() != source => {
            match (any_path, paths_of(m.sources()) == paths_of(source)) {
                (true, true) => Ok(()),
                (true, false) => Err(format!(
                    "made from {} paths, not {}",
                    paths_of(m.sources()),
                    paths_of(source)
                )),
                (false, _) => Err(format!(
                    "made from ({}), not ({})",
                    m.sources().replace('\n', ", "),
                    source.replace('\n', ", ")
                )),
            }
        }
        Stored::Manifest(m) if any_path || m.sources() == source => Ok(()),
        Stored::Manifest(m) if m.sources().is_empty() => {
            Err("made by an older cacher that did not record its directory".into())
        }
        Stored::Manifest(m) => Err(format!("made from {}, not {source}", m.sources())),
        Stored::Plain(_) => Err("a plain file".into()),
        Stored::Legacy(_) if several => Err("a tar.zst of one directory".into()),
        Stored::Legacy(_) if !any_path => {
            Err("a tar.zst that does not record its directory".into())
        }
        Stored::Legacy(info) => match looks_like_tar(chunks, info).await {
            true => Ok(()),
            false => Err("a zstd object that is not a tar archive".into()),
        },
    }
}

/// The label an entry made from `dirs` carries: each path's source label, one per line.
fn source_labels(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| archive::source_label(d))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether the zstd object `info` decompresses to something starting like a tar (its
/// first block, at most 128 KiB, is enough to tell).
async fn looks_like_tar(chunks: &ChunkStore, info: &crate::store::ObjectInfo) -> bool {
    let mut head = Vec::new();
    let read = chunks
        .transfer()
        .read_range(
            &info.key,
            info.etag.as_deref(),
            0..info.size.min(256 * 1024),
            &mut head,
        )
        .await;
    if read.is_err() {
        return false;
    }
    let mut block = [0u8; 512];
    let decoded = zstd::stream::read::Decoder::new(&head[..])
        .and_then(|mut d| std::io::Read::read_exact(&mut d, &mut block));
    decoded.is_ok() && &block[257..262] == b"ustar"
}

/// Unpacks a `tar.zst` stream into a temp dir inside `dir`, then swaps it into place.
/// Permissions keep no setuid, setgid or sticky bit, as for chunked entries.
fn extract_legacy(reader: impl std::io::Read, dir: &Path) -> anyhow::Result<()> {
    let restorer = Restorer::create(dir, Vec::new(), 0)?;
    let mut archive = tar::Archive::new(zstd::stream::read::Decoder::new(reader)?);
    archive.set_preserve_permissions(false);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.unpack(restorer.temp_path())?;
    restorer.finish().map(drop)
}
