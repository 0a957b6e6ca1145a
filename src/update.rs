//! Bringing a directory that holds a tree cacher recorded (see [`crate::state`]) up to
//! date with another entry, fetching and writing only what differs.
//!
//! - A file is kept as it is when its stamp matches the record (so it holds the
//!   recorded bytes), its mode and mtime are the new entry's, and the recorded and the
//!   new stream cover it with the same chunks at the same alignment (a chunk id is the
//!   hash of its bytes, so the bytes are the same). Only the chunks of the other files
//!   are fetched.
//! - A file that holds the recorded bytes of its path and size, but that the new
//!   stream covers with other chunks in places (a neighbour was added or removed, or
//!   its own bytes were edited), is compared with the new bytes of those places only,
//!   as they come: kept when they are equal, written otherwise (a staged copy of it
//!   with those places written over).
//! - Everything else is staged next to where it goes (`.cacher-new-*` files, symlinks
//!   and whole new directory trees, each created exclusively and never through a
//!   symlink) while those chunks are fetched and verified. Only then are the staged
//!   entries renamed into place, each replacing what was there, and paths the new tree
//!   lacks removed below its top-level entries, so DIR ends exactly as a fresh restore
//!   leaves it. A failure before that leaves DIR as it was; one during it leaves every
//!   path either old or new, never partial.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rayon::prelude::*;
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::chunk::format::{ChunkRef, ChunkTable, Entry, EntryKind, Manifest, show, tree_order};
use crate::chunk::store::{location, table_of};
use crate::exclude::Exclude;
use crate::restore::{
    MODE_MASK, check_space, complete_file, finalize, join_path, list_names, open_dir, permissions,
    split_path, timestamps,
};
use crate::state::{RecordedFiles, Stamp, TreeState};
use crate::temp::{self, ASIDE_PREFIX, NEW_PREFIX};
use crate::tree_stream::open_regular;

mod listings;
use listings::ListingsAhead;

/// What an update does with a file of the new tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileAction {
    /// Fetch its bytes and write it.
    Write,
    /// It holds the right bytes: leave it as it is.
    Keep,
    /// It holds the right bytes with another mode or mtime: set those.
    Touch,
    /// It holds the recorded bytes of its path and size, but the new stream covers
    /// some of them with other chunks (a neighbour was added or removed, or its own
    /// bytes edited): compare it with those chunks as they come, then keep or touch
    /// it, or write it if they differ.
    Compare,
}

/// What an update keeps and what it must fetch.
pub struct Plan {
    /// Per entry of the new tree (files; others `Write`).
    actions: Vec<FileAction>,
    /// Per entry: where its bytes start in the new stream (files).
    offsets: Vec<u64>,
    /// The chunks to fetch, in stream order.
    pub table: ChunkTable,
    /// Every chunk that covers a file to write or a place of a file to compare, in
    /// stream order.
    needed: Vec<Needed>,
    /// The recorded files that hold bytes of chunks read locally (path in DIR, offset
    /// in the recorded stream, size), in stream order.
    local_files: Vec<(PathBuf, u64, u64)>,
    /// Files to keep or touch, and their bytes.
    kept_files: u64,
    kept_bytes: u64,
    /// Bytes of the files to write, and of those to compare (which may be written).
    write_bytes: u64,
    compare_bytes: u64,
    /// Per file to compare (by entry, in order): the ranges of its bytes (from its
    /// start) that lie in chunks the recorded stream does not hold at the same place.
    /// The rest are the recorded bytes, which it still holds.
    compare: Vec<(u32, Vec<Range<u64>>)>,
    /// Each file to keep, touch or compare (entry of the new tree, in order) with the
    /// recorded file it is, whose stamp in `recorded` it has now. Not a map of stamps: on a
    /// 10^6-file tree that cost 136 MB.
    kept: Vec<(u32, u32)>,
    /// The recorded files (without their paths), for their stamps.
    recorded: RecordedFiles,
}

/// A chunk the update needs, where it goes in the new stream and where it comes from.
#[derive(Debug, Clone, Copy)]
struct Needed {
    at: u64,
    len: u64,
    id: crate::chunk::Id,
    source: Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Fetched (it comes through [`Write`], in order).
    Bucket,
    /// Read from the files that held these bytes at this offset of the recorded stream.
    Local(u64),
}

impl Plan {
    /// Files of the new tree that DIR holds as they are (kept or touched).
    pub fn kept_files(&self) -> u64 {
        self.kept_files
    }

    /// Files DIR holds the recorded bytes of that the new entry covers with other
    /// chunks in places: compared there, then kept or written.
    pub fn compare_files(&self) -> u64 {
        self.compare.len() as u64
    }

    /// Each file's stamp for the record of the updated tree, in stream order: kept
    /// files still hold what the old record said; `written` has the stamps of the
    /// files the update wrote or touched.
    fn stamps(&self, entries: &[Entry], written: &HashMap<usize, Stamp>) -> Vec<Option<Stamp>> {
        entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.kind, EntryKind::File { .. }))
            .map(|(i, _)| match self.actions[i] {
                FileAction::Keep => written.get(&i).copied().or_else(|| self.kept_stamp(i)),
                _ => written.get(&i).copied(),
            })
            .collect()
    }

    /// The stamp the plan found entry `i` with, if it is kept or touched.
    fn kept_stamp(&self, i: usize) -> Option<Stamp> {
        let k = self
            .kept
            .binary_search_by_key(&i, |&(entry, _)| entry as usize)
            .ok()?;
        self.recorded.stamp(self.kept[k].1 as usize)
    }
}

/// What `dir` holds of the tree its state records: which recorded files still hold
/// the recorded bytes. It needs only the record, so it is taken while the new entry
/// is fetched.
pub struct Survey {
    state: TreeState,
    /// Per recorded file: how it is now, if it still holds the recorded bytes.
    intact: Vec<Option<Intact>>,
}

