//! Threads that create and write a restore's small files. A tree of small files costs
//! its restore one open, write, time-set, stat and close per file, nearly all of it
//! kernel work; done by one thread that was the whole restore's bottleneck (a
//! node_modules tree: 0.9 s of one core for 65k files while the others waited).

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::fs::OFlags;
use rustix::io::Errno;

use crate::chunk::format::Entry;
use crate::state::Stamp;

/// Files up to this size are handed to the writers whole; larger ones are written as
/// their content streams in, since their cost is the bytes, not the calls.
pub(super) const HANDED_MAX: u64 = 256 * 1024;

/// Files are handed over in batches of this many, or fewer if they hold
/// [`BATCH_BYTES`]: one hand-over per file costs a thread wake-up each.
const BATCH_FILES: usize = 32;
const BATCH_BYTES: usize = 1024 * 1024;

/// Batches waiting for a writer at most.
const QUEUED: usize = 4;

/// A directory of the new tree, open so files are created through it, with the count
/// of its files still being written: its own times are set once that is zero.
pub(super) struct Parent {
    pub fd: OwnedFd,
    pending: AtomicUsize,
}

impl Parent {
    pub fn new(fd: OwnedFd) -> Arc<Parent> {
        Arc::new(Parent {
            fd,
            pending: AtomicUsize::new(0),
        })
    }

    /// Whether no file created in it is still being written.
    pub fn settled(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }
}

/// A whole small file to create in `parent`.
pub(super) struct SmallFile {
    /// Its entry's index, and its number among the tree's files (stream order).
    pub entry: usize,
    pub ordinal: usize,
    pub parent: Arc<Parent>,
    pub name: OsString,
    /// Its entry (mode, times, path for errors) and content.
    pub meta: Entry,
    pub data: Vec<u8>,
}

/// A file the writers could not make.
pub(super) enum Failure {
    /// Creating it failed (the restorer explains an `EEXIST`).
    Create {
        entry: usize,
        errno: Errno,
    },
    /// Its writer panicked.
    Panicked {
        entry: usize,
    },
    Other(anyhow::Error),
}

/// What a writer reports for one file: its number and its stamp, or why it failed.
pub(super) type Done = (usize, Result<Option<Stamp>, Failure>);

/// The writer threads, fed through a bounded queue.
pub(super) struct Writers {
    jobs: Option<SyncSender<Vec<SmallFile>>>,
    batch: Vec<SmallFile>,
    batch_bytes: usize,
    done: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
    /// Files handed over whose report has not been taken yet.
    outstanding: usize,
}

impl Writers {
    /// As many writers as cores, from two (the system calls wait on the filesystem,
    /// not only on the CPU) to eight (the calls of one directory share its lock).
    pub fn start() -> anyhow::Result<Writers> {
        let count = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 8);
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Vec<SmallFile>>(QUEUED);
        let (report, done) = std::sync::mpsc::channel();
        let queue = Arc::new(Mutex::new(queue));
        let threads = (0..count)
            .map(|_| {
                let (queue, report) = (queue.clone(), report.clone());
                std::thread::Builder::new()
                    .name("cacher-writer".into())
                    .spawn(move || work(&queue, &report))
            })
            .collect::<std::io::Result<_>>()
            .map_err(|e| anyhow::anyhow!("cannot start the file writers: {e}"))?;
        Ok(Writers {
            jobs: Some(jobs),
            batch: Vec::with_capacity(BATCH_FILES),
            batch_bytes: 0,
            done,
            threads,
            outstanding: 0,
        })
    }

    /// Hands `file` to a writer (with the next ones, in a batch), waiting while the
    /// queue is full.
    pub fn write(&mut self, file: SmallFile) -> anyhow::Result<()> {
        file.parent.pending.fetch_add(1, Ordering::AcqRel);
        self.outstanding += 1;
        self.batch_bytes += file.data.len();
        self.batch.push(file);
        if self.batch.len() >= BATCH_FILES || self.batch_bytes >= BATCH_BYTES {
            self.send_batch()?;
        }
        Ok(())
    }

    fn send_batch(&mut self) -> anyhow::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_FILES));
        self.batch_bytes = 0;
        let jobs = self.jobs.as_ref().expect("writers are running");
        if let Err(e) = jobs.send(batch) {
            for file in e.0 {
                file.parent.pending.fetch_sub(1, Ordering::AcqRel);
                self.outstanding -= 1;
            }
            anyhow::bail!("the file writers stopped");
        }
        Ok(())
    }

    /// The report of a file written, if one is in, without waiting.
    pub fn try_report(&mut self) -> Option<Done> {
        match self.done.try_recv() {
            Ok(done) => {
                self.outstanding -= 1;
                Some(done)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }

    /// Hands over the files gathered so far, without waiting for a full batch.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.send_batch()
    }

    /// The next report, waiting for it; `None` once every file handed over is
    /// reported.
    pub fn wait_report(&mut self) -> anyhow::Result<Option<Done>> {
        if self.outstanding == 0 {
            return Ok(None);
        }
        match self.done.recv() {
            Ok(done) => {
                self.outstanding -= 1;
                Ok(Some(done))
            }
            // Only a writer killed outside a panic leaves files unreported: the tree
            // would lack them.
            Err(_) => anyhow::bail!(
                "the file writers stopped with {} files unwritten",
                self.outstanding
            ),
        }
    }

    /// Stops the writers once the queue is empty and waits for them; the files queued
    /// are written first, the batch not handed over yet never is.
    pub fn stop(&mut self) {
        self.batch.clear();
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A writer thread: writes the batches of `queue` and reports each file.
fn work(queue: &Mutex<Receiver<Vec<SmallFile>>>, report: &Sender<Done>) {
    loop {
        let batch = queue.lock().expect("queue lock").recv();
        let Ok(batch) = batch else { return };
        for job in batch {
            let (ordinal, entry, parent) = (job.ordinal, job.entry, job.parent.clone());
            // A panic is reported as a failure: a writer that vanished would leave its
            // file's directory waiting forever.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write_small(job)))
                    .unwrap_or(Err(Failure::Panicked { entry }));
            parent.pending.fetch_sub(1, Ordering::AcqRel);
            if report.send((ordinal, result)).is_err() {
                return;
            }
        }
    }
}

/// Creates `job`'s file exclusively in its parent, writes it, and gives it its mode and
/// times; its stamp then.
fn write_small(job: SmallFile) -> Result<Option<Stamp>, Failure> {
    let fd = rustix::fs::openat(
        job.parent.fd.as_fd(),
        &job.name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        super::permissions(job.meta.mode),
    )
    .map_err(|errno| Failure::Create {
        entry: job.entry,
        errno,
    })?;
    let mut file = File::from(fd);
    file.write_all(&job.data).map_err(|e| {
        Failure::Other(anyhow::anyhow!(
            "cannot write {}: {e}",
            crate::chunk::format::show(&job.meta.path)
        ))
    })?;
    super::complete_file(file.as_fd(), &job.meta).map_err(Failure::Other)?;
    Ok(file.metadata().ok().map(|m| Stamp::of(&m)))
}
