//! Garbage collection of packs no manifest references, pruning of entries unused for a
//! while, and the last-use markers that tell the two apart.
//!
//! Safety beside concurrent uploads and restores rests on these rules (docs/format.md
//! explains why they suffice): a manifest is written only after all its packs; an
//! upload refreshes the modification time of reused packs older than [`REFRESH_AGE`];
//! gc deletes in two phases, like restic's prune: a pack no manifest references and
//! older than the grace period is first only *condemned* (recorded with the time), and
//! a later gc deletes it only once it was condemned at least the grace period ago, is
//! still unreferenced, and a HEAD right before the delete still shows it older than the
//! grace. gc deletes nothing when any manifest fails to decode.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::Id;
use super::layout::Layout;
use super::store::{ChunkStore, REFRESH_AGE, Stored};
use crate::store::{Body, ObjectInfo, PutOptions, StoreError};
use crate::transfer::Transfer;
use crate::ui;

/// A hit marks its entry used at most this often: marking costs a HEAD and a PUT, and
/// prune durations are counted in days.
pub const MARK_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Most manifest reads gc has in flight (with the default 8 jobs).
const MANIFEST_READS_IN_FLIGHT: usize = 64;
/// Most bytes of manifests (as stored) gc reads at once, in KiB.
const MANIFEST_KIB_IN_FLIGHT: usize = 16 * 1024;
/// First line of the condemned-packs object (docs/format.md).
const CONDEMNED_HEADER: &str = "cacher-condemned-packs 1";
/// Largest condemned-packs object read (about 800,000 packs); a larger one is ignored,
/// which only delays deletions.
const MAX_CONDEMNED_OBJECT: u64 = 64 * 1024 * 1024;

/// What one gc run found and did.
#[derive(Debug, Default)]
pub struct GcReport {
    /// Manifests read.
    pub manifests: usize,
    /// Packs listed.
    pub packs: usize,
    /// Packs some manifest references.
    pub referenced: usize,
    /// Unreferenced packs kept uncondemned because they are younger than the grace.
    pub young: usize,
    /// Packs condemned by this run (or that would be, with `dry_run`).
    pub condemned: usize,
    /// Packs condemned earlier, less than the grace period ago: deleted by a later run.
    pub waiting: usize,
    /// Condemned packs pardoned: referenced again, or refreshed by an upload.
    pub pardoned: usize,
    /// Condemned packs deleted (or that would be, with `dry_run`).
    pub deleted: usize,
    /// Bytes those packs held.
    pub deleted_bytes: u64,
    /// Last-use markers of entries that no longer exist, deleted.
    pub markers_deleted: usize,
    /// Index segments replaced by compacted ones (or skipped as unreadable).
    pub segments_deleted: usize,
    /// Unfinished writes (multipart uploads, temp files) older than the grace, aborted.
    pub stale_writes: usize,
}

