//! Bringing a directory that holds a tree cacher recorded (see [`crate::state`]) up to
//! date with another entry, fetching and writing only what differs.
//!
//! - A file is kept as it is when its stamp matches the record (so it holds the
//!   recorded bytes), its mode and mtime are the new entry's, and the recorded and the
//!   new stream cover it with the same chunks at the same alignment (a chunk id is the
//!   hash of its bytes, so the bytes are the same). Only the chunks of the other files
//!   are fetched.
//! - Everything else is staged next to where it goes (`.cacher-new-*` files, symlinks
//!   and whole new directory trees, each created exclusively and never through a
//!   symlink) while those chunks are fetched and verified. Only then are the staged
//!   entries renamed into place, each replacing what was there, and paths the new tree
//!   lacks removed below its top-level entries, so DIR ends exactly as a fresh restore
//!   leaves it. A failure before that leaves DIR as it was; one during it leaves every
//!   path either old or new, never partial.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rayon::prelude::*;
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::chunk::format::{ChunkRef, ChunkTable, Entry, EntryKind, Manifest, show};
use crate::chunk::store::{location, table_of};
use crate::restore::{
    MODE_MASK, check_space, finalize, list_names, open_dir, permissions, split_path,
    timestamps, umask,
};
use crate::state::{Stamp, TreeState};
use crate::temp::{self, ASIDE_PREFIX, NEW_PREFIX};

/// What an update does with a file of the new tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileAction {
    /// Fetch its bytes and write it.
    Write,
    /// It holds the right bytes: leave it as it is.
    Keep,
    /// It holds the right bytes with another mode or mtime: set those.
    Touch,
}

/// What an update keeps and what it must fetch.
pub struct Plan {
    /// Per entry of the new tree (files; others `Write`).
    actions: Vec<FileAction>,
    /// Per entry: where its bytes start in the new stream (files).
    offsets: Vec<u64>,
    /// The chunks of the new stream that cover files to write, in stream order.
    pub table: ChunkTable,
    /// Stream offset and length of each chunk of `table`.
    needed: Vec<(u64, u64)>,
    /// Files kept, and their bytes.
    pub kept_files: u64,
    pub kept_bytes: u64,
    /// Bytes of the files to write.
    pub write_bytes: u64,
    /// The current stamp of each kept file, by entry.
    kept: HashMap<usize, Stamp>,
}

/// A file's current stamp and whether its mode and mtime are the new entry's.
type Found = (Stamp, bool);

impl Plan {
    /// Each file's stamp for the record of the updated tree, in stream order: the
    /// kept ones still hold what the record said; written ones were renamed into place
    /// just now, which makes their stamps too recent to vouch for.
    pub fn stamps(&self, entries: &[Entry]) -> Vec<Option<Stamp>> {
        entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.kind, EntryKind::File { .. }))
            .map(|(i, _)| self.kept.get(&i).copied())
            .collect()
    }
}

