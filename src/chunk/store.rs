//! Writing and reading chunked entries through the shared transfer layer.
//!
//! Upload: a content stream is cut by FastCDC, chunks are hashed and the new ones
//! compressed on all cores (rayon), packed into ~8 MiB pack objects and sent `jobs` at a
//! time; once they are in, an index segment naming the new chunks for later uploads,
//! and the manifest (a `dir upload` sends it meanwhile), so a manifest is never visible
//! before its chunks.
//! Download: chunks are fetched as merged
//! byte ranges of packs, concurrently, and each is checked against its blake3 id.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use futures::{FutureExt, StreamExt, TryStreamExt};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::format::{ChunkRef, ChunkTable, MAX_CHUNK_STORED, Manifest};
use super::index::{FilterIndex, SummaryIndex};
use super::layout::Layout;
use super::summary;
use super::{CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, Id, PACK_TARGET};
use crate::sign::{Untrusted, Verdict};
use crate::store::{ObjectInfo, StoreError, is_changed};
use crate::task::OwnedTask;
use crate::transfer::{Transfer, retry_note};
use crate::ui;

/// First bytes of an entry read to tell what it is.
const FIRST_READ: u64 = 1024 * 1024;
/// Largest manifest object read whole.
const MAX_MANIFEST_OBJECT: u64 = 256 * 1024 * 1024;
/// Largest ranged GET of a restore, in stored bytes.
const MAX_RANGE: u64 = 8 * 1024 * 1024;
/// Most bytes the chunks of one ranged GET decode to: at most one such range is held
/// decoded at a time, which bounds memory on highly compressible trees.
const MAX_DECODED: u64 = 16 * 1024 * 1024;
/// Most ranged GETs of one restore in flight, however small.
const MAX_RANGES_IN_FLIGHT: usize = 64;
/// Chunks of one pack this close after the current range join it (skipping the gap).
const MERGE_GAP: u64 = 256 * 1024;
/// Most bytes of decoded chunks a restore holds for their later places in the stream.
const MAX_HELD: u64 = 16 * 1024 * 1024;
/// Raw bytes cut before a batch is hashed and compressed in parallel.
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Reused packs older than this are refreshed by an upload; gc's grace period must be
/// longer than this plus the longest upload.
pub const REFRESH_AGE: Duration = Duration::from_secs(3600);
/// First bytes of a zstd frame: a legacy `tar.zst` entry.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Most chunks one index segment holds: about 4 MiB encoded, far below what readers
/// accept ([`MAX_SEGMENT_OBJECT`], and the 256 MiB body limit of the format).
pub const MAX_SEGMENT_CHUNKS: usize = 100_000;
/// Largest index segment object read; a larger one is skipped unread (cacher never
/// writes one, see [`MAX_SEGMENT_CHUNKS`]).
pub const MAX_SEGMENT_OBJECT: u64 = 16 * 1024 * 1024;

/// The index segments read from the bucket.
#[derive(Debug, Default)]
pub struct Segments {
    /// Segments that decoded and match their names, with their keys.
    pub tables: Vec<(String, ChunkTable)>,
    /// Keys of segments skipped as corrupt, undecodable or too large.
    pub skipped: Vec<String>,
}

/// Chunks of index segments no summary describes (read whole or through their
/// filters) past which an upload asks for a gc (README, "Scale").
const NUDGE_GC_CHUNKS: usize = 1_000_000;

/// What reading one index segment gave.
pub enum SegmentRead {
    /// Its chunks.
    Table(ChunkTable),
    /// It could not be trusted (see [`ChunkStore::read_segment`]).
    Skipped,
    /// It was deleted since it was listed.
    Gone,
}

/// What reading an object named by the hash of its bytes gave.
pub enum Named {
    /// Its bytes, which match its name.
    Bytes(Vec<u8>),
    /// Why it cannot be trusted.
    Untrusted(String),
    /// It was deleted since it was listed.
    Gone,
}

/// Where a chunk already stored can be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: Id,
    pub offset: u32,
    pub stored_len: u32,
    pub len: u32,
}

/// A pack object as listed.
#[derive(Debug, Clone, Copy)]
pub struct PackInfo {
    /// Last-modified time, to know which packs an upload must refresh.
    pub modified: SystemTime,
    /// Size in bytes, to check index locations against.
    pub size: u64,
}

/// The packs present in the bucket, by id.
pub type Packs = HashMap<Id, PackInfo>;

/// The packs an upload may reuse chunks from, each looked up with a HEAD the first
/// time it is needed, instead of listing every pack of the prefix (50 LISTs at 10^7
/// chunks) for an upload that reuses a few.
#[derive(Default)]
pub struct PackCheck {
    /// Where to look packs up; `None` when only `seen` counts.
    source: Option<(ChunkStore, tokio::runtime::Handle)>,
    /// Packs looked up so far: `None` for one that does not exist.
    seen: Mutex<HashMap<Id, Option<PackInfo>>>,
}

impl PackCheck {
    /// Looks packs of `chunks` up as they are needed.
    pub fn lazy(chunks: &ChunkStore) -> PackCheck {
        PackCheck {
            source: Some((chunks.clone(), tokio::runtime::Handle::current())),
            seen: Mutex::default(),
        }
    }

    /// Knows exactly the packs `listed`.
    pub fn listed(listed: Packs) -> PackCheck {
        let seen = listed
            .into_iter()
            .map(|(id, info)| (id, Some(info)))
            .collect();
        PackCheck {
            source: None,
            seen: Mutex::new(seen),
        }
    }

    /// Looks `packs` up at once, so later [`PackCheck::info`] calls need not wait. A
    /// pack whose HEAD fails is left to be looked up again when needed.
    pub async fn prefetch(&self, packs: &[Id]) {
        let Some((chunks, _)) = &self.source else {
            return;
        };
        let found: Vec<(Id, Option<PackInfo>)> = futures::stream::iter(packs.iter().copied())
            .map(|pack| async move { chunks.pack_info(&pack).await.ok().map(|i| (pack, i)) })
            .buffer_unordered(PACK_HEADS_IN_FLIGHT)
            .filter_map(|found| async move { found })
            .collect()
            .await;
        self.seen.lock().expect("pack lock").extend(found);
    }

    /// The pack `id` as the bucket has it, `None` when it does not. A pack not looked up
    /// yet is, with a HEAD that blocks: call from a blocking thread, not async code. A
    /// failed HEAD counts as missing: the chunk is sent again.
    pub fn info(&self, id: &Id) -> Option<PackInfo> {
        if let Some(found) = self.seen.lock().expect("pack lock").get(id) {
            return *found;
        }
        let (chunks, handle) = self.source.as_ref()?;
        let found = handle.block_on(chunks.pack_info(id)).ok().flatten();
        self.seen.lock().expect("pack lock").insert(*id, found);
        found
    }

    /// A pack already looked up, without looking it up.
    fn seen(&self, id: &Id) -> Option<PackInfo> {
        self.seen
            .lock()
            .expect("pack lock")
            .get(id)
            .copied()
            .flatten()
    }
}

/// HEADs of packs in flight when prefetching.
const PACK_HEADS_IN_FLIGHT: usize = 32;

/// Chunks known to be in the bucket, in packs that still exist: those of the entries
/// the trees came from, those sent already, and what the index of the prefix says.
#[derive(Default)]
pub struct Known {
    /// Chunks of the entries the trees came from (their tree states), sorted by id:
    /// looked up first, so a chunk a tree had when it was restored needs no index.
    likely: Vec<(Id, Location)>,
    /// Chunks this command sent already (an earlier path of an entry of several).
    sent: Mutex<HashMap<Id, Location>>,
    packs: PackCheck,
    index: PendingIndex,
}

/// What the index of the prefix says, as an upload reads it.
#[derive(Default)]
struct Index {
    /// Chunks of the segments read whole: those neither gc's summary describes nor a
    /// filter stands for.
    chunks: HashMap<Id, Location>,
    /// The segments gc's summary describes, read only where a lookup needs them.
    summarized: Option<SummaryIndex>,
    /// The segments written since, through their filters, read only where a lookup
    /// needs them.
    filtered: Option<FilterIndex>,
}

/// The index of the prefix being read, from [`ChunkStore::start_reading_index`].
/// Dropped unused (the key was cached after all), it stops the read.
pub struct IndexReading(OwnedTask<anyhow::Result<Index>>);

/// The index of the prefix, loading on a task of its own: reading it takes several
/// requests in turn, which a warm upload would otherwise wait for before cutting its
/// tree. The first lookup that needs it waits for it.
#[derive(Default)]
struct PendingIndex {
    /// The read under way, which every waiter shares, and the runtime it runs on.
    /// Dropped before it is in, it stops the read: the task inside is an
    /// [`OwnedTask`], and waiters hold their clones only while `self` is borrowed.
    reading: Option<(IndexRead, tokio::runtime::Handle)>,
    /// The index, or why it could not be read, once a lookup waited for it.
    loaded: std::sync::OnceLock<Result<Arc<Index>, String>>,
}

type IndexRead =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<Arc<Index>, String>>>;

impl PendingIndex {
    /// The index read by `task`.
    fn reading(task: OwnedTask<anyhow::Result<Index>>) -> PendingIndex {
        let read = async move {
            match task.await {
                Ok(read) => read.map(Arc::new).map_err(|e| format!("{e:#}")),
                Err(e) => Err(format!("the index reader stopped: {e}")),
            }
        };
        PendingIndex {
            reading: Some((read.boxed().shared(), tokio::runtime::Handle::current())),
            loaded: std::sync::OnceLock::new(),
        }
    }

    fn ready(index: Index) -> PendingIndex {
        PendingIndex {
            reading: None,
            loaded: std::sync::OnceLock::from(Ok(Arc::new(index))),
        }
    }

    /// The index, waiting for it to load; `None` when it could not be. Blocks: call
    /// from a blocking thread, not async code.
    fn get(&self) -> Option<&Index> {
        let loaded = self.loaded.get_or_init(|| match &self.reading {
            Some((read, handle)) => handle.block_on(read.clone()),
            None => Ok(Arc::default()),
        });
        loaded.as_ref().ok().map(|index| &**index)
    }

    /// Why the index could not be read, if it is known already that it could not.
    fn failed(&self) -> Option<String> {
        let read = self.reading.as_ref()?.0.peek()?;
        read.as_ref().err().cloned()
    }

