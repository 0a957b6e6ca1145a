//! Temp files and directories beside or inside a destination, and the removal of what
//! killed runs left behind.
//!
//! Everything cacher writes to a user's path goes first to a name starting with
//! `.cacher-` and is renamed into place only when complete, so a failed or interrupted
//! run leaves the destination as it was.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustix::fs::{AtFlags, Mode, OFlags};
use tempfile::NamedTempFile;

/// Name prefix of a tree being restored (inside DIR, or beside it before 0.2).
pub const RESTORE_PREFIX: &str = ".cacher-restore-";
/// Name prefix of an old entry of DIR moved aside while a restore swaps in the new one.
pub const ASIDE_PREFIX: &str = ".cacher-old-";
/// A `.part` file untouched this long belongs to a dead download (a live one writes on).
const STALE_PART: Duration = Duration::from_secs(3600);
/// A restore directory this old belongs to a dead restore (a live one creates its
/// entries at the start, so the directory's age says nothing until then).
const STALE_RESTORE: Duration = Duration::from_secs(24 * 3600);
/// An aside entry whose rename is this old belongs to a dead restore: a live one deletes
/// its asides right after the swap.
const STALE_ASIDE: Duration = Duration::from_secs(3600);

/// Prefix of what an in-place update stages beside the entry it replaces (see
/// [`crate::update`]).
pub const NEW_PREFIX: &str = ".cacher-new-";

/// A fresh name to stage a new node under beside the entry it replaces.
pub fn new_name() -> std::ffi::OsString {
    format!("{NEW_PREFIX}{}", unique_tag()).into()
}

/// The tail of a temp name: the pid and a count, which no other call in this process
/// nor another live process in this pid namespace repeats, then 64 random bits seeded
/// from the OS (containers sharing a volume can share pids; leftovers of dead
/// processes can share both). fastrand alone seeds each thread from the clock and the
/// thread's number, so two processes can draw alike (two restores racing into one new
/// DIR once failed on it), and an aside is moved with a plain rename, which replaces
/// what it meets.
pub fn unique_tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Each RandomState has fresh keys: the hash of nothing is a random draw.
    let random = std::hash::RandomState::new().build_hasher().finish();
    format!("{:x}-{n:x}-{random:016x}", std::process::id())
}

/// Whether `name` is one of cacher's own temp entries, which uploads never include.
pub fn is_temp_name(name: &[u8]) -> bool {
    [RESTORE_PREFIX, ASIDE_PREFIX, NEW_PREFIX]
        .iter()
        .any(|p| name.starts_with(p.as_bytes()))
}

/// A temp file in the destination's directory (made if missing), removed unless
/// persisted.
pub fn temp_beside(dest: &Path) -> anyhow::Result<NamedTempFile> {
    let dir = parent_of(dest);
    check_file_destination(dest)?;
    // As `aws s3 cp` does: a job downloads into a cache directory not made yet.
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    remove_stale_leftovers(&dir);
    tempfile::Builder::new()
        .prefix(".cacher-")
        .suffix(".part")
        .tempfile_in(&dir)
        .with_context(|| format!("cannot create a temp file in {}", dir.display()))
}

