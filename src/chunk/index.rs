//! The index as gc leaves it: segments sorted by chunk id, described by a summary.
//! Uploads read the summary and fetch only the segments that may hold a chunk they
//! cut ([`SummaryIndex`]); the segments written since, each through its filter
//! ([`FilterIndex`]); gc rewrites the index into that shape in bounded memory
//! ([`compact`]). docs/format.md, "Index summary", has the layout and the figures.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;

use super::Id;
use super::fetched::FetchedSegments;
use super::format::ChunkTable;
use super::store::{
    ChunkStore, Location, MAX_SEGMENT_CHUNKS, Named, SegmentRead, location, table_of,
};
use super::summary::{self, Summary, SummarySegment};
use crate::store::ObjectInfo;
use crate::ui;

/// How old a filter without its segment must be before gc deletes it: an upload writes
/// a filter, then its segment, within seconds.
const ORPHAN_FILTER_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Largest summary object read: zstd cannot grow a 256 MiB body much.
pub const MAX_SUMMARY_OBJECT: u64 = 260 * 1024 * 1024;
/// Most chunks a summary describes: four bytes each, within the 256 MiB body readers
/// accept (with room for the segment records).
pub const MAX_SUMMARY_CHUNKS: usize = 60_000_000;

/// The chunks of the segments a summary describes, looked up on demand.
pub struct SummaryIndex {
    chunks: ChunkStore,
    handle: tokio::runtime::Handle,
    summary: Summary,
    /// The listed object of each segment the summary describes; `None` when it is not
    /// listed (deleted since), whose chunks are then unknown.
    objects: Vec<Option<ObjectInfo>>,
    /// The segments fetched so far.
    fetched: FetchedSegments,
}

impl SummaryIndex {
    /// Where the summarised segments say `id` is stored. The first lookup that needs
    /// a segment fetches it, blocking: call from a blocking thread, not async code.
    pub fn lookup(&self, id: &Id) -> Option<Location> {
        let i = self.summary.candidate(id)?;
        self.fetched.lookup(i, id, || self.fetch(i))
    }

    fn fetch(&self, i: usize) -> Option<ChunkTable> {
        fetch_sorted(&self.chunks, &self.handle, self.objects[i].as_ref()?)
    }
}

/// Reads the index segment `object`, blocking, its chunks sorted by id for lookups;
/// `None` when it cannot be read (its chunks are then sent again if needed).
fn fetch_sorted(
    chunks: &ChunkStore,
    handle: &tokio::runtime::Handle,
    object: &ObjectInfo,
) -> Option<ChunkTable> {
    match handle.block_on(chunks.read_segment(object)) {
        Ok(SegmentRead::Table(mut table)) => {
            table.chunks.sort_unstable_by_key(|c| c.id);
            Some(table)
        }
        Ok(_) => None,
        Err(e) => {
            ui::warn(format!(
                "cannot read index segment {}: {e}; chunks it lists may be sent again",
                object.key
            ));
            None
        }
    }
}

/// The segments no summary describes, each known by its filter (the fingerprints of
/// its chunks) and fetched only for a chunk whose fingerprint is there: 8 bytes a
/// chunk held instead of about 60 for a segment read whole.
///
/// Fingerprints are 40 bits, each stored with its segment's index in the low 24 bits
/// of one `u64`.
pub struct FilterIndex {
    chunks: ChunkStore,
    handle: tokio::runtime::Handle,
    objects: Vec<ObjectInfo>,
    /// The segments fetched so far.
    fetched: FetchedSegments,
    /// Every segment's fingerprints, each with the segment's index, in buckets by
    /// their top [`BUCKET_BITS`], each bucket sorted: one search a lookup, however many
    /// segments were written since the last gc.
    buckets: Vec<Vec<u64>>,
}

/// Bits of a merged fingerprint that hold the segment's index.
const SEGMENT_BITS: u32 = 24;

