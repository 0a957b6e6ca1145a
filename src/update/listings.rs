//! Directory listings read ahead of an update, on a thread of its own.
//!
//! An in-place update lists every directory that exists already, to find what the
//! new tree lacks; that `getdents` pass was most of the update thread's own time on a
//! 4,000-directory tree, while the other core sat mostly idle waiting for the next
//! chunk. The lister walks the new tree's directories in order, a bounded number
//! ahead of the update, and the update takes a listing only when the directory is
//! still the one listed, unchanged since (same inode, mtime and ctime): otherwise, or
//! when the lister is not there yet, it lists the directory itself. As with git's
//! racy index, a directory changed within [`RACY`] of its listing is not listed
//! ahead: a change in the same tick of the filesystem's clock would leave its times
//! as they were. (A name added while the update runs may be missed either way, as it
//! was when the update listed every directory itself.)

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::DirWalker;
use crate::restore::list_names;

/// How many directories the lister may run ahead of the update: what bounds the names
/// held in memory.
const AHEAD: usize = 256;

/// A directory changed this recently is listed by the update itself (see the module
/// doc); far above any filesystem clock's tick.
const RACY: Duration = Duration::from_millis(50);

/// A directory as listed: what identifies its state, and its names.
struct Listing {
    identity: Identity,
    names: Vec<OsString>,
}

/// Device, inode, mtime and ctime of a directory: any name added or removed changes
/// its mtime and ctime.
type Identity = (u64, u64, (i64, i64), (i64, i64));

fn identity(st: &rustix::fs::Stat) -> Identity {
    #[allow(clippy::unnecessary_cast)] // the field types of `stat` differ between systems
    (
        st.st_dev as u64,
        st.st_ino as u64,
        (st.st_mtime as i64, st.st_mtime_nsec as i64),
        (st.st_ctime as i64, st.st_ctime_nsec as i64),
    )
}

struct Shared {
    /// The new tree's directories (relative paths), in tree order.
    paths: Vec<Vec<u8>>,
    /// Per directory: taken by the lister or the update, whichever came first.
    claimed: Vec<AtomicBool>,
    /// Per directory: the listing, held locked while the lister reads it.
    listings: Vec<Mutex<Option<Listing>>>,
    /// How many directories the update has reached.
    reached: AtomicUsize,
    stop: AtomicBool,
}

