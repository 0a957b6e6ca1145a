//! Rebuilding a tree inside its destination directory DIR, safely.
//!
//! - The new tree is built in a hidden temp dir inside DIR (`.cacher-restore-*`), so a
//!   restore works when DIR is a mount point, a symlink to a directory (it lands in the
//!   target), or has a parent the user cannot write.
//! - Every node is created exclusively (`O_EXCL`, `O_NOFOLLOW`) relative to its parent's
//!   open handle; a file's content, mode and times go through the handle that created
//!   it. No step resolves a restored path through a symlink, and two entries that a
//!   case-insensitive filesystem takes for one name fail instead of aliasing.
//! - Only then are the new top-level entries swapped in: same-named old entries are
//!   moved aside first and deleted once the whole new tree is in place; a failure part
//!   way moves everything back. Any failure before that removes the temp dir and leaves
//!   DIR as it was.
//! - setuid, setgid and sticky bits are never restored.
//! - Small files are gathered whole and created by writer threads (`writers`), each
//!   through its parent's handle as above; a directory's own mode and times are set
//!   once the files in it are written, and the swap waits for all of them.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::chunk::format::{Entry, EntryKind, show};
use crate::state::Stamp;
use crate::temp::{self, ASIDE_PREFIX, RESTORE_PREFIX};
use crate::ui;

mod writers;

use writers::{Failure, Parent, SmallFile, Writers};

/// Permission bits a restore applies: never setuid, setgid or sticky.
pub const MODE_MASK: u32 = 0o777;

/// A directory of the new tree still open, so its children are created through it and
/// its mode and times are set when they are done.
struct OpenDir {
    entry: usize,
    dir: Arc<Parent>,
}

/// The regular file currently receiving content.
struct OpenFile {
    entry: usize,
    /// Its number among the tree's files, in stream order.
    ordinal: usize,
    content: Content,
    left: u64,
}

enum Content {
    /// A large file, created here and written as its content arrives.
    Direct(File),
    /// A small one, gathered whole for a writer thread to create in its directory.
    Gathered(Vec<u8>, Arc<Parent>),
}

/// Directories left waiting for the writers before the restore waits for all of them
/// (plus those one entry closes at once, at most the depth of the tree): each holds a
/// handle, and macOS gives a process 256 by default.
const MAX_UNSETTLED: usize = 64;

/// What a finished restore put in place.
pub struct Finished {
    /// When the restore was done, every stamp a clock tick old (see `state::record`).
    pub done_at: std::time::SystemTime,
    /// The entries restored.
    pub entries: Vec<Entry>,
    /// Each file's stamp once complete, in stream order; a top-level file moved into
    /// DIR by the swap is stamped again where it landed (a rename changes the ctime),
    /// or `None` if what is there is no longer the file written.
    pub stamps: Vec<Option<Stamp>>,
}

/// Rebuilds a tree in a temp dir inside its destination from entries (parents first,
/// as a manifest lists them) and the content stream, which arrives in order through
/// [`Write`]; [`Restorer::finish`] swaps it into place. Dropped before that, it removes
/// what it built.
pub struct Restorer {
    dest: PathBuf,
    /// The directory the temp dir is made in: DIR, or DIR's parent when DIR is new.
    root: OwnedFd,
    root_path: PathBuf,
    /// DIR's name in `root` when DIR did not exist: the temp dir is renamed to it.
    new_name: Option<OsString>,
    created_dest: bool,
    temp_name: Option<OsString>,
    /// The temp dir, which top-level entries are created in.
    temp: Arc<Parent>,
    entries: Vec<Entry>,
    next: usize,
    open_dirs: Vec<OpenDir>,
    /// Directories complete but for files their writers are still on: their mode and
    /// times are set once those are done.
    unsettled: Vec<OpenDir>,
    file: Option<OpenFile>,
    writers: Writers,
    /// Each file's stamp once complete (see [`Restorer::finish`]).
    stamps: Vec<Option<Stamp>>,
    /// The top-level files (ordinal, entry): a swap renames them into DIR one by one.
    top_level_files: Vec<(usize, usize)>,
    /// What the swap moved into DIR that is not a directory, each stat'ed right after
    /// its rename.
    landed: HashMap<OsString, Stamp>,
    /// Remove top-level entries of DIR that the tree lacks (`--delete`).
    mirror: bool,
}