    /// Waits for the index to load, failing if it could not be.
    async fn finish(&self) -> anyhow::Result<()> {
        let Some((read, _)) = &self.reading else {
            return Ok(());
        };
        read.clone()
            .await
            .map(drop)
            .map_err(|why| anyhow::anyhow!(why))
    }
}

impl Known {
    /// Where the chunk `id` of `len` bytes can be reused from, if the index knows it
    /// and its location is plausible: same length as the chunk just cut, inside a pack
    /// that exists now. A stale or corrupt index entry is then simply not reused
    /// (the chunk is sent again), so it can never make an entry unrestorable. May
    /// fetch an index segment or look a pack up, blocking: call from a blocking thread.
    pub fn reusable(&self, id: &Id, len: usize) -> Option<Location> {
        let likely = || {
            let at = self.likely.binary_search_by(|(c, _)| c.cmp(id)).ok()?;
            self.plausible(self.likely[at].1, len)
        };
        let sent = || {
            let loc = *self.sent.lock().expect("sent lock").get(id)?;
            self.plausible(loc, len)
        };
        // A segment read whole may name a pack gc removed since; the summary may not.
        let recent = || self.plausible(*self.index.get()?.chunks.get(id)?, len);
        let summarized = || self.plausible(self.index.get()?.summarized.as_ref()?.lookup(id)?, len);
        let filtered = || {
            let usable = |loc| self.plausible(loc, len).is_some();
            self.index.get()?.filtered.as_ref()?.lookup(id, usable)
        };
        likely()
            .or_else(sent)
            .or_else(recent)
            .or_else(summarized)
            .or_else(filtered)
    }

    /// Waits for the index of the prefix to be read (lookups may not have needed it),
    /// failing if it could not be: an upload that could not dedup says so.
    pub async fn finish(&self) -> anyhow::Result<()> {
        self.index.finish().await
    }

    /// Fails once the index of the prefix is known to be unreadable, so an upload
    /// stops instead of sending what it could not dedup.
    pub fn check(&self) -> anyhow::Result<()> {
        match self.index.failed() {
            Some(why) => Err(anyhow::anyhow!(why)),
            None => Ok(()),
        }
    }

    /// Learns the chunks of `table`, just sent: a later part of the same upload reuses
    /// them instead of sending them again.
    pub fn learn(&self, table: &ChunkTable) {
        let mut sent = self.sent.lock().expect("sent lock");
        let mut seen = self.packs.seen.lock().expect("pack lock");
        for c in &table.chunks {
            let pack = table.packs[c.pack as usize];
            sent.insert(c.id, location(pack, c));
            // The pack holds at least this chunk: enough for `plausible`.
            let end = u64::from(c.offset) + u64::from(c.stored_len);
            let info = seen.entry(pack).or_insert(None).get_or_insert(PackInfo {
                modified: SystemTime::now(),
                size: 0,
            });
            info.size = info.size.max(end);
        }
    }

    /// Chunks known at `locations`, in the listed `packs`.
    pub fn new(locations: impl IntoIterator<Item = (Id, Location)>, packs: Packs) -> Known {
        Known {
            packs: PackCheck::listed(packs),
            index: PendingIndex::ready(Index {
                chunks: locations.into_iter().collect(),
                ..Index::default()
            }),
            ..Known::default()
        }
    }

    /// Where the chunk `id` of `len` bytes can be reused from when the entry a tree
    /// came from recorded it at `recorded`: there, if that pack is still whole, without
    /// asking the index (whose segments a large prefix would fetch); else as
    /// [`Known::reusable`] finds it. Blocks like it.
    pub fn reusable_at(&self, id: &Id, len: usize, recorded: Location) -> Option<Location> {
        self.plausible(recorded, len)
            .or_else(|| self.reusable(id, len))
    }

    /// Whether reusing `pack` needs a refresh first: it is older than [`REFRESH_AGE`]
    /// (as looked up; packs this command sent count as new).
    fn needs_refresh(&self, pack: &Id) -> bool {
        self.packs.seen(pack).is_some_and(|info| {
            SystemTime::now()
                .duration_since(info.modified)
                .unwrap_or_default()
                > REFRESH_AGE
        })
    }

    /// `loc` if its pack exists and holds it, for a chunk of `len` bytes.
    fn plausible(&self, loc: Location, len: usize) -> Option<Location> {
        let pack = self.packs.info(&loc.pack)?;
        let end = u64::from(loc.offset) + u64::from(loc.stored_len);
        (loc.len as usize == len && loc.stored_len <= MAX_CHUNK_STORED && end <= pack.size)
            .then_some(loc)
    }
}

/// What an object under a key turned out to be.
pub enum Stored {
    /// A chunked entry.
    Manifest(Box<Manifest>),
    /// A plain `tar.zst` written by the shell loop or an older tool.
    Legacy(ObjectInfo),
    /// Anything else: a plain cached file.
    Plain(ObjectInfo),
}

/// Figures of one chunked upload or download, for the stats line and `--json`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Stats {
    /// Chunks in the content stream.
    pub chunks: u64,
    /// Chunks that had to be sent (upload) or were fetched (download).
    pub chunks_new: u64,
    /// Bytes in the content stream.
    pub stream_bytes: u64,
    /// Uncompressed bytes of the chunks sent.
    pub new_bytes: u64,
    /// Bytes that crossed the network (packs, index segment, manifest).
    pub wire_bytes: u64,
    /// Pack objects written or read.
    pub packs: u64,
    /// Requests retried in the whole command so far.
    pub retries: u64,
    /// Directory entries: files the tree state showed unchanged (upload: not read;
    /// download: left as they were), and their bytes.
    pub unchanged_files: u64,
    pub unchanged_bytes: u64,
    /// Directory entries: bytes read from the tree (upload) or written to it (download).
    pub disk_bytes: u64,
    /// Directory uploads: of `disk_bytes`, those read only to find them as the tree
    /// state's entry recorded them (files rewritten with the same bytes), not cut.
    pub checked_bytes: u64,
    /// Docker restores: the image's layers and those the daemon already had.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<LayerStats>,
    /// Docker uploads: seconds spent waiting for `docker save` to produce the archive;
    /// close to the upload's time when docker, not cacher, bounds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_save_seconds: Option<f64>,
}

impl Stats {
    /// Adds the counts of `other`, a transfer of another part of the same entry.
    pub fn add(&mut self, other: &Stats) {
        self.chunks += other.chunks;
        self.chunks_new += other.chunks_new;
        self.stream_bytes += other.stream_bytes;
        self.new_bytes += other.new_bytes;
        self.wire_bytes += other.wire_bytes;
        self.packs += other.packs;
        self.retries = self.retries.max(other.retries);
        self.unchanged_files += other.unchanged_files;
        self.unchanged_bytes += other.unchanged_bytes;
        self.disk_bytes += other.disk_bytes;
        self.checked_bytes += other.checked_bytes;
    }
}

/// What a docker restore could leave out because the daemon had it.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct LayerStats {
    /// Layers the entry's member map names.
    pub total: u64,
    /// Layers the daemon already had: `docker load` got them as empty members.
    pub present: u64,
    /// Bytes of those layers in the archive, neither fetched nor fed to docker.
    pub present_bytes: u64,
}

/// A content stream cut and placed, ready for a manifest: its chunks are all in the
/// bucket (from [`ChunkStore::start_sending`], once its [`Landing`] is waited for).
pub struct Sent {
    /// Figures of the upload so far.
    pub stats: Stats,
    /// The stream's chunks, in order.
    pub table: ChunkTable,
}

/// The packs of a [`ChunkStore::start_sending`] still on their way. Dropped unwaited
/// (the upload failed elsewhere), it stops them, and the copies and index filters
/// started on their behalf.
#[must_use = "the chunks are in the bucket only once the landing is waited for"]
pub struct Landing(OwnedTask<anyhow::Result<(u64, Indexing)>>);

impl Landing {
    /// Waits until every pack sent is in the bucket (and the reused ones refreshed), so
    /// a manifest of the stream may be published; the bytes put on the wire, and the
    /// index segments still being written.
    pub async fn wait(mut self) -> anyhow::Result<(u64, Indexing)> {
        (&mut self.0).await.context(UPLOADS_STOPPED)?
    }
}

/// The index segments of an upload's new chunks, written once its packs and their
/// filters landed, while its manifest is: segments only tell later uploads what the
/// bucket holds (docs/format.md), so a manifest never waits for them. Dropped
/// unwaited, it stops them and their filters (a filter already written is left for
/// gc).
#[must_use = "the index segments may still be on their way"]
pub struct Indexing(Option<OwnedTask<anyhow::Result<u64>>>);

impl Indexing {
    /// Waits for the segments; the bytes they took. One that could not be written costs
    /// later uploads the reuse of its chunks, not this upload: that is a warning.
    pub async fn wait(mut self) -> u64 {
        let Some(task) = self.0.as_mut() else {
            return 0;
        };
        match task.await.context(UPLOADS_STOPPED).and_then(|r| r) {
            Ok(bytes) => bytes,
            Err(e) => {
                ui::warn(format!(
                    "{e:#}: the entry is complete, but later uploads may send its new chunks again"
                ));
                0
            }
        }
    }
}

const UPLOADS_STOPPED: &str = "the pack uploads stopped";

/// A piece of a content stream, as a cutter hands it to [`ChunkStore::upload`].
pub enum Piece {
    /// A chunk's bytes: hashed, and compressed and sent if the bucket lacks them.
    Cut(Vec<u8>),
    /// A chunk known to be stored already, not read (see `crate::tree_stream`).
    Reused { id: Id, loc: Location },
}

impl Piece {
    /// Stream bytes the piece covers.
    pub fn len(&self) -> u64 {
        match self {
            Piece::Cut(data) => data.len() as u64,
            Piece::Reused { loc, .. } => u64::from(loc.len),
        }
    }

    /// Whether it covers no bytes (cutters never make such a piece).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A pack ready to go up.
struct SealedPack {
    id: Id,
    data: Bytes,
}

/// What the chunker thread produced.
struct Chunked {
    order: Vec<Id>,
    locations: HashMap<Id, Location>,
    new_chunks: Vec<(Id, Location)>,
    stats: Stats,
}

/// The chunked entries under one prefix.
#[derive(Clone)]
pub struct ChunkStore {
    transfer: Arc<Transfer>,
    layout: Layout,
}

impl ChunkStore {
    /// The chunk store under the configured `prefix`.
    pub fn new(transfer: Arc<Transfer>, prefix: &str) -> ChunkStore {
        ChunkStore {
            transfer,
            layout: Layout::new(prefix),
        }
    }