/// Looks at `dir`, which holds the tree `state` records, by one `stat` per recorded
/// file (through its directory's handle).
pub fn survey(dir: &Path, state: TreeState) -> Survey {
    let recorded = &state.files;
    // Which recorded files still hold the recorded bytes (with their mode and mtime
    // now). Files of one directory come one after another (tree order): each run of
    // them is looked at through its directory's handle, opened a name at a time
    // through its parent's, refusing symlinks as the update does, so a file is only
    // taken as intact when no directory above it is one. (Opening needs read
    // permission where a path lookup needs search only; the update lists every
    // directory, or the lister does for it, anyway.)
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for k in 0..recorded.len() {
        match runs.last_mut() {
            Some(run) if parent(recorded.path(run.start)) == parent(recorded.path(k)) => {
                run.end = k + 1
            }
            _ => runs.push(k..k + 1),
        }
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    let root = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok();
    let intact: Vec<Option<Intact>> = runs
        .par_chunks(RUNS_PER_WALKER)
        .flat_map_iter(|group| {
            let mut walker = root.as_ref().map(|root| DirWalker::new(root.as_fd()));
            let mut intact = Vec::with_capacity(group.iter().map(|r| r.len()).sum());
            for run in group {
                let path = recorded.path(run.start);
                let handle = walker.as_mut().and_then(|w| w.open(parent(path)).ok());
                intact.extend(run.clone().map(|k| {
                    let (path, stamp) = (recorded.path(k), recorded.stamp(k)?);
                    let name = path.rsplit(|b| *b == b'/').next().unwrap_or(path);
                    let st = rustix::fs::statat(
                        handle?,
                        OsStr::from_bytes(name),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .ok()?;
                    let file_type =
                        rustix::fs::FileType::from_raw_mode(st.st_mode as rustix::fs::RawMode);
                    let mode = st.st_mode as u32;
                    (Stamp::of_stat(&st) == stamp && file_type == rustix::fs::FileType::RegularFile)
                        .then_some(Intact {
                            mode,
                            mtime: (st.st_mtime as i64, st.st_mtime_nsec as u32),
                            // Setting a mode and mtime needs the owner's handle (readable),
                            // and must not reach other names of the same file (hard links,
                            // a pnpm store).
                            touchable: mode & 0o400 != 0
                                && st.st_nlink == 1
                                && (st.st_uid == euid || euid == 0),
                        })
                }));
            }
            intact
        })
        .collect();
    Survey { state, intact }
}

/// Decides which files of `new` that `dir` (as `survey` found it) already holds, and
/// where each chunk of the others comes from: a file still holding the recorded
/// bytes, or the bucket.
pub fn plan(dir: &Path, survey: Survey, new: &Manifest) -> Plan {
    let Survey { state, intact } = survey;
    let TreeState {
        table: recorded_table,
        files: mut recorded,
        ..
    } = state;
    let old = Stream::of(&recorded_table);
    let fresh = Stream::of(&new.table);
    let local = local_chunks(&old, &recorded, &intact);

    let mut plan = Plan {
        actions: vec![FileAction::Write; new.entries.len()],
        offsets: vec![0u64; new.entries.len()],
        table: ChunkTable::default(),
        needed: Vec::new(),
        local_files: Vec::new(),
        kept_files: 0,
        kept_bytes: 0,
        write_bytes: 0,
        compare_bytes: 0,
        compare: Vec::new(),
        kept: Vec::new(),
        recorded: RecordedFiles::default(),
    };
    let mut needed_chunk = vec![false; new.table.chunks.len()];
    let mut at = 0u64;
    // Both lists are in tree order (a manifest or record that is not is refused when
    // decoded), so one pass pairs each new file with the recorded file of the same path.
    let mut k = 0;
    for (i, e) in new.entries.iter().enumerate() {
        let EntryKind::File { size } = e.kind else {
            continue;
        };
        plan.offsets[i] = at;
        while k < recorded.len() && tree_order(recorded.path(k), &e.path) == Ordering::Less {
            k += 1;
        }
        let here = (k < recorded.len() && recorded.path(k) == &e.path[..])
            .then_some(k)
            .and_then(|k| Some((k, intact[k]?)));
        let action = match here {
            Some((k, now)) if recorded.size(k) == size => {
                let same_meta = has_meta(now.mode, now.mtime, e);
                let same_bytes = old.same_bytes(recorded.start(k), &fresh, at, size);
                let action = match (same_bytes, same_meta) {
                    (true, true) => FileAction::Keep,
                    (true, false) if now.touchable => FileAction::Touch,
                    // Read, and maybe given a mode and mtime, through its own handle.
                    (false, _) if now.touchable => FileAction::Compare,
                    _ => FileAction::Write,
                };
                if action != FileAction::Write {
                    plan.kept.push((to_u32(i), to_u32(k)));
                }
                action
            }
            _ => FileAction::Write,
        };
        plan.actions[i] = action;
        match action {
            FileAction::Write => {
                plan.write_bytes += size;
                let mut k = fresh.chunk_at(at);
                while size > 0 && k < fresh.starts.len() && fresh.starts[k] < at + size {
                    needed_chunk[k] = true;
                    k += 1;
                }
            }
            FileAction::Compare => {
                let (k, _) = here.expect("only a recorded file is compared");
                let old_start = recorded.start(k);
                let mut ranges: Vec<Range<u64>> = Vec::new();
                let mut c = fresh.chunk_at(at);
                while c < fresh.starts.len() && fresh.starts[c] < at + size {
                    let (from, len) = (fresh.starts[c], u64::from(fresh.chunks[c].len));
                    // The recorded bytes at the same place relative to the file.
                    let chunk = &fresh.chunks[c];
                    let same = (old_start + from).checked_sub(at).is_some_and(|o| {
                        old.chunk_starting_at(o)
                            .is_some_and(|was| (was.id, was.len) == (chunk.id, chunk.len))
                    });
                    if !same {
                        needed_chunk[c] = true;
                        let range = from.max(at) - at..(from + len).min(at + size) - at;
                        match ranges.last_mut() {
                            Some(r) if r.end == range.start => r.end = range.end,
                            _ => ranges.push(range),
                        }
                    }
                    c += 1;
                }
                plan.compare_bytes += size;
                plan.compare.push((to_u32(i), ranges));
            }
            FileAction::Keep | FileAction::Touch => {
                plan.kept_files += 1;
                plan.kept_bytes += size;
            }
        }
        at += size;
    }
    let mut fetched = Vec::new();
    for (k, c) in new.table.chunks.iter().enumerate() {
        if !needed_chunk[k] {
            continue;
        }
        let source = match local.get(&c.id) {
            Some(&old_at) => Source::Local(old_at),
            None => {
                fetched.push(c);
                Source::Bucket
            }
        };
        plan.needed.push(Needed {
            at: fresh.starts[k],
            len: u64::from(c.len),
            id: c.id,
            source,
        });
    }
    plan.table = table_of(
        fetched
            .into_iter()
            .map(|c| (c.id, location(new.table.packs[c.pack as usize], c))),
    );
    // Only the files holding bytes of chunks read locally: all of them would take a
    // path each (about 100 MB on a 10^6-file tree) for the few chunks usually read.
    let mut sources = Vec::new();
    for needed in &plan.needed {
        let Source::Local(old_at) = needed.source else {
            continue;
        };
        let mut k = recorded.file_at(old_at);
        while k < recorded.len() && recorded.start(k) < old_at + needed.len {
            let (start, size) = (recorded.start(k), recorded.size(k));
            if size > 0 && start + size > old_at {
                sources.push(k);
            }
            k += 1;
        }
    }
    sources.sort_unstable();
    sources.dedup();
    plan.local_files = sources
        .into_iter()
        .map(|k| {
            let path = dir.join(OsStr::from_bytes(recorded.path(k)));
            (path, recorded.start(k), recorded.size(k))
        })
        .collect();
    recorded.drop_paths();
    plan.recorded = recorded;
    plan
}

/// Runs of files (one directory each) a plan's walker takes in turn: each walker
/// opens the directories above its first run afresh.
const RUNS_PER_WALKER: usize = 64;

/// An index into a tree's entries or files, which are far fewer than 2^32.
fn to_u32(i: usize) -> u32 {
    u32::try_from(i).expect("a tree has fewer than 2^32 entries")
}

/// Whether a file with `mode` and `mtime` on disk has those of entry `e`. (Setuid,
/// setgid and sticky bits on disk differ from any restored mode.)
fn has_meta(mode: u32, mtime: (i64, u32), e: &Entry) -> bool {
    mode & 0o7777 == e.mode & MODE_MASK && mtime == (e.mtime, e.mtime_nsec)
}

/// The directory entries go in: the innermost open one, or DIR itself.
fn parent_fd<'a>(open_dirs: &'a [OpenDir], root: &'a OwnedFd) -> BorrowedFd<'a> {
    match open_dirs.last() {
        Some(d) => {
            d.fd.as_ref()
                .expect("opened to visit an entry in it")
                .as_fd()
        }
        None => root.as_fd(),
    }
}

/// The size of a file entry.
fn file_size(e: &Entry) -> u64 {
    match e.kind {
        EntryKind::File { size } => size,
        _ => unreachable!("only files receive content"),
    }
}

/// The directory holding a relative path (`a/b` for `a/b/c`, empty for `c`).
fn parent(path: &[u8]) -> &[u8] {
    path.iter()
        .rposition(|b| *b == b'/')
        .map_or(&path[..0], |i| &path[..i])
}

/// A recorded file that still holds the recorded bytes, as it is now.
#[derive(Debug, Clone, Copy)]
struct Intact {
    mode: u32,
    mtime: (i64, u32),
    /// Whether the update may give it another mode and mtime in place.
    touchable: bool,
}

/// The recorded chunks whose bytes all lie in files that still hold them: where each
/// starts in the recorded stream, by id.
fn local_chunks(
    old: &Stream<'_>,
    files: &RecordedFiles,
    intact: &[Option<Intact>],
) -> HashMap<crate::chunk::Id, u64> {
    let mut local = HashMap::new();
    for (k, c) in old.chunks.iter().enumerate() {
        let (from, to) = (old.starts[k], old.starts[k] + u64::from(c.len));
        let all_intact = (files.file_at(from)..files.len())
            .take_while(|&f| files.start(f) < to)
            .filter(|&f| files.size(f) > 0 && files.start(f) + files.size(f) > from)
            .all(|f| intact[f].is_some());
        if all_intact {
            local.entry(c.id).or_insert(from);
        }
    }
    local
}

/// A content stream's chunks with their offsets.
struct Stream<'a> {
    starts: Vec<u64>,
    chunks: &'a [ChunkRef],
}

impl<'a> Stream<'a> {
    fn of(table: &'a ChunkTable) -> Stream<'a> {
        let mut at = 0u64;
        let starts = table
            .chunks
            .iter()
            .map(|c| {
                let start = at;
                at += u64::from(c.len);
                start
            })
            .collect();
        Stream {
            starts,
            chunks: &table.chunks,
        }
    }

    /// The chunk holding stream offset `at`.
    fn chunk_at(&self, at: u64) -> usize {
        self.starts.partition_point(|&s| s <= at).saturating_sub(1)
    }

    /// The chunk that starts exactly at `at`, if one does.
    fn chunk_starting_at(&self, at: u64) -> Option<&ChunkRef> {
        let k = self.starts.binary_search(&at).ok()?;
        self.chunks.get(k)
    }

    /// Whether `len` bytes from `at` here are the bytes from `other_at` in `other`:
    /// both ranges lie at the same offset in chunks with the same ids.
    fn same_bytes(&self, at: u64, other: &Stream<'_>, other_at: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let (mut i, mut j) = (self.chunk_at(at), other.chunk_at(other_at));
        if i >= self.chunks.len() || j >= other.chunks.len() {
            return false;
        }
        if at - self.starts[i] != other_at - other.starts[j] {
            return false;
        }
        loop {
            let (Some(a), Some(b)) = (self.chunks.get(i), other.chunks.get(j)) else {
                return false;
            };
            if a.id != b.id || a.len != b.len {
                return false;
            }
            if self.starts[i] + u64::from(a.len) >= at + len {
                return true;
            }
            i += 1;
            j += 1;
        }
    }
}

/// A directory of the new tree whose entries are being visited.
struct OpenDir {
    entry: usize,
    /// Its handle, once something needs one. An existing directory the lister listed
    /// is opened only to look at or write an entry in it other than a kept or touched
    /// file, or to remove names the new tree lacks: most leaves of a bumped tree never
    /// are.
    fd: Option<OwnedFd>,
    /// For a directory that existed: its device and inode when it was visited, which
    /// a later open must find.
    identity: (u64, u64),
    /// Created by this update inside a staged tree: everything below is new too.
    fresh: bool,
    /// For a directory that existed: the names in it, matched with the new tree's.
    listed: Listed,
    /// For a directory that existed: whether its mode and times must be set at the
    /// end (they differ, or the update changes what it holds).
    dirty: bool,
    /// For a directory that existed: its mode and mtime before, and whether they are
    /// noted in `changed_dirs` yet.
    before: (u32, (i64, u32)),
    noted: bool,
}

/// The names listed in an existing directory, matched with the new tree's entries in
/// it as they are visited: sorted once and found by binary search. (A set of the
/// names and a list of the tree's cost three allocations and a hash per kept file.)
#[derive(Default)]
struct Listed {
    /// In byte order.
    names: Vec<OsString>,
    /// Per name: the new tree has it.
    matched: Vec<bool>,
    /// The new tree's entries in the directory so far that are not among `names` as
    /// spelled: on a filesystem that folds case, a name listed otherwise may be one.
    unlisted: Vec<usize>,
}

impl Listed {
    fn new(mut names: Vec<OsString>) -> Listed {
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Listed {
            matched: vec![false; names.len()],
            names,
            unlisted: Vec::new(),
        }
    }

    /// Notes entry `entry`, named `name`, of the new tree.
    fn see(&mut self, entry: usize, name: &[u8]) {
        match self.names.binary_search_by(|n| n.as_bytes().cmp(name)) {
            Ok(k) => self.matched[k] = true,
            Err(_) => self.unlisted.push(entry),
        }
    }

    /// The names the new tree lacks.
    fn unseen(&self) -> Vec<OsString> {
        let matched = self.matched.iter();
        let names = self.names.iter().zip(matched);
        names
            .filter(|(_, m)| !**m)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The names of the new tree's entries seen but not listed, given its `entries`.
    fn unlisted<'a>(&'a self, entries: &'a [Entry]) -> impl Iterator<Item = &'a OsStr> {
        let name = |i: &usize| OsStr::from_bytes(split_path(&entries[*i].path).1);
        self.unlisted.iter().map(name)
    }
}

/// The file receiving content.
struct OpenFile {
    entry: usize,
    file: File,
    left: u64,
}

/// A file of DIR being compared with the bytes the new tree has for it (see
/// [`FileAction::Compare`]).
struct Comparing {
    entry: usize,
    /// The file as it is, read through its own handle.
    existing: File,
    /// The range of its bytes being received (from the file's start), and those after.
    next: Range<u64>,
    rest: std::vec::IntoIter<Range<u64>>,
    /// Once a byte differed: the file written after all, a staged copy of the existing
    /// one (whose other bytes are the new tree's) that takes the ranges left.
    copy: Option<File>,
}

/// What receives the stream's bytes for one file.
enum Receiving {
    Write(OpenFile),
    Compare(Comparing),
}

impl Receiving {
    fn entry(&self) -> usize {
        match self {
            Receiving::Write(f) => f.entry,
            Receiving::Compare(c) => c.entry,
        }
    }

    /// The offset in the file of the next byte it takes, and how many it takes from
    /// there in a row; `size` is the file's.
    fn expecting(&self, size: u64) -> (u64, u64) {
        match self {
            Receiving::Write(f) => (size - f.left, f.left),
            Receiving::Compare(c) => (c.next.start, c.next.end - c.next.start),
        }
    }
}

/// What an update did: the new tree's entries, each file's stamp for its tree state
/// (stream order), and how much it kept and wrote.
pub struct Updated {
    pub entries: Vec<Entry>,
    pub stamps: Vec<Option<Stamp>>,
    pub kept_files: u64,
    pub kept_bytes: u64,
    pub written_bytes: u64,
}

/// Applies a [`Plan`]: takes the needed chunks' bytes in order through [`Write`],
/// stages what changes, and [`TreeUpdate::finish`] puts it in place. Dropped before
/// that, it removes what it staged and DIR is as it was.
pub struct TreeUpdate {
    dest: PathBuf,
    root: OwnedFd,
    entries: Vec<Entry>,
    plan: Plan,
    /// The needed chunk being received, and how far into it.
    chunk: usize,
    within: u64,
    next: usize,
    open_dirs: Vec<OpenDir>,
    file: Option<Receiving>,
    /// The bytes of a file being compared, read back.
    compare_buf: Vec<u8>,
    /// Files kept or touched, their bytes, and the bytes of the files written: the
    /// plan's, and then what the compared files turned out to be.
    kept_files: u64,
    kept_bytes: u64,
    written_bytes: u64,
    /// Remove top-level entries the new tree lacks (`--delete`).
    mirror: bool,
    /// Paths the new tree was uploaded without: never removed.
    keep: Exclude,
    root_listed: Listed,
    /// Staged entries (new tree entry, temp name beside it), in tree order, and how
    /// many are in place.
    staged: Vec<(usize, OsString)>,
    committed: usize,
    /// Paths the new tree lacks: (parent path, name).
    extras: Vec<(Vec<u8>, OsString)>,
    /// Directories that existed, to give their new mode and times at the end.
    existing_dirs: Vec<usize>,
    /// Files that hold the right bytes but need another mode or mtime.
    touched: Vec<usize>,
    /// The stamp of each file written or touched, by entry (see [`TreeUpdate::finish`]).
    stamps: HashMap<usize, Stamp>,
    /// Existing directories the update changed before its end (owner write permission
    /// added, entries staged in them), with their mode and mtime before, to put back if
    /// it fails.
    changed_dirs: Vec<(Vec<u8>, u32, (i64, u32))>,
    /// The new tree's directories listed ahead, and how many of them were visited.
    listings: Option<ListingsAhead>,
    dirs_visited: usize,
}

impl TreeUpdate {
    /// Opens `dest`, refuses an update whose new files its filesystem has no room for,
    /// and visits entries up to the first file that takes bytes from the stream.
    pub fn create(
        dest: &Path,
        entries: Vec<Entry>,
        plan: Plan,
        mirror: bool,
        keep: Exclude,
    ) -> anyhow::Result<TreeUpdate> {
        temp::remove_stale_leftovers(dest);
        check_space(dest, plan.write_bytes + plan.compare_bytes)?;
        let root = rustix::fs::open(
            dest,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("cannot open {}", dest.display()))?;
        refuse_folded_names(root.as_fd(), &entries, dest)?;
        let root_listed = Listed::new(
            list_names(root.as_fd())
                .with_context(|| format!("cannot list {}", dest.display()))?
                .into_iter()
                .filter(|n| !temp::is_temp_name(n.as_bytes()))
                .collect(),
        );
        let dirs = entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Dir))
            .map(|e| e.path.clone())
            .collect();
        let listings = rustix::io::fcntl_dupfd_cloexec(&root, 0)
            .ok()
            .and_then(|root| ListingsAhead::start(root, dirs));
        let (kept_files, kept_bytes, written_bytes) =
            (plan.kept_files, plan.kept_bytes, plan.write_bytes);
        let mut update = TreeUpdate {
            dest: dest.to_path_buf(),
            root,
            entries,
            plan,
            chunk: 0,
            within: 0,
            next: 0,
            open_dirs: Vec::new(),
            file: None,
            compare_buf: Vec::new(),
            kept_files,
            kept_bytes,
            written_bytes,
            mirror,
            keep,
            root_listed,
            staged: Vec::new(),
            committed: 0,
            extras: Vec::new(),
            existing_dirs: Vec::new(),
            touched: Vec::new(),
            stamps: HashMap::new(),
            changed_dirs: Vec::new(),
            listings,
            dirs_visited: 0,
        };
        update.advance()?;
        Ok(update)
    }

    /// Visits entries in order until one needs content from the stream.
    fn advance(&mut self) -> anyhow::Result<()> {
        while self.file.is_none() && self.next < self.entries.len() {
            let i = self.next;
            self.next += 1;
            self.visit(i)
                .with_context(|| format!("cannot restore {}", show(&self.entries[i].path)))?;
        }
        Ok(())
    }

    // The field types of `stat` differ between systems.
    #[allow(clippy::unnecessary_cast)]
    fn visit(&mut self, i: usize) -> anyhow::Result<()> {
        // A kept file's path and name are not copied: most of the tree, after a bump.
        let parent_len = split_path(&self.entries[i].path).0.len();
        while let Some(top) = self.open_dirs.last() {
            if self.entries[top.entry].path == self.entries[i].path[..parent_len] {
                break;
            }
            let done = self.open_dirs.pop().expect("checked above");
            self.close_dir(done)?;
        }
        if self.open_dirs.is_empty() && parent_len > 0 {
            bail!("it comes before its parent directory");
        }
        let name = split_path(&self.entries[i].path).1;
        let fresh = match self.open_dirs.last_mut() {
            Some(d) => {
                if !d.fresh {
                    d.listed.see(i, name);
                }
                d.fresh
            }
            None => {
                self.root_listed.see(i, name);
                false
            }
        };
        if let EntryKind::File { .. } = self.entries[i].kind
            && !fresh
        {
            match self.plan.actions[i] {
                FileAction::Keep => return Ok(()),
                FileAction::Touch => {
                    self.touched.push(i);
                    return Ok(());
                }
                FileAction::Compare => return self.start_comparing(i),
                FileAction::Write => {}
            }
        }
        let name = OsStr::from_bytes(split_path(&self.entries[i].path).1).to_os_string();
        self.open_visited_dirs()?;
        let parent = parent_fd(&self.open_dirs, &self.root);
        let entry = &self.entries[i];
        let existing = match fresh {
            true => None,
            false => match rustix::fs::statat(parent, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Some(st),
                Err(Errno::NOENT) => None,
                Err(e) => return Err(e.into()),
            },
        };
        let is_dir = |st: &rustix::fs::Stat| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
        };
        // Where a new node goes: its own name inside a staged tree, a temp name beside
        // what it replaces otherwise.
        let mut staged = None;
        match &entry.kind {
            EntryKind::Dir => {
                let n = self.dirs_visited;
                self.dirs_visited += 1;
                let opened = match &existing {
                    Some(st) if is_dir(st) => {
                        let mode = (st.st_mode as u32) & 0o7777;
                        let mtime = (st.st_mtime as i64, st.st_mtime_nsec as u32);
                        let mut dirty = mode != entry.mode & MODE_MASK
                            || mtime != (entry.mtime, entry.mtime_nsec);
                        let unlock = mode & 0o700 != 0o700;
                        let listed = self.listings.as_ref().and_then(|l| l.take(n, st));
                        let fd = match listed.is_none() || unlock {
                            true => Some(open_dir(parent, &name)?),
                            false => None,
                        };
                        if unlock {
                            let fd = fd.as_ref().expect("opened to unlock");
                            self.changed_dirs.push((entry.path.clone(), mode, mtime));
                            rustix::fs::fchmod(fd, Mode::from_raw_mode((mode | 0o700) as _))?;
                            dirty = true;
                        }
                        let names = match listed {
                            Some(names) => names,
                            None => list_names(fd.as_ref().expect("opened to list").as_fd())?,
                        };
                        let stamp = Stamp::of_stat(st);
                        OpenDir {
                            entry: i,
                            fd,
                            identity: (stamp.dev, stamp.ino),
                            fresh: false,
                            listed: Listed::new(names),
                            dirty,
                            before: (mode, mtime),
                            noted: unlock,
                        }
                    }
                    _ => {
                        if let Some(listings) = &self.listings {
                            listings.pass(n);
                        }
                        let at = match fresh {
                            true => name.clone(),
                            false => temp::new_name(),
                        };
                        rustix::fs::mkdirat(parent, &at, Mode::from_raw_mode(0o700))?;
                        let fd = Some(open_dir(parent, &at).inspect_err(|_| {
                            let _ = rustix::fs::unlinkat(parent, &at, AtFlags::REMOVEDIR);
                        })?);
                        if !fresh {
                            staged = Some(at.clone());
                        }
                        OpenDir {
                            entry: i,
                            fd,
                            identity: (0, 0),
                            fresh: true,
                            listed: Listed::default(),
                            dirty: false,
                            before: (0, (0, 0)),
                            noted: true,
                        }
                    }
                };
                if let Some(at) = staged {
                    self.stage(i, at);
                }
                self.open_dirs.push(opened);
            }
            EntryKind::Symlink { target } => {
                if let Some(st) = &existing {
                    let same_target = rustix::fs::readlinkat(parent, &name, Vec::new())
                        .is_ok_and(|t| t.as_bytes() == &target[..]);
                    let same_time = (st.st_mtime as i64, st.st_mtime_nsec as u32)
                        == (entry.mtime, entry.mtime_nsec);
                    if same_target && same_time {
                        return Ok(());
                    }
                }
                let at = match fresh {
                    true => name.clone(),
                    false => temp::new_name(),
                };
                rustix::fs::symlinkat(OsStr::from_bytes(target), parent, &at)?;
                let times = timestamps(entry.mtime, entry.mtime_nsec);
                let _ = rustix::fs::utimensat(parent, &at, &times, AtFlags::SYMLINK_NOFOLLOW);
                if !fresh {
                    self.stage(i, at);
                }
            }
            EntryKind::File { size } => {
                let at = match fresh {
                    true => name.clone(),
                    false => temp::new_name(),
                };
                let file = self.create_file(parent, &at, entry)?;
                let size = *size;
                if !fresh {
                    self.stage(i, at);
                }
                let file = OpenFile {
                    entry: i,
                    file,
                    left: size,
                };
                match size {
                    0 => self.close_file(file)?,
                    _ => self.file = Some(Receiving::Write(file)),
                }
            }
        }
        Ok(())
    }

    /// Creates the file `at` in `parent` for `entry`, exclusively and never through a
    /// symlink.
    fn create_file(
        &self,
        parent: BorrowedFd<'_>,
        at: &OsStr,
        entry: &Entry,
    ) -> anyhow::Result<File> {
        let fd = rustix::fs::openat(
            parent,
            at,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            permissions(entry.mode),
        )
        .map_err(|e| match e {
            Errno::EXIST => anyhow::anyhow!(
                "another entry already created this name on the filesystem of {} (it folds names); this tree cannot be restored there",
                self.dest.display()
            ),
            e => e.into(),
        })?;
        Ok(File::from(fd))
    }

    /// Opens the existing file of entry `i` to compare it with the bytes that come for
    /// it (see [`FileAction::Compare`]).
    fn start_comparing(&mut self, i: usize) -> anyhow::Result<()> {
        self.open_visited_dirs()?;
        let parent = parent_fd(&self.open_dirs, &self.root);
        let name = OsStr::from_bytes(split_path(&self.entries[i].path).1);
        let existing = rustix::fs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let k = self
            .plan
            .compare
            .binary_search_by_key(&i, |(entry, _)| *entry as usize)
            .expect("a file to compare has its ranges");
        let mut rest = std::mem::take(&mut self.plan.compare[k].1).into_iter();
        self.file = Some(Receiving::Compare(Comparing {
            entry: i,
            existing: File::from(existing),
            next: rest.next().unwrap_or(0..0),
            rest,
            copy: None,
        }));
        if let Some(Receiving::Compare(c)) = &self.file
            && c.next.is_empty()
        {
            self.complete_receiving()?;
        }
        Ok(())
    }

    /// Hands `bytes`, from offset `from` of the file receiving, to it: written, or
    /// compared with what the file holds. Returns whether it has all it takes.
    fn receive(&mut self, from: u64, bytes: &[u8]) -> anyhow::Result<bool> {
        let differs = match self.file.as_mut().expect("a file is receiving") {
            Receiving::Write(f) => {
                let path = &self.entries[f.entry].path;
                f.file
                    .write_all(bytes)
                    .with_context(|| format!("cannot write {}", show(path)))?;
                f.left -= bytes.len() as u64;
                return Ok(f.left == 0);
            }
            Receiving::Compare(c) if c.copy.is_none() => {
                self.compare_buf.resize(bytes.len(), 0);
                c.existing
                    .read_exact_at(&mut self.compare_buf, from)
                    .with_context(|| {
                        format!("cannot read {}", show(&self.entries[c.entry].path))
                    })?;
                self.compare_buf != bytes
            }
            Receiving::Compare(_) => false,
        };
        if differs {
            self.copy_existing()?;
        }
        let Some(Receiving::Compare(c)) = self.file.as_mut() else {
            unreachable!("compared above");
        };
        if let Some(copy) = &c.copy {
            copy.write_all_at(bytes, from)
                .with_context(|| format!("cannot write {}", show(&self.entries[c.entry].path)))?;
        }
        c.next.start += bytes.len() as u64;
        if c.next.is_empty() {
            match c.rest.next() {
                Some(next) => c.next = next,
                None => return Ok(true),
            }
        }
        Ok(false)
    }

    /// The file being compared holds other bytes than the new tree's: it is written
    /// after all, staged beside it as any other, starting as a copy of it (its bytes
    /// outside the ranges still to come are the new tree's: the ranges compared so far
    /// were equal, and the rest lie in chunks the record says it holds).
    fn copy_existing(&mut self) -> anyhow::Result<()> {
        let Some(Receiving::Compare(c)) = &self.file else {
            unreachable!("only a file being compared is copied");
        };
        let (i, size) = (c.entry, file_size(&self.entries[c.entry]));
        let parent = parent_fd(&self.open_dirs, &self.root);
        let at = temp::new_name();
        let copy = self.create_file(parent, &at, &self.entries[i])?;
        self.stage(i, at);
        let Some(Receiving::Compare(c)) = self.file.as_mut() else {
            unreachable!("checked above");
        };
        let copied = io::copy(&mut &c.existing, &mut &copy)
            .with_context(|| format!("cannot copy {}", show(&self.entries[i].path)))?;
        if copied != size {
            bail!(
                "{} changed while it was compared; run the restore again",
                show(&self.entries[i].path)
            );
        }
        c.copy = Some(copy);
        self.plan.actions[i] = FileAction::Write;
        Ok(())
    }

    /// The file receiving has all it takes: a written one gets its mode and times; a
    /// compared one is kept (or touched) if it held the new bytes all along.
    fn complete_receiving(&mut self) -> anyhow::Result<()> {
        let c = match self.file.take().expect("a file is receiving") {
            Receiving::Write(f) => return self.close_file(f),
            Receiving::Compare(c) => c,
        };
        let (i, size) = (c.entry, file_size(&self.entries[c.entry]));
        // What was compared (and copied) must be what the record vouched for all along.
        let st = rustix::fs::fstat(&c.existing)?;
        if Some(Stamp::of_stat(&st)) != self.plan.kept_stamp(i) {
            bail!(
                "{} changed while it was compared; run the restore again",
                show(&self.entries[i].path)
            );
        }
        if let Some(copy) = c.copy {
            self.written_bytes += size;
            return self.close_file(OpenFile {
                entry: i,
                file: copy,
                left: 0,
            });
        }
        // The field types of `stat` differ between systems.
        #[allow(clippy::unnecessary_cast)]
        let (mode, mtime) = (
            st.st_mode as u32,
            (st.st_mtime as i64, st.st_mtime_nsec as u32),
        );
        let same_meta = has_meta(mode, mtime, &self.entries[i]);
        self.plan.actions[i] = match same_meta {
            true => FileAction::Keep,
            false => {
                self.touched.push(i);
                FileAction::Touch
            }
        };
        self.kept_files += 1;
        self.kept_bytes += size;
        Ok(())
    }

    /// Notes that `at` beside entry `i` replaces it at the end; its directory then
    /// changes.
    fn stage(&mut self, i: usize, at: OsString) {
        self.staged.push((i, at));
        if let Some(parent) = self.open_dirs.last_mut() {
            parent.dirty = true;
            if !parent.noted {
                parent.noted = true;
                let (mode, mtime) = parent.before;
                let path = self.entries[parent.entry].path.clone();
                self.changed_dirs.push((path, mode, mtime));
            }
        }
    }

    fn close_file(&mut self, f: OpenFile) -> anyhow::Result<()> {
        let e = &self.entries[f.entry];
        complete_file(f.file.as_fd(), e)?;
        // Inside a staged tree the stamp is final (moving a directory leaves its
        // files' stamps alone); a file staged beside its place gets a new ctime when
        // renamed, so its stamp is taken then.
        if let Ok(meta) = f.file.metadata() {
            self.stamps.insert(f.entry, Stamp::of(&meta));
        }
        Ok(())
    }

    /// A directory is done: a new one gets its mode and times now; what an existing
    /// one holds that the new tree lacks is noted for removal.
    fn close_dir(&mut self, mut d: OpenDir) -> anyhow::Result<()> {
        if d.fresh {
            let e = &self.entries[d.entry];
            let fd = d.fd.as_ref().expect("a new directory is open");
            return finalize(fd.as_fd(), e)
                .with_context(|| format!("cannot set the mode and time of {}", show(&e.path)));
        }
        let listed = std::mem::take(&mut d.listed);
        let mut unseen = listed.unseen();
        if !unseen.is_empty() {
            let fd = match d.fd.take() {
                Some(fd) => fd,
                // Its parent, on top of the stack again, was opened to visit it.
                None => self.open_existing(self.open_dirs.last(), &d)?,
            };
            retain_extras(fd.as_fd(), &mut unseen, listed.unlisted(&self.entries));
            self.retain_included(fd.as_fd(), &self.entries[d.entry].path, &mut unseen);
        }
        let e = &self.entries[d.entry];
        if d.dirty || !unseen.is_empty() {
            self.existing_dirs.push(d.entry);
        }
        let path = e.path.clone();
        for name in unseen {
            self.extras.push((path.clone(), name));
        }
        Ok(())
    }

    /// Opens the directory on top of the stack if nothing has needed its handle yet:
    /// an entry in it is about to be looked at or written. (Its parents were opened to
    /// visit it.)
    fn open_visited_dirs(&mut self) -> anyhow::Result<()> {
        let Some(k) = self.open_dirs.len().checked_sub(1) else {
            return Ok(());
        };
        if self.open_dirs[k].fd.is_none() {
            let parent = k.checked_sub(1).map(|p| &self.open_dirs[p]);
            let fd = self.open_existing(parent, &self.open_dirs[k])?;
            self.open_dirs[k].fd = Some(fd);
        }
        Ok(())
    }

    /// Opens the existing directory `d` through `parent` (the root when none), which
    /// must be the directory it was when visited: its listing was taken for that one.
    fn open_existing(&self, parent: Option<&OpenDir>, d: &OpenDir) -> anyhow::Result<OwnedFd> {
        let parent = match parent {
            Some(p) => p.fd.as_ref().expect("a parent is opened to visit").as_fd(),
            None => self.root.as_fd(),
        };
        let path = &self.entries[d.entry].path;
        let (_, name) = split_path(path);
        let fd = open_dir(parent, OsStr::from_bytes(name))
            .with_context(|| format!("cannot open {}", show(path)))?;
        let now = Stamp::of_stat(&rustix::fs::fstat(&fd)?);
        if (now.dev, now.ino) != d.identity {
            bail!("{} was replaced during the restore", show(path));
        }
        Ok(fd)
    }

    /// Keeps in `unseen` (names in the directory `dir` at `path` that the new tree
    /// lacks) only those its upload did not exclude: the others are left alone.
    fn retain_included(&self, dir: BorrowedFd<'_>, path: &[u8], unseen: &mut Vec<OsString>) {
        if self.keep.is_empty() {
            return;
        }
        unseen.retain(|name| {
            !self
                .keep
                .excludes_at(dir, name, &join_path(path, name.as_bytes()))
        });
    }

    /// Visits the entries left, then puts every staged entry in place, removes what
    /// the new tree lacks, and gives existing directories their new mode and times.
    /// Returns the entries and each file's stamp (stream order) for the new tree
    /// state (kept files keep theirs, written and touched ones are stamped once in
    /// place), with what was kept and written.
    pub fn finish(mut self) -> anyhow::Result<Updated> {
        self.feed_local_chunks()?;
        self.advance()?;
        if let Some(f) = &self.file {
            bail!(
                "the content stream ended short of {}",
                show(&self.entries[f.entry()].path)
            );
        }
        while let Some(d) = self.open_dirs.pop() {
            self.close_dir(d)?;
        }
        if crate::ui::cancelled() {
            bail!("cancelled; {} left as it was", self.dest.display());
        }
        if self.mirror {
            let listed = std::mem::take(&mut self.root_listed);
            let mut unseen = listed.unseen();
            retain_extras(
                self.root.as_fd(),
                &mut unseen,
                listed.unlisted(&self.entries),
            );
            self.retain_included(self.root.as_fd(), &[], &mut unseen);
            self.extras
                .extend(unseen.into_iter().map(|n| (Vec::new(), n)));
        }
        self.commit().with_context(|| {
            format!(
                "cannot put the restored entries in place in {}",
                self.dest.display()
            )
        })?;
        Ok(Updated {
            stamps: self.plan.stamps(&self.entries, &self.stamps),
            entries: std::mem::take(&mut self.entries),
            kept_files: self.kept_files,
            kept_bytes: self.kept_bytes,
            written_bytes: self.written_bytes,
        })
    }

    fn commit(&mut self) -> anyhow::Result<()> {
        let mut dirs = DirWalker::new(self.root.as_fd());
        while self.committed < self.staged.len() {
            let (i, at) = &self.staged[self.committed];
            let entry = &self.entries[*i];
            let (parent, name) = split_path(&entry.path);
            let parent = dirs.open(parent)?;
            let name = OsStr::from_bytes(name);
            replace(parent, at, name, matches!(entry.kind, EntryKind::Dir))
                .with_context(|| format!("cannot move {} into place", show(&entry.path)))?;
            self.committed += 1;
            if let Some(written) = self.stamps.remove(i) {
                // The stamp of what is there now, if it is still the file written.
                let now = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| Stamp::of_stat(&st));
                if let Ok(now) = now
                    && (now.dev, now.ino, now.size, now.mtime)
                        == (written.dev, written.ino, written.size, written.mtime)
                {
                    self.stamps.insert(*i, now);
                }
            }
        }
        for &i in &self.touched {
            let e = &self.entries[i];
            let (parent, name) = split_path(&e.path);
            let parent = dirs.open(parent)?;
            let planned = self.plan.kept_stamp(i);
            let touched = rustix::fs::openat(
                parent,
                OsStr::from_bytes(name),
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io::Error::from)
            .and_then(|fd| {
                // Only the file the plan found: one changed since is not vouched for.
                if Some(Stamp::of_stat(&rustix::fs::fstat(&fd)?)) != planned {
                    return Ok(None);
                }
                finalize(fd.as_fd(), e)?;
                Ok(Some(Stamp::of_stat(&rustix::fs::fstat(&fd)?)))
            });
            let touched = touched
                .with_context(|| format!("cannot set the mode and time of {}", show(&e.path)))?;
            match touched {
                Some(stamp) => {
                    self.stamps.insert(i, stamp);
                }
                None => crate::ui::warn(format!(
                    "{} changed during the restore; left as it is",
                    show(&e.path)
                )),
            }
        }
        for (parent, name) in &self.extras {
            let fd = dirs.open(parent)?;
            let path = join_path(parent, name.as_bytes());
            // The new tree is in place: what cannot be removed (another user's file)
            // stays, and the restore stands.
            if let Err(e) = remove_keeping(fd, name, &path, &self.keep) {
                crate::ui::warn(format!("restored, but {e:#}"));
            }
        }
        // Deepest first: `existing_dirs` lists directories as they were closed, so
        // children come before parents already.
        for &i in &self.existing_dirs {
            let e = &self.entries[i];
            let fd = dirs.open(&e.path)?;
            finalize(fd, e)
                .with_context(|| format!("cannot set the mode and time of {}", show(&e.path)))?;
        }
        self.changed_dirs.clear();
        Ok(())
    }
}

