//! Directory listings read ahead of an update, on a thread of its own.
//!
//! An in-place update lists every directory that exists already, to find what the
//! new tree lacks; that `getdents` pass was most of the update thread's own time on a
//! 4,000-directory tree, while the other core sat mostly idle waiting for the next
//! chunk. The lister walks the new tree's directories in order, a bounded number
//! (and names) ahead of the update, and the update takes a listing only when the
//! directory is still the one listed, unchanged since (the same device, inode, size,
//! mtime and ctime, a [`Stamp`]):
//! otherwise, or when the lister is not there yet, it lists the directory itself.
//!
//! A directory changed within the filesystem's timestamp granularity of its listing
//! (20 ms, or 2 s where it keeps whole seconds, as for tree states) is not listed
//! ahead: a change in the same tick would leave its times as they were. (A name added
//! while the update runs may be missed either way, as it was when the update listed
//! every directory itself; so may one added on an NFS server whose clock lags the
//! runner's by more than that.)

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::DirWalker;
use crate::restore::list_names;
use crate::state::{Stamp, age_at, granularity_of};

/// How many directories, and names in all, the lister may hold ahead of the update:
/// what bounds its memory (a directory of 10^5 files is listed alone).
const AHEAD_DIRS: usize = 256;
const AHEAD_NAMES: usize = 64 * 1024;

/// A directory as listed: its stamp when it was (adding or removing a name changes
/// its mtime and ctime), and its names.
struct Listing {
    stamp: Stamp,
    names: Vec<OsString>,
}

struct Shared {
    /// The new tree's directories (relative paths), in tree order.
    paths: Vec<Vec<u8>>,
    /// Per directory: taken by the lister or the update, whichever came first.
    claimed: Vec<AtomicBool>,
    /// Per directory: the listing, held locked while the lister reads it.
    listings: Vec<Mutex<Option<Listing>>>,
    /// How many directories the update has reached, and the names listed ahead of it.
    reached: AtomicUsize,
    names_held: AtomicUsize,
    stop: AtomicBool,
}

/// The update's side of the listings read ahead.
pub(super) struct ListingsAhead {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ListingsAhead {
    /// Starts listing `dirs` (relative paths in tree order) below `root`; `None` when
    /// there are none or no thread can be had (the update then lists them itself).
    pub(super) fn start(root: OwnedFd, dirs: Vec<Vec<u8>>) -> Option<ListingsAhead> {
        if dirs.is_empty() {
            return None;
        }
        let shared = Arc::new(Shared {
            claimed: dirs.iter().map(|_| AtomicBool::new(false)).collect(),
            listings: dirs.iter().map(|_| Mutex::new(None)).collect(),
            paths: dirs,
            reached: AtomicUsize::new(0),
            names_held: AtomicUsize::new(0),
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
        let listing = self.reach(n)?;
        (listing.stamp == Stamp::of_stat(st)).then_some(listing.names)
    }

    /// Notes that the update reached the `n`th directory and needs no listing of it
    /// (it creates it).
    pub(super) fn pass(&self, n: usize) {
        self.reach(n);
    }

    /// Claims the `n`th directory for the update, and takes the listing the lister
    /// made of it, if any (waiting for one under way).
    fn reach(&self, n: usize) -> Option<Listing> {
        let shared = &self.shared;
        shared.reached.store(n + 1, Ordering::Relaxed);
        let lister_had_it = shared.claimed.get(n)?.swap(true, Ordering::AcqRel);
        let listing = match lister_had_it {
            // The lister holds the lock while it reads: this waits for it.
            true => shared.listings[n].lock().ok()?.take(),
            false => None,
        };
        if let Some(listing) = &listing {
            shared
                .names_held
                .fetch_sub(listing.names.len(), Ordering::Relaxed);
        }
        if let Some(thread) = &self.thread {
            thread.thread().unpark();
        }
        listing
    }
}

impl Drop for ListingsAhead {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// Lists the directories in order, each through its parent (never through a
/// symlink), within [`AHEAD_DIRS`] and [`AHEAD_NAMES`] of the update.
fn list_ahead(shared: &Shared, root: OwnedFd) {
    let mut walker = DirWalker::new(root.as_fd());
    for (n, path) in shared.paths.iter().enumerate() {
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let near = n < shared.reached.load(Ordering::Relaxed) + AHEAD_DIRS;
            if near && shared.names_held.load(Ordering::Relaxed) < AHEAD_NAMES {
                break;
            }
            // The update unparks it at every directory it reaches.
            std::thread::park_timeout(Duration::from_millis(10));
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
        let stamp = Stamp::of_stat(&st);
        if changed_recently(stamp, std::time::SystemTime::now()) {
            continue;
        }
        if let Ok(names) = list_names(dir) {
            shared.names_held.fetch_add(names.len(), Ordering::Relaxed);
            *slot = Some(Listing { stamp, names });
        }
    }
}

/// Whether a directory of `stamp` changed within its filesystem's timestamp
/// granularity of `now` (or after it).
fn changed_recently(stamp: Stamp, now: std::time::SystemTime) -> bool {
    let window = granularity_of([stamp.mtime, stamp.ctime]);
    age_at(stamp.latest_ns(), now) < window.as_nanos() as i128
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    fn stat(path: &std::path::Path) -> rustix::fs::Stat {
        rustix::fs::lstat(path).unwrap()
    }

    /// Waits for the lister to go through every directory (fewer than [`AHEAD_DIRS`]).
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
        // Old enough not to be racy, on fine timestamps or whole seconds.
        let Stamp { mtime, ctime, .. } = Stamp::of_stat(&stat(&root.path().join("a")));
        std::thread::sleep(granularity_of([mtime, ctime]) + Duration::from_millis(30));
        let root_fd = rustix::fs::open(
            root.path(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let dirs = ["a", "a/b", "c", "new"]
            .map(|d| d.as_bytes().to_vec())
            .to_vec();
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
        // Every listing was handed over or dropped; none is held.
        ahead.pass(3);
        assert_eq!(ahead.shared.names_held.load(Ordering::Relaxed), 0);
        assert_eq!(names(ahead.take(4, &stat(root.path()))), None);
    }

    #[test]
    fn a_directory_changed_within_the_timestamp_granularity_is_not_listed_ahead() {
        let now = SystemTime::now();
        let ns = |ago: Duration| {
            i64::try_from((now.duration_since(UNIX_EPOCH).unwrap() - ago).as_nanos()).unwrap()
        };
        let times = |mtime, ctime| Stamp {
            dev: 0,
            ino: 0,
            size: 0,
            mtime,
            ctime,
        };
        let fine = |ago_ms: u64| ns(Duration::from_millis(ago_ms)) | 1;
        assert!(changed_recently(times(fine(500), fine(5)), now));
        assert!(!changed_recently(times(fine(500), fine(100)), now));
        // Whole seconds (a filesystem that keeps no more): two of them.
        let whole = |ago_s: u64| ns(Duration::from_secs(ago_s)) / 1_000_000_000 * 1_000_000_000;
        assert!(changed_recently(times(whole(10), whole(1)), now));
        assert!(!changed_recently(times(whole(10), whole(4)), now));
        // From the future (a server's clock ahead): never listed ahead.
        assert!(changed_recently(
            times(fine(0), ns(Duration::ZERO) + 10_000_000),
            now
        ));
    }
}