impl Restorer {
    /// Opens (or creates) `dest`, refuses a tree of `needed` bytes that its filesystem
    /// has no room for, creates the temp dir inside it, and every entry up to the first
    /// non-empty file. Entries must have been validated (see `Manifest::decode`).
    pub fn create(dest: &Path, entries: Vec<Entry>, needed: u64) -> anyhow::Result<Restorer> {
        temp::remove_stale_leftovers(dest);
        check_space(dest, needed)?;
        // A DIR that does not exist yet is built beside its place and renamed into it
        // whole: one rename instead of one per top-level entry.
        let missing = match std::fs::symlink_metadata(dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dest.display())),
            Ok(_) => false,
        };
        let new_name = dest
            .file_name()
            .filter(|_| missing)
            .map(|n| n.to_os_string());
        let created_dest = missing && new_name.is_none();
        let root_path = match &new_name {
            Some(_) => temp::parent_of(dest),
            None => dest.to_path_buf(),
        };
        if missing {
            std::fs::create_dir_all(&root_path)
                .with_context(|| format!("cannot create {}", root_path.display()))?;
        }
        let root = match rustix::fs::open(
            &root_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOTDIR) => bail!("{} exists and is not a directory", root_path.display()),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open {}", root_path.display()));
            }
        };
        let mut restorer = Restorer {
            dest: dest.to_path_buf(),
            temp: Parent::new(root.try_clone()?),
            root,
            root_path,
            new_name,
            created_dest,
            temp_name: None,
            entries,
            next: 0,
            open_dirs: Vec::new(),
            unsettled: Vec::new(),
            file: None,
            writers: Writers::start()?,
            stamps: Vec::new(),
            top_level_files: Vec::new(),
            landed: HashMap::new(),
            mirror: false,
        };
        temp::remove_stale_leftovers(&temp::parent_of(dest));
        // Restores racing into one new DIR stage side by side in its parent: the
        // name's tag tells them apart (see `temp::unique_tag`).
        let name = OsString::from(format!("{RESTORE_PREFIX}{}", temp::unique_tag()));
        rustix::fs::mkdirat(&restorer.root, &name, Mode::from_raw_mode(0o700)).with_context(
            || {
                format!(
                    "cannot create a temp dir in {}",
                    restorer.root_path.display()
                )
            },
        )?;
        restorer.temp_name = Some(name.clone());
        let temp = open_dir(restorer.root.as_fd(), &name).with_context(|| {
            format!(
                "cannot open the temp dir in {}",
                restorer.root_path.display()
            )
        })?;
        restorer.temp = Parent::new(temp);
        restorer.advance()?;
        Ok(restorer)
    }

    /// Also removes the top-level entries of DIR that the tree lacks, once it is in
    /// place, so DIR mirrors it (`--delete`).
    pub fn mirror(&mut self) {
        self.mirror = true;
    }

    /// Where a legacy archive may be unpacked by path (it is then swapped in as usual).
    pub fn temp_path(&self) -> PathBuf {
        self.root_path
            .join(self.temp_name.as_deref().unwrap_or_default())
    }

    /// Creates entries in order until one needs content from the stream.
    fn advance(&mut self) -> anyhow::Result<()> {
        while self.file.is_none() && self.next < self.entries.len() {
            let i = self.next;
            self.next += 1;
            self.create_entry(i)?;
        }
        Ok(())
    }

    fn create_entry(&mut self, i: usize) -> anyhow::Result<()> {
        if self.unsettled.len() >= MAX_UNSETTLED {
            self.settle_some()?;
        }
        let entry = &self.entries[i];
        let (parent_path, name) = split_path(&entry.path);
        while let Some(top) = self.open_dirs.last() {
            if self.entries[top.entry].path == parent_path {
                break;
            }
            let done = self.open_dirs.pop().expect("checked above");
            close_dir(&self.entries, &mut self.unsettled, done)?;
        }
        if self.open_dirs.is_empty() && !parent_path.is_empty() {
            bail!("{} comes before its parent directory", show(&entry.path));
        }
        let parent_dir = match self.open_dirs.last() {
            Some(d) => d.dir.clone(),
            None => self.temp.clone(),
        };
        let parent = parent_dir.fd.as_fd();
        let name = OsStr::from_bytes(name);
        if let EntryKind::File { size } = entry.kind
            && size <= writers::HANDED_MAX
        {
            let file = OpenFile {
                entry: i,
                ordinal: self.new_file_ordinal(),
                content: Content::Gathered(Vec::with_capacity(size as usize), parent_dir.clone()),
                left: size,
            };
            return match size {
                0 => self.close_file(file),
                _ => {
                    self.file = Some(file);
                    Ok(())
                }
            };
        }
        let created = match &entry.kind {
            EntryKind::Dir => rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))
                .and_then(|()| open_dir(parent, name).map_err(errno_of)),
            // Created with its final mode: the handle that creates a file may write it
            // whatever its mode says (a Go module cache's files are 0444).
            EntryKind::File { .. } => rustix::fs::openat(
                parent,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                permissions(entry.mode),
            ),
            EntryKind::Symlink { target } => {
                rustix::fs::symlinkat(OsStr::from_bytes(target), parent, name)
                    .map_err(|e| self.creation_error(i, e))?;
                // Times through the parent's handle, never following the link; some
                // systems cannot set a link's times, which loses nothing that matters.
                let times = timestamps(entry.mtime, entry.mtime_nsec);
                let _ = rustix::fs::utimensat(parent, name, &times, AtFlags::SYMLINK_NOFOLLOW);
                return Ok(());
            }
        };
        let fd = created.map_err(|e| self.creation_error(i, e))?;
        match entry.kind {
            EntryKind::Dir => self.open_dirs.push(OpenDir {
                entry: i,
                dir: Parent::new(fd),
            }),
            EntryKind::File { size } => {
                self.file = Some(OpenFile {
                    entry: i,
                    ordinal: self.new_file_ordinal(),
                    content: Content::Direct(File::from(fd)),
                    left: size,
                });
            }
            EntryKind::Symlink { .. } => unreachable!("created above"),
        }
        Ok(())
    }

    /// Explains a failed creation: an existing name in a directory cacher just made
    /// means two entries share one name on this filesystem.
    fn creation_error(&self, i: usize, e: Errno) -> anyhow::Error {
        let path = &self.entries[i].path;
        if e != Errno::EXIST {
            return anyhow::Error::new(io::Error::from(e))
                .context(format!("cannot create {}", show(path)));
        }
        let (parent, name) = split_path(path);
        let folded = String::from_utf8_lossy(name).to_lowercase();
        // Files are created on several threads, so the other may come later.
        let other = self.entries.iter().enumerate().find(|(j, e)| {
            let (p, n) = split_path(&e.path);
            *j != i && p == parent && String::from_utf8_lossy(n).to_lowercase() == folded
        });
        match other {
            Some((j, _)) => anyhow::anyhow!(
                "{} and {} name the same file on the filesystem of {} (it ignores case); this tree cannot be restored there",
                show(&self.entries[i.min(j)].path),
                show(&self.entries[i.max(j)].path),
                self.dest.display()
            ),
            None => anyhow::anyhow!(
                "{} names a file that another entry already created on the filesystem of {} (it folds names); this tree cannot be restored there",
                show(path),
                self.dest.display()
            ),
        }
    }

    /// A slot for the next file's stamp; its number.
    fn new_file_ordinal(&mut self) -> usize {
        self.stamps.push(None);
        self.stamps.len() - 1
    }

    fn close_file(&mut self, f: OpenFile) -> anyhow::Result<()> {
        let e = &self.entries[f.entry];
        if !e.path.contains(&b'/') {
            self.top_level_files.push((f.ordinal, f.entry));
        }
        match f.content {
            Content::Direct(file) => {
                complete_file(file.as_fd(), e)?;
                self.stamps[f.ordinal] = file.metadata().ok().map(|m| Stamp::of(&m));
                // A writer's failure ends the restore now, not after the stream.
                self.take_reports()?;
            }
            Content::Gathered(data, parent) => {
                let name = OsStr::from_bytes(split_path(&e.path).1).to_os_string();
                self.writers.write(SmallFile {
                    entry: f.entry,
                    ordinal: f.ordinal,
                    parent,
                    name,
                    meta: e.clone(),
                    data,
                })?;
                self.take_reports()?;
            }
        }
        Ok(())
    }

    /// Takes what the writers finished: their stamps, their first failure, and the
    /// directories that no file is being written in any more.
    fn take_reports(&mut self) -> anyhow::Result<()> {
        while let Some(report) = self.writers.try_report() {
            self.take_report(report)?;
        }
        self.finalize_settled()
    }

    /// Waits for the writers until at most half of [`MAX_UNSETTLED`] directories wait
    /// for them, setting the times of the others: half, not none, so the writers keep
    /// busy with what is queued meanwhile.
    fn settle_some(&mut self) -> anyhow::Result<()> {
        self.writers.flush()?;
        while self.unsettled.len() > MAX_UNSETTLED / 2 {
            match self.writers.wait_report()? {
                Some(report) => self.take_report(report)?,
                None => break,
            }
            self.finalize_settled()?;
        }
        Ok(())
    }

    /// Waits for every file handed to the writers, then sets the times of the
    /// directories that waited for them.
    fn wait_for_writers(&mut self) -> anyhow::Result<()> {
        self.writers.flush()?;
        while let Some(report) = self.writers.wait_report()? {
            self.take_report(report)?;
        }
        self.finalize_settled()
    }

    fn finalize_settled(&mut self) -> anyhow::Result<()> {
        let mut i = 0;
        while i < self.unsettled.len() {
            match self.unsettled[i].dir.settled() {
                true => finalize_dir(&self.entries, self.unsettled.swap_remove(i))?,
                false => i += 1,
            }
        }
        Ok(())
    }

    fn take_report(&mut self, (ordinal, result): writers::Done) -> anyhow::Result<()> {
        match result {
            Ok(stamp) => {
                self.stamps[ordinal] = stamp;
                Ok(())
            }
            Err(Failure::Create { entry, errno }) => Err(self.creation_error(entry, errno)),
            Err(Failure::Panicked { entry }) => Err(anyhow::anyhow!(
                "cannot write {}: its writer thread panicked",
                show(&self.entries[entry].path)
            )),
            Err(Failure::Other(e)) => Err(e),
        }
    }

    /// Completes the tree (entries after the last file, directory modes and times) and
    /// swaps it into DIR. Returns the entries and each file's stamp once complete (a
    /// top-level file's once in DIR), for a [`crate::state::TreeState`].
    pub fn finish(mut self) -> anyhow::Result<Finished> {
        self.advance()?;
        if let Some(f) = &self.file {
            bail!(
                "the content stream ended {} bytes short of {}",
                f.left,
                show(&self.entries[f.entry].path)
            );
        }
        self.wait_for_writers()?;
        while let Some(d) = self.open_dirs.pop() {
            close_dir(&self.entries, &mut self.unsettled, d)?;
        }
        // A job cancelled while the tree was completed leaves DIR as it was.
        if crate::ui::cancelled() {
            bail!("cancelled; {} left as it was", self.dest.display());
        }
        // Nothing but this restore can touch the new files before the swap (see
        // `state::record` for why that moment matters); a few milliseconds' wait
        // makes the last ones written old enough to be vouched for.
        crate::state::settle(&self.stamps);
        if let Some(new_name) = self.new_name.clone() {
            self.rename_into_place(&new_name)?;
        } else {
            self.landed = self.swap_in()?;
            self.created_dest = false;
            if let Some(name) = self.temp_name.take() {
                rustix::fs::unlinkat(&self.root, &name, AtFlags::REMOVEDIR).ok();
            }
        }
        // A DIR that did not exist holds nothing else (and `root` is its parent then).
        if self.new_name.is_none() {
            self.stamp_swapped_files();
            if self.mirror {
                self.remove_others()?;
            }
            // The top-level files renamed into DIR were stamped there just now.
            crate::state::settle(&self.stamps);
        }
        Ok(Finished {
            done_at: std::time::SystemTime::now(),
            entries: std::mem::take(&mut self.entries),
            stamps: std::mem::take(&mut self.stamps),
        })
    }

    /// DIR was made by someone else (another restore) while this tree was built beside
    /// it: its entries are swapped in, as into any DIR that exists.
    fn swap_into_appeared_dir(&mut self) -> anyhow::Result<()> {
        let dir = rustix::fs::open(
            &self.dest,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("cannot open {}", self.dest.display()))?;
        let parent = std::mem::replace(&mut self.root, dir);
        self.new_name = None;
        let swapped = self.swap_in();
        if let Some(name) = self.temp_name.take() {
            // Empty after a swap; holding the tree again after a failed one.
            let _ = temp::remove_tree(parent.as_fd(), &name);
        }
        self.landed = swapped?;
        Ok(())
    }

    /// Stamps the top-level files with their stamps from just after the swap renamed
    /// each into DIR (the rename changed their ctime), if that is still the file written
    /// (same device, inode, size and mtime), as `TreeUpdate::commit` does.
    fn stamp_swapped_files(&mut self) {
        for &(ordinal, entry) in &self.top_level_files {
            let Some(written) = self.stamps[ordinal] else {
                continue;
            };
            let name = OsStr::from_bytes(&self.entries[entry].path);
            self.stamps[ordinal] = self.landed.get(name).copied().filter(|now| {
                (now.dev, now.ino, now.size, now.mtime)
                    == (written.dev, written.ino, written.size, written.mtime)
            });
        }
    }

    /// Renames the temp dir to DIR, which did not exist, and gives it the mode a new
    /// directory gets.
    fn rename_into_place(&mut self, name: &OsStr) -> anyhow::Result<()> {
        let temp = self
            .temp_name
            .clone()
            .expect("the temp dir exists until now");
        match rename_noreplace(self.root.as_fd(), &temp, self.root.as_fd(), name) {
            Ok(()) => {}
            Err(e)
                if e.raw_os_error() == Some(Errno::EXIST.raw_os_error())
                    || e.raw_os_error() == Some(Errno::NOTEMPTY.raw_os_error()) =>
            {
                return self.swap_into_appeared_dir();
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot move the restored tree to {}", self.dest.display())
                });
            }
        }
        self.temp_name = None;
        // The mode `mkdir` would have given it: learnt from a directory made the same
        // way, since the umask cannot be read everywhere without changing it.
        let probe = OsString::from(format!("{RESTORE_PREFIX}mode-{}", temp::unique_tag()));
        let mode = rustix::fs::mkdirat(&self.root, &probe, Mode::from_raw_mode(0o777))
            .and_then(|()| rustix::fs::statat(&self.root, &probe, AtFlags::SYMLINK_NOFOLLOW));
        let _ = rustix::fs::unlinkat(&self.root, &probe, AtFlags::REMOVEDIR);
        let set = mode.and_then(|st| {
            rustix::fs::fchmod(&self.temp.fd, Mode::from_raw_mode(st.st_mode & 0o777))
        });
        if let Err(e) = set {
            // The tree is in place: a mode is not worth failing the restore for.
            ui::warn(format!(
                "cannot set the mode of {}: {e}",
                self.dest.display()
            ));
        }
        Ok(())
    }

    /// Removes the top-level entries of DIR that are not the tree's (nor cacher's temp
    /// entries, which may be another run's).
    fn remove_others(&self) -> anyhow::Result<()> {
        let ours: std::collections::HashSet<&[u8]> = self
            .entries
            .iter()
            .map(|e| split_path(&e.path))
            .filter(|(parent, _)| parent.is_empty())
            .map(|(_, name)| name)
            .collect();
        let names = list_names(self.root.as_fd())
            .with_context(|| format!("cannot list {}", self.dest.display()))?;
        for name in names {
            let bytes = name.as_bytes();
            if !ours.contains(bytes) && !temp::is_temp_name(bytes) {
                temp::remove_tree(self.root.as_fd(), &name)
                    .with_context(|| format!("cannot remove {}", self.shown(&name)))?;
            }
        }
        Ok(())
    }

    /// Moves every top-level entry of the temp dir into DIR (see the module doc); the
    /// stamp of each that is not a directory, taken right after its rename.
    fn swap_in(&self) -> anyhow::Result<HashMap<OsString, Stamp>> {
        let names = list_names(self.temp.fd.as_fd())
            .with_context(|| format!("cannot list the restored tree in {}", self.dest.display()))?;
        let tag = format!("{ASIDE_PREFIX}{}-", temp::unique_tag());
        let mut aside: Vec<(&OsString, OsString)> = Vec::new();
        // Each entry moved in: its name, its identity, and for a directory its handle
        // and the mode and times to give back after the move.
        type Moved<'a> = (
            &'a OsString,
            (u64, u64),
            Option<(OwnedFd, rustix::fs::Stat)>,
        );
        let mut moved: Vec<Moved> = Vec::new();
        let mut landed = HashMap::new();
        let result = (|| -> anyhow::Result<()> {
            for (n, name) in names.iter().enumerate() {
                match rustix::fs::statat(&self.root, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(_) => {
                        // Same directory: no permission on the old entry is needed.
                        let to = OsString::from(format!("{tag}{n}"));
                        rustix::fs::renameat(&self.root, name, &self.root, &to)
                            .with_context(|| format!("cannot move {} aside", self.shown(name)))?;
                        aside.push((name, to));
                    }
                    Err(Errno::NOENT) => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot read {}", self.shown(name)));
                    }
                }
            }
            for name in &names {
                // A directory changing parents needs owner write permission on itself
                // (its `..` entry changes): grant it for the move, restore it after.
                let dir = open_dir(self.temp.fd.as_fd(), name).ok();
                let dir = match dir {
                    Some(fd) => {
                        let stat = rustix::fs::fstat(&fd)?;
                        rustix::fs::fchmod(
                            &fd,
                            Mode::from_raw_mode((stat.st_mode & 0o7777) | 0o700),
                        )?;
                        Some((fd, stat))
                    }
                    None => None,
                };
                let identity = identity_of(self.temp.fd.as_fd(), name)?;
                rename_noreplace(self.temp.fd.as_fd(), name, self.root.as_fd(), name)
                    .with_context(|| format!("cannot move {} into place", self.shown(name)))?;
                if dir.is_none()
                    && let Ok(st) = rustix::fs::statat(&self.root, name, AtFlags::SYMLINK_NOFOLLOW)
                {
                    landed.insert(name.clone(), Stamp::of_stat(&st));
                }
                moved.push((name, identity, dir));
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Put DIR back as it was: new entries out, old ones back. Never move or
            // replace what another run put there meanwhile.
            for (name, identity, _) in moved.iter().rev() {
                // Only what this restore moved in: a concurrent restore may have
                // replaced it since.
                if identity_of(self.root.as_fd(), name).ok() == Some(*identity) {
                    let _ = rename_noreplace(self.root.as_fd(), name, self.temp.fd.as_fd(), name);
                }
            }
            for (name, to) in aside.iter().rev() {
                let _ = rename_noreplace(self.root.as_fd(), to, self.root.as_fd(), name);
            }
            return Err(e.context(format!("{} left as it was", self.dest.display())));
        }
        for (name, _, dir) in moved {
            if let Some((fd, stat)) = dir {
                // `time_t` is i64 here but not on every target rustix builds for.
                #[allow(clippy::unnecessary_cast)]
                let times = Timestamps {
                    last_access: Timespec {
                        tv_sec: stat.st_atime as i64,
                        tv_nsec: stat.st_atime_nsec as _,
                    },
                    last_modification: Timespec {
                        tv_sec: stat.st_mtime as i64,
                        tv_nsec: stat.st_mtime_nsec as _,
                    },
                };
                // The new tree is in place: a failure here costs a mode, not the restore.
                if let Err(e) = rustix::fs::fchmod(&fd, Mode::from_raw_mode(stat.st_mode & 0o777))
                    .and_then(|()| rustix::fs::futimens(&fd, &times))
                {
                    ui::warn(format!("cannot set the mode of {}: {e}", self.shown(name)));
                }
            }
        }
        for (name, to) in aside {
            if let Err(e) = temp::remove_tree(self.root.as_fd(), &to) {
                ui::warn(format!(
                    "restored, but could not delete the old {} (left as {}): {e}",
                    self.shown(name),
                    self.shown(&to)
                ));
            }
        }
        Ok(landed)
    }

    fn shown(&self, name: &OsStr) -> String {
        show(self.dest.join(name).as_os_str().as_bytes())
    }
}