impl TreeUpdate {
    /// Routes stream bytes from offset `at` to the file receiving them (written or
    /// compared), skipping those of other files that share its chunks.
    fn route(&mut self, mut at: u64, mut piece: &[u8]) -> io::Result<()> {
        while let Some(receiving) = self.file.as_ref() {
            if piece.is_empty() {
                break;
            }
            let entry = receiving.entry();
            let (from, room) = receiving.expecting(file_size(&self.entries[entry]));
            let wanted = self.plan.offsets[entry] + from;
            if at < wanted {
                let skip = piece.len().min((wanted - at) as usize);
                (piece, at) = (&piece[skip..], at + skip as u64);
                continue;
            }
            if at > wanted {
                return Err(io::Error::other("the content stream is out of step"));
            }
            let m = piece.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            let complete = self
                .receive(from, &piece[..m])
                .map_err(|e| io::Error::other(format!("{e:#}")))?;
            (piece, at) = (&piece[m..], at + m as u64);
            if complete {
                self.complete_receiving()
                    .and_then(|()| self.advance())
                    .map_err(|e| io::Error::other(format!("{e:#}")))?;
            }
        }
        Ok(())
    }

    /// Feeds the needed chunks that come from files of DIR, up to the next one the
    /// bucket sends.
    fn feed_local_chunks(&mut self) -> io::Result<()> {
        while self.within == 0 {
            let Some(&needed) = self.plan.needed.get(self.chunk) else {
                break;
            };
            let Source::Local(old_at) = needed.source else {
                break;
            };
            let data = self.read_recorded(old_at, needed.len)?;
            if crate::chunk::Id::of(&data) != needed.id {
                return Err(io::Error::other(format!(
                    "a file of {} changed while it was read; run the restore again",
                    self.dest.display()
                )));
            }
            self.route(needed.at, &data)?;
            self.chunk += 1;
        }
        Ok(())
    }

