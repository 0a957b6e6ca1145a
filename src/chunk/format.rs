//! The persisted types of the chunk store and their binary encoding: chunk tables
//! (index segments) and manifests. Decoding is defensive: every count and size is
//! checked against the bytes actually present and against fixed limits, so a corrupt
//! or hostile object yields an error, never a panic or a huge allocation.

use std::cell::RefCell;
use std::io::Read;

use super::{CHUNK_MAX, Id};

/// First bytes of a manifest object.
pub const MANIFEST_MAGIC: &[u8; 8] = b"CACHERMF";
/// First bytes of an index segment object.
pub const INDEX_MAGIC: &[u8; 8] = b"CACHERIX";
/// Format version written and understood.
pub const VERSION: u16 = 1;
/// The version of a manifest whose label carries `--exclude` patterns (see
/// [`Manifest::exclusions`]), so that readers that would not honour them refuse it.
pub const EXCLUDING_VERSION: u16 = 2;
/// Bytes before the compressed body: magic, version, kind, reserved, body length.
pub const HEADER_LEN: usize = 8 + 2 + 1 + 1 + 8;
/// Largest decompressed body accepted (a 100k-file tree needs about 10 MiB).
pub const MAX_BODY: u64 = 256 * 1024 * 1024;
/// Longest path or symlink target accepted, in bytes.
pub const MAX_PATH: usize = 4096;
/// Paths share prefixes with the previous one, so a few body bytes can stand for a
/// long path: the paths of a manifest may add up to at most this many bytes per body
/// byte (plus [`PATH_BYTES_FLOOR`]), which bounds the memory a decode takes by a small
/// multiple of the body. Real trees use 2 to 6.
pub const PATH_BYTES_PER_BODY_BYTE: usize = 32;
/// Path bytes always allowed, whatever the body size.
pub const PATH_BYTES_FLOOR: usize = 1024 * 1024;
/// Most path bytes a manifest may hold in all, whatever its body size.
pub const MAX_PATH_BYTES: usize = 256 * 1024 * 1024;
/// Most entries a manifest may hold (four times a 10^6-file tree).
pub const MAX_ENTRIES: usize = 4_000_000;
/// Deepest path, in directories: a restore holds one handle per level.
pub const MAX_DEPTH: usize = 128;
/// Longest path shown in a message; hostile input can be much longer.
const SHOWN_PATH: usize = 160;
/// Largest compressed chunk accepted: zstd never expands a chunk by more than this.
pub const MAX_CHUNK_STORED: u32 = CHUNK_MAX + CHUNK_MAX / 128 + 1024;

/// What a manifest describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// A directory tree (`cacher dir`).
    Dir = 1,
    /// A `docker save` archive (`cacher docker`).
    Docker = 2,
    /// Several paths as one entry (`cacher dir` given several): see [`super::paths`].
    Paths = 3,
}

/// Where one chunk lives: its pack, byte range there, and its uncompressed length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// blake3 of the uncompressed bytes.
    pub id: Id,
    /// Index into [`ChunkTable::packs`].
    pub pack: u32,
    /// Offset of the compressed chunk in the pack.
    pub offset: u32,
    /// Compressed length.
    pub stored_len: u32,
    /// Uncompressed length.
    pub len: u32,
}

/// Packs and the chunks located in them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkTable {
    /// Pack ids (blake3 of each pack's bytes, also its object name).
    pub packs: Vec<Id>,
    /// Chunk locations; in a manifest, in content-stream order (repeats allowed).
    pub chunks: Vec<ChunkRef>,
}

/// One node of a directory tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the tree root, `/`-separated, raw bytes (names need not be UTF-8).
    pub path: Vec<u8>,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: u32,
}

/// The kinds of tree node cacher restores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file whose `size` bytes come next in the content stream.
    File { size: u64 },
    /// A symbolic link.
    Symlink { target: Vec<u8> },
}

/// A cache entry: what to rebuild and where its content stream's chunks are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Tree or docker archive.
    pub kind: ManifestKind,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// What the entry was made from: the image reference for docker entries; for trees
    /// the source labels (one per line), then, after a NUL each, the `--exclude`
    /// patterns (see [`Manifest::sources`] and [`Manifest::exclusions`]).
    pub label: String,
    /// Total length of the content stream.
    pub stream_len: u64,
    /// Chunks of the content stream, in order.
    pub table: ChunkTable,
    /// Tree nodes, parents before children; empty for docker entries.
    pub entries: Vec<Entry>,
}

/// A malformed object, named so the user knows which one.
#[derive(Debug, thiserror::Error)]
#[error("{what} is not a valid cacher object: {why}")]
pub struct FormatError {
    what: String,
    why: String,
}

pub(crate) fn bad(what: &str, why: impl Into<String>) -> FormatError {
    FormatError {
        what: what.to_string(),
        why: why.into(),
    }
}

impl Manifest {
    /// A tree's label without its exclusions: what `--fallback` compares.
    pub fn sources(&self) -> &str {
        self.label.split('\0').next().unwrap_or_default()
    }