    /// The configured prefix this store lives under.
    pub fn prefix(&self) -> &str {
        self.layout.prefix()
    }

    /// Where this store keeps each kind of object.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Key prefix of everything cacher keeps for itself ([`Layout::internal_prefix`]).
    pub fn internal_prefix(&self) -> String {
        self.layout.internal_prefix()
    }

    /// The shared transfer engine.
    pub fn transfer(&self) -> &Arc<Transfer> {
        &self.transfer
    }

    /// Key prefix of pack objects ([`Layout::packs_prefix`]).
    pub fn packs_prefix(&self) -> String {
        self.layout.packs_prefix()
    }

    /// Key of a pack object ([`Layout::pack_key`]).
    pub fn pack_key(&self, id: &Id) -> String {
        self.layout.pack_key(id)
    }

    /// Key prefix of index segments ([`Layout::index_prefix`]).
    pub fn index_prefix(&self) -> String {
        self.layout.index_prefix()
    }

    /// Every object under `prefix` (one of the layout's internal prefixes) listed now;
    /// `what` names them in the error.
    pub async fn list_internal(&self, prefix: &str, what: &str) -> anyhow::Result<Vec<ObjectInfo>> {
        Ok(self
            .transfer
            .store()
            .list(prefix, None)
            .await
            .with_context(|| format!("cannot list {what}"))?
            .objects)
    }

    /// The packs present in the bucket now.
    pub async fn list_packs(&self) -> anyhow::Result<Packs> {
        let listed = self
            .list_internal(&self.layout.packs_prefix(), "packs")
            .await?;
        Ok(listed
            .into_iter()
            .filter_map(|pack| {
                let id = self.layout.pack_id(&pack.key)?;
                let modified = pack.modified.unwrap_or(SystemTime::UNIX_EPOCH);
                Some((
                    id,
                    PackInfo {
                        modified,
                        size: pack.size,
                    },
                ))
            })
            .collect())
    }

    /// The objects under the full key prefix `prefix` that may be entries, at any
    /// depth. Listed a level at a time so cacher's own objects (`.cacher/`, which can
    /// hold millions of packs) are never listed.
    pub async fn list_entries(&self, prefix: &str) -> anyhow::Result<Vec<ObjectInfo>> {
        let store = self.transfer.store();
        let mut entries = Vec::new();
        let mut levels = vec![prefix.to_string()];
        while let Some(level) = levels.pop() {
            let mut token = None;
            loop {
                let (page, next) = store
                    .list_page(&level, Some('/'), token)
                    .await
                    .with_context(|| format!("cannot list {level}"))?;
                let internal = |key: &str| self.layout.is_internal(key);
                levels.extend(page.prefixes.into_iter().filter(|p| !internal(p)));
                entries.extend(page.objects.into_iter().filter(|o| !internal(&o.key)));
                match next {
                    Some(next) => token = Some(next),
                    None => break,
                }
            }
        }
        Ok(entries)
    }

    /// The chunks the bucket holds now: those of `likely`, the chunk tables of the
    /// entries the trees came from (their packs are looked up at once), and what the
    /// index says (`index`, being read), gc's summary and every index segment it does
    /// not describe (written by uploads since). Other packs are looked up when a chunk
    /// in them would be reused.
    pub async fn known(
        &self,
        likely: &[&ChunkTable],
        index: IndexReading,
    ) -> anyhow::Result<Known> {
        let mut chunks: Vec<(Id, Location)> = likely
            .iter()
            .flat_map(|t| {
                t.chunks
                    .iter()
                    .map(|c| (c.id, location(t.packs[c.pack as usize], c)))
            })
            .collect();
        chunks.sort_unstable_by_key(|c| c.0);
        chunks.dedup_by(|a, b| a.0 == b.0);
        let known = Known {
            likely: chunks,
            packs: PackCheck::lazy(self),
            index: PendingIndex::reading(index.0),
            ..Known::default()
        };
        let packs: Vec<Id> = likely
            .iter()
            .flat_map(|t| t.packs.iter().copied())
            .collect();
        known.packs.prefetch(&packs).await;
        Ok(known)
    }

    /// Starts reading the index of the prefix on a task of its own, for
    /// [`ChunkStore::known`]: it takes several requests in turn, so an upload starts it
    /// first, beside its own first requests (where the bucket is far, each is a round
    /// trip the cut would wait for).
    pub fn start_reading_index(&self) -> IndexReading {
        let reader = self.clone();
        IndexReading(OwnedTask::spawn(async move { reader.read_index().await }))
    }

    /// The index of the prefix, for [`ChunkStore::known`].
    async fn read_index(&self) -> anyhow::Result<Index> {
        let mut index = Index::default();
        // Listed at once: one round trip instead of three where the bucket is far. A
        // segment, filter or summary another job writes meanwhile may then be missed
        // by one listing and not the other, which costs a fetch or a reuse, never
        // correctness: the index is a cache (docs/format.md, "Index segments").
        let (summaries, mut listed, filters) = tokio::try_join!(
            super::index::list_summaries(self),
            self.list_segments(),
            super::index::list_filters(self),
        )?;
        if listed.is_empty() {
            return Ok(index);
        }
        let summary = super::index::load_summary(self, summaries, &listed).await?;
        if let Some((summarized, covered)) = summary {
            listed.retain(|o| !covered.contains(&o.key));
            index.summarized = Some(summarized);
        }
        let (filtered, listed) = super::index::load_filters(self, listed, filters).await?;
        let segments = self.read_listed_segments(listed).await?;
        let unsummarized = segments
            .tables
            .iter()
            .map(|(_, t)| t.chunks.len())
            .sum::<usize>()
            + filtered.as_ref().map_or(0, FilterIndex::len);
        index.filtered = filtered;
        if unsummarized > NUDGE_GC_CHUNKS {
            ui::warn(format!(
                "read {unsummarized} chunks of index segments no gc has summarised yet; run `cacher gc` (on a schedule) to keep uploads small"
            ));
        }
        for (_, table) in segments.tables {
            for c in &table.chunks {
                index
                    .chunks
                    .insert(c.id, location(table.packs[c.pack as usize], c));
            }
        }
        Ok(index)
    }

    /// A pack as the bucket has it now; `None` when it is gone.
    pub async fn pack_info(&self, pack: &Id) -> Result<Option<PackInfo>, StoreError> {
        let info = self.transfer.store().head(&self.pack_key(pack)).await?;
        Ok(info.map(|o| PackInfo {
            modified: o.modified.unwrap_or(SystemTime::UNIX_EPOCH),
            size: o.size,
        }))
    }

    /// Chunks `content` (see [`ChunkStore::upload_pieces`]).
    pub async fn upload<R>(
        &self,
        content: R,
        known: Arc<Known>,
        manifest: Manifest,
        key: &str,
    ) -> anyhow::Result<(Stats, Manifest)>
    where
        R: Read + Send + 'static,
    {
        let pieces = cut_in_batches(content);
        self.upload_pieces(pieces, known, manifest, key).await
    }

    /// Sends the chunks of `pieces` the bucket lacks, then publishes `manifest` under
    /// `key` (see [`ChunkStore::send_pieces`] and [`ChunkStore::publish`]).
    pub async fn upload_pieces<P>(
        &self,
        pieces: P,
        known: Arc<Known>,
        manifest: Manifest,
        key: &str,
    ) -> anyhow::Result<(Stats, Manifest)>
    where
        P: Iterator<Item = anyhow::Result<Vec<Piece>>> + Send + 'static,
    {
        let sent = self.send_pieces(pieces, known).await?;
        let published = self.publish(manifest, sent, key, false).await?;
        Ok(published.expect("a write that may replace always publishes"))
    }

    /// Cuts `content` and sends the chunks the bucket lacks (see
    /// [`ChunkStore::send_pieces`]).
    pub async fn send<R>(&self, content: R, known: Arc<Known>) -> anyhow::Result<Sent>
    where
        R: Read + Send + 'static,
    {
        self.send_pieces(cut_in_batches(content), known).await
    }

    /// Sends the chunks of `pieces` (a cut content stream, in batches) the bucket
    /// lacks and writes an index segment for them: everything a manifest of this stream
    /// needs is in the bucket when it returns.
    pub async fn send_pieces<P>(&self, pieces: P, known: Arc<Known>) -> anyhow::Result<Sent>
    where
        P: Iterator<Item = anyhow::Result<Vec<Piece>>> + Send + 'static,
    {
        let (mut sent, landing) = self.start_sending(pieces, known).await?;
        let (wire_bytes, indexing) = landing.wait().await?;
        sent.stats.wire_bytes += wire_bytes + indexing.wait().await;
        Ok(sent)
    }