fn older_than(info: &ObjectInfo, age: Duration, now: SystemTime) -> bool {
    info.modified
        .is_some_and(|t| now.duration_since(t).unwrap_or_default() > age)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The cache entries (plain objects and manifests) under `prefix`: internal objects,
/// this store's and those of stores nested below it, excluded.
pub async fn entries(chunks: &ChunkStore, prefix: &str) -> anyhow::Result<Vec<ObjectInfo>> {
    let mut objects = chunks
        .transfer()
        .store()
        .list(prefix, None)
        .await
        .context("cannot list entries")?
        .objects;
    objects.retain(|o| !chunks.layout().is_internal(&o.key));
    Ok(objects)
}

/// Packs gc condemned, with when (unix seconds): the state between two gc runs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Condemned(pub HashMap<Id, u64>);

impl Condemned {
    /// The text form stored in the bucket: a header line, then `<pack hex> <seconds>`
    /// per line, sorted so equal states give equal bytes.
    pub fn encode(&self) -> String {
        let mut lines: Vec<String> = self.0.iter().map(|(id, t)| format!("{id} {t}")).collect();
        lines.sort();
        let mut out = format!("{CONDEMNED_HEADER}\n");
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// Parses [`Condemned::encode`]'s form. Anything unexpected is dropped: forgetting
    /// a condemnation only delays a deletion, so a damaged state is never an error.
    pub fn decode(text: &str) -> Condemned {
        let mut lines = text.lines();
        if lines.next() != Some(CONDEMNED_HEADER) {
            ui::warn("ignoring gc's list of condemned packs: unknown format");
            return Condemned::default();
        }
        let parsed = lines.filter_map(|line| {
            let (id, secs) = line.split_once(' ')?;
            Some((Id::from_hex(id)?, secs.parse().ok()?))
        });
        Condemned(parsed.collect())
    }
}

/// Reads gc's condemned packs and the object's text as stored (`None` when there is
/// no object); a list too large or not text counts as empty.
async fn read_condemned(
    transfer: &Transfer,
    key: &str,
) -> anyhow::Result<(Condemned, Option<String>)> {
    let Some(info) = transfer.store().head(key).await? else {
        return Ok((Condemned::default(), None));
    };
    if info.size > MAX_CONDEMNED_OBJECT {
        ui::warn(format!("ignoring {key}: {} bytes is too large", info.size));
        return Ok((Condemned::default(), Some(String::new())));
    }
    let mut data = Vec::new();
    match transfer
        .read_range(key, None, 0..info.size, &mut data)
        .await
    {
        Ok(()) => {
            let text = String::from_utf8_lossy(&data).into_owned();
            Ok((Condemned::decode(&text), Some(text)))
        }
        Err(StoreError::NotFound(_)) => Ok((Condemned::default(), None)),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot read {key}"))),
    }
}

/// Records the condemned packs, deleting the object when there are none; sends nothing
/// when the object already says exactly that (most runs change nothing).
async fn write_condemned(
    transfer: &Transfer,
    key: &str,
    state: &Condemned,
    stored: Option<&str>,
) -> anyhow::Result<()> {
    let text = state.encode();
    let written = match (state.0.is_empty(), stored) {
        (true, None) => return Ok(()),
        (false, Some(old)) if old == text => return Ok(()),
        (true, Some(_)) => transfer.delete_many(&[key.to_string()]).await,
        (false, _) => transfer.put_bytes(key, Bytes::from(text)).await,
    };
    written.with_context(|| format!("cannot record the condemned packs in {key}"))
}

/// What gc decides for one listed pack, before the HEAD that confirms it.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A manifest references it.
    Referenced,
    /// Unreferenced but younger than the grace: left alone.
    Young,
    /// Unreferenced, old, not yet condemned: condemn it (after a HEAD).
    Condemn,
    /// Condemned less than the grace period ago: wait.
    Wait,
    /// Condemned long enough ago: delete it (after a HEAD).
    Delete,
}

fn verdict(
    pack: &ObjectInfo,
    referenced: bool,
    condemned_at: Option<u64>,
    grace: Duration,
    now: SystemTime,
) -> Verdict {
    match (referenced, condemned_at) {
        (true, _) => Verdict::Referenced,
        (false, Some(at)) if at.saturating_add(grace.as_secs()) <= unix_secs(now) => {
            Verdict::Delete
        }
        (false, Some(_)) => Verdict::Wait,
        (false, None) if older_than(pack, grace, now) => Verdict::Condemn,
        (false, None) => Verdict::Young,
    }
}

/// Condemns packs no manifest under the store's prefix references and that are older
/// than `grace`, deletes those condemned at least `grace` ago, deletes the last-use
/// markers of entries that are gone, compacts the index and aborts stale writes; with
/// `dry_run`, only reports (and prints what it would do on stdout).
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
    let started = SystemTime::now();
    let layout = chunks.layout();
    let transfer = chunks.transfer();
    let store = transfer.store().clone();
    let jobs = transfer.jobs();
    let mut report = GcReport::default();

    // Packs first: anything written after this listing is not even a candidate.
    let packs = chunks
        .list_internal(&layout.packs_prefix(), "packs")
        .await?;
    report.packs = packs.len();

    let all = entries(chunks, &layout.entries_prefix()).await?;
    let live_entries: HashSet<String> = all.iter().map(|e| e.key.clone()).collect();
    let tables = read_entries(chunks, all, |_, stored| match stored {
        Some(Stored::Manifest(m)) => Some(m.table.packs),
        _ => None,
    })
    .await
    .context("gc deletes nothing while a manifest is unreadable")?;
    let mut referenced: HashSet<Id> = HashSet::new();
    for packs in tables.into_iter().flatten() {
        report.manifests += 1;
        referenced.extend(packs);
    }

    let state_key = layout.condemned_key();
    let (old_state, stored_state) = read_condemned(transfer, &state_key).await?;
    let mut state = Condemned::default();
    let now = SystemTime::now();
    let (mut to_condemn, mut to_delete) = (Vec::new(), Vec::new());
    for pack in packs {
        let Some(id) = layout.pack_id(&pack.key) else {
            continue;
        };
        let condemned_at = old_state.0.get(&id).copied();
        match verdict(&pack, referenced.contains(&id), condemned_at, grace, now) {
            Verdict::Referenced => {
                report.referenced += 1;
                report.pardoned += usize::from(condemned_at.is_some());
            }
            Verdict::Young => report.young += 1,
            Verdict::Wait => {
                report.waiting += 1;
                state.0.insert(id, condemned_at.unwrap_or_default());
            }
            Verdict::Condemn => to_condemn.push((id, pack)),
            Verdict::Delete => to_delete.push(pack),
        }
    }
    // Condemned packs no longer listed were deleted by someone else: forgotten here.

    // An upload may have refreshed a pack since the listing: look again, one HEAD each.
    let condemn_checks: Vec<(Id, ObjectInfo, bool)> = futures::stream::iter(to_condemn)
        .map(|(id, pack)| {
            let store = store.clone();
            async move {
                let fresh = store.head(&pack.key).await?;
                let old = fresh
                    .as_ref()
                    .is_some_and(|f| older_than(f, grace, SystemTime::now()));
                Ok::<_, StoreError>((id, pack, old))
            }
        })
        .buffer_unordered(jobs)
        .try_collect()
        .await
        .context("cannot check a pack before condemning it")?;
    let condemned_at = unix_secs(SystemTime::now());
    for (id, pack, old) in condemn_checks {
        if !old {
            report.young += 1;
            continue;
        }
        if dry_run {
            ui::line(format_args!("would condemn {}", pack.key))?;
        }
        report.condemned += 1;
        state.0.insert(id, condemned_at);
    }

    let delete_checks: Vec<(ObjectInfo, Option<ObjectInfo>)> = futures::stream::iter(to_delete)
        .map(|pack| {
            let store = store.clone();
            async move {
                let fresh = store.head(&pack.key).await?;
                Ok::<_, StoreError>((pack, fresh))
            }
        })
        .buffer_unordered(jobs)
        .try_collect()
        .await
        .context("cannot check a pack before deleting it")?;
    let mut doomed = Vec::new();
    for (pack, fresh) in delete_checks {
        match fresh {
            // Gone already: nothing to do, and forgotten.
            None => {}
            Some(fresh) if older_than(&fresh, grace, SystemTime::now()) => {
                if dry_run {
                    ui::line(format_args!("would delete {}", pack.key))?;
                } else {
                    ui::verbose(format!("deleting {}", pack.key));
                }
                report.deleted += 1;
                report.deleted_bytes += fresh.size;
                doomed.push(pack.key);
            }
            // Refreshed by an upload that reuses it: pardoned; the clock starts again.
            Some(_) => report.pardoned += 1,
        }
    }

    report.markers_deleted = collect_markers(chunks, &live_entries, started, dry_run).await?;
    if dry_run {
        return Ok(report);
    }
    transfer
        .delete_many(&doomed)
        .await
        .context("cannot delete condemned packs")?;
    write_condemned(transfer, &state_key, &state, stored_state.as_deref()).await?;
    report.segments_deleted = super::index::compact(chunks).await?;
    report.stale_writes = store
        .abort_stale_writes(&layout.entries_prefix(), grace)
        .await
        .context("cannot abort unfinished uploads")?;
    Ok(report)
}

