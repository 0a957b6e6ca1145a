//! `cacher dir upload|download|exists`: directory trees on the chunk store.
//!
//! `download` prints the key it restored on stdout (the requested key, or the fallback
//! entry it chose), so a script can tell an exact hit from a fallback hit.

use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{Context, bail};
use rayon::prelude::*;

use super::{Outcome, heal};
use crate::archive::{self, Tree};
use crate::chunk::Id;
use crate::chunk::format::{EntryKind, Manifest, ManifestKind};
use crate::chunk::gc::mark_used;
use crate::chunk::store::{
    ChunkStore, Known, Location, Piece, Sent, Stats, Stored, download_stats_line, is_broken,
    now_secs, table_of, upload_stats_line,
};
use crate::cli::{DirCommand, DirDownloadArgs, DirUploadArgs, input_error};
use crate::config::Config;
use crate::key::{full_key, has_arch_suffix, join_prefix};
use crate::restore::Restorer;
use crate::state::TreeState;
use crate::transfer::Transfer;
use crate::tree_stream::{ReadReport, StaleState, cut_tree};
use crate::ui;
use crate::update::{self, TreeUpdate};

pub async fn run(config: &Config, cmd: &DirCommand) -> anyhow::Result<Outcome> {
    match cmd {
        DirCommand::Upload(args) => upload(config, args).await,
        DirCommand::Download(args) => download(config, args).await,
        DirCommand::Exists(args) => super::exists::run(config, &args.key).await,
    }
}

/// The chunk store under the configured prefix.
pub(super) async fn chunk_store(config: &Config) -> anyhow::Result<ChunkStore> {
    let transfer = Arc::new(Transfer::new(crate::store::open(config).await?, config));
    Ok(ChunkStore::new(transfer, &config.prefix.value))
}

/// The chunk store to upload `key` into, or `None` when `key` is already cached and
/// `force` is off (said as `command` would say it). An entry that cannot be restored
/// (its manifest does not decode, or a pack it references is gone) does not count as
/// cached: it is replaced, and the user is told.
pub(super) async fn chunk_store_for_upload(
    config: &Config,
    key: &str,
    force: bool,
    command: &str,
) -> anyhow::Result<Option<ChunkStore>> {
    let chunks = chunk_store(config).await?;
    if force || chunks.transfer().store().head(key).await?.is_none() {
        return Ok(Some(chunks));
    }
    let unrestorable = match chunks.fetch(key).await {
        Ok(Some(Stored::Manifest(m))) => missing_pack(&chunks, &m.table.packs).await?,
        Ok(_) => None,
        Err(e) if is_broken(&e) => Some(format!("{e:#}")),
        Err(e) => return Err(e),
    };
    if let Some(why) = unrestorable {
        ui::status(format!("{key} cannot be restored ({why}); replacing it"));
        return Ok(Some(chunks));
    }
    super::say_skipped(key, command);
    Ok(None)
}

/// The first of `wanted` that is gone from the bucket, said as a reason. A few packs
/// are looked up one HEAD each; many, through the listing of all packs (fewer
/// requests), each pack absent from it looked up once more, as another job may have
/// written it since.
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
    for pack in suspects {
        if chunks.pack_info(&pack).await?.is_none() {
            return Ok(Some(format!("pack {pack} is missing from the bucket")));
        }
    }
    Ok(None)
}

/// Packs of an existing entry the skip check looks up one by one; beyond, it lists.
const SKIP_CHECK_HEADS: usize = 16;