impl Write for Restorer {
    /// Takes the next bytes of the content stream.
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let taken = data.len();
        while !data.is_empty() {
            let Some(f) = self.file.as_mut() else {
                return Err(io::Error::other(
                    "the content stream is longer than the tree's files",
                ));
            };
            let n = data
                .len()
                .min(usize::try_from(f.left).unwrap_or(usize::MAX));
            let path = &self.entries[f.entry].path;
            match &mut f.content {
                Content::Direct(file) => file.write_all(&data[..n]).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot write {}: {e}", show(path)))
                })?,
                Content::Gathered(gathered, _) => gathered.extend_from_slice(&data[..n]),
            }
            f.left -= n as u64;
            data = &data[n..];
            if f.left == 0 {
                let f = self.file.take().expect("checked above");
                self.close_file(f)
                    .and_then(|()| self.advance())
                    .map_err(|e| io::Error::other(format!("{e:#}")))?;
            }
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Restorer {
    /// Removes what an unfinished restore built, and DIR itself when this restore
    /// created it (it is then empty again).
    fn drop(&mut self) {
        // The writers finish with the temp tree before it is removed.
        self.writers.stop();
        self.file = None;
        self.open_dirs.clear();
        self.unsettled.clear();
        if let Some(name) = self.temp_name.take() {
            let _ = temp::remove_tree(self.root.as_fd(), &name);
        }
        if self.created_dest {
            let _ = std::fs::remove_dir(&self.dest);
        }
    }
}

