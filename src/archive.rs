//! Directory trees ⇄ (entries, content stream).
//!
//! Upload side: [`scan`] walks a tree in a fixed order and records each node's metadata;
//! the regular files' bytes, back to back, make the content stream
//! ([`crate::tree_stream`] cuts it), so metadata changes (an `npm ci` that rewrote every
//! mtime) leave the chunks untouched. An upload walks with [`scan_in_parts`], which
//! hands the tree on as it goes, so cutting starts before the walk ends. The download
//! side is [`crate::restore`].

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};

use anyhow::{Context, bail};
use rayon::prelude::*;
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::chunk::format::{Entry, EntryKind, MAX_DEPTH, MAX_PATH, show};
use crate::exclude::Exclude;
use crate::restore::join_path;
use crate::state::Stamp;
use crate::ui;

/// A scanned tree: its entries (parents first) and its regular files in stream order.
#[derive(Clone)]
pub struct Tree {
    /// The directory scanned, as given.
    pub root: PathBuf,
    /// Every directory, file and symlink below the root.
    pub entries: Vec<Entry>,
    /// The regular files, in the order their bytes appear in the content stream.
    pub files: Vec<ScannedFile>,
    /// A single file scanned as a tree of itself ([`scan_path`]): `root` is its parent.
    pub single_file: bool,
}

impl Tree {
    /// The path to read file `i` at: the root joined with its entry's path.
    pub fn path(&self, i: usize) -> PathBuf {
        self.root.join(OsStr::from_bytes(self.rel(i)))
    }

    /// The path of file `i` relative to the root, as the manifest records it.
    pub fn rel(&self, i: usize) -> &[u8] {
        &self.entries[self.files[i].entry as usize].path
    }
}

/// A regular file as seen by the scan.
#[derive(Debug, Clone)]
pub struct ScannedFile {
    /// Its entry in [`Tree::entries`], which holds its path: a copy of the paths would
    /// cost about 60 MB on a 10^6-file tree.
    pub entry: u32,
    /// The file's stamp at scan time: to detect it changing while it is read, and to
    /// compare with a tree state.
    pub stamp: Stamp,
}

impl ScannedFile {
    /// Size at scan time; exactly this many bytes go into the stream.
    pub fn size(&self) -> u64 {
        self.stamp.size
    }
}

/// Walks `root` depth-first in byte order of names. Fifos, sockets and device nodes are
/// skipped with a warning; symlinks are recorded, never followed; cacher's own temp
/// entries (`.cacher-restore-*`, `.cacher-old-*`, `.cacher-new-*`: a restore running
/// into the same directory, or one killed there) are left out, and so is what
/// `exclude` matches (nothing below an excluded directory is looked at).
///
/// Every node is looked at relative to its parent's open handle (no path is resolved
/// twice), and subdirectories are scanned in parallel: with a tree state, this stat of
/// every file is most of what a warm upload costs.
pub fn scan(root: &Path, exclude: &Exclude) -> anyhow::Result<Tree> {
    let fd = open_root(root)?;
    let (entries, files) = scan_dir(root, fd, &[], 1, exclude)?;
    Ok(Tree {
        root: root.to_path_buf(),
        entries,
        files,
        single_file: false,
    })
}

/// Opens the directory a scan starts from.
fn open_root(root: &Path) -> anyhow::Result<OwnedFd> {
    rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::NOTDIR => anyhow::anyhow!("{} is not a directory", root.display()),
        e => anyhow::Error::new(std::io::Error::from(e))
            .context(format!("cannot read {}", root.display())),
    })
}

/// A path to upload as (part of) an entry: a directory's tree ([`scan`]), or a regular
/// file as a tree of itself, rooted at its parent (`exclude` applies below a
/// directory only).
pub fn scan_path(path: &Path, exclude: &Exclude) -> anyhow::Result<Tree> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return scan(path, exclude);
    }
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let (Some(name), true) = (path.file_name(), meta.is_file()) else {
        bail!("{} is not a directory or a regular file", path.display());
    };
    let stamp = Stamp::of(&meta);
    let mut entry = root_entry(path)?;
    entry.path = name.as_bytes().to_vec();
    entry.kind = EntryKind::File { size: stamp.size };
    Ok(Tree {
        root: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        entries: vec![entry],
        files: vec![ScannedFile { entry: 0, stamp }],
        single_file: true,
    })
}