/// Top bits of a fingerprint that choose its bucket. An upload waits for the filters
/// before its first lookup; spread into 256 buckets as they arrive, they are sorted
/// as 256 small sorts on every core, not one of them all (at 10^7 chunks: 120-135 ms
/// on one core, most of it while the other sat idle).
const BUCKET_BITS: u32 = 8;

/// The bucket of `fingerprint` in a [`FilterIndex`].
fn filter_bucket(fingerprint: u64) -> usize {
    (fingerprint >> (summary::FINGERPRINT_BITS - BUCKET_BITS)) as usize
}

impl FilterIndex {
    /// Where a filtered segment says `id` is stored, the first such place that
    /// `usable` accepts. The first lookup that needs a segment fetches it, blocking:
    /// call from a blocking thread, not async code.
    pub fn lookup(&self, id: &Id, usable: impl Fn(Location) -> bool) -> Option<Location> {
        let fingerprint = summary::filter_fingerprint(id);
        let bucket = &self.buckets[filter_bucket(fingerprint)];
        let first = bucket.partition_point(|&m| m >> SEGMENT_BITS < fingerprint);
        bucket[first..]
            .iter()
            .take_while(|&&m| m >> SEGMENT_BITS == fingerprint)
            .find_map(|&m| {
                let i = (m & ((1 << SEGMENT_BITS) - 1)) as usize;
                let fetch = || fetch_sorted(&self.chunks, &self.handle, &self.objects[i]);
                self.fetched.lookup(i, id, fetch).filter(|loc| usable(*loc))
            })
    }

    /// How many chunks the filters describe.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }

    /// Whether they describe none.
    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(Vec::is_empty)
    }
}

/// The filters of the index segments `listed`, as an index, and the segments without
/// a usable one among `filters` (written by cacher before filters, or whose filter is
/// gone or damaged, or was written after `filters` were listed), which are read whole.
pub async fn load_filters(
    chunks: &ChunkStore,
    listed: Vec<ObjectInfo>,
    filters: Vec<ObjectInfo>,
) -> anyhow::Result<(Option<FilterIndex>, Vec<ObjectInfo>)> {
    if listed.is_empty() {
        return Ok((None, listed));
    }
    let layout = chunks.layout();
    let filters: HashMap<Id, ObjectInfo> = filters
        .into_iter()
        .filter_map(|o| Some((layout.filter_segment(&o.key)?, o)))
        .collect();
    // Each bucket sized for its share of the fingerprints the filters' sizes promise,
    // and 5 % more (at 10^7 chunks, 25 standard deviations), so none is reallocated.
    let promised: u64 = (listed.iter())
        .filter_map(|segment| filters.get(&layout.segment_id(&segment.key)?))
        .filter(|filter| filter.size <= summary::MAX_FILTER_OBJECT)
        .map(|filter| filter.size)
        .sum::<u64>()
        / (summary::FINGERPRINT_BITS / 8) as u64;
    let per_bucket = ((promised >> BUCKET_BITS) * 21 / 20) as usize + 64;
    let mut buckets: Vec<Vec<u64>> = (0..1 << BUCKET_BITS)
        .map(|_| Vec::with_capacity(per_bucket))
        .collect();
    let read = futures::stream::iter(listed)
        .map(|segment| {
            let filter = layout
                .segment_id(&segment.key)
                .and_then(|id| filters.get(&id));
            async move {
                let fingerprints = match filter {
                    Some(filter) => read_filter(chunks, filter).await,
                    None => None,
                };
                (segment, fingerprints)
            }
        })
        .buffer_unordered(chunks.transfer().jobs());
    // Merged as each arrives, so no more than `jobs` filters are held beside the
    // buckets (holding them all first doubled the index's memory: 80 MB more at 10^7
    // chunks).
    let (mut objects, mut whole) = (Vec::new(), Vec::new());
    let mut read = std::pin::pin!(read);
    while let Some((object, fingerprints)) = read.next().await {
        let i = objects.len() as u64;
        match fingerprints {
            Some(fingerprints) if i < 1 << SEGMENT_BITS => {
                for f in fingerprints {
                    buckets[filter_bucket(f)].push(f << SEGMENT_BITS | i);
                }
                objects.push(object);
            }
            _ => whole.push(object),
        }
    }
    if objects.is_empty() {
        return Ok((None, whole));
    }
    let buckets = tokio::task::spawn_blocking(move || {
        sort_on_every_core(&mut buckets);
        buckets
    })
    .await
    .context("the filter sort stopped")?;
    let index = Some(FilterIndex {
        chunks: chunks.clone(),
        handle: tokio::runtime::Handle::current(),
        fetched: FetchedSegments::new(objects.len()),
        objects,
        buckets,
    });
    Ok((index, whole))
}