    /// Like [`ChunkStore::send_pieces`], but returns once every chunk has its place,
    /// while the last packs may still be on their way: the manifest can be sealed
    /// meanwhile, and published once the [`Landing`] is waited for.
    pub async fn start_sending<P>(
        &self,
        pieces: P,
        known: Arc<Known>,
    ) -> anyhow::Result<(Sent, Landing)>
    where
        P: Iterator<Item = anyhow::Result<Vec<Piece>>> + Send + 'static,
    {
        let _buffers = crate::memory::reuse_stream_buffers();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<SealedPack>(2);
        let chunker = {
            let known = known.clone();
            tokio::task::spawn_blocking(move || chunk_stream(pieces, &known, &tx))
        };
        let store = self.clone();
        let uploads = OwnedTask::spawn(async move {
            futures::stream::poll_fn(|cx| rx.poll_recv(cx))
                .map(|pack| {
                    let store = &store;
                    async move {
                        let len = pack.data.len() as u64;
                        store
                            .transfer
                            .put_bytes(&store.pack_key(&pack.id), pack.data)
                            .await
                            .with_context(|| format!("cannot upload pack {}", pack.id))?;
                        Ok::<u64, anyhow::Error>(len)
                    }
                })
                .buffer_unordered(store.transfer.jobs())
                .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
                .await
        });
        let mut chunked = match chunker.await.context("the chunker stopped")? {
            Ok(chunked) => chunked,
            // A failed upload closes the channel, which makes the chunker fail too:
            // report the upload's error, the root cause.
            Err(e) => match uploads.await {
                Ok(Err(upload)) => return Err(upload),
                _ => return Err(e),
            },
        };
        known.finish().await?;
        // Reused packs are refreshed beside the last packs' PUTs, not after them: a
        // warm upload reuses dozens, and on S3 a copy takes as long as a small PUT. Not
        // during the cut, which they slowed where the server shares the runner's cores.
        let reused: HashSet<Id> = chunked.locations.values().map(|l| l.pack).collect();
        let stale = reused.into_iter().filter(|p| known.needs_refresh(p));
        let refreshing = OwnedTask::spawn(self.clone().refresh_packs(stale.collect()));
        let stats = std::mem::take(&mut chunked.stats);
        let table = table_of(chunked.order.iter().map(|id| (*id, chunked.locations[id])));
        let new = table_of(chunked.new_chunks.iter().map(|(id, loc)| (*id, *loc)));
        let has_new = !new.chunks.is_empty();
        // The segments are encoded, and their filters written, beside the last packs: a
        // segment waits for its packs, and for its filter, so that a segment listed has
        // one.
        let filtering = {
            let store = self.clone();
            OwnedTask::spawn(async move {
                let layout = store.layout.clone();
                let segments = tokio::task::spawn_blocking(move || {
                    NewSegments::encode(&layout, &new, MAX_SEGMENT_CHUNKS)
                })
                .await
                .context("the index encoder stopped")?;
                let bytes = store.clone().write_filters(segments.filters()).await;
                anyhow::Ok((segments, bytes))
            })
        };
        let store = self.clone();
        // It owns the pack uploads, the copies and the filters: when it fails (nothing
        // is published then) or is dropped, they stop.
        let landing = OwnedTask::spawn(async move {
            let wire_bytes = uploads.await.context(UPLOADS_STOPPED)??;
            let indexing = Indexing(has_new.then(|| {
                let store = store.clone();
                OwnedTask::spawn(async move {
                    let (segments, filters) =
                        (filtering.await).context("the index filter writer stopped")??;
                    Ok(filters + store.write_segments(segments).await?)
                })
            }));
            refreshing.await.context("the pack refresher stopped")??;
            Ok((wire_bytes, indexing))
        });
        Ok((Sent { stats, table }, Landing(landing)))
    }

    /// Writes `manifest`, with the table and stream length of `sent` filled in, under
    /// `key`; returns the stats of the whole upload and the manifest published. With
    /// `if_absent`, `None` when another writer created `key` first (on servers that
    /// honour `If-None-Match`; see [`crate::store::PutOptions::if_absent`]).
    pub async fn publish(
        &self,
        manifest: Manifest,
        sent: Sent,
        key: &str,
        if_absent: bool,
    ) -> anyhow::Result<Option<(Stats, Manifest)>> {
        let (sealed, manifest) = seal(manifest, sent, key)?;
        Ok(self
            .put_sealed(sealed, key, if_absent)
            .await?
            .map(|stats| (stats, manifest)))
    }

    /// Writes the manifest `sealed` for `key` (see [`ChunkStore::publish`]); the stats
    /// of the whole upload, or `None` when `if_absent` and another writer was first.
    pub async fn put_sealed(
        &self,
        sealed: Sealed,
        key: &str,
        if_absent: bool,
    ) -> anyhow::Result<Option<Stats>> {
        let Sealed { data, mut stats } = sealed;
        match self.transfer.put_entry(key, data, if_absent).await {
            Err(StoreError::Exists(_)) => return Ok(None),
            written => written.with_context(|| format!("cannot write the manifest {key}"))?,
        }
        stats.retries = self.transfer.retries();
        Ok(Some(stats))
    }

    /// The index segment objects listed now.
    pub async fn list_segments(&self) -> anyhow::Result<Vec<ObjectInfo>> {
        self.list_internal(&self.layout.index_prefix(), "index segments")
            .await
    }

    /// Every index segment that can be trusted, with its key, and the keys of those
    /// skipped (see [`ChunkStore::read_segment`]).
    pub async fn read_segments(&self) -> anyhow::Result<Segments> {
        let listed = self.list_segments().await?;
        self.read_listed_segments(listed).await
    }

    /// [`ChunkStore::read_segments`] of the segments `listed`.
    pub async fn read_listed_segments(&self, listed: Vec<ObjectInfo>) -> anyhow::Result<Segments> {
        let read: Vec<(String, SegmentRead)> = futures::stream::iter(listed)
            .map(|seg| async move {
                let read = self.read_segment(&seg).await?;
                Ok::<_, StoreError>((seg.key, read))
            })
            .buffer_unordered(self.transfer.jobs())
            .try_collect()
            .await
            .context("cannot read the chunk index")?;
        let mut segments = Segments::default();
        for (key, read) in read {
            match read {
                SegmentRead::Table(table) => segments.tables.push((key, table)),
                SegmentRead::Skipped => segments.skipped.push(key),
                SegmentRead::Gone => {}
            }
        }
        Ok(segments)
    }

    /// Reads one index segment. Segments are a cache of what the bucket holds: one
    /// deleted meanwhile (gc compacts them) is gone, and one too large, not named by the
    /// blake3 of its bytes, or not decoding is skipped with a warning (an upload then
    /// resends chunks it would have reused, nothing worse). Reads go through the
    /// transfer, which retries temporary faults.
    pub async fn read_segment(&self, seg: &ObjectInfo) -> Result<SegmentRead, StoreError> {
        let Some(id) = self.layout.segment_id(&seg.key) else {
            return Ok(SegmentRead::Skipped);
        };
        let skipped = |why: String| {
            ui::warn(format!("ignoring index segment {}: {why}", seg.key));
            Ok(SegmentRead::Skipped)
        };
        let data = match self.read_named(seg, id, MAX_SEGMENT_OBJECT).await? {
            Named::Bytes(data) => data,
            Named::Untrusted(why) => return skipped(why),
            Named::Gone => return Ok(SegmentRead::Gone),
        };
        match ChunkTable::decode_index(&seg.key, &data) {
            Ok(table) => Ok(SegmentRead::Table(table)),
            // The error names the segment already.
            Err(e) => {
                ui::warn(format!("ignoring index segment: {e}"));
                Ok(SegmentRead::Skipped)
            }
        }
    }

    /// Reads `object`, whose name claims `id` for the blake3 of its bytes, as index
    /// segments and summaries are named: untrusted when it is over `max` bytes or its
    /// bytes do not hash to its name.
    pub async fn read_named(
        &self,
        object: &ObjectInfo,
        id: Id,
        max: u64,
    ) -> Result<Named, StoreError> {
        if object.size > max {
            let why = format!("{} bytes, more than the {max} allowed", object.size);
            return Ok(Named::Untrusted(why));
        }
        let mut data = Vec::new();
        match self
            .transfer
            .read_range(&object.key, None, 0..object.size, &mut data)
            .await
        {
            Ok(()) => {}
            Err(StoreError::NotFound(_)) => return Ok(Named::Gone),
            Err(e) => return Err(e),
        }
        if Id::of(&data) != id {
            return Ok(Named::Untrusted(
                "its bytes do not match its name (corrupt)".into(),
            ));
        }
        Ok(Named::Bytes(data))
    }

    /// Writes `table` as index segments of at most `max_chunks` chunks each, each after
    /// its filter; the bytes they took. An upload writes its own in two steps (see
    /// [`ChunkStore::start_sending`]).
    pub async fn write_index(&self, table: &ChunkTable, max_chunks: usize) -> anyhow::Result<u64> {
        let segments = NewSegments::encode(&self.layout, table, max_chunks);
        let filters = self.clone().write_filters(segments.filters()).await;
        Ok(filters + self.write_segments(segments).await?)
    }

    /// Writes the filters of index segments (see [`NewSegments`]); the bytes they took.
    /// A filter is only a shortcut (without one, its segment is read whole), so one
    /// that cannot be written is a warning.
    async fn write_filters(self, filters: Vec<(String, Bytes)>) -> u64 {
        let transfer = &self.transfer;
        futures::stream::iter(filters)
            .map(|(key, filter)| async move {
                let len = filter.len() as u64;
                match transfer.put_bytes(&key, filter).await {
                    Ok(_) => len,
                    Err(e) => {
                        ui::warn(format!("cannot write the index filter {key}: {e}"));
                        0
                    }
                }
            })
            .buffer_unordered(transfer.jobs())
            .fold(0, |sum, len| async move { sum + len })
            .await
    }

    /// Writes index segments, once their packs and filters are in; the bytes they took.
    async fn write_segments(&self, segments: NewSegments) -> anyhow::Result<u64> {
        futures::stream::iter(segments.0)
            .map(|segment| async move {
                let len = segment.data.len() as u64;
                self.transfer
                    .put_bytes(&segment.key, segment.data)
                    .await
                    .context("cannot write an index segment")?;
                Ok::<_, anyhow::Error>(len)
            })
            .buffer_unordered(self.transfer.jobs())
            .try_fold(0, |sum, len| async move { Ok(sum + len) })
            .await
    }