    /// The `--exclude` patterns the tree was uploaded with, as given.
    pub fn exclusions(&self) -> Vec<String> {
        self.label.split('\0').skip(1).map(str::to_string).collect()
    }

    /// Records `patterns` as the tree's exclusions: each after a NUL in the label.
    pub fn add_exclusions(&mut self, patterns: &[String]) {
        for p in patterns {
            self.label.push('\0');
            self.label.push_str(p);
        }
    }

    /// Encodes the manifest: header, then a zstd-compressed body. Entries are stored
    /// column by column, paths as (shared prefix, suffix) with the previous one, so
    /// zstd finds the repetition (a 22k-file cargo registry takes about 10 bytes a file).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        put_u64(&mut body, self.created);
        put_bytes(&mut body, self.label.as_bytes());
        put_u64(&mut body, self.stream_len);
        encode_table(&mut body, &self.table);
        put_varint(&mut body, self.entries.len() as u64);
        for e in &self.entries {
            body.push(match e.kind {
                EntryKind::Dir => 1,
                EntryKind::File { .. } => 2,
                EntryKind::Symlink { .. } => 3,
            });
        }
        let mut previous: &[u8] = &[];
        for e in &self.entries {
            let shared = common_prefix(previous, &e.path);
            put_varint(&mut body, shared as u64);
            put_varint(&mut body, (e.path.len() - shared) as u64);
            body.extend_from_slice(&e.path[shared..]);
            previous = &e.path;
        }
        for e in &self.entries {
            put_varint(&mut body, u64::from(e.mode));
        }
        let mut last_mtime = 0i64;
        for e in &self.entries {
            put_varint(&mut body, zigzag(e.mtime.wrapping_sub(last_mtime)));
            last_mtime = e.mtime;
        }
        for e in &self.entries {
            put_varint(&mut body, u64::from(e.mtime_nsec));
        }
        for e in &self.entries {
            match &e.kind {
                EntryKind::File { size } => put_varint(&mut body, *size),
                EntryKind::Symlink { target } => put_bytes(&mut body, target),
                EntryKind::Dir => {}
            }
        }
        // Older readers would restore a tree without leaving its excluded paths alone:
        // the next version makes them refuse it (a miss) instead.
        let version = match self.label.contains('\0') {
            true => EXCLUDING_VERSION,
            false => VERSION,
        };
        wrap_as(MANIFEST_MAGIC, version, self.kind as u8, &body, 3)
    }

    /// Decodes and validates a manifest; `what` names it in errors.
    pub fn decode(what: &str, data: &[u8]) -> Result<Manifest, FormatError> {
        let (_, kind, body) = unwrap_as(what, MANIFEST_MAGIC, EXCLUDING_VERSION, data)?;
        let kind = match kind {
            1 => ManifestKind::Dir,
            2 => ManifestKind::Docker,
            3 => ManifestKind::Paths,
            k => return Err(bad(what, format!("unknown manifest kind {k}"))),
        };
        let mut r = Reader::new(what, &body);
        let created = r.u64()?;
        let label = String::from_utf8(r.bytes(MAX_PATH)?.to_vec())
            .map_err(|_| bad(what, "label is not UTF-8"))?;
        let stream_len = r.u64()?;
        let table = decode_table(&mut r)?;
        // Each entry takes at least 5 bytes: kind, two path varints, mode, mtime, nsec.
        let count = r.varint_count(5)?;
        if count > MAX_ENTRIES {
            return Err(bad(what, format!("{count} entries (limit {MAX_ENTRIES})")));
        }
        let kinds = r.take(count)?;
        let path_budget = path_budget(body.len());
        let mut path_bytes = 0usize;
        let mut order = TreeOrder::default();
        let mut paths: Vec<Vec<u8>> = Vec::with_capacity(count);
        for i in 0..count {
            let shared = usize::try_from(r.varint()?).unwrap_or(usize::MAX);
            let suffix_len = usize::try_from(r.varint()?).unwrap_or(usize::MAX);
            let previous = if i == 0 { &[][..] } else { &paths[i - 1][..] };
            let len = shared.saturating_add(suffix_len);
            if shared > previous.len() || len > MAX_PATH {
                return Err(bad(what, "path prefix out of range"));
            }
            path_bytes += len;
            if path_bytes > path_budget {
                return Err(bad(
                    what,
                    format!("its paths add up to more than {path_budget} bytes"),
                ));
            }
            let mut path = Vec::with_capacity(len);
            path.extend_from_slice(&previous[..shared]);
            path.extend_from_slice(r.take(suffix_len)?);
            order.check(what, &path, kinds[i] == 1)?;
            paths.push(path);
        }
        let mut modes = Vec::with_capacity(count);
        for _ in 0..count {
            modes.push(u32::try_from(r.varint()?).map_err(|_| bad(what, "mode out of range"))?);
        }
        let mut mtimes = Vec::with_capacity(count);
        let mut last_mtime = 0i64;
        for _ in 0..count {
            last_mtime = last_mtime.wrapping_add(unzigzag(r.varint()?));
            mtimes.push(last_mtime);
        }
        let mut nsecs = Vec::with_capacity(count);
        for _ in 0..count {
            let nsec = r.varint()?;
            if nsec >= 1_000_000_000 {
                return Err(bad(what, "mtime nanoseconds out of range"));
            }
            nsecs.push(nsec as u32);
        }
        let mut entries = Vec::with_capacity(count);
        for (i, path) in paths.into_iter().enumerate() {
            let kind = match kinds[i] {
                1 => EntryKind::Dir,
                2 => EntryKind::File { size: r.varint()? },
                3 => EntryKind::Symlink {
                    target: r.bytes(MAX_PATH)?.to_vec(),
                },
                t => return Err(bad(what, format!("unknown entry kind {t}"))),
            };
            entries.push(Entry {
                path,
                kind,
                mode: modes[i],
                mtime: mtimes[i],
                mtime_nsec: nsecs[i],
            });
        }
        r.finish()?;
        let manifest = Manifest {
            kind,
            created,
            label,
            stream_len,
            table,
            entries,
        };
        manifest.validate(what)?;
        Ok(manifest)
    }

    /// Checks that sizes add up and that no path could write outside the tree.
    fn validate(&self, what: &str) -> Result<(), FormatError> {
        let chunk_total = self
            .table
            .chunks
            .iter()
            .try_fold(0u64, |acc, c| acc.checked_add(u64::from(c.len)))
            .ok_or_else(|| bad(what, "chunk lengths overflow"))?;
        if chunk_total != self.stream_len {
            return Err(bad(
                what,
                format!(
                    "chunks hold {chunk_total} bytes but the stream is {} bytes",
                    self.stream_len
                ),
            ));
        }
        // A docker entry's entries are only a member map, which a restore checks before
        // relying on it (and loads the whole archive when it does not fit).
        if self.kind == ManifestKind::Docker {
            return Ok(());
        }
        let file_total = self
            .entries
            .iter()
            .try_fold(0u64, |acc, e| match e.kind {
                EntryKind::File { size } => acc.checked_add(size),
                _ => Some(acc),
            })
            .ok_or_else(|| bad(what, "file sizes overflow"))?;
        if file_total != self.stream_len {
            return Err(bad(
                what,
                format!(
                    "files hold {file_total} bytes but the stream is {} bytes",
                    self.stream_len
                ),
            ));
        }
        for e in &self.entries {
            if let EntryKind::Symlink { target } = &e.kind
                && (target.is_empty() || target.contains(&0))
            {
                return Err(bad(
                    what,
                    format!("bad symlink target for {}", show(&e.path)),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a manifest that a reader would reject for its size, before it is
    /// published: `encoded` is what [`Manifest::encode`] returned.
    pub fn check_readable(&self, what: &str, encoded: &[u8]) -> Result<(), FormatError> {
        let body_len = u64::from_le_bytes(encoded[12..20].try_into().expect("8 bytes"));
        if body_len > MAX_BODY {
            return Err(bad(
                what,
                format!("its body would be {body_len} bytes; readers accept at most {MAX_BODY}"),
            ));
        }
        if self.entries.len() > MAX_ENTRIES {
            return Err(bad(
                what,
                format!(
                    "{} entries; readers accept at most {MAX_ENTRIES}",
                    self.entries.len()
                ),
            ));
        }
        if self.label.len() > MAX_PATH {
            return Err(bad(
                what,
                format!(
                    "its label (the paths it was made from) is {} bytes; readers accept at most {MAX_PATH}",
                    self.label.len()
                ),
            ));
        }
        // A scan keeps within these; an entry of several paths adds a level (`000/`).
        for e in &self.entries {
            let depth = memchr::memchr_iter(b'/', &e.path).count() + 1;
            let deepest = match e.kind {
                EntryKind::Dir => MAX_DEPTH - 1,
                _ => MAX_DEPTH,
            };
            if e.path.len() > MAX_PATH || depth > deepest {
                return Err(bad(
                    what,
                    format!("{} is too long or too deep for readers", show(&e.path)),
                ));
            }
        }
        let path_bytes: usize = self.entries.iter().map(|e| e.path.len()).sum();
        if path_bytes > path_budget(body_len as usize) {
            return Err(bad(
                what,
                format!(
                    "its paths add up to {path_bytes} bytes, more than readers accept for this tree"
                ),
            ));
        }
        Ok(())
    }
}

/// The path bytes a manifest body of `body_len` bytes may hold.
pub(crate) fn path_budget(body_len: usize) -> usize {
    body_len
        .saturating_mul(PATH_BYTES_PER_BODY_BYTE)
        .saturating_add(PATH_BYTES_FLOOR)
        .min(MAX_PATH_BYTES)
}

/// Checks, entry by entry, that paths come in the order a depth-first walk with
/// names in byte order gives: each entry's parent is a directory on the current path,
/// and names increase within a directory. That rules out duplicates and any path
/// through a file or a symlink, with memory bounded by the tree's depth.
#[derive(Default)]
struct TreeOrder {
    /// The directories on the current path, each with the last name seen in it; the
    /// first level is the root.
    open: Vec<(Vec<u8>, Vec<u8>)>,
}

impl TreeOrder {
    fn check(&mut self, what: &str, path: &[u8], is_dir: bool) -> Result<(), FormatError> {
        check_relative_path(what, path)?;
        if self.open.is_empty() {
            self.open.push((Vec::new(), Vec::new()));
        }
        let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&[][..], path),
        };
        while self.open.len() > 1 && self.open.last().expect("not empty").0 != parent {
            self.open.pop();
        }
        let (dir, last) = self.open.last_mut().expect("the root stays");
        if dir.as_slice() != parent {
            return Err(bad(
                what,
                format!("{} comes before its parent directory", show(path)),
            ));
        }
        if !last.is_empty() && name <= last.as_slice() {
            return Err(bad(
                what,
                format!("{} is a duplicate or out of order", show(path)),
            ));
        }
        *last = name.to_vec();
        if is_dir {
            if self.open.len() > MAX_DEPTH {
                return Err(bad(
                    what,
                    format!("{} is deeper than {MAX_DEPTH} directories", show(path)),
                ));
            }
            self.open.push((path.to_vec(), Vec::new()));
        }
        Ok(())
    }
}

impl ChunkTable {
    /// Encodes the table as an index segment object.
    pub fn encode_index(&self) -> Vec<u8> {
        let mut body = Vec::new();
        encode_table(&mut body, self);
        wrap(INDEX_MAGIC, 0, &body)
    }

    /// Decodes an index segment object.
    pub fn decode_index(what: &str, data: &[u8]) -> Result<ChunkTable, FormatError> {
        let (_, body) = unwrap(what, INDEX_MAGIC, data)?;
        let mut r = Reader::new(what, &body);
        let table = decode_table(&mut r)?;
        r.finish()?;
        Ok(table)
    }
}

/// Decodes one stored chunk: zstd-decompresses `stored` into at most `len` bytes and
/// checks the result is exactly `len` bytes with blake3 id `id`. `None` means corrupt;
/// memory stays bounded by `len` (at most [`CHUNK_MAX`] in a decoded table) whatever
/// `stored` claims.
pub fn decode_chunk(stored: &[u8], len: u32, id: &Id) -> Option<Vec<u8>> {
    thread_local! {
        static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { RefCell::new(None) };
    }
    let data = DECOMPRESSOR
        .with_borrow_mut(|d| match d {
            Some(d) => d.decompress(stored, len as usize),
            None => zstd::bulk::Decompressor::new()
                .and_then(|new| d.insert(new).decompress(stored, len as usize)),
        })
        .ok()?;
    (data.len() == len as usize && Id::of(&data) == *id).then_some(data)
}

/// Compresses one chunk for a pack, at [`super::ZSTD_LEVEL`]. Each thread keeps its
/// zstd context: a fresh one per chunk allocates and clears megabytes, which musl's
/// allocator returns to the system every time (the static releases uploaded at half
/// the speed of the glibc build).
pub fn encode_chunk(data: &[u8]) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { RefCell::new(None) };
    }
    COMPRESSOR.with_borrow_mut(|c| match c {
        Some(c) => c.compress(data),
        None => zstd::bulk::Compressor::new(super::ZSTD_LEVEL)
            .and_then(|new| c.insert(new).compress(data)),
    })
}