/// Sorts each bucket, the buckets shared among threads of their own: not rayon's,
/// whose workers may all be waiting, in lookups, for this very index.
fn sort_on_every_core(buckets: &mut [Vec<u64>]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    std::thread::scope(|scope| {
        for part in buckets.chunks_mut(buckets.len().div_ceil(threads)) {
            scope.spawn(|| part.iter_mut().for_each(|b| b.sort_unstable()));
        }
    });
}

/// One segment's filter; `None` (said with `-v`) when it cannot be read, is too large
/// or does not decode: the segment is then read whole, as without a filter.
async fn read_filter(chunks: &ChunkStore, filter: &ObjectInfo) -> Option<Vec<u64>> {
    let ignoring = |why: String| {
        ui::verbose(format!("ignoring the segment filter {}: {why}", filter.key));
        None
    };
    if filter.size > summary::MAX_FILTER_OBJECT {
        return ignoring(format!("{} bytes", filter.size));
    }
    let mut data = Vec::new();
    let read = chunks
        .transfer()
        .read_range(&filter.key, None, 0..filter.size, &mut data)
        .await;
    if let Err(e) = read {
        return ignoring(e.to_string());
    }
    match summary::decode_filter(&filter.key, &data) {
        Ok(fingerprints) => Some(fingerprints),
        Err(e) => ignoring(e.to_string()),
    }
}

/// The newest of the index summaries `summaries`, and the keys of the segments among
/// `listed` it describes (which an upload then need not read). `None` when there is
/// none, or the newest does not decode (a warning; the segments are then read whole).
/// An older summary is never used: it describes segments a later gc replaced. A
/// summary listed after the segments may describe segments not listed; those are
/// simply not covered.
pub async fn load_summary(
    chunks: &ChunkStore,
    summaries: Vec<ObjectInfo>,
    listed: &[ObjectInfo],
) -> anyhow::Result<Option<(SummaryIndex, HashSet<String>)>> {
    let Some(newest) = summaries.into_iter().max_by_key(|o| o.modified) else {
        return Ok(None);
    };
    let Some(summary) = read_summary(chunks, &newest).await? else {
        return Ok(None);
    };
    let by_key: HashMap<&str, &ObjectInfo> = listed.iter().map(|o| (o.key.as_str(), o)).collect();
    let objects: Vec<Option<ObjectInfo>> = summary
        .segments()
        .iter()
        .map(|s| {
            let key = chunks.layout().segment_key(&s.id);
            by_key.get(key.as_str()).map(|o| (*o).clone())
        })
        .collect();
    let covered = objects.iter().flatten().map(|o| o.key.clone()).collect();
    let fetched = FetchedSegments::new(objects.len());
    let index = SummaryIndex {
        chunks: chunks.clone(),
        handle: tokio::runtime::Handle::current(),
        summary,
        objects,
        fetched,
    };
    Ok(Some((index, covered)))
}