/// The entry of `path` itself (its path left empty): a directory, or a file with its
/// size, with the mode and mtime a restore gives it.
pub fn root_entry(path: &Path) -> anyhow::Result<Entry> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let kind = match meta.is_dir() {
        true => EntryKind::Dir,
        false => EntryKind::File { size: meta.len() },
    };
    Ok(Entry {
        path: Vec::new(),
        kind,
        mode: meta.mode() & 0o7777,
        mtime: meta.mtime(),
        mtime_nsec: meta.mtime_nsec() as u32,
    })
}

/// A directory's child as the scan records it: its entry, its stamp when it is a
/// regular file (`entry` not set yet), and its name, to open it when it is a directory.
struct Child {
    entry: Entry,
    file: Option<ScannedFile>,
    name: CString,
}

impl Child {
    fn is_dir(&self) -> bool {
        self.entry.kind == EntryKind::Dir
    }
}

/// The children of the open directory `fd` (path `rel` relative to the root, `depth`
/// levels below it) that the scan records, in byte order of names.
fn list_dir(
    root: &Path,
    fd: BorrowedFd<'_>,
    rel: &[u8],
    depth: usize,
    exclude: &Exclude,
) -> anyhow::Result<Vec<Child>> {
    let shown = |name: &[u8]| {
        root.join(OsStr::from_bytes(&join_path(rel, name)))
            .display()
            .to_string()
    };
    let mut names: Vec<Vec<u8>> = Vec::new();
    crate::restore::for_each_name(fd, |name| {
        // cacher's own temp names, at any depth: an in-place restore stages beside
        // the entries it replaces, and a killed one may leave them.
        let skip = name == b"." || name == b".." || crate::temp::is_temp_name(name);
        if !skip {
            names.push(name.to_vec());
        }
    })
    .with_context(|| format!("cannot walk {}", shown(b"")))?;
    names.sort_unstable();
    let mut children = Vec::with_capacity(names.len());
    for name in names {
        let path = join_path(rel, &name);
        let c_name = CString::new(name.clone()).expect("names hold no NUL");
        let st = rustix::fs::statat(fd, &c_name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(std::io::Error::from)
            .with_context(|| format!("cannot stat {}", shown(&name)))?;
        let file_type = rustix::fs::FileType::from_raw_mode(st.st_mode as rustix::fs::RawMode);
        if exclude.excludes(&path, file_type == rustix::fs::FileType::Directory) {
            continue;
        }
        if depth > MAX_DEPTH {
            bail!(
                "{} is deeper than {MAX_DEPTH} directories, more than cacher restores",
                show(&path)
            );
        }
        if path.len() > MAX_PATH {
            bail!(
                "{} is a {}-byte path; cacher stores paths of at most {MAX_PATH} bytes",
                show(&path),
                path.len()
            );
        }
        let mut file = None;
        let kind = match file_type {
            rustix::fs::FileType::Directory => EntryKind::Dir,
            rustix::fs::FileType::RegularFile => {
                let stamp = Stamp::of_stat(&st);
                file = Some(ScannedFile {
                    entry: 0, // set once the entry has its place in the tree
                    stamp,
                });
                EntryKind::File { size: stamp.size }
            }
            rustix::fs::FileType::Symlink => {
                let target = rustix::fs::readlinkat(fd, &c_name, Vec::new())
                    .map_err(std::io::Error::from)
                    .with_context(|| format!("cannot read link {}", shown(&name)))?
                    .into_bytes();
                if target.len() > MAX_PATH {
                    bail!(
                        "the link {} points to a path longer than {MAX_PATH} bytes",
                        show(&path)
                    );
                }
                EntryKind::Symlink { target }
            }
            _ => {
                ui::warn(format!(
                    "skipping {}: not a file, directory or symlink",
                    shown(&name)
                ));
                continue;
            }
        };
        let entry = Entry {
            path,
            kind,
            mode: (st.st_mode as u32) & 0o7777,
            mtime: st.st_mtime as i64,
            mtime_nsec: st.st_mtime_nsec as u32,
        };
        children.push(Child {
            entry,
            file,
            name: c_name,
        });
    }
    Ok(children)
}

/// Opens the subdirectory `name` of `parent` for a scan, never through a symlink.
fn open_subdir(
    root: &Path,
    parent: BorrowedFd<'_>,
    name: &CString,
    rel: &[u8],
) -> anyhow::Result<OwnedFd> {
    rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(std::io::Error::from)
    .with_context(|| {
        format!(
            "cannot walk {}",
            root.join(OsStr::from_bytes(rel)).display()
        )
    })
}

/// The entries and files below the open directory `fd`, whose path relative to the
/// root is `rel`; each file's `entry` counts from the first of these entries.
fn scan_dir(
    root: &Path,
    fd: OwnedFd,
    rel: &[u8],
    depth: usize,
    exclude: &Exclude,
) -> anyhow::Result<(Vec<Entry>, Vec<ScannedFile>)> {
    let children = list_dir(root, fd.as_fd(), rel, depth, exclude)?;
    // A subdirectory is opened by the task that scans it, so handles stay bounded by
    // the depth times the threads however wide the tree is.
    let subtrees: Vec<Option<(Vec<Entry>, Vec<ScannedFile>)>> = children
        .par_iter()
        .map(|child| {
            if !child.is_dir() {
                return Ok(None);
            }
            let sub = open_subdir(root, fd.as_fd(), &child.name, &child.entry.path)?;
            scan_dir(root, sub, &child.entry.path, depth + 1, exclude).map(Some)
        })
        .collect::<anyhow::Result<_>>()?;
    // Sized exactly, and the entries joined before the files: at the top this holds
    // the tree twice over, so spare room or both lists at once would show in the peak
    // memory of an upload (about 150 MB more on a 10^6-file tree).
    let below = |count: fn(&(Vec<Entry>, Vec<ScannedFile>)) -> usize| {
        subtrees.iter().flatten().map(count).sum::<usize>()
    };
    let mut entries = Vec::with_capacity(children.len() + below(|t| t.0.len()));
    let file_count = children.len() + below(|t| t.1.len());
    let mut parts = Vec::with_capacity(children.len());
    for (Child { entry, file, .. }, subtree) in children.into_iter().zip(subtrees) {
        let at = u32::try_from(entries.len()).expect("entries are far fewer than 2^32");
        entries.push(entry);
        let file = file.map(|f| ScannedFile { entry: at, ..f });
        let files = subtree.map(|(sub_entries, sub_files)| {
            entries.extend(sub_entries);
            (at + 1, sub_files)
        });
        parts.push((file, files));
    }
    let mut files = Vec::with_capacity(file_count);
    for (file, below) in parts {
        files.extend(file);
        if let Some((first, sub_files)) = below {
            files.extend(sub_files.into_iter().map(|f| ScannedFile {
                entry: f.entry + first,
                ..f
            }));
        }
    }
    Ok((entries, files))
}

/// Entries a part holds before it is handed on; the walk also hands on what it has
/// whenever it must wait for a listing.
const PART_ENTRIES: usize = 4096;

/// The next entries of a tree in scan order (parents first), with their regular files,
/// as [`scan_in_parts`] hands them on. Each file's `entry` counts from the tree's first
/// entry, not the part's.
#[derive(Default)]
pub struct TreePart {
    pub entries: Vec<Entry>,
    pub files: Vec<ScannedFile>,
}

/// A tree whose scan may still be running: its root, and its parts in order.
pub struct ScanParts {
    /// As [`Tree::root`].
    pub root: PathBuf,
    /// As [`Tree::single_file`].
    pub single_file: bool,
    parts: Receiver<anyhow::Result<Option<TreePart>>>,
}

impl ScanParts {
    /// A tree scanned already, as one part.
    pub fn of_tree(tree: Tree) -> ScanParts {
        let (tx, parts) = std::sync::mpsc::channel();
        let Tree {
            root,
            entries,
            files,
            single_file,
        } = tree;
        let _ = tx.send(Ok(Some(TreePart { entries, files })));
        let _ = tx.send(Ok(None));
        ScanParts {
            root,
            single_file,
            parts,
        }
    }

    /// A tree handed on in parts of `n` entries, for tests of what reads the parts.
    #[cfg(test)]
    pub fn of_tree_in_parts(tree: Tree, n: usize) -> ScanParts {
        let (tx, parts) = std::sync::mpsc::channel();
        let mut entries = tree.entries.into_iter();
        let mut files = tree.files.into_iter().peekable();
        let mut end = 0u32;
        loop {
            let part: Vec<Entry> = entries.by_ref().take(n).collect();
            if part.is_empty() {
                break;
            }
            end += part.len() as u32;
            let mut part_files = Vec::new();
            while let Some(f) = files.next_if(|f| f.entry < end) {
                part_files.push(f);
            }
            let _ = tx.send(Ok(Some(TreePart {
                entries: part,
                files: part_files,
            })));
        }
        let _ = tx.send(Ok(None));
        ScanParts {
            root: tree.root,
            single_file: tree.single_file,
            parts,
        }
    }

    fn failed(root: &Path, e: anyhow::Error) -> ScanParts {
        let (tx, parts) = std::sync::mpsc::channel();
        let _ = tx.send(Err(e));
        ScanParts {
            root: root.to_path_buf(),
            single_file: false,
            parts,
        }
    }

    /// The next part, once the walk has reached it; `None` once the tree is complete
    /// (and not to be asked again).
    pub fn next_part(&self) -> anyhow::Result<Option<TreePart>> {
        self.parts.recv().unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "the scan of {} stopped",
                self.root.display()
            ))
        })
    }
}