/// The packs the manifest `entry` references; `None` for an entry that is no
/// manifest (or is gone). An unreadable manifest is an error: gc then deletes nothing.
/// Reads every one of `entries` (listed cache entries) and keeps what `summary` takes
/// from each (`None`: gone since the listing). Manifests are small: their reads cost
/// the server's latency, so many run at once, as many as fit in a byte budget (a large
/// tree's manifest takes megabytes decoded), and only the summaries are held.
pub async fn read_entries<T: Send>(
    chunks: &ChunkStore,
    entries: Vec<ObjectInfo>,
    summary: impl Fn(&ObjectInfo, Option<Stored>) -> T + Sync,
) -> anyhow::Result<Vec<T>> {
    let budget = Arc::new(tokio::sync::Semaphore::new(MANIFEST_KIB_IN_FLIGHT));
    let jobs = chunks.transfer().jobs();
    let summary = &summary;
    futures::stream::iter(entries)
        .map(|entry| {
            let budget = budget.clone();
            async move {
                let kib = entry
                    .size
                    .div_ceil(1024)
                    .clamp(1, MANIFEST_KIB_IN_FLIGHT as u64);
                let _permit = budget.acquire_many_owned(kib as u32).await?;
                let stored = chunks
                    .read_listed(&entry)
                    .await
                    .with_context(|| format!("cannot read {}", entry.key))?;
                Ok::<_, anyhow::Error>(summary(&entry, stored))
            }
        })
        .buffer_unordered((jobs * 8).min(MANIFEST_READS_IN_FLIGHT))
        .try_collect()
        .await
}