async fn upload(config: &Config, args: &DirUploadArgs) -> anyhow::Result<Outcome> {
    let key = full_key(config, &args.key)?;
    // A DIR that is not there is the job's mistake, not the cache's (--on-error).
    match std::fs::metadata(&args.dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(input_error(format!(
                "{} is not a directory",
                args.dir.display()
            )));
        }
        Err(e) => {
            return Err(input_error(format!(
                "cannot read {}: {e}",
                args.dir.display()
            )));
        }
    }
    let started = Instant::now();
    // Stamps taken after this moment may be recorded (see `TreeState::new`).
    let taken = SystemTime::now();
    // The tree is scanned and its state read while the bucket is asked whether the key
    // is cached and what it holds: on a warm tree the scan is most of the upload. On
    // threads of their own, so a skipped upload does not wait for them.
    let (dir, state_dir) = (args.dir.clone(), args.dir.clone());
    let scanning = on_thread(move || archive::scan(&dir));
    let loading = on_thread(move || TreeState::load(&state_dir));
    let Some(chunks) = chunk_store_for_upload(config, &key, args.force, "dir upload").await? else {
        return Ok(Outcome::Success);
    };
    let state = loading.await?;
    // The packs of the entry the tree came from hold most of what it reuses.
    let likely = state
        .as_ref()
        .map_or(&[][..], |s| &s.manifest.table.packs[..]);
    let known = Arc::new(chunks.known(likely).await?);
    let tree = Arc::new(scanning.await??);
    let total = tree.files.iter().map(|f| f.size).sum();
    let progress = Arc::new(ui::Progress::new(format!("uploading {key}"), total));
    let send = |state| send_tree(&chunks, &tree, state, &known, &progress);
    let mut sent = send(state.as_ref()).await;
    if let Err(e) = &sent
        && let Some(stale) = e.downcast_ref::<StaleState>()
    {
        ui::verbose(stale.to_string());
        progress.reset();
        sent = send(None).await;
    }
    drop(state);
    let failed =
        |e: anyhow::Error| e.context(format!("upload of {} to {key} failed", args.dir.display()));
    let (sent, read) = sent.inspect_err(|_| progress.clear()).map_err(failed)?;
    // The cutter is done with the tree (its batches ended), so this moves it.
    let Tree { entries, files, .. } = Arc::unwrap_or_clone(tree);
    let manifest = Manifest {
        kind: ManifestKind::Dir,
        created: now_secs(),
        label: archive::source_label(&args.dir),
        stream_len: 0,
        table: Default::default(),
        entries,
    };
    let published = chunks.publish(manifest, sent, &key).await;
    progress.clear();
    let (mut stats, manifest) = published.map_err(failed)?;
    stats.unchanged_files = read.unchanged_files;
    stats.unchanged_bytes = read.unchanged_bytes;
    stats.disk_bytes = read.bytes_read;
    let file_count = files.len();
    let stamps = files
        .into_iter()
        .zip(&read.trusted)
        .map(|(f, trusted)| trusted.then_some(f.stamp))
        .collect();
    let (dir, recorded_key) = (args.dir.clone(), key.clone());
    tokio::task::spawn_blocking(move || {
        if let Ok(canonical) = dir.canonicalize() {
            TreeState::new(canonical, recorded_key, manifest, stamps, taken).save();
        }
    })
    .await?;
    ui::status(upload_stats_line(
        &key,
        Some(file_count),
        &stats,
        started.elapsed(),
    ));
    report("dir upload", &key, "uploaded", None, Some(&stats));
    Ok(Outcome::Success)
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

/// Cuts the files of a scanned tree and sends the chunks the bucket lacks, reading
/// only what `state` cannot vouch for; what was sent, and what was read.
async fn send_tree(
    chunks: &ChunkStore,
    tree: &Arc<Tree>,
    state: Option<&TreeState>,
    known: &Arc<Known>,
    progress: &Arc<ui::Progress>,
) -> anyhow::Result<(Sent, ReadReport)> {
    let (pieces, report) = cut_tree(tree.clone(), state, known.clone(), progress.clone());
    let sent = chunks.send_pieces(pieces, known.clone()).await?;
    let report = report.lock().expect("report lock").clone();
    Ok((sent, report))
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
    let mut restored = None;
    if let Some((info, stored)) = heal(&key, chunks.fetch_with_info(&key).await)?.flatten() {
        match &stored {
            Stored::Plain(_) => {
                bail!("{key} is a plain file, not a directory entry (use `cacher download`)")
            }
            Stored::Manifest(m) if m.kind != ManifestKind::Dir => {
                bail!("{key} holds a docker image, not a directory tree")
            }
            _ => {}
        }
        if let Some(stats) = heal(&key, restore(&chunks, &key, stored, args, started).await)? {
            mark_used(chunks.transfer(), chunks.layout(), &info).await;
            restored = Some((key.clone(), stats));
        }
    }
    if restored.is_none() {
        restored = restore_fallback(config, &chunks, args, started).await?;
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
        println!("{}", &restored_key[prefix_len..]);
    }
    Ok(Outcome::Success)
}