    /// `len` bytes from offset `at` of the recorded stream, read from the files that
    /// held them (the plan checked that they still do).
    fn read_recorded(&self, at: u64, len: u64) -> io::Result<Vec<u8>> {
        let files = &self.plan.local_files;
        let first = files.partition_point(|f| f.1 <= at).saturating_sub(1);
        let mut out = vec![0u8; len as usize];
        let mut done = 0u64;
        for (path, start, size) in &files[first..] {
            if done == len {
                break;
            }
            let from = at + done - start;
            if from >= *size {
                continue;
            }
            let n = (size - from).min(len - done);
            open_regular(path)?
                .read_exact_at(&mut out[done as usize..(done + n) as usize], from)?;
            done += n;
        }
        if done < len {
            return Err(io::Error::other(
                "the recorded tree is shorter than its record",
            ));
        }
        Ok(out)
    }
}

impl Write for TreeUpdate {
    /// Takes the next bytes of the chunks fetched from the bucket, in order.
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            self.feed_local_chunks()?;
            let Some(&needed) = self.plan.needed.get(self.chunk) else {
                return Err(io::Error::other("more content than the update needs"));
            };
            let n = rest.len().min((needed.len - self.within) as usize);
            self.route(needed.at + self.within, &rest[..n])?;
            self.within += n as u64;
            if self.within == needed.len {
                (self.chunk, self.within) = (self.chunk + 1, 0);
            }
            rest = &rest[n..];
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for TreeUpdate {
    /// Removes what an unfinished update staged and gives the directories it changed
    /// their mode and mtime back: DIR is as it was (or, if putting things in place
    /// failed part way, each path is old or new).
    fn drop(&mut self) {
        self.file = None;
        self.open_dirs.clear();
        let mut dirs = DirWalker::new(self.root.as_fd());
        for (i, at) in &self.staged[self.committed..] {
            let (parent, _) = split_path(&self.entries[*i].path);
            if let Ok(fd) = dirs.open(parent) {
                let _ = temp::remove_tree(fd, at);
            }
        }
        for (path, mode, (secs, nsec)) in self.changed_dirs.iter().rev() {
            if let Ok(fd) = dirs.open(path) {
                let _ = rustix::fs::fchmod(fd, Mode::from_raw_mode(*mode as _));
                let _ = rustix::fs::futimens(fd, &timestamps(*secs, *nsec));
            }
        }
    }
}

/// On a filesystem that ignores case (probed in DIR), refuses a tree with two names in
/// one directory that differ only in case, before anything is staged: renamed into
/// place one after the other, the second would silently replace the first. (A fresh
/// restore finds the same through its exclusive creates.) Names that differ only in
/// Unicode normalization (which APFS also folds) and subdirectories with a folding
/// attribute of their own (ext4 `+F`) are not detected.
fn refuse_folded_names(root: BorrowedFd<'_>, entries: &[Entry], dest: &Path) -> anyhow::Result<()> {
    let probe = format!("{NEW_PREFIX}case-{}", temp::unique_tag());
    let created = rustix::fs::openat(
        root,
        probe.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    );
    // A DIR where the probe cannot be made is taken to fold: the check then only
    // refuses trees that could not be restored on such a filesystem anyway.
    let folds = created.is_err()
        || rustix::fs::statat(
            root,
            probe.to_uppercase().as_str(),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok();
    if created.is_ok() {
        let _ = rustix::fs::unlinkat(root, probe.as_str(), AtFlags::empty());
    }
    if !folds {
        return Ok(());
    }
    let mut seen: HashMap<(&[u8], String), &[u8]> = HashMap::new();
    for e in entries {
        let (parent, name) = split_path(&e.path);
        let folded = String::from_utf8_lossy(name).to_lowercase();
        if let Some(other) = seen.insert((parent, folded), &e.path) {
            bail!(
                "{} and {} name the same file on the filesystem of {} (it ignores case); this tree cannot be restored there",
                show(other),
                show(&e.path),
                dest.display()
            );
        }
    }
    Ok(())
}

/// Keeps in `unseen` (names in `dir` the new tree lacks) only true extras: on a
/// filesystem that folds case, `Foo` on disk is the tree's `foo` (one of `unlisted`,
/// the tree's names the listing did not hold as spelled), and removing it would remove
/// the tree's own entry. A name listed as spelled is no such alias, so another name of
/// the same file (a hard link, as cargo makes in `target/`) is an extra.
fn retain_extras<'a>(
    dir: BorrowedFd<'_>,
    unseen: &mut Vec<OsString>,
    unlisted: impl Iterator<Item = &'a OsStr>,
) {
    if unseen.is_empty() {
        return;
    }
    let identity = |name: &OsStr| {
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| (st.st_dev, st.st_ino))
    };
    let ours: HashSet<_> = unlisted.filter_map(identity).collect();
    unseen.retain(|n| identity(n).is_none_or(|id| !ours.contains(&id)));
}