/// Whether `data` starts like a manifest (as opposed to a plain file or a tar.zst).
pub fn is_manifest(data: &[u8]) -> bool {
    data.starts_with(MANIFEST_MAGIC)
}

/// A manifest's kind and content length, read from the first bytes of its object
/// (the body starts with them, so a few KiB of the zstd frame are enough); `None`
/// when `head` is not the start of a manifest this cacher reads, or too short to tell.
pub fn peek_manifest(head: &[u8]) -> Option<(ManifestKind, u64)> {
    if !is_manifest(head) || head.len() < HEADER_LEN {
        return None;
    }
    if !(VERSION..=EXCLUDING_VERSION).contains(&u16::from_le_bytes([head[8], head[9]])) {
        return None;
    }
    let kind = match head[10] {
        1 => ManifestKind::Dir,
        2 => ManifestKind::Docker,
        3 => ManifestKind::Paths,
        _ => return None,
    };
    let mut body = Vec::new();
    // A truncated frame decodes as far as it goes, then fails: keep what came out.
    let mut decoder = zstd::stream::read::Decoder::new(&head[HEADER_LEN..]).ok()?;
    let mut buf = [0u8; 4096];
    while body.len() < 64 * 1024 {
        match decoder.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    let mut r = Reader::new("", &body);
    r.take(8).ok()?;
    let label_len = usize::try_from(r.varint().ok()?).ok()?;
    r.take(label_len).ok()?;
    let stream_len = u64::from_le_bytes(r.take(8).ok()?.try_into().ok()?);
    Some((kind, stream_len))
}

/// How two relative paths compare in tree order, the order of a manifest's entries
/// and of a scan: depth-first, names in byte order (a directory's contents come right
/// after it, so `a/b` < `a.b`).
///
/// That is name by name, so it is byte order with `/` ranked below every other byte:
/// found at the first byte where the paths differ, a word at a time. Warm uploads and
/// restores pair every recorded file with a scanned one by it.
pub fn tree_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let at = common_prefix(a, b);
    let rank = |path: &[u8]| {
        path.get(at)
            .map(|&c| if c == b'/' { 0 } else { u16::from(c) + 1 })
    };
    // A path that ends there is a prefix of the other: `None` ranks first.
    rank(a).cmp(&rank(b))
}