/// Decides which files of `new` that `dir` (holding the tree `state` records) already
/// holds, by one `lstat` per file.
pub fn plan(dir: &Path, state: &TreeState, new: &Manifest) -> Plan {
    let old = Stream::of(&state.manifest.table);
    let fresh = Stream::of(&new.table);
    let mut recorded: HashMap<&[u8], (u64, Stamp)> = HashMap::new();
    let mut at = 0u64;
    let mut stamps = state.stamps.iter();
    for e in &state.manifest.entries {
        if let EntryKind::File { size } = e.kind {
            if let Some(Some(stamp)) = stamps.next() {
                recorded.insert(&e.path, (at, *stamp));
            }
            at += size;
        }
    }
    let mut offsets = vec![0u64; new.entries.len()];
    let mut files = Vec::new();
    let mut at = 0u64;
    for (i, e) in new.entries.iter().enumerate() {
        if let EntryKind::File { size } = e.kind {
            offsets[i] = at;
            files.push((i, at, size));
            at += size;
        }
    }
    let found: HashMap<usize, Found> = files
        .par_iter()
        .filter_map(|&(i, at, size)| {
            let e = &new.entries[i];
            let (old_at, stamp) = recorded.get(&e.path[..])?;
            let meta = std::fs::symlink_metadata(dir.join(OsStr::from_bytes(&e.path))).ok()?;
            let same_bytes = Stamp::of(&meta) == *stamp
                && meta.file_type().is_file()
                && old.same_bytes(*old_at, &fresh, at, size);
            let same_meta = meta.mode() & MODE_MASK == e.mode & MODE_MASK
                && (meta.mtime(), meta.mtime_nsec() as u32) == (e.mtime, e.mtime_nsec);
            // Touching opens the file for reading, which its owner may not be allowed.
            let touchable = meta.mode() & 0o400 != 0;
            (same_bytes && (same_meta || touchable)).then_some((i, (*stamp, same_meta)))
        })
        .collect();
    let mut actions = vec![FileAction::Write; new.entries.len()];
    let mut kept = HashMap::new();
    let mut needed_chunk = vec![false; new.table.chunks.len()];
    let (mut kept_files, mut kept_bytes, mut write_bytes) = (0, 0, 0);
    for &(i, at, size) in &files {
        if let Some(&(stamp, same_meta)) = found.get(&i) {
            kept_files += 1;
            kept_bytes += size;
            actions[i] = match same_meta {
                true => {
                    kept.insert(i, stamp);
                    FileAction::Keep
                }
                false => FileAction::Touch,
            };
            continue;
        }
        write_bytes += size;
        if size == 0 {
            continue;
        }
        let mut k = fresh.chunk_at(at);
        while k < fresh.starts.len() && fresh.starts[k] < at + size {
            needed_chunk[k] = true;
            k += 1;
        }
    }
    let mut needed = Vec::new();
    let chosen: Vec<&ChunkRef> = new
        .table
        .chunks
        .iter()
        .enumerate()
        .filter(|(k, _)| needed_chunk[*k])
        .map(|(k, c)| {
            needed.push((fresh.starts[k], u64::from(c.len)));
            c
        })
        .collect();
    let table = table_of(
        chosen
            .into_iter()
            .map(|c| (c.id, location(new.table.packs[c.pack as usize], c))),
    );
    Plan {
        actions,
        offsets,
        table,
        needed,
        kept_files,
        kept_bytes,
        write_bytes,
        kept,
    }
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

/// A directory of the new tree, open while its entries are visited.
struct OpenDir {
    entry: usize,
    fd: OwnedFd,
    /// Created by this update inside a staged tree: everything below is new too.
    fresh: bool,
    /// For a directory that existed: the names in it not (yet) in the new tree.
    unseen: HashSet<OsString>,
}

/// The file receiving content.
struct OpenFile {
    entry: usize,
    file: File,
    left: u64,
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
    file: Option<OpenFile>,
    /// Remove top-level entries the new tree lacks (`--delete`).
    mirror: bool,
    root_unseen: HashSet<OsString>,
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
    /// Existing directories given owner write permission for the update, with their
    /// mode before, to put back if it fails.
    unlocked: Vec<(Vec<u8>, u32)>,
}

impl TreeUpdate {
    /// Opens `dest`, refuses an update whose new files its filesystem has no room for,
    /// and visits entries up to the first file to write.
    pub fn create(
        dest: &Path,
        entries: Vec<Entry>,
        plan: Plan,
        mirror: bool,
    ) -> anyhow::Result<TreeUpdate> {
        temp::remove_stale_leftovers(dest);
        check_space(dest, plan.write_bytes)?;
        let root = rustix::fs::open(
            dest,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("cannot open {}", dest.display()))?;
        let root_unseen = list_names(root.as_fd())
            .with_context(|| format!("cannot list {}", dest.display()))?
            .into_iter()
            .filter(|n| !temp::is_temp_name(n.as_bytes()))
            .collect();
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
            mirror,
            root_unseen,
            staged: Vec::new(),
            committed: 0,
            extras: Vec::new(),
            existing_dirs: Vec::new(),
            touched: Vec::new(),
            unlocked: Vec::new(),
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

    fn visit(&mut self, i: usize) -> anyhow::Result<()> {
        let path = self.entries[i].path.clone();
        let (parent_path, name) = split_path(&path);
        while let Some(top) = self.open_dirs.last() {
            if self.entries[top.entry].path == parent_path {
                break;
            }
            let done = self.open_dirs.pop().expect("checked above");
            self.close_dir(done)?;
        }
        if self.open_dirs.is_empty() && !parent_path.is_empty() {
            bail!("it comes before its parent directory");
        }
        let name = OsStr::from_bytes(name).to_os_string();
        let (parent, fresh) = match self.open_dirs.last_mut() {
            Some(d) => {
                d.unseen.remove(&name);
                (d.fd.as_fd(), d.fresh)
            }
            None => {
                self.root_unseen.remove(&name);
                (self.root.as_fd(), false)
            }
        };
        let entry = &self.entries[i];
        if let EntryKind::File { .. } = entry.kind
            && !fresh
        {
            match self.plan.actions[i] {
                FileAction::Keep => return Ok(()),
                FileAction::Touch => {
                    self.touched.push(i);
                    return Ok(());
                }
                FileAction::Write => {}
            }
        }
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
        let staged_name = || OsString::from(format!("{NEW_PREFIX}{:016x}", fastrand::u64(..)));
        let mut staged = None;
        match &entry.kind {
            EntryKind::Dir => {
                let opened = match &existing {
                    Some(st) if is_dir(st) => {
                        let fd = open_dir(parent, &name)?;
                        let mode = (st.st_mode as u32) & 0o7777;
                        if mode & 0o700 != 0o700 {
                            rustix::fs::fchmod(&fd, Mode::from_raw_mode((mode | 0o700) as _))?;
                            self.unlocked.push((entry.path.clone(), mode));
                        }
                        let unseen = list_names(fd.as_fd())?.into_iter().collect();
                        self.existing_dirs.push(i);
                        OpenDir {
                            entry: i,
                            fd,
                            fresh: false,
                            unseen,
                        }
                    }
                    _ => {
                        let at = match fresh {
                            true => name.clone(),
                            false => staged_name(),
                        };
                        rustix::fs::mkdirat(parent, &at, Mode::from_raw_mode(0o700))?;
                        if !fresh {
                            staged = Some(at.clone());
                        }
                        OpenDir {
                            entry: i,
                            fd: open_dir(parent, &at)?,
                            fresh: true,
                            unseen: HashSet::new(),
                        }
                    }
                };
                if let Some(at) = staged {
                    self.staged.push((i, at));
                }
                self.open_dirs.push(opened);
            }
            EntryKind::Symlink { target } => {
                if existing.is_some() {
                    let same_target = rustix::fs::readlinkat(parent, &name, Vec::new())
                        .is_ok_and(|t| t.as_bytes() == &target[..]);
                    let st = existing.as_ref().expect("checked above");
                    let same_time = (st.st_mtime as i64, st.st_mtime_nsec as u32)
                        == (entry.mtime, entry.mtime_nsec);
                    if same_target && same_time {
                        return Ok(());
                    }
                }
                let at = match fresh {
                    true => name.clone(),
                    false => staged_name(),
                };
                rustix::fs::symlinkat(OsStr::from_bytes(target), parent, &at)?;
                let times = timestamps(entry.mtime, entry.mtime_nsec);
                let _ = rustix::fs::utimensat(parent, &at, &times, AtFlags::SYMLINK_NOFOLLOW);
                if !fresh {
                    self.staged.push((i, at));
                }
            }
            EntryKind::File { size } => {
                let at = match fresh {
                    true => name.clone(),
                    false => staged_name(),
                };
                let fd = rustix::fs::openat(
                    parent,
                    &at,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    permissions(entry.mode),
                )
                .map_err(|e| match e {
                    Errno::EXIST => anyhow::anyhow!(
                        "another entry already created this name on the filesystem of {} (it folds names); this tree cannot be restored there",
                        self.dest.display()
                    ),
                    e => e.into(),
                })?;
                let size = *size;
                if !fresh {
                    self.staged.push((i, at));
                }
                let file = OpenFile {
                    entry: i,
                    file: File::from(fd),
                    left: size,
                };
                match size {
                    0 => self.close_file(file)?,
                    _ => self.file = Some(file),
                }
            }
        }
        Ok(())
    }

    fn close_file(&self, f: OpenFile) -> anyhow::Result<()> {
        let e = &self.entries[f.entry];
        let exact = umask().is_some_and(|mask| e.mode & MODE_MASK & mask == 0);
        let fd = f.file.as_fd();
        match exact {
            true => rustix::fs::futimens(fd, &timestamps(e.mtime, e.mtime_nsec))
                .map_err(io::Error::from),
            false => finalize(fd, e),
        }
        .with_context(|| format!("cannot set the mode and time of {}", show(&e.path)))
    }

    /// A directory is done: a new one gets its mode and times now; what an existing
    /// one holds that the new tree lacks is noted for removal.
    fn close_dir(&mut self, d: OpenDir) -> anyhow::Result<()> {
        let e = &self.entries[d.entry];
        if d.fresh {
            return finalize(d.fd.as_fd(), e)
                .with_context(|| format!("cannot set the mode and time of {}", show(&e.path)));
        }
        let path = e.path.clone();
        for name in d.unseen {
            self.extras.push((path.clone(), name));
        }
        Ok(())
    }

    /// Visits the entries left, then puts every staged entry in place, removes what
    /// the new tree lacks, and gives existing directories their new mode and times.
    /// Returns the entries.
    pub fn finish(mut self) -> anyhow::Result<Vec<Entry>> {
        self.advance()?;
        if let Some(f) = &self.file {
            bail!(
                "the content stream ended {} bytes short of {}",
                f.left,
                show(&self.entries[f.entry].path)
            );
        }
        while let Some(d) = self.open_dirs.pop() {
            self.close_dir(d)?;
        }
        if crate::ui::cancelled() {
            bail!("cancelled; {} left as it was", self.dest.display());
        }
        if self.mirror {
            let unseen = std::mem::take(&mut self.root_unseen);
            self.extras.extend(unseen.into_iter().map(|n| (Vec::new(), n)));
        }
        self.commit().with_context(|| {
            format!(
                "cannot put the restored entries in place in {}",
                self.dest.display()
            )
        })?;
        Ok(std::mem::take(&mut self.entries))
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
        }
        for &i in &self.touched {
            let e = &self.entries[i];
            let (parent, name) = split_path(&e.path);
            let parent = dirs.open(parent)?;
            let touched = rustix::fs::openat(
                parent,
                OsStr::from_bytes(name),
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io::Error::from)
            .and_then(|fd| finalize(fd.as_fd(), e));
            touched.with_context(|| format!("cannot set the mode and time of {}", show(&e.path)))?;
        }
        for (parent, name) in &self.extras {
            let fd = dirs.open(parent)?;
            temp::remove_tree(fd, name).with_context(|| {
                format!("cannot remove {}", show(&join(parent, name.as_bytes())))
            })?;
        }
        for &i in self.existing_dirs.iter().rev() {
            let e = &self.entries[i];
            let fd = dirs.open(&e.path)?;
            finalize(fd, e)
                .with_context(|| format!("cannot set the mode and time of {}", show(&e.path)))?;
        }
        self.unlocked.clear();
        Ok(())
    }
}

impl Write for TreeUpdate {
    /// Takes the next bytes of the needed chunks, in order.
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            let Some(&(start, len)) = self.plan.needed.get(self.chunk) else {
                return Err(io::Error::other("more content than the update needs"));
            };
            let n = rest.len().min((len - self.within) as usize);
            let (mut piece, mut at) = (&rest[..n], start + self.within);
            while let Some(f) = self.file.as_mut() {
                if piece.is_empty() {
                    break;
                }
                let size = match self.entries[f.entry].kind {
                    EntryKind::File { size } => size,
                    _ => unreachable!("only files receive content"),
                };
                let wanted = self.plan.offsets[f.entry] + (size - f.left);
                if at < wanted {
                    // Bytes of a kept file that share a chunk with this one.
                    let skip = piece.len().min((wanted - at) as usize);
                    (piece, at) = (&piece[skip..], at + skip as u64);
                    continue;
                }
                if at > wanted {
                    return Err(io::Error::other("the content stream is out of step"));
                }
                let m = piece.len().min(usize::try_from(f.left).unwrap_or(usize::MAX));
                let path = &self.entries[f.entry].path;
                f.file.write_all(&piece[..m]).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot write {}: {e}", show(path)))
                })?;
                f.left -= m as u64;
                (piece, at) = (&piece[m..], at + m as u64);
                if f.left == 0 {
                    let f = self.file.take().expect("checked above");
                    self.close_file(f)
                        .and_then(|()| self.advance())
                        .map_err(|e| io::Error::other(format!("{e:#}")))?;
                }
            }
            self.within += n as u64;
            if self.within == len {
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
    /// Removes what an unfinished update staged and gives unlocked directories their
    /// mode back: DIR is as it was (or, if putting things in place failed part way,
    /// each path is old or new).
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
        for (path, mode) in self.unlocked.iter().rev() {
            if let Ok(fd) = dirs.open(path) {
                let _ = rustix::fs::fchmod(fd, Mode::from_raw_mode(*mode as _));
            }
        }
    }
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
            let aside = OsString::from(format!("{ASIDE_PREFIX}{:016x}", fastrand::u64(..)));
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
            let ancestor = path == &top[..]
                || (path.starts_with(top) && path.get(top.len()) == Some(&b'/'));
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
                    Some((p, _)) => join(p, component),
                    None => component.to_vec(),
                };
                self.open.push((so_far, fd));
            }
        }
        Ok(self.open.last().map_or(self.root, |(_, fd)| fd.as_fd()))
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return name.to_vec();
    }
    [parent, b"/", name].concat()
}