/// Sets a complete directory's mode and times, now or, while files in it are still
/// being written (which changes its times), once they are (see `unsettled`).
fn close_dir(entries: &[Entry], unsettled: &mut Vec<OpenDir>, d: OpenDir) -> anyhow::Result<()> {
    match d.dir.settled() {
        true => finalize_dir(entries, d),
        false => {
            unsettled.push(d);
            Ok(())
        }
    }
}

fn finalize_dir(entries: &[Entry], d: OpenDir) -> anyhow::Result<()> {
    let e = &entries[d.entry];
    finalize(d.dir.fd.as_fd(), e)
        .with_context(|| format!("cannot set the mode and time of {}", show(&e.path)))
}

/// Refuses a tree of `needed` bytes that the filesystem `dest` is (or would be) on has
/// no room for, before anything is created.
pub(crate) fn check_space(dest: &Path, needed: u64) -> anyhow::Result<()> {
    let Some(existing) = dest
        .ancestors()
        .find(|p| p.as_os_str().is_empty() || p.exists())
    else {
        return Ok(());
    };
    let existing = if existing.as_os_str().is_empty() {
        Path::new(".")
    } else {
        existing
    };
    let Ok(fs) = rustix::fs::statvfs(existing) else {
        return Ok(());
    };
    let free = fs.f_bavail.saturating_mul(fs.f_frsize);
    if needed > free {
        bail!(
            "the entry holds {} but the filesystem of {} has {} free; nothing was written",
            ui::human_bytes(needed),
            dest.display(),
            ui::human_bytes(free)
        );
    }
    Ok(())
}