/// How many leading bytes `a` and `b` share.
pub(crate) fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const WORD: usize = std::mem::size_of::<u64>();
    let len = a.len().min(b.len());
    let mut at = 0;
    while at + WORD <= len {
        let word = |p: &[u8]| u64::from_le_bytes(p[at..at + WORD].try_into().expect("a word"));
        let diff = word(a) ^ word(b);
        if diff != 0 {
            // Little-endian: the first byte that differs is the lowest set one.
            return at + diff.trailing_zeros() as usize / 8;
        }
        at += WORD;
    }
    at + a[at..len]
        .iter()
        .zip(&b[at..len])
        .take_while(|(x, y)| x == y)
        .count()
}

/// Renders raw path bytes for messages, cut to a readable length.
pub fn show(path: &[u8]) -> String {
    let text = String::from_utf8_lossy(path);
    if text.chars().count() <= SHOWN_PATH {
        return format!("`{text}`");
    }
    let head: String = text.chars().take(SHOWN_PATH).collect();
    format!("`{head}…` ({} bytes)", path.len())
}

/// Refuses a path that could leave the tree: empty, absolute, with a NUL, an empty
/// segment, `.` or `..`. (Every path of a manifest or record passes here when it is
/// read, so the scans are memchr's.)
pub(crate) fn check_relative_path(what: &str, path: &[u8]) -> Result<(), FormatError> {
    let mut start = 0;
    let ok = !path.is_empty()
        && memchr::memchr(0, path).is_none()
        && memchr::memchr_iter(b'/', path)
            .chain([path.len()])
            .all(|end| {
                let seg = &path[start..end];
                start = end + 1;
                !seg.is_empty() && seg != b"." && seg != b".."
            });
    if ok {
        Ok(())
    } else {
        Err(bad(what, format!("unsafe path {}", show(path))))
    }
}

