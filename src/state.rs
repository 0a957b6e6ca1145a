//! What cacher last restored into or uploaded from a directory (its *tree state*), so
//! the next upload reads only the files that changed since.
//!
//! The record lives outside the tree, in cacher's state directory ([`state_dir`]), one
//! file per directory (named by the blake3 of its canonical path). It holds the entry's
//! chunk table and, for each regular file, its path, its size and the stamp it had when
//! cacher last vouched for its content: device, inode, size, and modification and
//! change times with nanoseconds. A file whose stamp still matches holds the bytes the
//! entry says, because any write, truncation, rename over it or `touch -r` changes its
//! change time (ctime), which no user can set. Stamps that were taken too close to the
//! moment they were recorded are dropped (git's "racy" rule, see [`record`]), and a
//! missing, corrupt or foreign record is ignored: the cost is a full read, never a
//! wrong manifest. docs/format.md describes the record.

use std::cmp::Ordering;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::chunk::format::{
    ChunkTable, EntryKind, FormatError, MAX_BODY, MAX_ENTRIES, MAX_PATH, Manifest, Reader, bad,
    check_relative_path, common_prefix, decode_table, encode_table, path_budget, put_bytes,
    put_varint, tree_order, unwrap, unzigzag, wrap_local, zigzag,
};
use crate::ui;

/// Magic bytes of a tree state record.
const STATE_MAGIC: &[u8; 8] = b"CACHERST";
/// The kind byte of records of files only; cacher before it wrote kind 0 (the whole
/// manifest), which is now ignored like any record it cannot use.
const RECORD_KIND: u8 = 1;
/// How close to the recording time a stamp may be on a filesystem with sub-second
/// timestamps: Linux takes file times from a clock that ticks every jiffy (at most
/// 10 ms), so twice that.
const FINE_GRANULARITY: Duration = Duration::from_millis(20);
/// The same on a filesystem that keeps whole seconds (FAT keeps two).
const COARSE_GRANULARITY: Duration = Duration::from_secs(2);

/// What identifies the state of a file's content: if any byte changed, one of these did.
/// Times are in nanoseconds since the epoch (40 bytes a stamp, where seconds and
/// nanoseconds apart took 56: a scan holds one per file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: i64,
    pub ctime: i64,
}

