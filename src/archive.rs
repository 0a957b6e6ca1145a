//! Directory trees ⇄ (entries, content stream).
//!
//! Upload side: [`scan`] walks a tree in a fixed order and records each node's metadata;
//! the regular files' bytes, back to back, make the content stream
//! ([`crate::tree_stream`] cuts it), so metadata changes (an `npm ci` that rewrote every
//! mtime) leave the chunks untouched. The download side is [`crate::restore`].

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
    let fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::NOTDIR => anyhow::anyhow!("{} is not a directory", root.display()),
        e => anyhow::Error::new(std::io::Error::from(e))
            .context(format!("cannot read {}", root.display())),
    })?;
    let (entries, files) = scan_dir(root, fd, &[], 1, exclude)?;
    Ok(Tree {
        root: root.to_path_buf(),
        entries,
        files,
        single_file: false,
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

/// The entries and files below the open directory `fd`, whose path relative to the
/// root is `rel`; each file's `entry` counts from the first of these entries.
fn scan_dir(
    root: &Path,
    fd: OwnedFd,
    rel: &[u8],
    depth: usize,
    exclude: &Exclude,
) -> anyhow::Result<(Vec<Entry>, Vec<ScannedFile>)> {
    let shown = |name: &[u8]| {
        root.join(OsStr::from_bytes(&join_path(rel, name)))
            .display()
            .to_string()
    };
    let mut names: Vec<Vec<u8>> = Vec::new();
    // Read through the handle itself: `Dir::read_from` would open the directory again
    // and ask its flags, three more system calls per directory.
    let walk_error = || format!("cannot walk {}", shown(b""));
    let mut dir = rustix::fs::Dir::new(fd).with_context(walk_error)?;
    for item in &mut dir {
        let item = item.with_context(|| format!("cannot walk {}", shown(b"")))?;
        let name = item.file_name().to_bytes();
        // cacher's own temp names, at any depth: an in-place restore stages beside
        // the entries it replaces, and a killed one may leave them.
        let skip = name == b"." || name == b".." || crate::temp::is_temp_name(name);
        if !skip {
            names.push(name.to_vec());
        }
    }
    names.sort_unstable();
    let fd = dir.fd().with_context(walk_error)?;
    // Each child as an entry (and a file's stamp), with its name for the system calls.
    let mut children: Vec<(Entry, Option<ScannedFile>, std::ffi::CString)> =
        Vec::with_capacity(names.len());
    for name in names {
        let path = join_path(rel, &name);
        let c_name = std::ffi::CString::new(name).expect("names hold no NUL");
        let name = c_name.as_bytes();
        let st = rustix::fs::statat(fd, &c_name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(std::io::Error::from)
            .with_context(|| format!("cannot stat {}", shown(name)))?;
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
                    entry: 0, // set when the lists are joined below
                    stamp,
                });
                EntryKind::File { size: stamp.size }
            }
            rustix::fs::FileType::Symlink => {
                let target = rustix::fs::readlinkat(fd, &c_name, Vec::new())
                    .map_err(std::io::Error::from)
                    .with_context(|| format!("cannot read link {}", shown(name)))?
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
                    shown(name)
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
        children.push((entry, file, c_name));
    }
    // A subdirectory is opened by the task that scans it, so handles stay bounded by
    // the depth times the threads however wide the tree is.
    let subtrees: Vec<Option<(Vec<Entry>, Vec<ScannedFile>)>> = children
        .par_iter()
        .map(|(entry, _, name)| {
            if entry.kind != EntryKind::Dir {
                return Ok(None);
            }
            let sub = rustix::fs::openat(
                fd,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(std::io::Error::from)
            .with_context(|| format!("cannot walk {}", shown(name.as_bytes())))?;
            scan_dir(root, sub, &entry.path, depth + 1, exclude).map(Some)
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
    for ((entry, file, _), subtree) in children.into_iter().zip(subtrees) {
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
    }
}