/// Packs, then chunks column by column: ids, pack indexes, offsets, stored lengths,
/// lengths (small integers as varints, which zstd then squeezes further).
pub(crate) fn encode_table(out: &mut Vec<u8>, table: &ChunkTable) {
    put_varint(out, table.packs.len() as u64);
    for p in &table.packs {
        out.extend_from_slice(&p.0);
    }
    put_varint(out, table.chunks.len() as u64);
    for c in &table.chunks {
        out.extend_from_slice(&c.id.0);
    }
    for c in &table.chunks {
        put_varint(out, u64::from(c.pack));
    }
    for c in &table.chunks {
        put_varint(out, u64::from(c.offset));
    }
    for c in &table.chunks {
        put_varint(out, u64::from(c.stored_len));
    }
    for c in &table.chunks {
        put_varint(out, u64::from(c.len));
    }
}

pub(crate) fn decode_table(r: &mut Reader<'_>) -> Result<ChunkTable, FormatError> {
    let n = r.varint_count(32)?;
    let mut packs = Vec::with_capacity(n);
    for _ in 0..n {
        packs.push(r.id()?);
    }
    let n = r.varint_count(32 + 4)?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(r.id()?);
    }
    let mut columns = [const { Vec::new() }; 4];
    for column in columns.iter_mut() {
        column.reserve(n);
        for _ in 0..n {
            let v =
                u32::try_from(r.varint()?).map_err(|_| bad(r.what, "chunk field out of range"))?;
            column.push(v);
        }
    }
    let mut chunks = Vec::with_capacity(n);
    for (i, id) in ids.into_iter().enumerate() {
        let c = ChunkRef {
            id,
            pack: columns[0][i],
            offset: columns[1][i],
            stored_len: columns[2][i],
            len: columns[3][i],
        };
        if c.pack as usize >= packs.len() {
            return Err(bad(
                r.what,
                format!("chunk refers to pack {} of {}", c.pack, packs.len()),
            ));
        }
        if c.len == 0 || c.len > CHUNK_MAX || c.stored_len == 0 || c.stored_len > MAX_CHUNK_STORED {
            return Err(bad(
                r.what,
                format!("chunk of {} bytes stored in {}", c.len, c.stored_len),
            ));
        }
        chunks.push(c);
    }
    Ok(ChunkTable { packs, chunks })
}

pub(crate) fn wrap(magic: &[u8; 8], kind: u8, body: &[u8]) -> Vec<u8> {
    wrap_as(magic, VERSION, kind, body, 3)
}

/// [`wrap`] at zstd's fastest useful level (-1), for files that stay on this machine
/// (tree states): a record of a 47k-file tree compresses in 2.7 ms instead of 6.2 ms,
/// and decompresses faster too, for 15 % more bytes.
pub(crate) fn wrap_local(magic: &[u8; 8], kind: u8, body: &[u8]) -> Vec<u8> {
    wrap_as(magic, VERSION, kind, body, -1)
}