/// Scans `path` as [`scan_path`] does, handing the tree on in parts as the walk reaches
/// them, so that cutting it can start before the walk ends. Directories are listed
/// on all cores ahead of the walk, which takes their listings in tree order.
pub fn scan_in_parts(path: &Path, exclude: Arc<Exclude>) -> ScanParts {
    if !std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return match scan_path(path, &exclude) {
            Ok(tree) => ScanParts::of_tree(tree),
            Err(e) => ScanParts::failed(path, e),
        };
    }
    let (tx, parts) = std::sync::mpsc::channel();
    let walker = Arc::new(Walker {
        root: path.to_path_buf(),
        exclude,
        stop: AtomicBool::new(false),
    });
    let walking = std::thread::Builder::new()
        .name("scan".into())
        .spawn(move || {
            let mut out = PartWriter {
                tx: &tx,
                part: TreePart::default(),
                entries: 0,
            };
            let walked = walker.walk(&mut out).and_then(|()| out.flush());
            // Listings queued ahead of a walk that failed have no reader.
            walker.stop.store(true, Ordering::Relaxed);
            let _ = tx.send(walked.map(|()| None));
        });
    match walking {
        Ok(_) => ScanParts {
            root: path.to_path_buf(),
            single_file: false,
            parts,
        },
        Err(e) => ScanParts::failed(path, anyhow::Error::new(e).context("cannot start the scan")),
    }
}