    /// Gives reused packs older than [`REFRESH_AGE`] a new modification time, so a gc
    /// running now cannot take them for old garbage before our manifest lands (see
    /// docs/format.md, "Garbage collection"). A pack that vanished fails the upload.
    async fn refresh_packs(self, stale: Vec<Id>) -> anyhow::Result<()> {
        let this = &self;
        futures::stream::iter(stale)
            .map(|pack| async move {
                this.transfer
                    .store()
                    .touch(&this.pack_key(&pack))
                    .await
                    .map_err(|e| match e {
                        StoreError::NotFound(_) => anyhow::anyhow!(
                            "pack {pack} disappeared during the upload (a concurrent gc?); nothing was published, run the upload again"
                        ),
                        e => anyhow::Error::new(e).context(format!("cannot refresh pack {pack}")),
                    })
            })
            .buffer_unordered(self.transfer.jobs())
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// What is stored under `key`: `None` when nothing is.
    /// An entry overwritten while it is read is read again, a few times.
    pub async fn fetch(&self, key: &str) -> anyhow::Result<Option<Stored>> {
        Ok(self.fetch_with_info(key).await?.map(|(_, stored)| stored))
    }

    /// Like [`ChunkStore::fetch`], with the metadata of `key` (for
    /// [`super::gc::mark_used`] after a restore).
    pub async fn fetch_with_info(&self, key: &str) -> anyhow::Result<Option<(ObjectInfo, Stored)>> {
        self.fetch_as(key, true).await
    }

    /// What the listed object `info` holds, read without a HEAD: the listing gave its
    /// size and version. One that changed since the listing is read again; `None` when
    /// it is gone. Signatures are not checked: gc and stats count every entry.
    pub async fn read_listed(&self, info: &ObjectInfo) -> anyhow::Result<Option<Stored>> {
        let read = async {
            let (mut head, first) = (Vec::new(), 0..info.size.min(FIRST_READ));
            (self.transfer)
                .read_range(&info.key, info.etag.as_deref(), first, &mut head)
                .await?;
            self.read_entry(&info.key, info, head).await
        };
        match read.await {
            Ok(stored) => Ok(Some(stored)),
            Err(e) if is_changed(&e) => {
                let fetched = self.fetch_as(&info.key, false).await?;
                Ok(fetched.map(|(_, stored)| stored))
            }
            Err(e) if matches!(e.downcast_ref(), Some(StoreError::NotFound(_))) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// What `key` holds, with its metadata, read again (a few times) when it is
    /// overwritten meanwhile; `trusted`: as a restore may use it (see
    /// [`ChunkStore::fetch_once`]).
    async fn fetch_as(
        &self,
        key: &str,
        trusted: bool,
    ) -> anyhow::Result<Option<(ObjectInfo, Stored)>> {
        let mut attempts = 0;
        loop {
            match self.fetch_once(key, trusted).await {
                Err(e) if is_changed(&e) && attempts < 3 => attempts += 1,
                other => return other,
            }
        }
    }

    /// One read of `key` (its metadata with its first bytes); with `trusted`, an entry
    /// the configured trust refuses is an [`Untrusted`] error.
    async fn fetch_once(
        &self,
        key: &str,
        trusted: bool,
    ) -> anyhow::Result<Option<(ObjectInfo, Stored)>> {
        // Most manifests are read whole by this first GET.
        let mut head = Vec::new();
        let Some(info) = self
            .transfer
            .head_and_read(key, FIRST_READ, &mut head)
            .await?
        else {
            return Ok(None);
        };
        let verdict = match trusted {
            true => self.transfer.trust().check(&info)?,
            false => Verdict::Unchecked,
        };
        let stored = self.read_entry(key, &info, head).await?;
        // A tar.zst or a plain docker archive is used as it streams (extracted, or read
        // by docker load) before its sha256 could be checked, so a signature on one
        // cannot be honoured: images and trees are signed through their manifests.
        if let (Stored::Legacy(_) | Stored::Plain(_), Verdict::Signed(id)) = (&stored, verdict) {
            return Err(Untrusted {
                key: key.to_string(),
                reason: format!(
                    "it is a whole archive signed by {id}, which `dir` and `docker download` cannot check before using it (store trees and images with `dir upload` and `docker upload`)"
                ),
            }
            .into());
        }
        Ok(Some((info, stored)))
    }

    /// Reads what the object `info` holds, given its first bytes `head`.
    async fn read_entry(
        &self,
        key: &str,
        info: &ObjectInfo,
        head: Vec<u8>,
    ) -> anyhow::Result<Stored> {
        if head.starts_with(&ZSTD_MAGIC) {
            return Ok(Stored::Legacy(info.clone()));
        }
        if !super::format::is_manifest(&head) {
            return Ok(Stored::Plain(info.clone()));
        }
        if info.size > MAX_MANIFEST_OBJECT {
            return Err(broken(format!(
                "{key} is a {}-byte manifest, larger than any cacher writes",
                info.size
            )));
        }
        let mut data = head;
        if (data.len() as u64) < info.size {
            let mut rest = Vec::new();
            self.transfer
                .read_range(
                    key,
                    info.etag.as_deref(),
                    data.len() as u64..info.size,
                    &mut rest,
                )
                .await?;
            data.extend_from_slice(&rest);
        }
        // The sha256 recorded with a manifest is what its signature covers.
        if let Some(recorded) = &info.sha256
            && hex::encode(Sha256::digest(&data)) != *recorded
        {
            return Err(broken(format!(
                "{key} does not hash to the sha256 recorded with it (tampered, or corrupt)"
            )));
        }
        let manifest = Manifest::decode(key, &data).map_err(|e| broken(e.to_string()))?;
        Ok(Stored::Manifest(Box::new(manifest)))
    }

    /// Writes the stream of `table` to `out` on a blocking thread, every chunk verified:
    /// `jobs` ranges are fetched and decoded (on all cores) ahead of the writer, and a
    /// chunk the stream holds more than once is fetched once ([`plan_restore`]). On
    /// failure `out` is dropped off the async threads, which is how a restorer removes
    /// its temp tree and `docker load` is killed before the archive's end.
    pub async fn restore_in_order<W>(
        &self,
        table: &ChunkTable,
        out: W,
    ) -> anyhow::Result<(W, Stats)>
    where
        W: Write + Send + 'static,
    {
        let _buffers = crate::memory::reuse_stream_buffers();
        let mut stats = Stats {
            chunks: table.chunks.len() as u64,
            packs: table.packs.len() as u64,
            ..Stats::default()
        };
        // Decoding (on all cores) and writing each happen on a thread of their own, so
        // the next ranges are fetched and decoded while one is written; at most two
        // fetched ranges and two decoded ones wait, and the writer holds at most
        // MAX_HELD bytes of repeated chunks, which bounds memory.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(FetchRange, Vec<u8>)>(2);
        let (decoded_tx, decoded_rx) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(1);
        let decoder = tokio::task::spawn_blocking(move || {
            while let Some((run, buf)) = rx.blocking_recv() {
                let decoded = decode_run(&run, &buf).map_err(|e| (e, run.pack))?;
                if decoded_tx.send(decoded).is_err() {
                    break; // the writer failed: its error is the one to report
                }
            }
            Ok::<_, (anyhow::Error, Id)>(())
        });
        let RestorePlan { sources, runs } = plan_restore(table);
        let fetched_chunks = runs.iter().map(|r| r.chunks.len() as u64).sum();
        let writer = tokio::task::spawn_blocking(move || {
            let mut out = out;
            // Returning drops `out` here, off the async threads.
            let bytes = write_planned(&mut out, sources, decoded_rx)?;
            Ok::<_, std::io::Error>((out, bytes))
        });
        // Ranges in flight are bounded by bytes, not by count: a sparse restore (an
        // update fetching a few changed chunks) makes many small GETs, whose cost is
        // the server's latency, so more of them run at once.
        let budget = Arc::new(tokio::sync::Semaphore::new(
            self.transfer.jobs() * (MAX_RANGE / 1024) as usize,
        ));
        let fetched = async {
            let mut runs = futures::stream::iter(runs)
                .map(|run| {
                    let (pack, end) = (run.pack, run.end);
                    let budget = budget.clone();
                    async move {
                        let kib = (end - run.start).div_ceil(1024) as u32;
                        let permit = budget.acquire_many_owned(kib).await?;
                        let mut buf = Vec::new();
                        let read = self
                            .transfer
                            .read_range(&self.pack_key(&pack), None, run.start..end, &mut buf)
                            .await;
                        match read {
                            Ok(()) => Ok((run, buf, permit)),
                            Err(e) => Err(self.explain_pack_error(e, &pack, end).await),
                        }
                    }
                })
                .buffered(MAX_RANGES_IN_FLIGHT);
            while let Some(next) = runs.next().await {
                let (run, buf, permit) = next?;
                stats.wire_bytes += buf.len() as u64;
                if tx.send((run, buf)).await.is_err() {
                    break; // the writer failed: its error is the one to report
                }
                drop(permit);
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        drop(tx);
        let decoded = decoder.await?;
        let written = writer.await?;
        // The first failure along the pipeline is the cause; `out` goes with it.
        let failure = match (fetched, decoded) {
            (Err(e), _) => Some(e),
            (_, Err((e, pack))) => {
                if is_broken(&e) {
                    self.remove_if_corrupt(&pack).await;
                }
                Some(e)
            }
            _ => None,
        };
        if let Some(e) = failure {
            if let Ok((out, ..)) = written {
                tokio::task::spawn_blocking(move || drop(out)).await?;
            }
            return Err(e);
        }
        let (out, bytes) = written?;
        stats.chunks_new = fetched_chunks;
        stats.new_bytes = bytes;
        stats.stream_bytes = stats.new_bytes;
        stats.retries = self.transfer.retries();
        Ok((out, stats))
    }
}

impl ChunkStore {
    /// Why reading bytes up to `end` of `pack` failed: a missing pack or one shorter
    /// than the manifest says makes the entry broken (packs never change); anything
    /// else (network, server) stays what it was.
    async fn explain_pack_error(&self, e: StoreError, pack: &Id, end: u64) -> anyhow::Error {
        if let StoreError::NotFound(_) = e {
            return broken(format!("pack {pack} is missing from the bucket"));
        }
        match self.transfer.store().head(&self.pack_key(pack)).await {
            Ok(None) => broken(format!("pack {pack} is missing from the bucket")),
            Ok(Some(info)) if info.size < end => broken(format!(
                "pack {pack} holds {} bytes, fewer than the entry says",
                info.size
            )),
            _ => anyhow::Error::new(e),
        }
    }

    /// Deletes `pack` when its bytes no longer hash to its name: it is then garbage for
    /// every entry, and without it the next upload sends its chunks again (an upload
    /// would otherwise keep reusing them). Best effort: read-only credentials or a
    /// fault leave it, and only `-v` says why.
    async fn remove_if_corrupt(&self, pack: &Id) {
        let key = self.pack_key(pack);
        let checked = async {
            let Some(info) = self.transfer.store().head(&key).await? else {
                return Ok(false);
            };
            let mut data = Vec::new();
            self.transfer
                .read_range(&key, info.etag.as_deref(), 0..info.size, &mut data)
                .await?;
            if Id::of(&data) == *pack {
                return Ok(false);
            }
            self.transfer.store().delete(&key).await?;
            Ok::<_, StoreError>(true)
        };
        match checked.await {
            Ok(true) => ui::warn(format!(
                "deleted pack {pack}: its content no longer matches its name; the next upload sends its chunks again"
            )),
            Ok(false) => {}
            Err(e) => ui::verbose(format!("could not check pack {pack}: {e}")),
        }
    }
}

/// An entry that is in the bucket but cannot be restored: its manifest does not
/// decode, a pack it references is missing, or a chunk fails verification. It says
/// nothing about the network or the local disk: a restore takes it for a miss, and an
/// upload without `--force` replaces it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokenEntry(String);

pub(crate) fn broken(why: String) -> anyhow::Error {
    BrokenEntry(why).into()
}

/// Whether `e` says the entry itself is broken (see [`BrokenEntry`]).
pub fn is_broken(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<BrokenEntry>())
}

/// The location of chunk `c` stored in `pack`.
pub fn location(pack: Id, c: &ChunkRef) -> Location {
    Location {
        pack,
        offset: c.offset,
        stored_len: c.stored_len,
        len: c.len,
    }
}

/// Splits `table` into tables of at most `max_chunks` chunks (at least one each), each
/// naming only the packs its chunks use.
pub fn split_table(table: &ChunkTable, max_chunks: usize) -> Vec<ChunkTable> {
    table
        .chunks
        .chunks(max_chunks.max(1))
        .map(|part| {
            table_of(
                part.iter()
                    .map(|c| (c.id, location(table.packs[c.pack as usize], c))),
            )
        })
        .collect()
}

/// The index segments of the chunks an upload sent, encoded, each with its filter: at
/// most `max_chunks` chunks each, so no reader rejects one, however large the table.
struct NewSegments(Vec<NewSegment>);

/// One index segment to write: its key and bytes, and its filter's.
struct NewSegment {
    key: String,
    data: Bytes,
    filter_key: String,
    filter: Bytes,
}

impl NewSegments {
    /// The segments of `table`, each encoded and named by its hash.
    fn encode(layout: &Layout, table: &ChunkTable, max_chunks: usize) -> NewSegments {
        let segments = (split_table(table, max_chunks).into_iter())
            .filter(|part| !part.chunks.is_empty())
            .map(|part| {
                let data = Bytes::from(part.encode_index());
                let id = Id::of(&data);
                let filter = summary::encode_filter(part.chunks.iter().map(|c| &c.id));
                NewSegment {
                    key: layout.segment_key(&id),
                    data,
                    filter_key: layout.filter_key(&id),
                    filter: Bytes::from(filter),
                }
            });
        NewSegments(segments.collect())
    }

    /// Each segment's filter, with its key.
    fn filters(&self) -> Vec<(String, Bytes)> {
        let filter = |s: &NewSegment| (s.filter_key.clone(), s.filter.clone());
        self.0.iter().map(filter).collect()
    }
}

/// Builds a table, numbering packs in order of first use.
pub fn table_of(chunks: impl Iterator<Item = (Id, Location)>) -> ChunkTable {
    let mut table = ChunkTable::default();
    let mut pack_index: HashMap<Id, u32> = HashMap::new();
    for (id, loc) in chunks {
        let pack = *pack_index.entry(loc.pack).or_insert_with(|| {
            table.packs.push(loc.pack);
            (table.packs.len() - 1) as u32
        });
        table.chunks.push(ChunkRef {
            id,
            pack,
            offset: loc.offset,
            stored_len: loc.stored_len,
            len: loc.len,
        });
    }
    table
}

/// Bytes of cut chunks being hashed and compressed at once, beyond which packing waits.
const IN_FLIGHT_BYTES: usize = 8 * 1024 * 1024;

/// Where a piece of the stream is kept.
enum Keeping {
    /// The bucket holds it already, there.
    Reused(Location),
    /// It goes into a pack: its compressed bytes.
    New(Vec<u8>),
}

/// A piece of the stream on its way into a pack: its id, length and where it is kept.
type Processed = (Id, u32, Keeping);

/// A piece waiting its turn to be packed.
enum Waiting {
    /// Known already: a reused chunk.
    Ready(Processed),
    /// Being hashed and compressed on the pool: its length, and where it arrives.
    Running(usize, std::sync::mpsc::Receiver<std::io::Result<Processed>>),
}

/// The pieces of the stream between the cutter and the packer, in stream order, their
/// chunks hashed and compressed on the pool meanwhile. Dropped, it waits for the jobs
/// still running, so none outlives the upload that started it.
#[derive(Default)]
struct Turns {
    waiting: std::collections::VecDeque<Waiting>,
    /// Bytes of the running jobs.
    in_flight: usize,
}

impl Turns {
    /// Queues `piece`: a cut chunk is hashed, looked up in `known` and compressed if
    /// the bucket lacks it, on the pool.
    fn push(&mut self, piece: Piece, known: &Arc<Known>) {
        let data = match piece {
            Piece::Reused { id, loc } => {
                let ready = (id, loc.len, Keeping::Reused(loc));
                return self.waiting.push_back(Waiting::Ready(ready));
            }
            Piece::Cut(data) => data,
        };
        let len = data.len();
        self.in_flight += len;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let known = known.clone();
        rayon::spawn(move || {
            // A panic in a job spawned on the pool would abort the process: it comes
            // back as this piece's error instead.
            let processed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let id = Id::of(&data);
                let stored = match known.reusable(&id, len) {
                    Some(loc) => Keeping::Reused(loc),
                    None => Keeping::New(super::format::encode_chunk(&data)?),
                };
                Ok((id, len as u32, stored))
            }))
            .unwrap_or_else(|_| Err(std::io::Error::other("a compression job panicked")));
            let _ = tx.send(processed);
        });
        self.waiting.push_back(Waiting::Running(len, rx));
    }

    /// The next piece in stream order once it is processed; `None` when there is none,
    /// or when it is still running and `wait` is off.
    fn next(&mut self, wait: bool) -> anyhow::Result<Option<Processed>> {
        let done = match self.waiting.front() {
            None => return Ok(None),
            Some(Waiting::Ready(_)) => None,
            Some(Waiting::Running(_, rx)) => match rx.try_recv() {
                Ok(done) => Some(done),
                Err(std::sync::mpsc::TryRecvError::Empty) if !wait => return Ok(None),
                Err(std::sync::mpsc::TryRecvError::Empty) => rx.recv().ok(),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
            },
        };
        match self.waiting.pop_front().expect("a front") {
            Waiting::Ready(ready) => Ok(Some(ready)),
            Waiting::Running(len, _) => {
                self.in_flight -= len;
                let done = done.context("a compression job stopped")?;
                done.context("zstd compression failed").map(Some)
            }
        }
    }
}

impl Drop for Turns {
    fn drop(&mut self) {
        for waiting in self.waiting.drain(..) {
            if let Waiting::Running(_, rx) = waiting {
                let _ = rx.recv();
            }
        }
    }
}

/// Runs on a blocking thread: hashes, compresses and packs the cut stream.
///
/// Each chunk cut goes to the pool as soon as it arrives, whatever batch it came in
/// (a warm upload's batch may hold one cut chunk among a hundred reused ones, which
/// one batch at a time compressed on one core while the cutter waited), and is packed
/// in stream order; at most [`IN_FLIGHT_BYTES`] are in flight.
fn chunk_stream(
    pieces: impl Iterator<Item = anyhow::Result<Vec<Piece>>>,
    known: &Arc<Known>,
    packs: &tokio::sync::mpsc::Sender<SealedPack>,
) -> anyhow::Result<Chunked> {
    let mut packer = Packer::new(packs);
    let mut turns = Turns::default();
    for batch in pieces {
        let batch = batch?;
        known.check()?;
        // A failed pack upload ends the stream now, not at the next pack.
        if packs.is_closed() {
            return Err(pack_upload_stopped());
        }
        for piece in batch {
            turns.push(piece, known);
            // What is done is packed at once; past the bound, packing waits.
            while let Some(next) = turns.next(turns.in_flight > IN_FLIGHT_BYTES)? {
                packer.add(next)?;
            }
        }
    }
    while let Some(next) = turns.next(true)? {
        packer.add(next)?;
    }
    packer.finish()
}

/// The packs' uploader is gone: it failed, and its error is the one reported.
fn pack_upload_stopped() -> anyhow::Error {
    anyhow::anyhow!("pack upload stopped")
}

/// Gathers the chunks the bucket lacks into packs and hands each on to be uploaded
/// once it holds [`PACK_TARGET`] bytes; records where every chunk of the stream is.
struct Packer<'a> {
    out: Chunked,
    pack: Vec<u8>,
    /// The chunks in `pack`: id, offset, stored and plain length.
    open: Vec<(Id, u32, u32, u32)>,
    packs: &'a tokio::sync::mpsc::Sender<SealedPack>,
}

impl<'a> Packer<'a> {
    /// A packer handing its packs to `packs`.
    fn new(packs: &'a tokio::sync::mpsc::Sender<SealedPack>) -> Packer<'a> {
        Packer {
            out: Chunked {
                order: Vec::new(),
                locations: HashMap::new(),
                new_chunks: Vec::new(),
                stats: Stats::default(),
            },
            pack: Vec::with_capacity(PACK_TARGET + CHUNK_MAX as usize),
            open: Vec::new(),
            packs,
        }
    }

    /// Adds the next chunk of the stream.
    fn add(&mut self, (id, len, stored): Processed) -> anyhow::Result<()> {
        let out = &mut self.out;
        out.order.push(id);
        out.stats.chunks += 1;
        out.stats.stream_bytes += u64::from(len);
        if out.locations.contains_key(&id) || self.open.iter().any(|o| o.0 == id) {
            return Ok(());
        }
        let compressed = match stored {
            Keeping::Reused(loc) => {
                out.locations.insert(id, loc);
                return Ok(());
            }
            Keeping::New(compressed) => compressed,
        };
        self.open
            .push((id, self.pack.len() as u32, compressed.len() as u32, len));
        self.pack.extend_from_slice(&compressed);
        out.stats.chunks_new += 1;
        out.stats.new_bytes += u64::from(len);
        if self.pack.len() >= PACK_TARGET {
            self.seal()?;
        }
        Ok(())
    }

    /// Hands on the open pack, if it holds anything.
    fn seal(&mut self) -> anyhow::Result<()> {
        if self.pack.is_empty() {
            return Ok(());
        }
        let data = Bytes::from(std::mem::replace(
            &mut self.pack,
            Vec::with_capacity(PACK_TARGET + CHUNK_MAX as usize),
        ));
        let id = Id::of(&data);
        for (chunk, offset, stored_len, len) in self.open.drain(..) {
            let loc = Location {
                pack: id,
                offset,
                stored_len,
                len,
            };
            self.out.locations.insert(chunk, loc);
            self.out.new_chunks.push((chunk, loc));
        }
        self.out.stats.packs += 1;
        self.packs
            .blocking_send(SealedPack { id, data })
            .map_err(|_| pack_upload_stopped())
    }

    /// Hands on the last pack; where every chunk is.
    fn finish(mut self) -> anyhow::Result<Chunked> {
        self.seal()?;
        Ok(self.out)
    }
}

/// Cuts `content` with FastCDC on a thread of its own, yielding batches of about
/// [`BATCH_BYTES`]; at most two batches wait, which bounds memory.
fn cut_in_batches<R: Read + Send + 'static>(
    content: R,
) -> impl Iterator<Item = anyhow::Result<Vec<Piece>>> + Send + 'static {
    let (tx, rx) = std::sync::mpsc::sync_channel(2);
    std::thread::spawn(move || {
        let cutter = fastcdc::v2020::StreamCDC::new(
            content,
            CHUNK_MIN as usize,
            CHUNK_AVG as usize,
            CHUNK_MAX as usize,
        );
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for chunk in cutter {
            let chunk = match chunk {
                Ok(c) => c,
                Err(fastcdc::v2020::Error::IoError(io)) => {
                    let _ = tx.send(Err(anyhow::Error::new(io)));
                    return;
                }
                Err(other) => {
                    let _ = tx.send(Err(anyhow::anyhow!("chunking failed: {other:?}")));
                    return;
                }
            };
            batch_bytes += chunk.data.len();
            batch.push(Piece::Cut(chunk.data));
            if batch_bytes >= BATCH_BYTES {
                batch_bytes = 0;
                if tx.send(Ok(std::mem::take(&mut batch))).is_err() {
                    return;
                }
            }
        }
        if !batch.is_empty() {
            let _ = tx.send(Ok(batch));
        }
    });
    rx.into_iter()
}