/// Removes `name` in `parent` (at `path` in the tree), but for what `keep` excludes
/// below it: a directory holding such paths stays, with them and its mode, and only
/// the rest goes. Whether anything stayed. On an error, what could not be removed
/// stays as it was, and its directories keep their modes.
fn remove_keeping(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    path: &[u8],
    keep: &Exclude,
) -> anyhow::Result<bool> {
    let cannot = || format!("cannot remove {}", show(path));
    let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW).with_context(cannot)?;
    let is_dir = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory;
    if keep.is_empty() || !is_dir {
        temp::remove_tree(parent, name).with_context(cannot)?;
        return Ok(false);
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o700 != 0o700 {
        // Not through a handle: a directory without owner read cannot be opened first.
        rustix::fs::chmodat(parent, name, Mode::from_raw_mode(0o700), AtFlags::empty())
            .with_context(cannot)?;
    }
    let dir = open_dir(parent, name).with_context(cannot)?;
    let removed = (|| {
        let mut kept = false;
        for child in list_names(dir.as_fd()).with_context(cannot)? {
            let child_path = join_path(path, child.as_bytes());
            if keep.excludes_at(dir.as_fd(), &child, &child_path) {
                kept = true;
            } else {
                kept |= remove_keeping(dir.as_fd(), &child, &child_path, keep)?;
            }
        }
        anyhow::Ok(kept)
    })();
    match removed {
        Ok(false) => rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR).with_context(cannot)?,
        // The directory stays: with its mode, and no mtime to keep (it lost entries).
        _ => {
            let _ = rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode));
        }
    }
    removed
}