/// The walk of [`scan_in_parts`].
struct Walker {
    root: PathBuf,
    exclude: Arc<Exclude>,
    stop: AtomicBool,
}

/// A directory's children, with the listing of each subdirectory, in order, as it
/// arrives from the pool.
struct Listing {
    children: Vec<Child>,
    subdirs: Vec<Receiver<anyhow::Result<Listing>>>,
}

impl Walker {
    /// Hands on the whole tree in order.
    fn walk(self: &Arc<Self>, out: &mut PartWriter<'_>) -> anyhow::Result<()> {
        let fd = open_root(&self.root)?;
        // Listed on the pool like every other directory, so that the listings it
        // queues run in tree order (see `listing`).
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let walker = self.clone();
        rayon::spawn(move || {
            let listed = list_dir(&walker.root, fd.as_fd(), &[], 1, &walker.exclude)
                .map(|children| walker.listing(fd, children, 1));
            let _ = tx.send(listed);
        });
        let root = rx.recv().map_err(|_| self.stopped())??;
        self.emit(root, out)
    }

    /// `children` of the directory `fd`, `depth` levels below the root, with the
    /// listing of each subdirectory queued on the pool.
    fn listing(self: &Arc<Self>, fd: OwnedFd, children: Vec<Child>, depth: usize) -> Listing {
        let fd = Arc::new(fd);
        // Queued last first: a pool thread runs its own newest job first, so the first
        // subdirectory, the one the walk needs next, is listed first, and handles stay
        // bounded by the depth times the threads, as in `scan`.
        let mut subdirs: Vec<_> = children
            .iter()
            .rev()
            .filter(|c| c.is_dir())
            .map(|child| {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                let walker = self.clone();
                let parent = fd.clone();
                let (name, rel) = (child.name.clone(), child.entry.path.clone());
                rayon::spawn(move || {
                    if !walker.stop.load(Ordering::Relaxed) {
                        let _ = tx.send(walker.list_subdir(parent, &name, &rel, depth + 1));
                    }
                });
                rx
            })
            .collect();
        subdirs.reverse();
        Listing { children, subdirs }
    }

