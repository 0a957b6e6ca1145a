//! `cacher dir upload|download|exists`: directory trees on the chunk store.
//!
//! `download` prints the key it restored on stdout (the requested key, or the fallback
//! entry it chose), so a script can tell an exact hit from a fallback hit.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};

use super::Outcome;
use crate::archive::{self, ContentReader, Restorer};
use crate::chunk::format::{Manifest, ManifestKind};
use crate::chunk::store::{ChunkStore, Stored, download_stats_line, now_secs, upload_stats_line};
use crate::cli::{DirCommand, DirDownloadArgs, DirUploadArgs};
use crate::config::Config;
use crate::key::{full_key, join_prefix};
use crate::transfer::Transfer;
use crate::ui;

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
/// `force` is off (said as `command` would say it).
pub(super) async fn chunk_store_for_upload(
    config: &Config,
    key: &str,
    force: bool,
    command: &str,
) -> anyhow::Result<Option<ChunkStore>> {
    let chunks = chunk_store(config).await?;
    let store = chunks.transfer().store().as_ref();
    if super::skip_existing(store, key, force, command).await? {
        return Ok(None);
    }
    Ok(Some(chunks))
}

async fn upload(config: &Config, args: &DirUploadArgs) -> anyhow::Result<Outcome> {
    let key = full_key(config, &args.key)?;
    let Some(chunks) = chunk_store_for_upload(config, &key, args.force, "dir upload").await? else {
        return Ok(Outcome::Success);
    };
    let started = Instant::now();
    let dir = args.dir.clone();
    let tree = tokio::task::spawn_blocking(move || archive::scan(&dir)).await??;
    let files = tree.files.len();
    let known = chunks.load_known().await?;
    let manifest = Manifest {
        kind: ManifestKind::Dir,
        created: now_secs(),
        label: String::new(),
        stream_len: 0,
        table: Default::default(),
        entries: tree.entries,
    };
    let total = tree.files.iter().map(|f| f.size).sum();
    let progress = Arc::new(ui::Progress::new(format!("uploading {key}"), total));
    let content = progress.counted(ContentReader::new(tree.files));
    let stats = chunks.upload(content, known, manifest, &key).await;
    progress.clear();
    let stats =
        stats.with_context(|| format!("upload of {} to {key} failed", args.dir.display()))?;
    ui::status(upload_stats_line(
        &key,
        Some(files),
        &stats,
        started.elapsed(),
    ));
    report("dir upload", &key, "uploaded", None, Some(&stats));
    Ok(Outcome::Success)
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
    let (restored_key, stored) = match chunks.fetch(&key).await? {
        Some(stored) => (key.clone(), stored),
        None => match find_fallback(config, &chunks, &args.fallback).await? {
            Some(found) => found,
            None => {
                ui::status(format!("{key} is not cached"));
                report("dir download", &key, "miss", None, None);
                return Ok(Outcome::Miss);
            }
        },
    };
    let result = if restored_key == key {
        "hit"
    } else {
        "fallback"
    };
    match stored {
        Stored::Manifest(manifest) => {
            if manifest.kind != ManifestKind::Dir {
                bail!("{restored_key} holds a docker image, not a directory tree");
            }
            let stats =
                restore_manifest(&chunks, &restored_key, *manifest, &args.dir, started).await?;
            report(
                "dir download",
                &key,
                result,
                Some(&restored_key),
                Some(&stats),
            );
        }
        Stored::Plain(_) => {
            bail!("{restored_key} is a plain file, not a directory entry (use `cacher download`)")
        }
        Stored::Legacy(info) => {
            let transfer = chunks.transfer().clone();
            let dir = args.dir.clone();
            let reader = transfer.stream_object(info);
            tokio::task::spawn_blocking(move || extract_legacy(reader, &dir))
                .await?
                .with_context(|| format!("cannot extract the tar.zst under {restored_key}"))?;
            ui::status(format!(
                "restored {restored_key} (legacy tar.zst) in {:.2}s",
                started.elapsed().as_secs_f64()
            ));
            report("dir download", &key, result, Some(&restored_key), None);
        }
    }
    if !ui::json_enabled() {
        let prefix_len = match config.prefix.value.as_str() {
            "" => 0,
            p => p.len() + 1,
        };
        println!("{}", &restored_key[prefix_len..]);
    }
    Ok(Outcome::Success)
}

async fn restore_manifest(
    chunks: &ChunkStore,
    key: &str,
    manifest: Manifest,
    dir: &Path,
    started: Instant,
) -> anyhow::Result<crate::chunk::store::Stats> {
    let files = manifest
        .entries
        .iter()
        .filter(|e| matches!(e.kind, crate::chunk::format::EntryKind::File { .. }))
        .count();
    let (dest, entries) = (dir.to_path_buf(), manifest.entries);
    let restorer =
        Arc::new(tokio::task::spawn_blocking(move || Restorer::create(&dest, entries)).await??);
    let sink = restorer.clone();
    let progress = Arc::new(ui::Progress::new(
        format!("restoring {key}"),
        manifest.stream_len,
    ));
    let counter = progress.clone();
    let stats = chunks
        .restore(&manifest.table, move |offset, data| {
            counter.add(data.len() as u64);
            sink.write(offset, data)
        })
        .await;
    progress.clear();
    let mut stats =
        stats.with_context(|| format!("cannot restore {key}; {} left untouched", dir.display()))?;
    stats.stream_bytes = manifest.stream_len;
    let restorer = Arc::into_inner(restorer).expect("the restore holds no other reference");
    tokio::task::spawn_blocking(move || restorer.finish()).await??;
    ui::status(download_stats_line(
        key,
        Some(files),
        &stats,
        started.elapsed(),
    ));
    Ok(stats)
}

/// The newest entry under the first fallback prefix that has one.
async fn find_fallback(
    config: &Config,
    chunks: &ChunkStore,
    prefixes: &[String],
) -> anyhow::Result<Option<(String, Stored)>> {
    let store = chunks.transfer().store();
    let internal = join_prefix(&config.prefix.value, ".cacher/");
    for prefix in prefixes {
        let full = join_prefix(&config.prefix.value, prefix);
        let mut candidates = store.list(&full, None).await?.objects;
        candidates.retain(|o| !o.key.starts_with(&internal));
        candidates.sort_by_key(|o| std::cmp::Reverse(o.modified));
        for candidate in candidates {
            match chunks.fetch(&candidate.key).await {
                Ok(Some(Stored::Plain(_))) => {}
                Ok(Some(stored)) => {
                    ui::status(format!("fallback: restoring {}", candidate.key));
                    return Ok(Some((candidate.key, stored)));
                }
                Ok(None) => {}
                Err(e) => ui::warn(format!("skipping fallback {}: {e:#}", candidate.key)),
            }
        }
    }
    Ok(None)
}

/// Unpacks a `tar.zst` stream into a temp dir beside `dir`, then moves it into place.
fn extract_legacy(reader: impl std::io::Read, dir: &Path) -> anyhow::Result<()> {
    let restorer = Restorer::create(dir, Vec::new())?;
    let mut archive = tar::Archive::new(zstd::stream::read::Decoder::new(reader)?);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.unpack(restorer.temp_root())?;
    restorer.finish()
}