/// [`wrap`] with another format version in the header and another zstd level.
fn wrap_as(magic: &[u8; 8], version: u16, kind: u8, body: &[u8], level: i32) -> Vec<u8> {
    let compressed = zstd::bulk::compress(body, level).expect("zstd compression of a buffer");
    let mut out = Vec::with_capacity(HEADER_LEN + compressed.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.push(kind);
    out.push(0);
    put_u64(&mut out, body.len() as u64);
    out.extend_from_slice(&compressed);
    out
}

pub(crate) fn unwrap(
    what: &str,
    magic: &[u8; 8],
    data: &[u8],
) -> Result<(u8, Vec<u8>), FormatError> {
    unwrap_as(what, magic, VERSION, data).map(|(_, kind, body)| (kind, body))
}

/// [`unwrap`] for an object whose format versions go up to `latest`; its version too.
fn unwrap_as(
    what: &str,
    magic: &[u8; 8],
    latest: u16,
    data: &[u8],
) -> Result<(u16, u8, Vec<u8>), FormatError> {
    if data.len() < HEADER_LEN || &data[..8] != magic {
        return Err(bad(what, "wrong magic bytes"));
    }
    let version = u16::from_le_bytes([data[8], data[9]]);
    if !(VERSION..=latest).contains(&version) {
        return Err(bad(
            what,
            format!("format version {version}; this cacher reads versions {VERSION} to {latest}"),
        ));
    }
    let kind = data[10];
    let body_len = u64::from_le_bytes(data[12..20].try_into().expect("8 bytes"));
    if body_len > MAX_BODY {
        return Err(bad(what, format!("declares a {body_len}-byte body")));
    }
    // Grow with the data actually decompressed, never with the declared length alone:
    // start from it only as far as the compressed bytes could plausibly inflate, so an
    // incompressible body (an index summary's fingerprints) is never reallocated.
    let plausible = (data.len() as u64)
        .saturating_mul(4)
        .saturating_add(64 * 1024);
    let mut body = Vec::with_capacity(body_len.min(plausible) as usize);
    zstd::stream::read::Decoder::new(&data[HEADER_LEN..])
        .and_then(|d| d.take(body_len + 1).read_to_end(&mut body))
        .map_err(|e| bad(what, format!("body does not decompress: {e}")))?;
    if body.len() as u64 != body_len {
        return Err(bad(
            what,
            format!("body is {} bytes, header says {body_len}", body.len()),
        ));
    }
    Ok((version, kind, body))
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// LEB128: 7 bits a byte, low bits first.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Bounds-checked reading of a decoded body.
pub(crate) struct Reader<'a> {
    what: &'a str,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    pub(crate) fn new(what: &'a str, data: &'a [u8]) -> Reader<'a> {
        Reader { what, data, pos: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.data.len() - self.pos < n {
            return Err(bad(self.what, "truncated"));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub(crate) fn id(&mut self) -> Result<Id, FormatError> {
        Ok(Id(self.take(32)?.try_into().expect("32 bytes")))
    }

    pub(crate) fn varint(&mut self) -> Result<u64, FormatError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(bad(self.what, "varint longer than 10 bytes"))
    }

    pub(crate) fn bytes(&mut self, max: usize) -> Result<&'a [u8], FormatError> {
        let n = self.varint()? as usize;
        if n > max {
            return Err(bad(self.what, format!("a {n}-byte field (limit {max})")));
        }
        self.take(n)
    }

    /// A record count, refused when the remaining bytes cannot hold that many records.
    pub(crate) fn varint_count(&mut self, min_record: usize) -> Result<usize, FormatError> {
        let n = usize::try_from(self.varint()?).unwrap_or(usize::MAX);
        if n.saturating_mul(min_record) > self.data.len() - self.pos {
            return Err(bad(
                self.what,
                format!("claims {n} records in too few bytes"),
            ));
        }
        Ok(n)
    }

    pub(crate) fn finish(&self) -> Result<(), FormatError> {
        if self.pos == self.data.len() {
            Ok(())
        } else {
            Err(bad(self.what, "trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let id = Id::of(b"hello");
        Manifest {
            kind: ManifestKind::Dir,
            created: 1,
            label: String::new(),
            stream_len: 5,
            table: ChunkTable {
                packs: vec![Id::of(b"pack")],
                chunks: vec![ChunkRef {
                    id,
                    pack: 0,
                    offset: 0,
                    stored_len: 14,
                    len: 5,
                }],
            },
            entries: vec![
                Entry {
                    path: b"d".to_vec(),
                    kind: EntryKind::Dir,
                    mode: 0o755,
                    mtime: 10,
                    mtime_nsec: 5,
                },
                Entry {
                    path: b"d/f".to_vec(),
                    kind: EntryKind::File { size: 5 },
                    mode: 0o644,
                    mtime: 11,
                    mtime_nsec: 0,
                },
                Entry {
                    path: b"l".to_vec(),
                    kind: EntryKind::Symlink {
                        target: b"d/f".to_vec(),
                    },
                    mode: 0o777,
                    mtime: 12,
                    mtime_nsec: 0,
                },
            ],
        }
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode("m", &m.encode()).unwrap(), m);
    }

    #[test]
    fn varints_and_zigzag_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(Reader::new("v", &out).varint().unwrap(), v);
        }
        for v in [0i64, 1, -1, i64::MAX, i64::MIN, -1_700_000_000] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(Manifest::decode("m", &bytes[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn traversal_and_symlink_redirects_are_rejected() {
        for path in [&b"../x"[..], b"/abs", b"a/../../x", b"", b"a//b"] {
            let mut m = sample();
            m.entries[1].path = path.to_vec();
            assert!(Manifest::decode("m", &m.encode()).is_err(), "{path:?}");
        }
        let mut m = sample();
        m.entries[1].path = b"l/f".to_vec();
        m.entries.swap(1, 2);
        let err = Manifest::decode("m", &m.encode()).unwrap_err().to_string();
        assert!(err.contains("parent"), "{err}");
    }

    #[test]
    fn only_paths_that_stay_below_the_tree_pass() {
        for bad in [
            &b""[..],
            b"/",
            b"/a",
            b"a/",
            b"a//b",
            b".",
            b"..",
            b"./a",
            b"a/.",
            b"a/..",
            b"a/../b",
            b"a/./b",
            b"a\0b",
            b"\0",
        ] {
            assert!(check_relative_path("t", bad).is_err(), "{bad:?}");
        }
        for good in [
            &b"a"[..],
            b"a/b",
            b".a",
            b"..a",
            b"a/..b",
            b"a/b.",
            b"x/.cache/y",
            b"...",
        ] {
            assert!(check_relative_path("t", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn sizes_that_do_not_add_up_are_rejected() {
        let mut m = sample();
        m.entries[1].kind = EntryKind::File { size: 6 };
        assert!(Manifest::decode("m", &m.encode()).is_err());
        let mut m = sample();
        m.table.chunks[0].pack = 7;
        assert!(Manifest::decode("m", &m.encode()).is_err());
    }

    /// A manifest body of `count` entries whose paths are given as (shared, suffix
    /// length, suffix) triples, every entry a directory.
    fn raw_paths(paths: &[(u64, u64, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        put_u64(&mut body, 0);
        put_bytes(&mut body, b"");
        put_u64(&mut body, 0);
        encode_table(&mut body, &ChunkTable::default());
        put_varint(&mut body, paths.len() as u64);
        body.extend(std::iter::repeat_n(1u8, paths.len()));
        for (shared, len, suffix) in paths {
            put_varint(&mut body, *shared);
            put_varint(&mut body, *len);
            body.extend_from_slice(suffix);
        }
        for _ in 0..3 * paths.len() {
            put_varint(&mut body, 0);
        }
        wrap(MANIFEST_MAGIC, 1, &body)
    }

    #[test]
    fn overflowing_path_lengths_are_errors_not_panics() {
        let data = raw_paths(&[(0, 1, b"a"), (1, u64::MAX, b"")]);
        let err = Manifest::decode("m", &data).unwrap_err().to_string();
        assert!(err.contains("out of range"), "{err}");
        let data = raw_paths(&[(u64::MAX, 1, b"a")]);
        assert!(Manifest::decode("m", &data).is_err());
    }

    #[test]
    fn long_shared_prefixes_cannot_blow_up_memory() {
        // Each entry repeats a 4,000-byte prefix for about 12 body bytes: 300k entries
        // would expand a 4 MB body into 1.2 GB of paths. The budget stops it early.
        let long = vec![b'x'; 3999];
        let mut paths: Vec<(u64, u64, &[u8])> = vec![(0, 3999, &long)];
        let letter = |i: u32, place: u32| b'a' + (i / 26u32.pow(place) % 26) as u8;
        let names: Vec<[u8; 5]> = (0..300_000u32)
            .map(|i| [b'/', letter(i, 3), letter(i, 2), letter(i, 1), letter(i, 0)])
            .collect();
        for name in &names {
            paths.push((3999, 5, name));
        }
        let data = raw_paths(&paths);
        let err = Manifest::decode("m", &data).unwrap_err().to_string();
        assert!(err.contains("paths add up"), "{err}");
    }

    #[test]
    fn duplicates_and_out_of_order_entries_are_rejected() {
        let mut m = sample();
        m.entries.swap(0, 2);
        let err = Manifest::decode("m", &m.encode()).unwrap_err().to_string();
        assert!(
            err.contains("out of order") || err.contains("parent"),
            "{err}"
        );
        let mut m = sample();
        m.entries[2].path = b"d".to_vec();
        let err = Manifest::decode("m", &m.encode()).unwrap_err().to_string();
        assert!(err.contains("duplicate"), "{err}");
    }

    #[test]
    fn messages_cut_long_paths() {
        let shown = show(&[b'a'; 4000]);
        assert!(shown.len() < 200, "{shown}");
        assert!(shown.contains("4000 bytes"), "{shown}");
    }

    #[test]
    fn absurd_counts_do_not_allocate() {
        let mut body = Vec::new();
        put_u64(&mut body, 0);
        put_bytes(&mut body, b"");
        put_u64(&mut body, 0);
        put_varint(&mut body, u64::from(u32::MAX));
        let data = wrap(MANIFEST_MAGIC, 1, &body);
        let err = Manifest::decode("m", &data).unwrap_err().to_string();
        assert!(err.contains("records"), "{err}");
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn entry_kind() -> impl Strategy<Value = EntryKind> {
        prop_oneof![
            Just(EntryKind::Dir),
            (0u64..1 << 20).prop_map(|size| EntryKind::File { size }),
            proptest::collection::vec(1u8..=255, 1..64)
                .prop_map(|target| EntryKind::Symlink { target }),
        ]
    }

    /// Valid manifests: unique flat names (so every parent exists), sizes summing to a
    /// stream covered by the chunks.
    fn manifest() -> impl Strategy<Value = Manifest> {
        let names = proptest::collection::btree_set("[a-zA-Z0-9._-]{1,20}", 0..40);
        (
            names,
            proptest::collection::vec(
                (
                    entry_kind(),
                    any::<u32>(),
                    any::<i64>(),
                    0u32..1_000_000_000,
                ),
                40,
            ),
        )
            .prop_filter("no . or .. names", |(names, _)| {
                names.iter().all(|n| n != "." && n != "..")
            })
            .prop_map(|(names, attrs)| {
                let entries: Vec<Entry> = names
                    .into_iter()
                    .zip(attrs)
                    .map(|(name, (kind, mode, mtime, nsec))| Entry {
                        path: name.into_bytes(),
                        kind,
                        mode: mode & 0o7777,
                        mtime,
                        mtime_nsec: nsec,
                    })
                    .collect();
                let total: u64 = entries
                    .iter()
                    .map(|e| match e.kind {
                        EntryKind::File { size } => size,
                        _ => 0,
                    })
                    .sum();
                let mut chunks = Vec::new();
                let mut left = total;
                let mut i = 0u32;
                while left > 0 {
                    let len = left.min(u64::from(CHUNK_MAX)) as u32;
                    chunks.push(ChunkRef {
                        id: Id::of(&i.to_le_bytes()),
                        pack: i % 3,
                        offset: i * 7,
                        stored_len: len.min(MAX_CHUNK_STORED),
                        len,
                    });
                    left -= u64::from(len);
                    i += 1;
                }
                Manifest {
                    kind: ManifestKind::Dir,
                    created: 7,
                    label: "label".into(),
                    stream_len: total,
                    table: ChunkTable {
                        packs: vec![Id::of(b"a"), Id::of(b"b"), Id::of(b"c")],
                        chunks,
                    },
                    entries,
                }
            })
            .prop_filter("chunks cover the stream", |m| {
                m.table.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() == m.stream_len
            })
    }

    #[test]
    fn common_prefix_counts_across_and_within_words() {
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 40] {
            let a: Vec<u8> = (0..len as u8).map(|i| b'a' + i % 26).collect();
            assert_eq!(common_prefix(&a, &a), len);
            for differ in 0..len {
                let mut b = a.clone();
                b[differ] ^= 0x80;
                assert_eq!(
                    common_prefix(&a, &b),
                    differ,
                    "{len} bytes, differing at {differ}"
                );
                assert_eq!(common_prefix(&b, &a), differ);
            }
            for cut in 0..len {
                assert_eq!(common_prefix(&a[..cut], &a), cut, "a prefix of {cut} bytes");
                assert_eq!(common_prefix(&a, &a[..cut]), cut);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn tree_order_compares_name_by_name(
            a in proptest::collection::vec(prop_oneof![Just(b'/'), Just(b'.'), Just(b'-'), any::<u8>()], 0..40),
            b in proptest::collection::vec(prop_oneof![Just(b'/'), Just(b'.'), Just(b'-'), any::<u8>()], 0..40),
            shared in 0usize..24,
        ) {
            // Most pairs share a prefix, as paths in one tree do.
            let b = [&a[..shared.min(a.len())], &b[..]].concat();
            let by_names = |a: &[u8], b: &[u8]| a.split(|&c| c == b'/').cmp(b.split(|&c| c == b'/'));
            prop_assert_eq!(tree_order(&a, &b), by_names(&a, &b));
            prop_assert_eq!(tree_order(&b, &a), by_names(&b, &a));
            prop_assert_eq!(tree_order(&a, &a), std::cmp::Ordering::Equal);
        }

        #[test]
        fn manifests_round_trip(m in manifest()) {
            prop_assert_eq!(Manifest::decode("m", &m.encode()).unwrap(), m);
        }

        #[test]
        fn random_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let data = wrap(MANIFEST_MAGIC, 1, &body);
            let _ = Manifest::decode("m", &data);
            let data = wrap(INDEX_MAGIC, 0, &body);
            let _ = ChunkTable::decode_index("i", &data);
        }

        #[test]
        fn flipped_bytes_never_panic(m in manifest(), at in any::<usize>(), bit in 0u8..8) {
            let mut data = m.encode();
            let i = at % data.len();
            data[i] ^= 1 << bit;
            let _ = Manifest::decode("m", &data);
        }
    }
}
