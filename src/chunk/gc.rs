//! Garbage collection of packs no manifest references, and pruning of old entries.
//!
//! Safety beside concurrent uploads rests on three rules (docs/format.md explains why
//! they suffice): a manifest is written only after all its packs; an upload refreshes
//! the modification time of reused packs older than [`REFRESH_AGE`]; gc deletes a pack
//! only if no manifest references it and a HEAD right before the delete still shows it
//! older than the grace period. gc deletes nothing when any manifest fails to decode.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};

use super::Id;
use super::store::{ChunkStore, Location, REFRESH_AGE, Stored, location, table_of};
use crate::key::join_prefix;
use crate::store::ObjectInfo;
use crate::ui;

/// What one gc run found and did.
#[derive(Debug, Default)]
pub struct GcReport {
    /// Manifests read.
    pub manifests: usize,
    /// Packs listed.
    pub packs: usize,
    /// Packs some manifest references.
    pub referenced: usize,
    /// Unreferenced packs kept because they are younger than the grace period.
    pub young: usize,
    /// Packs deleted (or that would be, with `dry_run`).
    pub deleted: usize,
    /// Bytes those packs held.
    pub deleted_bytes: u64,
    /// Index segments replaced by one compacted segment.
    pub segments_deleted: usize,
    /// Unfinished writes (multipart uploads, temp files) older than the grace, aborted.
    pub stale_writes: usize,
}

fn older_than(info: &ObjectInfo, age: Duration, now: SystemTime) -> bool {
    info.modified
        .is_some_and(|t| now.duration_since(t).unwrap_or_default() > age)
}

/// The cache entries (plain objects and manifests) under `prefix`, internal objects
/// excluded.
pub async fn entries(chunks: &ChunkStore, prefix: &str) -> anyhow::Result<Vec<ObjectInfo>> {
    let internal = chunks.internal_prefix();
    let mut objects = chunks
        .transfer()
        .store()
        .list(prefix, None)
        .await
        .context("cannot list entries")?
        .objects;
    objects.retain(|o| !o.key.starts_with(&internal));
    Ok(objects)
}

/// Deletes packs no manifest under the store's prefix references and that are older
/// than `grace`; with `dry_run`, only reports.
pub async fn collect(
    chunks: &ChunkStore,
    grace: Duration,
    dry_run: bool,
) -> anyhow::Result<GcReport> {
    if grace < REFRESH_AGE {
        ui::warn(format!(
            "a grace period under {}s can delete packs that uploads running now rely on",
            REFRESH_AGE.as_secs()
        ));
    }
    let store = chunks.transfer().store().clone();
    let jobs = chunks.transfer().jobs();
    let mut report = GcReport::default();

    // Packs first: anything written after this listing is not even a candidate.
    let packs_prefix = chunks.packs_prefix();
    let packs = store
        .list(&packs_prefix, None)
        .await
        .context("cannot list packs")?
        .objects;
    report.packs = packs.len();

    let all = entries(chunks, &join_prefix(chunks.prefix(), "")).await?;
    let tables: Vec<Option<Vec<Id>>> = futures::stream::iter(all)
        .map(|entry| async move {
            match chunks.fetch(&entry.key).await {
                Ok(Some(Stored::Manifest(m))) => Ok(Some(m.table.packs)),
                Ok(_) => Ok(None),
                Err(e) => Err(e.context(format!(
                    "cannot read {}; gc deletes nothing while a manifest is unreadable",
                    entry.key
                ))),
            }
        })
        .buffer_unordered(jobs)
        .try_collect()
        .await?;
    let mut referenced: HashSet<Id> = HashSet::new();
    for packs in tables.into_iter().flatten() {
        report.manifests += 1;
        referenced.extend(packs);
    }

    let now = SystemTime::now();
    let mut candidates = Vec::new();
    for pack in packs {
        let Some(id) = Id::from_hex(&pack.key[packs_prefix.len()..]) else {
            continue;
        };
        if referenced.contains(&id) {
            report.referenced += 1;
        } else if older_than(&pack, grace, now) {
            candidates.push(pack);
        } else {
            report.young += 1;
        }
    }

    let deleted: Vec<Option<u64>> = futures::stream::iter(candidates)
        .map(|pack| {
            let store = store.clone();
            async move {
                // An upload may have refreshed it since the listing: look again.
                let Some(fresh) = store.head(&pack.key).await? else {
                    return Ok(None);
                };
                if !older_than(&fresh, grace, SystemTime::now()) {
                    return Ok(None);
                }
                if dry_run {
                    println!("would delete {}", pack.key);
                } else {
                    ui::verbose(format!("deleting {}", pack.key));
                    store.delete(&pack.key).await?;
                }
                Ok::<_, anyhow::Error>(Some(fresh.size))
            }
        })
        .buffer_unordered(jobs)
        .try_collect()
        .await?;
    for size in deleted.into_iter().flatten() {
        report.deleted += 1;
        report.deleted_bytes += size;
    }
    if !dry_run {
        let left: HashSet<String> = store
            .list(&packs_prefix, None)
            .await?
            .objects
            .into_iter()
            .map(|o| o.key)
            .collect();
        report.segments_deleted = compact_segments(chunks, &left).await?;
        report.stale_writes = store
            .abort_stale_writes(&join_prefix(chunks.prefix(), ""), grace)
            .await
            .context("cannot abort unfinished uploads")?;
    }
    Ok(report)
}

/// Rewrites the index as one segment holding the chunks of packs still in `left` (full
/// pack keys), then deletes the segments it replaced. A segment written meanwhile by an
/// upload is not among those read, so it stays. Returns how many were deleted.
async fn compact_segments(chunks: &ChunkStore, left: &HashSet<String>) -> anyhow::Result<usize> {
    let segments = chunks.read_segments().await?;
    let mut live: HashMap<Id, Location> = HashMap::new();
    let mut dead_entries = false;
    for (_, table) in &segments {
        for c in &table.chunks {
            let pack = table.packs[c.pack as usize];
            if left.contains(&chunks.pack_key(&pack)) {
                live.insert(c.id, location(pack, c));
            } else {
                dead_entries = true;
            }
        }
    }
    if segments.len() <= 1 && !dead_entries {
        return Ok(0);
    }
    let mut live: Vec<(Id, Location)> = live.into_iter().collect();
    live.sort_by_key(|(_, loc)| (loc.pack, loc.offset));
    let written = match live.is_empty() {
        true => None,
        false => Some(chunks.write_segment(&table_of(live.into_iter())).await?.0),
    };
    let store = chunks.transfer().store();
    let mut deleted = 0;
    for (key, _) in &segments {
        // Same content, same name: the compacted segment may equal an old one.
        if Some(key) != written.as_ref() {
            store.delete(key).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Deletes cache entries under `prefix` last modified more than `age` ago; returns them.
pub async fn prune(
    chunks: &ChunkStore,
    prefix: &str,
    age: Duration,
    dry_run: bool,
) -> anyhow::Result<Vec<ObjectInfo>> {
    if prefix.split('/').any(|s| s == "..") {
        bail!("prefix `{prefix}` contains `..`");
    }
    let now = SystemTime::now();
    let mut old = entries(chunks, prefix).await?;
    old.retain(|o| older_than(o, age, now));
    if !dry_run {
        let store = chunks.transfer().store();
        futures::stream::iter(&old)
            .map(|o| store.delete(&o.key))
            .buffer_unordered(chunks.transfer().jobs())
            .try_collect::<Vec<()>>()
            .await?;
    }
    Ok(old)
}