/// Moves the staged `at` over `name` in `parent`. A file replaces a file or symlink in
/// one rename; where a directory is involved, the old entry is moved aside first and
/// removed after.
fn replace(parent: BorrowedFd<'_>, at: &OsStr, name: &OsStr, new_is_dir: bool) -> io::Result<()> {
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(crate::restore::rename_noreplace(parent, at, parent, name)?),
        Ok(st)
            if new_is_dir
                || rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::Directory =>
        {
            let aside = OsString::from(format!("{ASIDE_PREFIX}{}", temp::unique_tag()));
            rustix::fs::renameat(parent, name, parent, &aside)?;
            if let Err(e) = rustix::fs::renameat(parent, at, parent, name) {
                let _ = rustix::fs::renameat(parent, &aside, parent, name);
                return Err(e.into());
            }
            temp::remove_tree(parent, &aside)
        }
        Ok(_) => Ok(rustix::fs::renameat(parent, at, parent, name)?),
        Err(e) => Err(e.into()),
    }
}

/// Opens directories of the tree by relative path, never through a symlink, keeping
/// the handles of the last path's ancestors for the next one.
struct DirWalker<'a> {
    root: BorrowedFd<'a>,
    open: Vec<(Vec<u8>, OwnedFd)>,
}

impl<'a> DirWalker<'a> {
    fn new(root: BorrowedFd<'a>) -> DirWalker<'a> {
        DirWalker {
            root,
            open: Vec::new(),
        }
    }

    fn open(&mut self, path: &[u8]) -> io::Result<BorrowedFd<'_>> {
        while let Some((top, _)) = self.open.last() {
            let ancestor =
                path == &top[..] || (path.starts_with(top) && path.get(top.len()) == Some(&b'/'));
            if ancestor {
                break;
            }
            self.open.pop();
        }
        let done = self.open.last().map_or(0, |(p, _)| p.len());
        if done < path.len() {
            let rest = &path[done..];
            let rest = rest.strip_prefix(b"/").unwrap_or(rest);
            for component in rest.split(|&b| b == b'/') {
                let fd = {
                    let parent = self.open.last().map_or(self.root, |(_, fd)| fd.as_fd());
                    open_dir(parent, OsStr::from_bytes(component))?
                };
                let so_far = match self.open.last() {
                    Some((p, _)) => join_path(p, component),
                    None => component.to_vec(),
                };
                self.open.push((so_far, fd));
            }
        }
        Ok(self.open.last().map_or(self.root, |(_, fd)| fd.as_fd()))
    }
}