/// The index summary objects listed now.
pub async fn list_summaries(chunks: &ChunkStore) -> anyhow::Result<Vec<ObjectInfo>> {
    chunks
        .list_internal(&chunks.layout().summary_prefix(), "index summaries")
        .await
}

/// The index segment filter objects listed now.
pub async fn list_filters(chunks: &ChunkStore) -> anyhow::Result<Vec<ObjectInfo>> {
    chunks
        .list_internal(&chunks.layout().filter_prefix(), "index segment filters")
        .await
}

/// Reads and checks one summary; `None` (with a warning) when it cannot be trusted or
/// vanished.
async fn read_summary(chunks: &ChunkStore, object: &ObjectInfo) -> anyhow::Result<Option<Summary>> {
    let ignoring = |why: String| {
        ui::warn(format!("ignoring index summary {}: {why}", object.key));
        Ok(None)
    };
    let Some(id) = chunks.layout().summary_id(&object.key) else {
        return ignoring("not named by its hash".into());
    };
    let read = chunks.read_named(object, id, MAX_SUMMARY_OBJECT).await;
    let data = match read.context("cannot read the index summary")? {
        Named::Bytes(data) => data,
        Named::Untrusted(why) => return ignoring(why),
        Named::Gone => return Ok(None),
    };
    match Summary::decode(&object.key, &data) {
        Ok(summary) => Ok(Some(summary)),
        // The error names the summary already.
        Err(e) => {
            ui::warn(format!("ignoring index summary: {e}"));
            Ok(None)
        }
    }
}

/// Temp files the index is spread over by the top bits of chunk ids: few enough to
/// stay far below any open-file limit, enough that one holds 1/64 of the index.
const BUCKETS: usize = 64;
/// Bytes of a chunk in a bucket file: id, pack number, offset, stored length, length.
const RECORD: usize = 32 + 4 * 4;