    fn list_subdir(
        self: &Arc<Self>,
        parent: Arc<OwnedFd>,
        name: &CString,
        rel: &[u8],
        depth: usize,
    ) -> anyhow::Result<Listing> {
        let fd = open_subdir(&self.root, parent.as_fd(), name, rel)?;
        drop(parent);
        let children = list_dir(&self.root, fd.as_fd(), rel, depth, &self.exclude)?;
        Ok(self.listing(fd, children, depth))
    }

    /// Hands on `listing` and everything below it, in tree order.
    fn emit(&self, listing: Listing, out: &mut PartWriter<'_>) -> anyhow::Result<()> {
        let mut subdirs = listing.subdirs.into_iter();
        for child in listing.children {
            let is_dir = child.is_dir();
            out.push(child.entry, child.file)?;
            if is_dir {
                let next = subdirs.next().expect("a listing per subdirectory");
                let sub = match next.try_recv() {
                    Ok(sub) => sub,
                    Err(_) => {
                        // Hand on what is ready while the pool catches up.
                        out.flush()?;
                        next.recv().map_err(|_| self.stopped())?
                    }
                };
                self.emit(sub?, out)?;
            }
        }
        Ok(())
    }

    fn stopped(&self) -> anyhow::Error {
        anyhow::anyhow!("a listing below {} stopped", self.root.display())
    }
}

/// Gathers a walk's entries into parts and hands them on.
struct PartWriter<'a> {
    tx: &'a Sender<anyhow::Result<Option<TreePart>>>,
    part: TreePart,
    /// Entries handed on or held, which is the next entry's place in the tree.
    entries: usize,
}

impl PartWriter<'_> {
    fn push(&mut self, entry: Entry, file: Option<ScannedFile>) -> anyhow::Result<()> {
        let at = u32::try_from(self.entries).expect("entries are far fewer than 2^32");
        self.part.entries.push(entry);
        self.part
            .files
            .extend(file.map(|f| ScannedFile { entry: at, ..f }));
        self.entries += 1;
        if self.part.entries.len() >= PART_ENTRIES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if self.part.entries.is_empty() {
            return Ok(());
        }
        self.tx
            .send(Ok(Some(std::mem::take(&mut self.part))))
            .map_err(|_| anyhow::anyhow!("nothing reads the scan any more"))
    }
}