/// The update's side of the listings read ahead.
pub(super) struct ListingsAhead {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ListingsAhead {
    /// Starts listing `dirs` (relative paths in tree order) below `root`; `None` when
    /// the thread cannot be had (the update then lists every directory itself).
    pub(super) fn start(root: OwnedFd, dirs: Vec<Vec<u8>>) -> Option<ListingsAhead> {
        let shared = Arc::new(Shared {
            claimed: dirs.iter().map(|_| AtomicBool::new(false)).collect(),
            listings: dirs.iter().map(|_| Mutex::new(None)).collect(),
            paths: dirs,
            reached: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let lister = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cacher-lister".into())
            .spawn(move || list_ahead(&lister, root))
            .ok()?;
        Some(ListingsAhead {
            shared,
            thread: Some(thread),
        })
    }

    /// The names in the `n`th directory (in tree order), which the update found as
    /// `st`, if the lister read them from that very state; `None` when the update must
    /// list it itself.
    pub(super) fn take(&self, n: usize, st: &rustix::fs::Stat) -> Option<Vec<OsString>> {
        if !self.pass(n) {
            return None;
        }
        let shared = &self.shared;
        // The lister holds the lock while it reads: this waits for it.
        let listing = shared.listings[n].lock().ok()?.take()?;
        (listing.identity == identity(st)).then_some(listing.names)
    }
}

impl ListingsAhead {
    /// Notes that the update reached the `n`th directory (which it may not need
    /// listed: one it creates); whether the lister had claimed it.
    pub(super) fn pass(&self, n: usize) -> bool {
        let shared = &self.shared;
        shared.reached.store(n + 1, Ordering::Relaxed);
        shared
            .claimed
            .get(n)
            .is_some_and(|claimed| claimed.swap(true, Ordering::AcqRel))
    }
}

impl Drop for ListingsAhead {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Lists the directories in order, each through its parent (never through a
/// symlink), at most [`AHEAD`] past the one the update has reached.
fn list_ahead(shared: &Shared, root: OwnedFd) {
    let mut walker = DirWalker::new(root.as_fd());
    for (n, path) in shared.paths.iter().enumerate() {
        while n >= shared.reached.load(Ordering::Relaxed) + AHEAD {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::park_timeout(Duration::from_micros(500));
        }
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut slot) = shared.listings[n].lock() else {
            return;
        };
        if shared.claimed[n].swap(true, Ordering::AcqRel) {
            continue; // the update got there first
        }
        // A directory the new tree adds is not there: nothing to list.
        let Ok(dir) = walker.open(path) else {
            continue;
        };
        let Ok(st) = rustix::fs::fstat(dir) else {
            continue;
        };
        if changed_recently(&st) {
            continue;
        }
        if let Ok(names) = list_names(dir) {
            *slot = Some(Listing {
                identity: identity(&st),
                names,
            });
        }
    }
}

/// Whether a directory's mtime or ctime lies within [`RACY`] of now (or ahead of it).
fn changed_recently(st: &rustix::fs::Stat) -> bool {
    let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else {
        return true;
    };
    let (_, _, mtime, ctime) = identity(st);
    let latest = mtime.max(ctime);
    let latest = Duration::new(
        latest.0.max(0) as u64,
        latest.1.clamp(0, 999_999_999) as u32,
    );
    now.saturating_sub(latest) < RACY
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn stat(path: &std::path::Path) -> rustix::fs::Stat {
        rustix::fs::lstat(path).unwrap()
    }

    /// Waits for the lister to go through every directory (fewer than [`AHEAD`]).
    fn listed(mut ahead: ListingsAhead) -> ListingsAhead {
        ahead.thread.take().unwrap().join().unwrap();
        ahead
    }

    fn names(list: Option<Vec<OsString>>) -> Option<Vec<String>> {
        list.map(|l| l.iter().map(|n| n.to_string_lossy().into_owned()).collect())
    }

    #[test]
    fn a_listing_is_taken_only_while_its_directory_is_as_listed() {
        let root = tempfile::tempdir().unwrap();
        for dir in ["a", "a/b", "c", "x"] {
            fs::create_dir(root.path().join(dir)).unwrap();
        }
        fs::write(root.path().join("a/one"), b"1").unwrap();
        fs::write(root.path().join("c/two"), b"2").unwrap();
        let root_fd = rustix::fs::open(
            root.path(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let dirs = ["a", "a/b", "c", "new"]
            .map(|d| d.as_bytes().to_vec())
            .to_vec();

        // Changed just now: the update lists them itself.
        let ahead =
            listed(ListingsAhead::start(root_fd.try_clone().unwrap(), dirs.clone()).unwrap());
        assert_eq!(names(ahead.take(0, &stat(&root.path().join("a")))), None);

        std::thread::sleep(RACY * 2);
        let ahead = listed(ListingsAhead::start(root_fd, dirs).unwrap());
        let a = root.path().join("a");
        assert_eq!(
            names(ahead.take(0, &stat(&a))),
            Some(vec!["b".into(), "one".into()])
        );
        // Taken once.
        assert_eq!(names(ahead.take(0, &stat(&a))), None);
        // A name added after the listing: the listing is not taken.
        let c = root.path().join("c");
        fs::write(c.join("three"), b"3").unwrap();
        assert_eq!(names(ahead.take(2, &stat(&c))), None);
        // The same name now another directory.
        let b = root.path().join("a/b");
        let b_stat = stat(&b);
        fs::remove_dir(&b).unwrap();
        fs::rename(root.path().join("x"), &b).unwrap();
        assert_ne!(stat(&b).st_ino, b_stat.st_ino);
        assert_eq!(names(ahead.take(1, &stat(&b))), None);
        // Not there to list; past the end.
        assert!(!ahead.pass(3) || ahead.take(3, &stat(root.path())).is_none());
        assert_eq!(names(ahead.take(4, &stat(root.path()))), None);
    }
}