/// Rewrites the index as segments sorted by chunk id, with disjoint ranges, holding
/// the chunks of packs that still exist, and a summary of them; then deletes the
/// segments and summaries it replaced and the segments that could not be trusted.
/// Memory stays bounded whatever the index holds: chunks are first spread over
/// [`BUCKETS`] temp files by the top bits of their id, then each file is sorted alone.
/// Segments are listed before packs: an upload writes its packs before its segment,
/// so the packs of every segment read are listed, and a segment written after the
/// listing is not read, so it stays. Returns how many segments were deleted; nothing
/// is rewritten when the newest summary already describes exactly the live index.
pub async fn compact(chunks: &ChunkStore) -> anyhow::Result<usize> {
    let layout = chunks.layout();
    let summaries = list_summaries(chunks).await?;
    // Before the segments: a filter is written before its segment (see below).
    let filters = list_filters(chunks).await?;
    let listed = chunks.list_segments().await?;
    let left: HashSet<Id> = chunks.list_packs().await?.into_keys().collect();
    let spill_dir = tempfile::tempdir().context("cannot create a temp dir to compact the index")?;
    let mut spill = Spill::create(spill_dir.path())?;
    let (mut read, mut skipped, mut dead) = (Vec::new(), Vec::new(), false);
    let mut reads = futures::stream::iter(&listed)
        .map(|seg| async move { (seg, chunks.read_segment(seg).await) })
        .buffer_unordered(chunks.transfer().jobs());
    while let Some((seg, outcome)) = reads.next().await {
        match outcome.context("cannot read the chunk index")? {
            SegmentRead::Table(table) => {
                read.push(seg.key.clone());
                for c in &table.chunks {
                    let pack = table.packs[c.pack as usize];
                    if left.contains(&pack) {
                        spill.push(c.id, location(pack, c))?;
                    } else {
                        dead = true;
                    }
                }
            }
            SegmentRead::Skipped => skipped.push(seg.key.clone()),
            SegmentRead::Gone => {}
        }
    }
    drop(reads);
    if !dead && skipped.is_empty() && summarises_exactly(chunks, &summaries, &read).await? {
        return Ok(0);
    }

    let mut writer = SegmentWriter::default();
    for bucket in 0..BUCKETS {
        let mut records = spill.take(bucket)?;
        records.sort_unstable_by_key(|r| r.0);
        records.dedup_by(|a, b| a.0 == b.0);
        for record in records {
            writer.current.push(record);
            if writer.current.len() == MAX_SEGMENT_CHUNKS {
                writer.flush(chunks).await?;
            }
        }
    }
    writer.flush(chunks).await?;
    let mut keep: HashSet<String> = writer.keys.clone();
    let fingerprints: usize = writer.segments.iter().map(|(s, _)| s.count).sum();
    if fingerprints > MAX_SUMMARY_CHUNKS {
        ui::warn(format!(
            "the index holds {fingerprints} chunks, more than the {MAX_SUMMARY_CHUNKS} a summary may describe; uploads will read it whole"
        ));
    } else if !writer.segments.is_empty() {
        let data = Bytes::from(summary::encode(&writer.segments));
        let key = layout.summary_key(&Id::of(&data));
        chunks
            .transfer()
            .put_bytes(&key, data)
            .await
            .context("cannot write the index summary")?;
        keep.insert(key);
    }
    // Same content, same name: a rewritten segment may equal an old one.
    let replaced: Vec<String> = read
        .into_iter()
        .chain(skipped)
        .filter(|key| !keep.contains(key))
        .collect();
    let old_summaries: Vec<String> = summaries
        .into_iter()
        .map(|o| o.key)
        .filter(|key| !keep.contains(key))
        .collect();
    chunks
        .transfer()
        .delete_many(&replaced)
        .await
        .context("cannot delete replaced index segments")?;
    chunks
        .transfer()
        .delete_many(&old_summaries)
        .await
        .context("cannot delete replaced index summaries")?;
    // The filters of the segments deleted, and those whose segment is gone (a killed
    // upload, an older gc): not one whose segment may still be on its way (an upload
    // writes the filter first), and only as a courtesy, since uploads ask for the
    // filters of the segments they list.
    let deleted: HashSet<Id> = replaced
        .iter()
        .filter_map(|k| layout.segment_id(k))
        .collect();
    let present: HashSet<Id> = listed
        .iter()
        .filter_map(|o| layout.segment_id(&o.key))
        .collect();
    let now = std::time::SystemTime::now();
    let stale: Vec<String> = filters
        .into_iter()
        .filter(|f| {
            let Some(segment) = layout.filter_segment(&f.key) else {
                return false;
            };
            let old = f
                .modified
                .is_some_and(|m| now.duration_since(m).unwrap_or_default() > ORPHAN_FILTER_AGE);
            deleted.contains(&segment) || (!present.contains(&segment) && old)
        })
        .map(|f| f.key)
        .collect();
    if let Err(e) = chunks.transfer().delete_many(&stale).await {
        ui::warn(format!(
            "cannot delete {} index segment filters: {e}",
            stale.len()
        ));
    }
    Ok(replaced.len())
}

/// Whether the newest of `summaries` describes exactly the segments `read`.
async fn summarises_exactly(
    chunks: &ChunkStore,
    summaries: &[ObjectInfo],
    read: &[String],
) -> anyhow::Result<bool> {
    let Some(newest) = summaries.iter().max_by_key(|o| o.modified) else {
        return Ok(read.is_empty());
    };
    let Some(summary) = read_summary(chunks, newest).await? else {
        return Ok(false);
    };
    let described: HashSet<String> = summary
        .segments()
        .iter()
        .map(|s| chunks.layout().segment_key(&s.id))
        .collect();
    Ok(summaries.len() == 1
        && described.len() == read.len()
        && read.iter().all(|k| described.contains(k)))
}

/// The bucket of a chunk id: its top bits, so buckets in order hold ids in order.
fn bucket_of(id: &Id) -> usize {
    usize::from(id.0[0]) * BUCKETS / 256
}