/// What the entries under a prefix hold and cost: `cacher stats`.
#[derive(Debug, Default, serde::Serialize)]
pub struct Usage {
    /// Entries: plain files, directory trees (of one path or several), docker images.
    pub files: usize,
    pub trees: usize,
    pub images: usize,
    /// Bytes a restore of every entry writes (plain files' sizes, trees' and images'
    /// content streams).
    pub logical_bytes: u64,
    /// Bytes of the entry objects themselves (plain files and manifests).
    pub entry_bytes: u64,
    /// Packs the trees and images reference, and their bytes in the bucket (a pack
    /// shared with entries outside the prefix counts whole).
    pub packs: usize,
    pub pack_bytes: u64,
    /// When an entry was last used (uploaded or hit), the newest and the oldest.
    #[serde(skip)]
    pub newest_use: Option<SystemTime>,
    #[serde(skip)]
    pub oldest_use: Option<SystemTime>,
}

impl Usage {
    /// What the entries cost in the bucket.
    pub fn stored_bytes(&self) -> u64 {
        self.entry_bytes + self.pack_bytes
    }

    /// Logical bytes per stored byte; 1 for an empty prefix.
    pub fn dedup_ratio(&self) -> f64 {
        match self.stored_bytes() {
            0 => 1.0,
            stored => self.logical_bytes as f64 / stored as f64,
        }
    }
}

/// The [`Usage`] of the entries under `prefix`: every manifest is read (as gc reads
/// them), the packs and last-use markers are listed.
pub async fn usage(chunks: &ChunkStore, prefix: &str) -> anyhow::Result<Usage> {
    let layout = chunks.layout();
    let all = entries(chunks, prefix).await?;
    let markers: HashMap<String, Option<SystemTime>> = list_markers(chunks)
        .await?
        .into_iter()
        .map(|m| (m.key, m.modified))
        .collect();
    let mut usage = Usage::default();
    for entry in &all {
        let marked = markers.get(&layout.used_key(&entry.key)).copied().flatten();
        if let Some(used) = last_use(entry, marked) {
            usage.newest_use = usage.newest_use.max(Some(used));
            usage.oldest_use = Some(usage.oldest_use.map_or(used, |t| t.min(used)));
        }
    }
    let read = read_entries(chunks, all, |entry, stored| {
        let summary = match &stored {
            Some(Stored::Manifest(m)) => Some((Some(m.kind), m.stream_len, m.table.packs.clone())),
            Some(_) => Some((None, entry.size, Vec::new())),
            None => None,
        };
        summary.map(|s| (entry.size, s))
    })
    .await?;
    let mut referenced: HashSet<Id> = HashSet::new();
    for (size, (kind, logical, packs)) in read.into_iter().flatten() {
        match kind {
            None => usage.files += 1,
            Some(super::format::ManifestKind::Docker) => usage.images += 1,
            Some(_) => usage.trees += 1,
        }
        usage.entry_bytes += size;
        usage.logical_bytes += logical;
        referenced.extend(packs);
    }
    let packs = chunks
        .list_internal(&layout.packs_prefix(), "packs")
        .await?;
    for pack in packs {
        if layout
            .pack_id(&pack.key)
            .is_some_and(|id| referenced.contains(&id))
        {
            usage.packs += 1;
            usage.pack_bytes += pack.size;
        }
    }
    Ok(usage)
}