/// Writes the stream as `sources` say, taking fetched chunks from `decoded` in order
/// and holding repeated ones for their later places; the bytes written. A closed
/// channel before the end is the fetch or the decoder failing, whose error is the one
/// reported.
fn write_planned(
    out: &mut impl Write,
    sources: Vec<Source>,
    decoded: std::sync::mpsc::Receiver<Vec<Vec<u8>>>,
) -> std::io::Result<u64> {
    let mut bytes = 0u64;
    let mut held: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut batch = Vec::new().into_iter();
    for source in sources {
        let (data, keep) = match source {
            Source::Fetched { hold } => {
                let data = match batch.next() {
                    Some(data) => data,
                    None => {
                        batch = decoded.recv().map_err(|_| ended_early())?.into_iter();
                        batch.next().ok_or_else(ended_early)?
                    }
                };
                (data, hold)
            }
            Source::Held { slot, last } => {
                let data = held
                    .remove(&slot)
                    .ok_or_else(|| std::io::Error::other("a repeated chunk was not held"))?;
                (data, (!last).then_some(slot))
            }
        };
        out.write_all(&data)?;
        bytes += data.len() as u64;
        if let Some(slot) = keep {
            held.insert(slot, data);
        }
    }
    if batch.next().is_some() || decoded.recv().is_ok() {
        return Err(std::io::Error::other(
            "more chunks were fetched than planned",
        ));
    }
    Ok(bytes)
}