/// What a tree was made from, as `--fallback` compares it: DIR as given, lexically
/// normalized (no `.` segments, no trailing or doubled `/`), with the home directory
/// written `~` so runners with different home paths agree. Relative paths stay
/// relative: CI jobs run in checkouts whose absolute paths differ.
pub fn source_label(dir: &Path) -> String {
    use std::path::Component;
    let mut parts: Vec<String> = Vec::new();
    let mut absolute = false;
    for c in dir.components() {
        match c {
            Component::RootDir => absolute = true,
            Component::CurDir => {}
            Component::ParentDir => parts.push("..".into()),
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::Prefix(p) => parts.push(p.as_os_str().to_string_lossy().into_owned()),
        }
    }
    let joined = parts.join("/");
    if !absolute {
        return if joined.is_empty() {
            ".".into()
        } else {
            joined
        };
    }
    let path = format!("/{joined}");
    let home = std::env::var("HOME").unwrap_or_default();
    let home = home.trim_end_matches('/');
    if home.starts_with('/') && home.len() > 1 {
        if path == home {
            return "~".into();
        }
        if let Some(rest) = path.strip_prefix(&format!("{home}/")) {
            return format!("~/{rest}");
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn source_labels_abstract_the_home_directory_and_normalize() {
        let home = std::env::var("HOME").unwrap();
        let at_home = |rest: &str| PathBuf::from(format!("{home}/{rest}"));
        assert_eq!(
            source_label(&at_home(".cargo/registry/")),
            "~/.cargo/registry"
        );
        assert_eq!(source_label(&at_home("./go//pkg/mod")), "~/go/pkg/mod");
        assert_eq!(source_label(Path::new("./target/")), "target");
        assert_eq!(source_label(Path::new("target")), "target");
        assert_eq!(source_label(Path::new(".")), ".");
        assert_eq!(source_label(Path::new("/opt/cache")), "/opt/cache");
        assert_ne!(source_label(&at_home("a")), source_label(&at_home("b")));
    }

    #[test]
    fn scan_orders_by_name_bytes_and_lists_parents_first() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("b/c")).unwrap();
        fs::write(dir.path().join("b/c/f"), "x").unwrap();
        fs::write(dir.path().join("a.txt"), "y").unwrap();
        let tree = scan(dir.path(), &Exclude::default()).unwrap();
        let paths: Vec<_> = tree.entries.iter().map(|e| e.path.clone()).collect();
        assert_eq!(paths, [&b"a.txt"[..], b"b", b"b/c", b"b/c/f"]);
    }

    /// The tree [`scan_in_parts`] hands on, put together.
    pub(super) fn collect(parts: ScanParts) -> anyhow::Result<Tree> {
        let mut tree = Tree {
            root: parts.root.clone(),
            entries: Vec::new(),
            files: Vec::new(),
            single_file: parts.single_file,
        };
        let mut count = 0;
        while let Some(part) = parts.next_part()? {
            count += 1;
            tree.entries.extend(part.entries);
            tree.files.extend(part.files);
        }
        assert!(count > 0 || tree.entries.is_empty());
        Ok(tree)
    }

    pub(super) fn same_tree(a: &Tree, b: &Tree) -> bool {
        let files = |t: &Tree| -> Vec<(u32, Stamp)> {
            t.files.iter().map(|f| (f.entry, f.stamp)).collect()
        };
        a.entries == b.entries && files(a) == files(b) && a.root == b.root
    }

    #[test]
    fn a_tree_handed_on_in_parts_is_the_tree_scan_makes() {
        // Wide and deep enough for many parts, and for the walk to wait on listings.
        let dir = tempfile::tempdir().unwrap();
        for d in 0..100 {
            let sub = dir.path().join(format!("d{d:02}/e/f"));
            fs::create_dir_all(&sub).unwrap();
            for f in 0..90 {
                fs::write(sub.join(format!("{f}")), format!("{d}/{f}")).unwrap();
            }
            fs::write(dir.path().join(format!("d{d:02}/top")), "t").unwrap();
        }
        fs::write(dir.path().join("z"), "last").unwrap();
        let whole = scan(dir.path(), &Exclude::default()).unwrap();
        assert!(whole.entries.len() > 2 * PART_ENTRIES);
        let parts = scan_in_parts(dir.path(), Arc::default());
        assert!(same_tree(&collect(parts).unwrap(), &whole));
    }

    #[test]
    fn a_walk_that_fails_below_says_why_and_hands_on_no_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        for _ in 0..=MAX_DEPTH {
            deep.push("d");
        }
        fs::create_dir_all(&deep).unwrap();
        fs::write(dir.path().join("a"), "first").unwrap();
        let whole = scan(dir.path(), &Exclude::default()).err().unwrap();
        let parts = scan_in_parts(dir.path(), Arc::default());
        let walked = collect(parts).err().unwrap();
        assert_eq!(walked.to_string(), whole.to_string());
        assert!(walked.to_string().contains("deeper than"), "{walked}");
    }
}

#[cfg(test)]
mod properties {
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::symlink;

    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    use proptest::prelude::*;

    use super::*;
    use crate::restore::Restorer;