impl Stamp {
    /// The stamp of a file as `lstat` or `fstat` saw it.
    pub fn of(meta: &Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: nanos(meta.mtime(), meta.mtime_nsec()),
            ctime: nanos(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The stamp of a file as `statat` saw it.
    // The field types of `stat` differ between systems.
    #[allow(clippy::unnecessary_cast)]
    pub fn of_stat(st: &rustix::fs::Stat) -> Stamp {
        Stamp {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            size: st.st_size as u64,
            mtime: nanos(st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime: nanos(st.st_ctime as i64, st.st_ctime_nsec as i64),
        }
    }

    /// The latest of its two times.
    pub fn latest_ns(&self) -> i64 {
        self.mtime.max(self.ctime)
    }
}

/// A directory's recorded tree, as the next upload or restore reads it: the chunk
/// table of the entry it matched and its regular files, each with its stamp.
pub struct TreeState {
    /// The directory, canonical.
    pub dir: PathBuf,
    /// The chunks of the entry restored or uploaded, in stream order.
    pub table: ChunkTable,
    /// That entry's regular files, in stream order.
    pub files: RecordedFiles,
}

/// The regular files of a recorded tree in stream order (which is tree order): path,
/// where the file's bytes start in the stream, and its stamp when its content was
/// exactly the entry's (`None` when that is not known). Paths share one buffer, and a
/// stamp's size is the file's: a 10^6-file tree takes about 80 MB here, where the
/// entry's decoded manifest and stamps took 190 MB.
pub struct RecordedFiles {
    paths: Vec<u8>,
    /// Where each path ends in `paths`.
    path_ends: Vec<u32>,
    /// Where each file starts in the stream, then where the last one ends.
    starts: Vec<u64>,
    /// Each file's stamp but its size; meaningful where `vouched`.
    stamps: Vec<StampTimes>,
    vouched: Vec<bool>,
}

/// A [`Stamp`] without its size.
#[derive(Clone, Copy, Default)]
struct StampTimes {
    dev: u64,
    ino: u64,
    mtime: i64,
    ctime: i64,
}

impl Default for RecordedFiles {
    fn default() -> RecordedFiles {
        RecordedFiles::with_capacity(0, 0)
    }
}

impl RecordedFiles {
    fn with_capacity(files: usize, path_bytes: usize) -> RecordedFiles {
        let mut starts = Vec::with_capacity(files + 1);
        starts.push(0);
        RecordedFiles {
            paths: Vec::with_capacity(path_bytes),
            path_ends: Vec::with_capacity(files),
            starts,
            stamps: Vec::with_capacity(files),
            vouched: Vec::with_capacity(files),
        }
    }

    /// Adds a file; `None` when its path would not fit in the buffer's 4 GiB or the
    /// sizes overflow (then the whole list is unusable).
    #[must_use]
    fn push(&mut self, path: &[u8], size: u64, stamp: Option<Stamp>) -> Option<()> {
        self.paths.extend_from_slice(path);
        self.path_ends.push(u32::try_from(self.paths.len()).ok()?);
        let end = self.stream_len().checked_add(size)?;
        self.starts.push(end);
        self.vouched.push(stamp.is_some());
        self.stamps
            .push(stamp.map_or_else(StampTimes::default, |s| StampTimes {
                dev: s.dev,
                ino: s.ino,
                mtime: s.mtime,
                ctime: s.ctime,
            }));
        Some(())
    }

    /// How many files.
    pub fn len(&self) -> usize {
        self.vouched.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.vouched.is_empty()
    }

    /// File `k`'s path, relative to the directory.
    pub fn path(&self, k: usize) -> &[u8] {
        let start = match k {
            0 => 0,
            k => self.path_ends[k - 1] as usize,
        };
        &self.paths[start..self.path_ends[k] as usize]
    }

    /// Where file `k`'s bytes start in the stream.
    pub fn start(&self, k: usize) -> u64 {
        self.starts[k]
    }

    /// File `k`'s size.
    pub fn size(&self, k: usize) -> u64 {
        self.starts[k + 1] - self.starts[k]
    }

    /// File `k`'s stamp, if it vouches for the file.
    pub fn stamp(&self, k: usize) -> Option<Stamp> {
        let t = self.stamps[k];
        self.vouched[k].then_some(Stamp {
            dev: t.dev,
            ino: t.ino,
            size: self.size(k),
            mtime: t.mtime,
            ctime: t.ctime,
        })
    }

    /// The index of the file whose bytes hold stream offset `at` (the last of those
    /// starting there, when some are empty).
    pub fn file_at(&self, at: u64) -> usize {
        self.starts[..self.len()]
            .partition_point(|&s| s <= at)
            .saturating_sub(1)
    }

    /// The length of the stream, the sum of the files' sizes.
    pub fn stream_len(&self) -> u64 {
        *self.starts.last().expect("starts holds at least 0")
    }

    /// Frees the paths, when only sizes and stamps are needed any more ([`path`]
    /// must not be called after).
    ///
    /// [`path`]: RecordedFiles::path
    pub fn drop_paths(&mut self) {
        self.paths = Vec::new();
        self.path_ends = Vec::new();
    }
}

impl TreeState {
    /// The state of a `dir` whose files are not known to hold anything: an update
    /// from it writes every file.
    pub fn of_nothing(dir: PathBuf) -> TreeState {
        TreeState {
            dir,
            table: ChunkTable::default(),
            files: RecordedFiles::default(),
        }
    }

    /// The state of `dir` holding `manifest`'s tree whose files had `stamps` (one per
    /// file, in stream order); see [`record`] for `taken`.
    pub fn new(
        dir: PathBuf,
        manifest: &Manifest,
        mut stamps: Vec<Option<Stamp>>,
        taken: SystemTime,
    ) -> TreeState {
        let path_bytes = files_of(manifest).map(|(path, _)| path.len()).sum();
        if stamps.len() != files_of(manifest).count() {
            debug_assert!(false, "one stamp per file");
            return TreeState::of_nothing(dir);
        }
        drop_racy(&dir, &mut stamps, taken);
        let mut files = RecordedFiles::with_capacity(stamps.len(), path_bytes);
        for ((path, size), stamp) in files_of(manifest).zip(stamps) {
            // Past 4 GiB of paths nothing is vouched for: every file is written or
            // read, as without a record.
            if files.push(path, size, stamp).is_none() {
                return TreeState::of_nothing(dir);
            }
        }
        TreeState {
            dir,
            table: manifest.table.clone(),
            files,
        }
    }

    /// The record for `dir`, if one exists and is intact; anything else is `None`
    /// (said with `-v`).
    pub fn load(dir: &Path) -> Option<TreeState> {
        let canonical = dir.canonicalize().ok()?;
        let path = record_path(&canonical)?;
        let data = match read_record(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                ui::verbose(format!("ignoring the tree state {}: {e}", path.display()));
                return None;
            }
        };
        match decode(&path.display().to_string(), &data) {
            Ok(state) if state.dir == canonical => Some(state),
            Ok(_) => {
                ui::verbose(format!(
                    "ignoring the tree state {}: it is for another directory",
                    path.display()
                ));
                None
            }
            Err(e) => {
                ui::verbose(format!("ignoring the tree state: {e}"));
                None
            }
        }
    }

    /// Removes the record of `dir`, if any.
    pub fn forget(dir: &Path) {
        if let Some(path) = dir.canonicalize().ok().and_then(|d| record_path(&d)) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The bytes of the record file at `path`: a regular file of at most [`MAX_BODY`]
/// bytes (its body is compressed), never followed if a symlink, and never waited on
/// (a fifo in its place is not read).
fn read_record(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > MAX_BODY {
        let what = format!("not a regular file of at most {MAX_BODY} bytes");
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(meta.len()).read_to_end(&mut data)?;
    Ok(data)
}

/// Records that the canonical `dir` holds `manifest`'s tree (restored or uploaded
/// under `key`) whose files had `stamps` (one per file, in stream order).
///
/// `taken` is the earliest moment a change to a file must show in its stamp: for an
/// upload, when its scan began; for a restore, when it was done (it [`settle`]s its
/// stamps first, so they stay; a process writing into DIR while the restore still runs
/// there may go unseen, as in any tool's view of a tree another writes to). A stamp
/// whose ctime or mtime is within the timestamp granularity of `taken` (or later) is
/// dropped: a write in the same clock tick as the stamp's ctime could leave the whole
/// stamp the same (git calls such index entries racy). Git looks at the mtime only,
/// which misses a rewrite that puts back an old mtime, as `npm` and `tar -x` do, in the
/// tick of the last change: a whole second on filesystems with coarse times. Any write
/// after `taken` gives a later ctime. Where a restore does not wait (whole-second
/// times), the files it wrote last are not vouched for, and the next upload reads them.
/// The rule compares file times with this machine's clock, so a network filesystem
/// whose server clock lags may defeat it (as it does git's).
///
/// The record is written to a temp file, then renamed. Failing to is not an error of
/// the command: the next upload reads everything, and `-v` says why.
pub fn record(
    dir: &Path,
    key: &str,
    manifest: &Manifest,
    stamps: Vec<Option<Stamp>>,
    taken: SystemTime,
) {
    if let Some(record) = Record::prepare(dir, key, manifest, stamps, taken) {
        record.write();
    }
}

/// A tree state encoded, to write once the entry it names exists: an upload prepares
/// it while its manifest is being written.
pub struct Record {
    dir: PathBuf,
    path: PathBuf,
    /// `None`: too large for a record; the directory's previous one goes.
    data: Option<Vec<u8>>,
}

impl Record {
    /// The record [`record`] writes; `None` when the directory has no place for one.
    pub fn prepare(
        dir: &Path,
        key: &str,
        manifest: &Manifest,
        mut stamps: Vec<Option<Stamp>>,
        taken: SystemTime,
    ) -> Option<Record> {
        let path = record_path(dir)?;
        if stamps.len() != files_of(manifest).count() {
            debug_assert!(false, "one stamp per file");
            return None;
        }
        drop_racy(dir, &mut stamps, taken);
        Some(Record {
            dir: dir.to_path_buf(),
            path,
            data: encode(dir, key, manifest, &stamps),
        })
    }

    /// Writes the record in place of the directory's previous one (a record too large
    /// to write removes it, said with `-v`).
    pub fn write(self) {
        let Some(data) = self.data else {
            ui::verbose(format!(
                "not recording the tree state of {}: too large for a record",
                self.dir.display()
            ));
            TreeState::forget(&self.dir);
            return;
        };
        let written = (|| {
            let parent = crate::temp::parent_of(&self.path);
            std::fs::create_dir_all(&parent)?;
            let mut tmp = tempfile::Builder::new()
                .prefix(".cacher-")
                .suffix(".part")
                .tempfile_in(&parent)?;
            std::io::Write::write_all(&mut tmp, &data)?;
            tmp.persist(&self.path)?;
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = written {
            ui::verbose(format!(
                "cannot record the tree state of {} in {}: {e}",
                self.dir.display(),
                self.path.display()
            ));
        }
    }
}

/// The regular files of `manifest`, path and size, in stream order.
fn files_of(manifest: &Manifest) -> impl Iterator<Item = (&[u8], u64)> {
    manifest.entries.iter().filter_map(|e| match e.kind {
        EntryKind::File { size } => Some((&e.path[..], size)),
        _ => None,
    })
}

/// Drops the stamps too recent to vouch for (see [`record`]).
fn drop_racy(dir: &Path, stamps: &mut [Option<Stamp>], taken: SystemTime) {
    let granularity = granularity(stamps).as_nanos() as i128;
    let mut racy = 0;
    for stamp in stamps.iter_mut() {
        if stamp.is_some_and(|s| age_at(s.latest_ns(), taken) <= granularity) {
            *stamp = None;
            racy += 1;
        }
    }
    if racy > 0 {
        ui::verbose(format!(
            "tree state of {}: {racy} files changed too recently to vouch for",
            dir.display()
        ));
    }
}

/// How long before `at` the file time `ns` (see [`nanos`]) lies, in nanoseconds;
/// negative when after it. The racy rules of tree states and of listings ahead
/// compare it with the timestamp granularity.
pub fn age_at(ns: i64, at: SystemTime) -> i128 {
    let at = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    at - i128::from(ns)
}

/// A file time in nanoseconds since the epoch. Times before 1678 or after 2262
/// saturate (such stamps then never match, and the file is read): the ctime, which
/// the kernel sets, is never there.
fn nanos(secs: i64, nsec: i64) -> i64 {
    let ns = i128::from(secs) * 1_000_000_000 + i128::from(nsec);
    ns.clamp(i64::MIN.into(), i64::MAX.into()) as i64
}

/// How far apart two moments must be for the filesystem that gave `stamps` to tell
/// them apart: sub-second timestamps anywhere mean fine ones.
fn granularity(stamps: &[Option<Stamp>]) -> Duration {
    granularity_of(stamps.iter().flatten().flat_map(|s| [s.ctime, s.mtime]))
}

/// How far apart two moments must be for the filesystem that gave `times`
/// (nanoseconds since the epoch) to tell them apart: sub-millisecond parts anywhere
/// mean fine timestamps.
pub fn granularity_of(times: impl IntoIterator<Item = i64>) -> Duration {
    match times.into_iter().any(|t| t.rem_euclid(1_000_000) != 0) {
        true => FINE_GRANULARITY,
        false => COARSE_GRANULARITY,
    }
}

/// Waits until every one of `stamps` is older than the timestamp granularity (at most
/// a few milliseconds, and only on filesystems with fine timestamps), so a record
/// taken from now on can vouch for all of them: a restore calls this before its files
/// become visible, and again once it has renamed some into place (which changes their
/// ctime); the last files it wrote would otherwise be racy.
pub fn settle(stamps: &[Option<Stamp>]) {
    let granularity = granularity(stamps);
    if granularity != FINE_GRANULARITY {
        return;
    }
    let Some(latest) = stamps.iter().flatten().map(Stamp::latest_ns).max() else {
        return;
    };
    let wait = granularity.as_nanos() as i128 - age_at(latest, SystemTime::now());
    if wait > 0 {
        std::thread::sleep(Duration::from_nanos(
            wait.min(granularity.as_nanos() as i128) as u64 + 1_000_000,
        ));
    }
}

/// Where cacher keeps tree states: `$CACHER_STATE_DIR`, else `$XDG_STATE_HOME/cacher`,
/// else `~/.local/state/cacher` (`~/Library/Caches/cacher` on macOS). Not the cache
/// directory itself: that is the default `file://` store, whose keys it would mix with.
pub fn state_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("CACHER_STATE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_STATE_HOME") {
        return Some(PathBuf::from(dir).join("cacher"));
    }
    let home = PathBuf::from(var("HOME")?);
    Some(match cfg!(target_os = "macos") {
        true => home.join("Library/Caches/cacher"),
        false => home.join(".local/state/cacher"),
    })
}

/// The record file of the canonical directory `dir`.
fn record_path(dir: &Path) -> Option<PathBuf> {
    let name = blake3::hash(dir.as_os_str().as_bytes()).to_hex();
    Some(state_dir()?.join("trees").join(&name[..32]))
}

/// The record's bytes: a wrapped body (as manifests are, kind 1) followed by the
/// blake3 of everything before it, so a torn or flipped record is refused whole.
/// `None` when [`decode`] would refuse it for its size.
fn encode(dir: &Path, key: &str, manifest: &Manifest, stamps: &[Option<Stamp>]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    put_bytes(&mut body, dir.as_os_str().as_bytes());
    put_bytes(&mut body, key.as_bytes());
    encode_table(&mut body, &manifest.table);
    // File by file, so that a reader builds its lists in one pass with nothing
    // in between; the paths' total first, so that it sizes their buffer exactly.
    let path_bytes: usize = files_of(manifest).map(|(p, _)| p.len()).sum();
    put_varint(&mut body, stamps.len() as u64);
    put_varint(&mut body, path_bytes as u64);
    let mut previous: &[u8] = &[];
    for ((path, size), stamp) in files_of(manifest).zip(stamps) {
        let shared = common_prefix(previous, path);
        put_varint(&mut body, shared as u64);
        put_bytes(&mut body, &path[shared..]);
        previous = path;
        put_varint(&mut body, size);
        let Some(s) = stamp else {
            body.push(0);
            continue;
        };
        body.push(1);
        put_varint(&mut body, s.dev);
        put_varint(&mut body, s.ino);
        for time in [s.mtime, s.ctime] {
            put_varint(&mut body, zigzag(time.div_euclid(1_000_000_000)));
            put_varint(&mut body, time.rem_euclid(1_000_000_000) as u64);
        }
    }
    if body.len() as u64 > MAX_BODY || path_bytes > path_budget(body.len()) {
        return None;
    }
    let mut out = wrap_local(STATE_MAGIC, RECORD_KIND, &body);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    Some(out)
}

fn decode(what: &str, data: &[u8]) -> Result<TreeState, FormatError> {
    let Some(split) = data.len().checked_sub(32) else {
        return Err(bad(what, "truncated"));
    };
    let (data, sum) = data.split_at(split);
    if blake3::hash(data).as_bytes() != sum {
        return Err(bad(what, "checksum mismatch"));
    }
    let (kind, body) = unwrap(what, STATE_MAGIC, data)?;
    if kind != RECORD_KIND {
        return Err(bad(what, "written by another version of cacher"));
    }
    let mut r = Reader::new(what, &body);
    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(r.bytes(MAX_PATH)?));
    // The key, for a person reading the record.
    r.bytes(MAX_PATH)?;
    let table = decode_table(&mut r)?;
    // Each file takes at least 4 bytes: two path varints, a size and a stamp flag.
    let count = r.varint_count(4)?;
    let path_bytes = usize::try_from(r.varint()?).unwrap_or(usize::MAX);
    // Bounded as a manifest's paths are, before anything is reserved for them.
    if count > MAX_ENTRIES || path_bytes > path_budget(body.len()) {
        return Err(bad(what, "more files or path bytes than a record holds"));
    }
    let mut files = RecordedFiles::with_capacity(count, path_bytes);
    let mut path = Vec::new();
    for _ in 0..count {
        let shared = usize::try_from(r.varint()?).unwrap_or(usize::MAX);
        let suffix = r.bytes(MAX_PATH)?;
        if shared > path.len() || shared + suffix.len() > MAX_PATH {
            return Err(bad(what, "path prefix out of range"));
        }
        path.truncate(shared);
        path.extend_from_slice(suffix);
        check_relative_path(what, &path)?;
        // Paired with the scan and the entry in one merge, which needs tree order.
        if !files.is_empty() && tree_order(files.path(files.len() - 1), &path) != Ordering::Less {
            return Err(bad(what, "files out of order"));
        }
        let size = r.varint()?;
        let stamp = match r.u8()? {
            0 => None,
            _ => {
                let dev = r.varint()?;
                let ino = r.varint()?;
                let mut time = || -> Result<i64, FormatError> {
                    let secs = unzigzag(r.varint()?);
                    match r.varint()? {
                        nsec @ 0..1_000_000_000 => Ok(nanos(secs, nsec as i64)),
                        _ => Err(bad(what, "bad nanoseconds")),
                    }
                };
                let mtime = time()?;
                let ctime = time()?;
                Some(Stamp {
                    dev,
                    ino,
                    size,
                    mtime,
                    ctime,
                })
            }
        };
        files
            .push(&path, size, stamp)
            .ok_or_else(|| bad(what, "its sizes overflow"))?;
    }
    r.finish()?;
    if files.paths.len() != path_bytes {
        return Err(bad(what, "paths do not add up to their total"));
    }
    let chunk_total: u64 = table.chunks.iter().map(|c| u64::from(c.len)).sum();
    if chunk_total != files.stream_len() {
        return Err(bad(what, "the files' sizes do not add up to the chunks'"));
    }
    Ok(TreeState { dir, table, files })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::format::{Entry, ManifestKind};

    /// Only a regular file is read as a record: a symlink to an endless device or a
    /// fifo in its place is refused at once, neither read without end nor waited on.
    #[test]
    fn a_record_is_read_only_from_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        std::fs::write(at("record"), b"bytes").unwrap();
        assert_eq!(read_record(&at("record")).unwrap(), b"bytes");
        std::os::unix::fs::symlink("/dev/zero", at("zero")).unwrap();
        std::os::unix::fs::symlink(at("record"), at("link")).unwrap();
        let fifo = std::ffi::CString::new(at("fifo").into_os_string().into_encoded_bytes());
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.unwrap().as_ptr(), 0o600) }, 0);
        std::fs::create_dir(at("dir")).unwrap();
        for name in ["zero", "link", "fifo", "dir"] {
            assert!(read_record(&at(name)).is_err(), "{name}");
        }
        assert_eq!(
            read_record(&at("missing")).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
    }

    /// A tree of a directory and two files, the first modified and changed at `mtime`.
    fn manifest_and_stamps(mtime: SystemTime) -> (Manifest, Vec<Option<Stamp>>) {
        let mtime = mtime.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let mtime = nanos(mtime.as_secs() as i64, i64::from(mtime.subsec_nanos() | 1));
        let entry = |name: &str, kind| Entry {
            path: name.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            mtime: 1,
            mtime_nsec: 0,
        };
        let manifest = Manifest {
            kind: ManifestKind::Dir,
            created: 0,
            label: "x".into(),
            stream_len: 0,
            table: Default::default(),
            entries: vec![
                entry("a", EntryKind::File { size: 0 }),
                entry("d", EntryKind::Dir),
                entry("d/b", EntryKind::File { size: 0 }),
            ],
        };
        let stamp = Stamp {
            dev: 1,
            ino: 2,
            size: 0,
            mtime,
            ctime: mtime,
        };
        (manifest, vec![Some(stamp), None])
    }

    fn state(taken: SystemTime, mtime: SystemTime) -> TreeState {
        let (manifest, stamps) = manifest_and_stamps(mtime);
        TreeState::new("/d".into(), &manifest, stamps, taken)
    }

    #[test]
    fn records_round_trip_and_refuse_any_flipped_byte() {
        let (manifest, stamps) = manifest_and_stamps(SystemTime::UNIX_EPOCH);
        let data = encode(Path::new("/d"), "k", &manifest, &stamps).unwrap();
        let back = decode("t", &data).unwrap();
        assert_eq!(
            (back.files.stamp(0), back.files.stamp(1)),
            (stamps[0], stamps[1])
        );
        assert_eq!(
            (back.files.path(0), back.files.path(1)),
            (&b"a"[..], &b"d/b"[..])
        );
        assert_eq!(back.table, manifest.table);
        assert_eq!(back.dir, PathBuf::from("/d"));
        for at in [0, data.len() / 2, data.len() - 1] {
            let mut bad = data.clone();
            bad[at] ^= 1;
            assert!(decode("t", &bad).is_err(), "flip at {at}");
        }
        assert!(decode("t", &data[..data.len() - 1]).is_err());
    }

    #[test]
    fn times_round_trip_before_1970_and_at_the_extremes() {
        let (manifest, _) = manifest_and_stamps(SystemTime::UNIX_EPOCH);
        for time in [
            i64::MIN,
            -1_000_000_001,
            -1,
            0,
            1_600_000_000_123_456_789,
            i64::MAX,
        ] {
            let stamp = Stamp {
                dev: 1,
                ino: 2,
                size: 0,
                mtime: time,
                ctime: time,
            };
            let data = encode(Path::new("/d"), "k", &manifest, &[Some(stamp), None]).unwrap();
            assert_eq!(decode("t", &data).unwrap().files.stamp(0), Some(stamp));
        }
        assert_eq!(nanos(-2, 999_999_999), -1_000_000_001);
        assert_eq!(nanos(i64::MIN / 2, 0), i64::MIN);
    }

    /// A sealed record of kind `kind` with no chunks and `files` (path, size, no
    /// stamp), declaring `path_total` path bytes.
    fn craft(kind: u8, files: &[(&[u8], u64)], path_total: u64) -> Vec<u8> {
        let mut body = Vec::new();
        put_bytes(&mut body, b"/d");
        put_bytes(&mut body, b"k");
        encode_table(&mut body, &ChunkTable::default());
        put_varint(&mut body, files.len() as u64);
        put_varint(&mut body, path_total);
        for (path, size) in files {
            put_varint(&mut body, 0);
            put_bytes(&mut body, path);
            put_varint(&mut body, *size);
            body.push(0);
        }
        let mut out = wrap_local(STATE_MAGIC, kind, &body);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    #[test]
    fn malformed_records_are_refused() {
        let ok: &[(&[u8], u64)] = &[(b"a", 0), (b"b", 0)];
        assert!(decode("t", &craft(RECORD_KIND, ok, 2)).is_ok());
        let refused = [
            ("another kind", craft(0, ok, 2)),
            (
                "out of order",
                craft(RECORD_KIND, &[(b"b", 0), (b"a", 0)], 2),
            ),
            ("duplicate", craft(RECORD_KIND, &[(b"a", 0), (b"a", 0)], 2)),
            ("unsafe path", craft(RECORD_KIND, &[(b"../a", 0)], 4)),
            (
                "sizes wrap to 0",
                craft(RECORD_KIND, &[(b"a", u64::MAX), (b"b", 1)], 2),
            ),
            ("sizes without chunks", craft(RECORD_KIND, &[(b"a", 5)], 1)),
            ("wrong path total", craft(RECORD_KIND, ok, 3)),
            // Refused before anything is reserved for them.
            ("huge path total", craft(RECORD_KIND, ok, 1 << 40)),
        ];
        for (what, data) in refused {
            assert!(decode("t", &data).is_err(), "{what} accepted");
        }
    }

    #[test]
    fn stamps_as_recent_as_the_record_are_not_trusted() {
        let now = SystemTime::now();
        let ms = Duration::from_millis;
        assert!(state(now, now - ms(500)).files.stamp(0).is_some());
        assert!(state(now, now - ms(20)).files.stamp(0).is_none());
        assert!(
            state(now, now + ms(60_000)).files.stamp(0).is_none(),
            "a time in the future"
        );
    }

    /// A file rewritten with an old mtime put back (as npm and `tar -x` leave files) is
    /// as racy as one written with a new mtime: its ctime says when.
    #[test]
    fn a_recent_ctime_makes_a_stamp_racy_whatever_its_mtime() {
        let now = SystemTime::now();
        let (manifest, mut stamps) = manifest_and_stamps(now - Duration::from_secs(3600));
        let recent = now - Duration::from_millis(5);
        let since_epoch = recent.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let ctime = nanos(
            since_epoch.as_secs() as i64,
            since_epoch.subsec_nanos().into(),
        );
        stamps[0].as_mut().unwrap().ctime = ctime;
        let state = TreeState::new("/d".into(), &manifest, stamps, now);
        assert!(state.files.stamp(0).is_none());
    }
}