/// Gives a file just created with the entry's mode and written through `fd` its times,
/// and its mode again if the umask took bits from it.
pub(crate) fn complete_file(fd: BorrowedFd<'_>, e: &Entry) -> anyhow::Result<()> {
    let exact = umask().is_some_and(|mask| e.mode & MODE_MASK & mask == 0);
    match exact {
        true => {
            rustix::fs::futimens(fd, &timestamps(e.mtime, e.mtime_nsec)).map_err(io::Error::from)
        }
        false => finalize(fd, e),
    }
    .with_context(|| format!("cannot set the mode and time of {}", show(&e.path)))
}

/// `parent/name` as a relative tree path (`name` at the top).
pub(crate) fn join_path(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return name.to_vec();
    }
    [parent, b"/", name].concat()
}

/// Sets an entry's mode (without setuid, setgid, sticky) and times through its handle.
pub(crate) fn finalize(fd: BorrowedFd<'_>, e: &Entry) -> io::Result<()> {
    rustix::fs::fchmod(fd, permissions(e.mode))?;
    rustix::fs::futimens(fd, &timestamps(e.mtime, e.mtime_nsec))?;
    Ok(())
}

/// The permission bits a restore applies for a recorded mode (see [`MODE_MASK`]).
// `mode_t` is u32 here but u16 on macOS.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn permissions(mode: u32) -> Mode {
    Mode::from_raw_mode((mode & MODE_MASK) as rustix::fs::RawMode)
}