/// Refuses a destination a file cannot be renamed over as asked: a path that names
/// no file (ending in `/`, `.` or `..`), a directory, and a device, fifo or socket
/// (or a symlink to one), which the rename would replace (`/dev/null` as root). A
/// symlink to a file is replaced by the file, not written through.
pub fn check_file_destination(dest: &Path) -> anyhow::Result<()> {
    let shown = dest.display();
    let last = dest
        .as_os_str()
        .as_encoded_bytes()
        .rsplit(|b| *b == b'/')
        .next();
    if matches!(last, Some(b"" | b"." | b"..")) {
        return Err(crate::cli::input_error(format!(
            "{shown} names a directory, not a file; give a file path"
        )));
    }
    let refused = |meta: std::fs::Metadata| match meta.file_type() {
        t if t.is_dir() => Some("is a directory"),
        t if !t.is_file() && !t.is_symlink() => Some("is a device, fifo or socket"),
        _ => None,
    };
    // The path itself, then what a symlink there leads to.
    let why = std::fs::symlink_metadata(dest)
        .ok()
        .and_then(refused)
        .or_else(|| std::fs::metadata(dest).ok().and_then(refused));
    match why {
        Some(why) => Err(crate::cli::input_error(format!(
            "{shown} {why}; give a file path"
        ))),
        None => Ok(()),
    }
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Moves a finished temp file over `dest` with ordinary file permissions.
pub fn persist(tmp: NamedTempFile, dest: &Path) -> anyhow::Result<()> {
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .ok();
    tmp.persist(dest)
        .map(|_| ())
        .with_context(|| format!("cannot move the download into {}", dest.display()))
}

/// Removes what killed runs left in `dir`: `.cacher-*.part` files, restore directories
/// and aside entries, each once it is old enough that no live run can own it (see the
/// constants above). Best effort: errors are ignored, as another run may remove the
/// same leftover.
pub fn remove_stale_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let Ok(handle) = std::fs::File::open(dir) else {
        return;
    };
    let now = SystemTime::now();
    let age = |t: io::Result<SystemTime>| {
        t.ok()
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default()
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let text = name.to_string_lossy();
        let Ok(meta) = entry.metadata() else { continue };
        let stale = if text.starts_with(".cacher-") && text.ends_with(".part") && meta.is_file() {
            age(meta.modified()) > STALE_PART
        } else if text.starts_with(RESTORE_PREFIX) && meta.is_dir() {
            age(meta.modified()) > STALE_RESTORE
        } else if text.starts_with(ASIDE_PREFIX) {
            // A rename changes the ctime only: it says when the entry was moved aside.
            age(Ok(changed(&meta))) > STALE_ASIDE
        } else if text.starts_with(NEW_PREFIX) {
            // Staged with the entry's old mtime: the ctime says when it was written.
            age(Ok(changed(&meta))) > STALE_RESTORE
        } else {
            false
        };
        if stale {
            let _ = remove_tree(handle.as_fd(), &name);
        }
    }
}

/// When `meta`'s inode last changed (its ctime).
fn changed(meta: &std::fs::Metadata) -> SystemTime {
    use std::os::unix::fs::MetadataExt;
    SystemTime::UNIX_EPOCH + Duration::from_secs(meta.ctime().max(0) as u64)
}

/// Removes `name` in the directory `parent`, and everything below it when it is a
/// directory, without following symlinks. Directories without owner permissions (a Go
/// module cache is 0555) are opened up first, as `rm -rf` would need too.
pub fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let stat = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Directory {
        return Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())?);
    }
    if stat.st_mode & 0o700 != 0o700 {
        // Not through a handle: a directory without owner read cannot be opened first.
        // It was just seen as a directory, not a symlink, and is not followed below.
        rustix::fs::chmodat(parent, name, Mode::from_raw_mode(0o700), AtFlags::empty())?;
    }
    let dir = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut children = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let child = entry.file_name().to_bytes();
        if child != b"." && child != b".." {
            children.push(std::ffi::OsString::from(
                <OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(child),
            ));
        }
    }
    for child in children {
        remove_tree(dir.as_fd(), &child)?;
    }
    drop(dir);
    Ok(rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_tree_opens_read_only_directories_and_never_follows_links() {
        let work = tempfile::tempdir().unwrap();
        let outside = work.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        let tree = work.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/f"), "y").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("a/link")).unwrap();
        for d in ["a/b", "a", ""] {
            std::fs::set_permissions(tree.join(d), std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        let handle = std::fs::File::open(work.path()).unwrap();
        remove_tree(handle.as_fd(), OsStr::new("tree")).unwrap();
        assert!(!tree.exists());
        assert!(outside.join("keep").exists());
    }
}