/// Chunks spread over bucket files by the top bits of their id.
struct Spill {
    paths: Vec<PathBuf>,
    files: Vec<BufWriter<File>>,
    /// Packs by number, so a record holds four bytes instead of 32.
    packs: Vec<Id>,
    numbers: HashMap<Id, u32>,
}

impl Spill {
    fn create(dir: &Path) -> anyhow::Result<Spill> {
        let paths: Vec<PathBuf> = (0..BUCKETS).map(|b| dir.join(format!("{b:02x}"))).collect();
        let files = paths
            .iter()
            .map(|p| File::create(p).map(|f| BufWriter::with_capacity(16 * 1024, f)))
            .collect::<std::io::Result<_>>()
            .context("cannot create temp files to compact the index")?;
        Ok(Spill {
            paths,
            files,
            packs: Vec::new(),
            numbers: HashMap::new(),
        })
    }

    fn push(&mut self, id: Id, loc: Location) -> anyhow::Result<()> {
        let number = *self.numbers.entry(loc.pack).or_insert_with(|| {
            self.packs.push(loc.pack);
            self.packs.len() as u32 - 1
        });
        let mut record = [0u8; RECORD];
        record[..32].copy_from_slice(&id.0);
        for (i, v) in [number, loc.offset, loc.stored_len, loc.len]
            .into_iter()
            .enumerate()
        {
            record[32 + 4 * i..36 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        self.files[bucket_of(&id)]
            .write_all(&record)
            .context("cannot write a temp file to compact the index")
    }

    /// The chunks of one bucket, its file removed.
    fn take(&mut self, bucket: usize) -> anyhow::Result<Vec<(Id, Location)>> {
        self.files[bucket].flush()?;
        let mut data = Vec::new();
        BufReader::new(File::open(&self.paths[bucket])?).read_to_end(&mut data)?;
        let _ = std::fs::remove_file(&self.paths[bucket]);
        let u32_at = |r: &[u8], i: usize| {
            u32::from_le_bytes(r[32 + 4 * i..36 + 4 * i].try_into().expect("4 bytes"))
        };
        Ok(data
            .chunks_exact(RECORD)
            .map(|r| {
                let id = Id(r[..32].try_into().expect("32 bytes"));
                let loc = Location {
                    pack: self.packs[u32_at(r, 0) as usize],
                    offset: u32_at(r, 1),
                    stored_len: u32_at(r, 2),
                    len: u32_at(r, 3),
                };
                (id, loc)
            })
            .collect())
    }
}

/// Writes sorted chunks as segments of [`MAX_SEGMENT_CHUNKS`] and describes them.
#[derive(Default)]
struct SegmentWriter {
    current: Vec<(Id, Location)>,
    segments: Vec<(SummarySegment, Vec<u32>)>,
    keys: HashSet<String>,
}

impl SegmentWriter {
    async fn flush(&mut self, chunks: &ChunkStore) -> anyhow::Result<()> {
        let (Some(first), Some(last)) = (self.current.first(), self.current.last()) else {
            return Ok(());
        };
        let (first, last) = (first.0, last.0);
        let mut fingerprints: Vec<u32> = self
            .current
            .iter()
            .map(|(id, _)| summary::fingerprint(id))
            .collect();
        fingerprints.sort_unstable();
        let table = table_of(self.current.drain(..));
        let data = Bytes::from(table.encode_index());
        let id = Id::of(&data);
        let key = chunks.layout().segment_key(&id);
        chunks
            .transfer()
            .put_bytes(&key, data)
            .await
            .context("cannot write an index segment")?;
        self.keys.insert(key);
        let count = fingerprints.len();
        self.segments.push((
            SummarySegment {
                id,
                first,
                last,
                count,
            },
            fingerprints,
        ));
        Ok(())
    }
}