/// The writer of a restore ran out of fetched chunks before the end of its plan.
fn ended_early() -> std::io::Error {
    std::io::Error::other("the fetched chunks ended before the stream")
}

/// How a restore gets the chunks of its stream.
struct RestorePlan {
    /// Where each chunk of the stream comes from, in stream order.
    sources: Vec<Source>,
    /// The ranged GETs, in stream order.
    runs: Vec<FetchRange>,
}

/// Where the writer of a restore takes one chunk of the stream from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The next chunk of the fetched ranges; held in the slot given for a later place.
    Fetched { hold: Option<u32> },
    /// The chunk held in `slot` since an earlier place; `last`: its last place.
    Held { slot: u32, last: bool },
}

/// The plan of a restore of `table`'s stream. A chunk the stream holds more than once
/// (the same file in two places) is fetched once and held for its later places, from
/// the first place where it fits within [`MAX_HELD`] bytes held at a time. Fetched
/// again, each repeat would cost two ranged GETs, one back to its pack and one to go
/// on, and the server reads (and verifies) a whole block of its own for each, however
/// small.
fn plan_restore(table: &ChunkTable) -> RestorePlan {
    let chunks = &table.chunks;
    // The same chunk is the same id and length: a table that gives one id two lengths
    // is corrupt, and those places are fetched, to fail as such.
    let same = |a: &ChunkRef, b: &ChunkRef| (a.id, a.len) == (b.id, b.len);
    // Which places have the same chunk later: places sorted by chunk (four bytes each,
    // where a map of every id would take forty on a table of millions; a decoded table
    // holds fewer than 2^32 chunks).
    let mut by_chunk: Vec<u32> = (0..chunks.len() as u32).collect();
    by_chunk.sort_unstable_by_key(|&i| (chunks[i as usize].id, chunks[i as usize].len, i));
    let mut again_later = vec![false; chunks.len()];
    for pair in by_chunk.windows(2) {
        if same(&chunks[pair[0] as usize], &chunks[pair[1] as usize]) {
            again_later[pair[0] as usize] = true;
        }
    }
    drop(by_chunk);
    // The chunks held now, by id; each one's slot is the place it was fetched at.
    let (mut slots, mut held_bytes) = (HashMap::<Id, u32>::new(), 0u64);
    let mut sources = Vec::with_capacity(chunks.len());
    for (c, at) in chunks.iter().zip(0u32..) {
        let last = !again_later[at as usize];
        if let Some(&slot) = slots
            .get(&c.id)
            .filter(|&&slot| same(&chunks[slot as usize], c))
        {
            if last {
                slots.remove(&c.id);
                held_bytes -= u64::from(c.len);
            }
            sources.push(Source::Held { slot, last });
            continue;
        }
        let mut hold = None;
        if !last && !slots.contains_key(&c.id) && held_bytes + u64::from(c.len) <= MAX_HELD {
            slots.insert(c.id, at);
            held_bytes += u64::from(c.len);
            hold = Some(at);
        }
        sources.push(Source::Fetched { hold });
    }
    let fetched = chunks
        .iter()
        .zip(&sources)
        .filter(|(_, source)| matches!(source, Source::Fetched { .. }))
        .map(|(c, _)| c);
    let runs = plan_runs(&table.packs, fetched);
    RestorePlan { sources, runs }
}

/// The ranged GETs that fetch `chunks` (of a table of `packs`), in their order: each
/// covers consecutive chunks stored close together in one pack (uploads store new
/// chunks in stream order, so ranges are long except where old chunks are reused). Few
/// large GETs matter: a server spends about as much on a small GET as on a large one.
fn plan_runs<'a>(packs: &[Id], chunks: impl IntoIterator<Item = &'a ChunkRef>) -> Vec<FetchRange> {
    let mut runs: Vec<FetchRange> = Vec::new();
    for c in chunks {
        let pack = packs[c.pack as usize];
        let (start, end) = (
            u64::from(c.offset),
            u64::from(c.offset) + u64::from(c.stored_len),
        );
        match runs.last_mut() {
            Some(r)
                if r.pack == pack
                    && start >= r.start
                    && start <= r.end + MERGE_GAP
                    && end - r.start <= MAX_RANGE
                    && r.decoded + u64::from(c.len) <= MAX_DECODED =>
            {
                r.end = r.end.max(end);
                r.decoded += u64::from(c.len);
                r.chunks.push(*c);
            }
            _ => runs.push(FetchRange {
                pack,
                start,
                end,
                decoded: u64::from(c.len),
                chunks: vec![*c],
            }),
        }
    }
    runs
}

/// One ranged GET of a pack and the chunks it holds, in stream order.
struct FetchRange {
    pack: Id,
    start: u64,
    end: u64,
    /// Bytes the chunks decode to.
    decoded: u64,
    chunks: Vec<ChunkRef>,
}

/// Decompresses and verifies each chunk of a fetched range, on all cores.
fn decode_run(range: &FetchRange, buf: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    range
        .chunks
        .par_iter()
        .map(|c| {
            let from = (u64::from(c.offset) - range.start) as usize;
            let stored = buf.get(from..from + c.stored_len as usize).ok_or_else(|| {
                broken(format!(
                    "pack {} is shorter than its index says",
                    range.pack
                ))
            })?;
            super::format::decode_chunk(stored, c.len, &c.id)
                .ok_or_else(|| broken(format!("chunk {} in pack {} is corrupt", c.id, range.pack)))
        })
        .collect()
}

/// The stats line of an upload: files, bytes, chunks total / new / reused, bytes sent,
/// dedup %, time, rate.
pub fn upload_stats_line(
    key: &str,
    files: Option<usize>,
    stats: &Stats,
    elapsed: Duration,
) -> String {
    let dedup = if stats.stream_bytes == 0 {
        100.0
    } else {
        100.0 * stats.stream_bytes.saturating_sub(stats.new_bytes) as f64
            / stats.stream_bytes as f64
    };
    format!(
        "uploaded {key}: {}{}, chunks {} total / {} new / {} reused, sent {}, dedup {dedup:.1}%, {:.2}s, {}{}",
        files_note(files, stats, "read"),
        ui::human_bytes(stats.stream_bytes),
        stats.chunks,
        stats.chunks_new,
        stats.chunks - stats.chunks_new,
        ui::human_bytes(stats.wire_bytes),
        elapsed.as_secs_f64(),
        ui::human_rate(stats.stream_bytes, elapsed),
        retry_note(stats.retries),
    )
}