/// Every last-use marker under the store's prefix.
async fn list_markers(chunks: &ChunkStore) -> anyhow::Result<Vec<ObjectInfo>> {
    chunks
        .list_internal(&chunks.layout().used_prefix(), "last-use markers")
        .await
}

/// Deletes the last-use markers of entries not among `live` (the entries listed at
/// the start of the run). A marker written after `started` is kept: its entry may be
/// newer than the listing. Returns how many were (or would be) deleted.
async fn collect_markers(
    chunks: &ChunkStore,
    live: &HashSet<String>,
    started: SystemTime,
    dry_run: bool,
) -> anyhow::Result<usize> {
    let layout = chunks.layout();
    let live: HashSet<String> = live.iter().map(|k| layout.used_key(k)).collect();
    let stale: Vec<String> = list_markers(chunks)
        .await?
        .into_iter()
        .filter(|m| !live.contains(&m.key) && m.modified.is_some_and(|t| t < started))
        .map(|m| m.key)
        .collect();
    if dry_run {
        for key in &stale {
            ui::line(format_args!("would delete {key}"))?;
        }
    } else {
        chunks
            .transfer()
            .delete_many(&stale)
            .await
            .context("cannot delete stale last-use markers")?;
    }
    Ok(stale.len())
}

/// When an entry was last used: the later of its own modification (an upload) and its
/// last-use marker's (a hit).
pub fn last_use(entry: &ObjectInfo, marker: Option<SystemTime>) -> Option<SystemTime> {
    entry.modified.max(marker)
}

/// Deletes cache entries under `prefix` not used (uploaded or hit) for more than
/// `age`, and their last-use markers; returns the entries.
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
    let layout = chunks.layout();
    let mut old = entries(chunks, prefix).await?;
    let markers: HashMap<String, Option<SystemTime>> = list_markers(chunks)
        .await?
        .into_iter()
        .map(|m| (m.key, m.modified))
        .collect();
    let marker_of = |entry: &ObjectInfo| {
        let key = layout.used_key(&entry.key);
        markers.get(&key).map(|t| (key, *t))
    };
    old.retain(|entry| {
        let marked = marker_of(entry).and_then(|(_, t)| t);
        last_use(entry, marked).is_some_and(|t| now.duration_since(t).unwrap_or_default() > age)
    });
    if !dry_run {
        let doomed: Vec<String> = old
            .iter()
            .flat_map(|entry| {
                [
                    Some(entry.key.clone()),
                    marker_of(entry).map(|(key, _)| key),
                ]
            })
            .flatten()
            .collect();
        chunks
            .transfer()
            .delete_many(&doomed)
            .await
            .context("cannot delete pruned entries")?;
    }
    Ok(old)
}

/// Whether a hit on an entry modified at `entry_modified` must look at its marker: not
/// when the entry itself was written within [`MARK_INTERVAL`] (its own time says it is
/// fresh).
pub fn entry_needs_marker(entry_modified: Option<SystemTime>, now: SystemTime) -> bool {
    !within_interval(entry_modified, now)
}

/// Whether a marker (its modification time when it exists) must be written again.
pub fn marker_is_stale(marker: Option<Option<SystemTime>>, now: SystemTime) -> bool {
    marker.is_none_or(|modified| !within_interval(modified, now))
}