    #[derive(Debug, Clone)]
    enum Node {
        File(Vec<u8>, u32),
        Dir(u32),
        Link(String),
    }

    /// Random trees: up to 30 paths of 1-3 segments from a small alphabet (so names
    /// collide and nest), with contents, modes and link targets.
    fn tree() -> impl Strategy<Value = BTreeMap<String, Node>> {
        let segment = "[ab.é -]{1,3}";
        let path = proptest::collection::vec(segment, 1..4).prop_map(|s| s.join("/"));
        let node = prop_oneof![
            (
                proptest::collection::vec(any::<u8>(), 0..3000),
                prop_oneof![Just(0o644u32), Just(0o755), Just(0o600)]
            )
                .prop_map(|(data, mode)| Node::File(data, mode)),
            prop_oneof![Just(0o755u32), Just(0o700)].prop_map(Node::Dir),
            "[a-z./]{1,10}".prop_map(Node::Link),
        ];
        proptest::collection::btree_map(path, node, 0..30)
    }

    /// Creates the nodes, skipping any that would go through a symlink or a file.
    fn build(root: &Path, nodes: &BTreeMap<String, Node>) {
        for (path, node) in nodes {
            let full = root.join(path);
            let through_non_dir = Path::new(path)
                .ancestors()
                .skip(1)
                .any(|a| fs::symlink_metadata(root.join(a)).is_ok_and(|m| !m.is_dir()));
            let parent = full.parent().unwrap();
            let dotted = path.split('/').any(|s| s == "." || s == "..");
            if dotted
                || through_non_dir
                || fs::create_dir_all(parent).is_err()
                || fs::symlink_metadata(&full).is_ok()
            {
                continue;
            }
            match node {
                Node::File(data, mode) => {
                    fs::write(&full, data).unwrap();
                    fs::set_permissions(&full, fs::Permissions::from_mode(*mode)).unwrap();
                }
                Node::Dir(mode) => {
                    fs::create_dir(&full).unwrap();
                    fs::set_permissions(&full, fs::Permissions::from_mode(*mode)).unwrap();
                }
                Node::Link(target) => symlink(target, &full).unwrap(),
            }
        }
    }

    fn snapshot(root: &Path) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
            let e = e.unwrap();
            let meta = fs::symlink_metadata(e.path()).unwrap();
            let what = if meta.file_type().is_symlink() {
                format!("link {:?}", fs::read_link(e.path()).unwrap())
            } else if meta.is_dir() {
                format!(
                    "dir {:o} {}.{}",
                    meta.mode() & 0o7777,
                    meta.mtime(),
                    meta.mtime_nsec()
                )
            } else {
                format!(
                    "file {:o} {}.{} {:?}",
                    meta.mode() & 0o7777,
                    meta.mtime(),
                    meta.mtime_nsec(),
                    fs::read(e.path()).unwrap()
                )
            };
            out.push((e.path().strip_prefix(root).unwrap().to_path_buf(), what));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn scan_stream_and_restore_round_trip(nodes in tree(), cut in 1usize..5000) {
            let work = tempfile::tempdir().unwrap();
            let src = work.path().join("src");
            fs::create_dir(&src).unwrap();
            build(&src, &nodes);

            let tree = scan(&src, &Exclude::default()).unwrap();
            let stream = crate::tree_stream::content(tree.clone()).unwrap();
            let out = work.path().join("out");
            let mut restorer = Restorer::create(&out, tree.entries, 0).unwrap();
            // Content arrives in pieces of arbitrary size.
            for piece in stream.chunks(cut) {
                restorer.write_all(piece).unwrap();
            }
            restorer.finish().unwrap();
            prop_assert_eq!(snapshot(&out), snapshot(&src));
        }

        #[test]
        fn a_tree_handed_on_in_parts_is_the_tree_scan_makes(nodes in tree()) {
            let work = tempfile::tempdir().unwrap();
            build(work.path(), &nodes);
            let whole = scan(work.path(), &Exclude::default()).unwrap();
            let walked = super::tests::collect(scan_in_parts(work.path(), Arc::default())).unwrap();
            prop_assert!(super::tests::same_tree(&walked, &whole));
        }
    }
}