/// Restores the entry `stored` (read from `key`) into `dir`; the stats of a chunked one.
async fn restore(
    chunks: &ChunkStore,
    key: &str,
    stored: Stored,
    args: &DirDownloadArgs,
    started: Instant,
) -> anyhow::Result<Option<Stats>> {
    let dir = &args.dir;
    match stored {
        Stored::Manifest(manifest) => {
            restore_manifest(chunks, key, *manifest, dir, args.delete, started)
                .await
                .map(Some)
        }
        Stored::Legacy(info) => {
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
        Stored::Plain(_) => bail!("{key} is a plain file, not a directory entry"),
    }
}

/// Restores a chunked entry into `dir`: in place when `dir` holds a tree cacher
/// recorded (only what differs is fetched and written), else built whole beside what
/// is there and swapped in. Either way `dir` ends the same, and its new tree state is
/// recorded.
async fn restore_manifest(
    chunks: &ChunkStore,
    key: &str,
    manifest: Manifest,
    dir: &Path,
    mirror: bool,
    started: Instant,
) -> anyhow::Result<Stats> {
    let files = manifest
        .entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::File { .. }))
        .count();
    let (dest, stream_len) = (dir.to_path_buf(), manifest.stream_len);
    let state = tokio::task::spawn_blocking(move || {
        TreeState::load(&dest).or_else(|| seed_state(&dest, stream_len))
    })
    .await?;
    let restored = match state.filter(|s| s.manifest.kind == ManifestKind::Dir) {
        Some(state) => {
            let updated = restore_in_place(chunks, key, manifest, state, dir, mirror).await;
            match updated {
                // Unless the entry itself is at fault (or the job was cancelled), the
                // record or DIR may be: files someone else owns, a record gone stale.
                // The tree is then built whole, as without a record.
                // A failure the whole restore shares (no room, names the filesystem
                // folds) is reported once, by it.
                Err(e) if !is_broken(&e) && !ui::cancelled() => {
                    TreeState::forget(dir);
                    // Read again rather than kept: a copy held through the update
                    // would cost as much memory as the manifest (90 MB for 10^6 files).
                    let why = || format!("could not update {} in place ({e:#})", dir.display());
                    let manifest = match chunks.fetch(key).await.with_context(why)? {
                        Some(Stored::Manifest(m)) if m.kind == ManifestKind::Dir => *m,
                        _ => bail!("{}, and {key} changed meanwhile", why()),
                    };
                    let whole = restore_whole(chunks, key, manifest, dir, mirror).await;
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
        None => restore_whole(chunks, key, manifest, dir, mirror).await,
    };
    let (stats, state) = restored.with_context(|| format!("cannot restore {key}"))?;
    if let Some(state) = state {
        tokio::task::spawn_blocking(move || state.save()).await?;
    }
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
/// the tree whole.
fn seed_state(dir: &Path, stream_len: u64) -> Option<TreeState> {
    let non_empty = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .any(|e| !crate::temp::is_temp_name(e.file_name().as_encoded_bytes()));
    if !non_empty {
        return None;
    }
    let taken = SystemTime::now();
    let tree = archive::scan(dir).ok()?;
    let held: u64 = tree.files.iter().map(|f| f.size).sum();
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
        String::new(),
        manifest,
        stamps,
        taken,
    ))
}

/// Builds the tree in a temp dir inside `dir` and swaps it in ([`Restorer`]).
async fn restore_whole(
    chunks: &ChunkStore,
    key: &str,
    manifest: Manifest,
    dir: &Path,
    mirror: bool,
) -> anyhow::Result<(Stats, Option<TreeState>)> {
    let (dest, entries, needed) = (dir.to_path_buf(), manifest.entries, manifest.stream_len);
    let manifest = Manifest {
        entries: Vec::new(),
        ..manifest
    };
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
        let state = dest
            .canonicalize()
            .ok()
            .map(|dir| TreeState::new(dir, key, restored, finished.stamps, finished.visible_from));
        Ok((stats, state))
    })
    .await?
}