fn within_interval(t: Option<SystemTime>, now: SystemTime) -> bool {
    t.is_some_and(|t| now.duration_since(t).unwrap_or_default() < MARK_INTERVAL)
}

/// Records a hit on `entry` (its metadata as the restore read it) so `prune` counts from it: at
/// most once per [`MARK_INTERVAL`] per entry, nothing for an entry written within it.
/// Best effort: any failure (read-only credentials, a fault) is ignored and shown only
/// with `-v`, so marking never fails or clutters a restore.
pub async fn mark_used(transfer: &Transfer, layout: &Layout, entry: &ObjectInfo) {
    let now = SystemTime::now();
    if !entry_needs_marker(entry.modified, now) {
        return;
    }
    let key = layout.used_key(&entry.key);
    let store = transfer.store();
    let marked = async {
        let marker = store.head(&key).await?;
        if !marker_is_stale(marker.map(|m| m.modified), now) {
            return Ok(());
        }
        let body = Bytes::from(entry.key.clone());
        let opts = PutOptions {
            crc32: Some(crc32fast::hash(&body)),
            ..PutOptions::default()
        };
        store.put(&key, Body::Bytes(body), &opts).await
    };
    if let Err(e) = marked.await {
        ui::verbose(format!("could not mark {} as used: {e}", entry.key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn pack(age: Duration, now: SystemTime) -> ObjectInfo {
        ObjectInfo {
            key: "p".into(),
            size: 1,
            modified: Some(now - age),
            etag: None,
            sha256: None,
            signature: None,
        }
    }

    #[test]
    fn packs_are_condemned_first_and_deleted_a_grace_period_later() {
        let now = SystemTime::now();
        let secs = unix_secs(now);
        let old = pack(2 * DAY, now);
        let young = pack(Duration::from_secs(60), now);
        assert_eq!(verdict(&old, true, None, DAY, now), Verdict::Referenced);
        assert_eq!(verdict(&old, true, Some(0), DAY, now), Verdict::Referenced);
        assert_eq!(verdict(&young, false, None, DAY, now), Verdict::Young);
        assert_eq!(verdict(&old, false, None, DAY, now), Verdict::Condemn);
        assert_eq!(
            verdict(&old, false, Some(secs - 60), DAY, now),
            Verdict::Wait
        );
        assert_eq!(
            verdict(&old, false, Some(secs - 2 * 86400), DAY, now),
            Verdict::Delete
        );
        // With a zero grace, the second run deletes what the first condemned.
        assert_eq!(
            verdict(&old, false, Some(secs), Duration::ZERO, now),
            Verdict::Delete
        );
    }

    #[test]
    fn the_condemned_list_round_trips_and_damage_only_forgets() {
        let mut state = Condemned::default();
        state.0.insert(Id::of(b"a"), 1_700_000_000);
        state.0.insert(Id::of(b"b"), 1_700_000_100);
        let text = state.encode();
        assert!(text.starts_with("cacher-condemned-packs 1\n"));
        assert_eq!(Condemned::decode(&text), state);
        let damaged = format!("{text}not a line\n{} soon\n", Id::of(b"c"));
        assert_eq!(Condemned::decode(&damaged), state);
        assert_eq!(Condemned::decode("something else\n"), Condemned::default());
    }

    #[test]
    fn a_hit_marks_an_entry_at_most_once_a_day() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        assert!(!entry_needs_marker(Some(now - hour), now), "fresh entry");
        assert!(entry_needs_marker(Some(now - 2 * DAY), now));
        assert!(entry_needs_marker(None, now));
        assert!(marker_is_stale(None, now), "no marker yet");
        assert!(!marker_is_stale(Some(Some(now - hour)), now));
        assert!(marker_is_stale(Some(Some(now - 2 * DAY)), now));
    }

    #[test]
    fn last_use_is_the_later_of_upload_and_hit() {
        let now = SystemTime::now();
        let entry = pack(10 * DAY, now);
        assert_eq!(last_use(&entry, None), entry.modified);
        assert_eq!(last_use(&entry, Some(now - DAY)), Some(now - DAY));
        assert_eq!(last_use(&entry, Some(now - 20 * DAY)), entry.modified);
    }
}