/// The process's umask, where the system tells it without changing it (Linux's
/// /proc/self/status); `None` elsewhere, and modes are then always set explicitly.
pub(crate) fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    })
}

pub(crate) fn timestamps(sec: i64, nsec: u32) -> Timestamps {
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: nsec.into(),
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Renames without replacing: fails when `to` exists (another restore into the same
/// DIR got there first). Filesystems without the atomic flag (some FUSE ones) get a
/// check, then a plain rename.
pub(crate) fn rename_noreplace(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
) -> io::Result<()> {
    match rustix::fs::renameat_with(
        from_dir,
        from,
        to_dir,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    ) {
        Err(Errno::INVAL | Errno::NOSYS | Errno::NOTSUP) => {
            match rustix::fs::statat(to_dir, to, AtFlags::SYMLINK_NOFOLLOW) {
                Err(Errno::NOENT) => Ok(rustix::fs::renameat(from_dir, from, to_dir, to)?),
                Ok(_) => Err(Errno::EXIST.into()),
                Err(e) => Err(e.into()),
            }
        }
        other => Ok(other?),
    }
}

/// Device and inode of `name` in `parent` (not following a symlink).
#[allow(clippy::unnecessary_cast)]
pub(crate) fn identity_of(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<(u64, u64)> {
    let stat = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok((stat.st_dev as u64, stat.st_ino as u64))
}

/// Opens the directory `name` in `parent`, refusing a symlink.
pub(crate) fn open_dir(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

pub(crate) fn errno_of(e: io::Error) -> Errno {
    Errno::from_io_error(&e).unwrap_or(Errno::IO)
}

/// The names in a directory, without `.` and `..`.
pub(crate) fn list_names(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for_each_name(dir, |name| {
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    })?;
    names.sort();
    Ok(names)
}

/// Calls `f` with each name in the directory `dir`, read from its start.
// Through `dir` itself: `Dir::read_from` opens the directory again and asks its flags,
// three more system calls per directory, a third of an in-place restore's walk.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn for_each_name(dir: BorrowedFd<'_>, mut f: impl FnMut(&[u8])) -> io::Result<()> {
    rustix::fs::seek(dir, rustix::fs::SeekFrom::Start(0))?;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
    let mut entries = rustix::fs::RawDir::new(dir, &mut buf);
    while let Some(entry) = entries.next() {
        f(entry?.file_name().to_bytes());
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn for_each_name(dir: BorrowedFd<'_>, mut f: impl FnMut(&[u8])) -> io::Result<()> {
    for entry in rustix::fs::Dir::read_from(dir)? {
        f(entry?.file_name().to_bytes());
    }
    Ok(())
}

/// `(parent, name)` of a relative `/`-separated path; the parent of a top-level entry
/// is empty.
pub(crate) fn split_path(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}
