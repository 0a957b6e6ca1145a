//! Directory trees ⇄ (entries, content stream).
//!
//! Upload side: [`scan`] walks a tree in a fixed order and records each node's metadata;
//! the regular files' bytes, back to back, make the content stream
//! ([`crate::tree_stream`] cuts it), so metadata changes (an `npm ci` that rewrote every
//! mtime) leave the chunks untouched. The download side is [`crate::restore`].

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::chunk::format::{Entry, EntryKind, MAX_DEPTH, MAX_PATH, show};
use crate::state::Stamp;
use crate::ui;

/// A scanned tree: its entries (parents first) and its regular files in stream order.
pub struct Tree {
    /// Every directory, file and symlink below the root.
    pub entries: Vec<Entry>,
    /// The regular files, in the order their bytes appear in the content stream.
    pub files: Vec<ScannedFile>,
}

/// A regular file as seen by the scan.
#[derive(Debug, Clone)]
pub struct ScannedFile {
    /// Absolute or root-joined path to read.
    pub path: PathBuf,
    /// Path relative to the root, as the manifest records it.
    pub rel: Vec<u8>,
    /// Size at scan time; exactly this many bytes go into the stream.
    pub size: u64,
    /// The file's stamp at scan time: to detect it changing while it is read, and to
    /// compare with a tree state.
    pub stamp: Stamp,
}

/// Walks `root` depth-first in byte order of names. Fifos, sockets and device nodes are
/// skipped with a warning; symlinks are recorded, never followed; cacher's own temp
/// entries at the top (a restore running into the same directory) are left out.
pub fn scan(root: &Path) -> anyhow::Result<Tree> {
    let meta = fs::metadata(root).with_context(|| format!("cannot read {}", root.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let mut tree = Tree {
        entries: Vec::new(),
        files: Vec::new(),
    };
    let walker = walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()))
        .into_iter()
        .filter_entry(|e| !(e.depth() == 1 && crate::temp::is_temp_name(e.file_name().as_bytes())));
    for item in walker {
        let item = item.with_context(|| format!("cannot walk {}", root.display()))?;
        let rel = item
            .path()
            .strip_prefix(root)
            .expect("walkdir yields paths under the root");
        if item.depth() > MAX_DEPTH {
            bail!(
                "{} is deeper than {MAX_DEPTH} directories, more than cacher restores",
                show(rel.as_os_str().as_bytes())
            );
        }
        if rel.as_os_str().len() > MAX_PATH {
            bail!(
                "{} is a {}-byte path; cacher stores paths of at most {MAX_PATH} bytes",
                show(rel.as_os_str().as_bytes()),
                rel.as_os_str().len()
            );
        }
        let meta = item
            .metadata()
            .with_context(|| format!("cannot stat {}", item.path().display()))?;
        let file_type = item.file_type();
        let kind = if file_type.is_dir() {
            EntryKind::Dir
        } else if file_type.is_file() {
            tree.files.push(ScannedFile {
                path: item.path().to_path_buf(),
                rel: rel.as_os_str().as_bytes().to_vec(),
                size: meta.len(),
                stamp: Stamp::of(&meta),
            });
            EntryKind::File { size: meta.len() }
        } else if file_type.is_symlink() {
            let target = fs::read_link(item.path())
                .with_context(|| format!("cannot read link {}", item.path().display()))?;
            if target.as_os_str().len() > MAX_PATH {
                bail!(
                    "the link {} points to a path longer than {MAX_PATH} bytes",
                    show(rel.as_os_str().as_bytes())
                );
            }
            EntryKind::Symlink {
                target: target.as_os_str().as_bytes().to_vec(),
            }
        } else {
            ui::warn(format!(
                "skipping {}: not a file, directory or symlink",
                item.path().display()
            ));
            continue;
        };
        tree.entries.push(Entry {
            path: rel.as_os_str().as_bytes().to_vec(),
            kind,
            mode: meta.mode() & 0o7777,
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec() as u32,
        });
    }
    Ok(tree)
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
        let tree = scan(dir.path()).unwrap();
        let paths: Vec<_> = tree.entries.iter().map(|e| e.path.clone()).collect();
        assert_eq!(paths, [&b"a.txt"[..], b"b", b"b/c", b"b/c/f"]);
    }
}

#[cfg(test)]
mod properties {
    use std::collections::BTreeMap;
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

            let tree = scan(&src).unwrap();
            let stream = crate::tree_stream::content(tree.files).unwrap();
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