/// Updates the tree `state` records in `dir` to the entry ([`TreeUpdate`]).
async fn restore_in_place(
    chunks: &ChunkStore,
    key: &str,
    manifest: Manifest,
    state: TreeState,
    dir: &Path,
    mirror: bool,
) -> anyhow::Result<(Stats, Option<TreeState>)> {
    let dest = dir.to_path_buf();
    let (plan, mut manifest) = tokio::task::spawn_blocking(move || {
        let plan = update::plan(&dest, state, &manifest);
        (plan, manifest)
    })
    .await?;
    let needed = plan.table.clone();
    let mut stats = Stats {
        unchanged_files: plan.kept_files,
        unchanged_bytes: plan.kept_bytes,
        disk_bytes: plan.write_bytes,
        ..Stats::default()
    };
    ui::verbose(format!(
        "{} holds {} files of {key} already; fetching {} chunks of {}",
        dir.display(),
        plan.kept_files,
        needed.chunks.len(),
        manifest.table.chunks.len()
    ));
    let (dest, entries) = (dir.to_path_buf(), std::mem::take(&mut manifest.entries));
    let updater =
        tokio::task::spawn_blocking(move || TreeUpdate::create(&dest, entries, plan, mirror))
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
        let (entries, stamps) = updater.finish()?;
        manifest.entries = entries;
        let state = dest
            .canonicalize()
            .ok()
            .map(|dir| TreeState::new(dir, key, manifest, stamps, SystemTime::now()));
        Ok((stats, state))
    })
    .await?
}

/// Restores the newest usable entry under the first fallback prefix that has one.
/// Usable: a directory entry made from the same directory as DIR (unless
/// `--fallback-any-path`), carrying this platform's suffix when keys get one; a
/// broken candidate is skipped with a warning.
async fn restore_fallback(
    config: &Config,
    chunks: &ChunkStore,
    args: &DirDownloadArgs,
    started: Instant,
) -> anyhow::Result<Option<(String, Option<Stats>)>> {
    let source = archive::source_label(&args.dir);
    let base = join_prefix(&config.prefix.value, "");
    for prefix in &args.fallback {
        let full = join_prefix(&config.prefix.value, prefix);
        let mut candidates = chunks.list_entries(&full).await?;
        candidates.sort_by_key(|o| std::cmp::Reverse(o.modified));
        for candidate in candidates {
            let key = candidate.key;
            if config.arch_suffix.value && !has_arch_suffix(&key[base.len()..]) {
                continue;
            }
            let Some((info, stored)) = heal(&key, chunks.fetch_with_info(&key).await)?.flatten()
            else {
                continue;
            };
            if let Err(why) = fallback_fits(chunks, &stored, &source, args.fallback_any_path).await
            {
                ui::verbose(format!("fallback: skipping {key}: {why}"));
                continue;
            }
            ui::status(format!("fallback: restoring {key}"));
            if let Some(stats) = heal(&key, restore(chunks, &key, stored, args, started).await)? {
                mark_used(chunks.transfer(), chunks.layout(), &info).await;
                return Ok(Some((key, stats)));
            }
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
    any_path: bool,
) -> Result<(), String> {
    match stored {
        Stored::Manifest(m) if m.kind != ManifestKind::Dir => Err("a docker image".into()),
        Stored::Manifest(m) if any_path || m.label == source => Ok(()),
        Stored::Manifest(m) if m.label.is_empty() => {
            Err("made by an older cacher that did not record its directory".into())
        }
        Stored::Manifest(m) => Err(format!("made from {}, not {source}", m.label)),
        Stored::Plain(_) => Err("a plain file".into()),
        Stored::Legacy(_) if !any_path => {
            Err("a tar.zst that does not record its directory".into())
        }
        Stored::Legacy(info) => match looks_like_tar(chunks, info).await {
            true => Ok(()),
            false => Err("a zstd object that is not a tar archive".into()),
        },
    }
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