/// The stats line of a download: files, bytes, chunks and packs fetched, bytes
/// received, time, rate.
pub fn download_stats_line(
    key: &str,
    files: Option<usize>,
    stats: &Stats,
    elapsed: Duration,
) -> String {
    format!(
        "restored {key}: {}{}, chunks {} total / {} fetched from {} packs, received {}, {:.2}s, {}{}",
        files_note(files, stats, "written"),
        ui::human_bytes(stats.stream_bytes),
        stats.chunks,
        stats.chunks_new,
        stats.packs,
        ui::human_bytes(stats.wire_bytes),
        elapsed.as_secs_f64(),
        ui::human_rate(stats.stream_bytes, elapsed),
        retry_note(stats.retries),
    )
}

fn files_note(files: Option<usize>, stats: &Stats, verb: &str) -> String {
    let Some(n) = files else {
        return String::new();
    };
    let checked = match stats.checked_bytes {
        0 => String::new(),
        n => format!(", {} of it as recorded", ui::human_bytes(n)),
    };
    let noun = if n == 1 { "file" } else { "files" };
    format!(
        "{n} {noun} ({} unchanged, {} {verb}{checked}), ",
        stats.unchanged_files,
        ui::human_bytes(stats.disk_bytes)
    )
}

/// A manifest encoded and checked, ready to write, with the stats of its upload.
pub struct Sealed {
    data: Bytes,
    stats: Stats,
}

/// `manifest` with the table and stream length of `sent` filled in, and its encoding
/// for `key`, checked as a reader would check it.
pub fn seal(mut manifest: Manifest, sent: Sent, key: &str) -> anyhow::Result<(Sealed, Manifest)> {
    let Sent { mut stats, table } = sent;
    manifest.stream_len = stats.stream_bytes;
    manifest.table = table;
    let data = manifest.encode();
    manifest
        .check_readable(key, &data)
        .context("refusing to publish an entry no reader would accept")?;
    stats.wire_bytes += data.len() as u64;
    let data = Bytes::from(data);
    Ok((Sealed { data, stats }, manifest))
}

/// Seconds since the epoch, for manifests.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays `plan` as the restore's writer does, checking each step against `table`:
    /// the next fetched chunk is the place's own, a held one is open and the same
    /// chunk, the bytes held never pass MAX_HELD, and nothing is left held at the end.
    /// The chunks fetched, in order.
    fn play(table: &ChunkTable, plan: &RestorePlan) -> Vec<ChunkRef> {
        assert_eq!(plan.sources.len(), table.chunks.len());
        let mut fetched = plan.runs.iter().flat_map(|r| r.chunks.iter().copied());
        let (mut held, mut held_bytes) = (HashMap::new(), 0u64);
        let mut order = Vec::new();
        for (i, (c, source)) in table.chunks.iter().zip(&plan.sources).enumerate() {
            match *source {
                Source::Fetched { hold } => {
                    let next = fetched.next().expect("a fetched chunk for every place");
                    assert_eq!(next, *c, "place {i}");
                    order.push(next);
                    if let Some(slot) = hold {
                        assert!(held.insert(slot, *c).is_none(), "slot {slot} reused");
                        held_bytes += u64::from(c.len);
                    }
                }
                Source::Held { slot, last } => {
                    let kept = held[&slot];
                    assert_eq!((kept.id, kept.len), (c.id, c.len), "place {i}");
                    if last {
                        held.remove(&slot);
                        held_bytes -= u64::from(c.len);
                    }
                }
            }
            assert!(held_bytes <= MAX_HELD, "{held_bytes} held at place {i}");
        }
        assert!(fetched.next().is_none(), "more fetched than planned");
        assert!(held.is_empty(), "still held at the end: {held:?}");
        order
    }

    /// `count` places drawn from `distinct` chunks of up to CHUNK_MAX bytes, stored in
    /// two packs in the order they first appear.
    fn repeating_table(rng: &mut fastrand::Rng, distinct: usize, count: usize) -> ChunkTable {
        let kinds: Vec<(Id, u32)> = (0..distinct)
            .map(|k| {
                (
                    Id::of(&k.to_le_bytes()),
                    rng.u32(1..=crate::chunk::CHUNK_MAX),
                )
            })
            .collect();
        let (mut stored, mut offsets) = (HashMap::new(), [0u32; 2]);
        let chunks = (0..count)
            .map(|_| {
                let (id, len) = kinds[rng.usize(..distinct)];
                *stored.entry(id).or_insert_with(|| {
                    let pack = rng.u32(0..2);
                    let offset = offsets[pack as usize];
                    offsets[pack as usize] += len / 2;
                    ChunkRef {
                        id,
                        pack,
                        offset,
                        stored_len: len / 2,
                        len,
                    }
                })
            })
            .collect();
        ChunkTable {
            packs: vec![Id::of(b"pack 0"), Id::of(b"pack 1")],
            chunks,
        }
    }

    #[test]
    fn a_restore_fetches_a_repeated_chunk_once_and_holds_at_most_max_held() {
        let chunk = |name: &[u8], offset: u32| ChunkRef {
            id: Id::of(name),
            pack: 0,
            offset,
            stored_len: 100_000,
            len: crate::chunk::CHUNK_MAX,
        };
        let (a, b) = (chunk(b"a", 0), chunk(b"b", 100_000));
        let table = ChunkTable {
            packs: vec![Id::of(b"pack")],
            chunks: vec![a, b, a, a],
        };
        let plan = plan_restore(&table);
        use Source::*;
        assert_eq!(
            plan.sources,
            [
                Fetched { hold: Some(0) },
                Fetched { hold: None },
                Held {
                    slot: 0,
                    last: false
                },
                Held {
                    slot: 0,
                    last: true
                },
            ]
        );
        assert_eq!(play(&table, &plan), [a, b]);
        assert_eq!(plan.runs.len(), 1, "a and b in one range");

        // An id given two lengths is not one chunk: that place is fetched, and fails
        // its check there, as in any corrupt table.
        let other = ChunkRef { len: 5, ..a };
        let table = ChunkTable {
            packs: vec![Id::of(b"pack")],
            chunks: vec![a, other, a],
        };
        let plan = plan_restore(&table);
        assert_eq!(play(&table, &plan), [a, other]);

        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20 {
            // Under 16 MiB of distinct chunks: each is fetched once.
            let table = repeating_table(&mut rng, 60, 600);
            let fetched = play(&table, &plan_restore(&table));
            let distinct: HashSet<Id> = table.chunks.iter().map(|c| c.id).collect();
            assert_eq!(fetched.len(), distinct.len());
            // Far more: the bound holds, and every place is still served.
            let table = repeating_table(&mut rng, 400, 2000);
            let fetched = play(&table, &plan_restore(&table));
            assert!(fetched.len() < table.chunks.len());
        }
    }

    #[test]
    fn chunks_compressed_out_of_batch_order_are_packed_in_stream_order_and_once() {
        // 24 distinct chunks of 512 KiB (12 MiB, past the bytes allowed in flight),
        // each cut twice in a row so both copies are in flight together, between
        // chunks the bucket holds already.
        let data: Vec<Vec<u8>> = (0..24u64)
            .map(|i| {
                let mut rng = fastrand::Rng::with_seed(i);
                (0..512 * 1024).map(|_| rng.u8(..)).collect()
            })
            .collect();
        let held = |i: u32| {
            let loc = Location {
                pack: Id::of(b"old pack"),
                offset: i * 10,
                stored_len: 10,
                len: 100,
            };
            (Id::of(&i.to_le_bytes()), loc)
        };
        let info = PackInfo {
            modified: SystemTime::now(),
            size: 1 << 20,
        };
        let known = Arc::new(Known::new(
            (0..24).map(held),
            [(Id::of(b"old pack"), info)].into(),
        ));
        let mut want = Vec::new();
        let batches: Vec<anyhow::Result<Vec<Piece>>> = data
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (id, loc) = held(i as u32);
                want.extend([Id::of(d), Id::of(d), id]);
                let cut = || Piece::Cut(d.clone());
                Ok(vec![cut(), cut(), Piece::Reused { id, loc }])
            })
            .collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<SealedPack>(2);
        let packs = std::thread::spawn(move || {
            let mut packs = HashMap::new();
            while let Some(pack) = rx.blocking_recv() {
                packs.insert(pack.id, pack.data);
            }
            packs
        });
        let chunked = chunk_stream(batches.into_iter(), &known, &tx).unwrap();
        drop(tx);
        let packs = packs.join().unwrap();

        assert_eq!(chunked.order, want);
        assert_eq!(chunked.stats.chunks_new, 24);
        assert_eq!(chunked.new_chunks.len(), 24);
        for (i, d) in data.iter().enumerate() {
            let id = Id::of(d);
            let loc = chunked.locations[&id];
            let pack = &packs[&loc.pack];
            let stored = &pack[loc.offset as usize..][..loc.stored_len as usize];
            assert_eq!(
                super::super::format::decode_chunk(stored, loc.len, &id).as_ref(),
                Some(d),
                "chunk {i} is in its pack"
            );
            assert_eq!(chunked.locations[&held(i as u32).0], held(i as u32).1);
        }
    }

    fn table(chunks: u32, packs: u32) -> ChunkTable {
        table_of((0..chunks).map(|i| {
            let loc = Location {
                pack: Id::of(&(i % packs).to_le_bytes()),
                offset: i * 10,
                stored_len: 10,
                len: 20,
            };
            (Id::of(&i.to_le_bytes()), loc)
        }))
    }

    #[test]
    fn a_table_over_the_limit_is_split_into_segments_that_decode_to_the_same_chunks() {
        let whole = table(25, 3);
        let parts = split_table(&whole, 10);
        assert_eq!(
            parts.iter().map(|p| p.chunks.len()).collect::<Vec<_>>(),
            [10, 10, 5]
        );
        let mut seen = Vec::new();
        for part in &parts {
            let decoded = ChunkTable::decode_index("segment", &part.encode_index()).unwrap();
            assert_eq!(&decoded, part);
            assert!(
                decoded.packs.len() <= 3,
                "each names only the packs it uses"
            );
            seen.extend(
                decoded
                    .chunks
                    .iter()
                    .map(|c| (c.id, location(decoded.packs[c.pack as usize], c).offset)),
            );
        }
        let want: Vec<_> = whole.chunks.iter().map(|c| (c.id, c.offset)).collect();
        assert_eq!(seen, want);
        assert_eq!(split_table(&table(3, 1), MAX_SEGMENT_CHUNKS).len(), 1);
    }
}
