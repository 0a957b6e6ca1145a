//! Moving whole objects between files and a [`Store`]: multipart uploads and ranged,
//! concurrent downloads with bounded memory, retries, integrity checks and temp files.
//!
//! Uploads checksum every body (CRC32, verified by the server) and record the sha256 of
//! the whole file as metadata where it costs no extra pass; downloads pin every range to
//! one object version, verify size and any recorded or pinned sha256, and only then
//! rename the temp file over the destination. The chunk store sends its packs and
//! reads its ranges through the same engine. With a signing key, the entries it writes
//! are signed, and a download takes only what the configured [`Trust`] accepts.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{FutureExt, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::sign::Trust;
use crate::store::{Body, FirstBytes, ObjectInfo, PutOptions, Store, StoreError, StoreResult};
use crate::temp::{persist, temp_beside};
use crate::ui::{self, Progress};

/// Size of one ranged GET: large enough for throughput, small enough that `jobs` of
/// them in memory stay bounded (AWS advises 8-16 MiB).
const RANGE_SIZE: u64 = 8 * 1024 * 1024;
/// S3 allows at most this many parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;
/// Attempts per request on top of the SDK's own retries, for faults that outlast them.
const ATTEMPTS: u32 = 3;

/// A downloaded object whose content is not what it should be; the destination was
/// left untouched.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    /// The content does not match the sha256 recorded when it was uploaded.
    #[error(
        "{key} is corrupt: stored with sha256 {recorded}, but its content hashes to {actual}; destination left untouched"
    )]
    Corrupt {
        key: String,
        recorded: String,
        actual: String,
    },
    /// The content does not match the sha256 the user pinned.
    #[error(
        "sha256 mismatch for {key}: expected {expected}, got {actual}; destination left untouched"
    )]
    NotExpected {
        key: String,
        expected: String,
        actual: String,
    },
}

/// When to try a request again: temporary faults only, with growing pauses.
#[derive(Debug, Default)]
struct Backoff {
    attempts: u32,
}

impl Backoff {
    /// The pause before the next attempt, or `None` when `err` is final.
    fn next_delay(&mut self, err: &StoreError) -> Option<Duration> {
        self.attempts += 1;
        (err.is_temporary() && self.attempts < ATTEMPTS)
            .then(|| Duration::from_millis(500 << self.attempts))
    }
}

/// Range buffers handed back after use, so a download touches fresh memory only for
/// the first `jobs` ranges.
#[derive(Default)]
pub struct BufferPool(std::sync::Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    /// A buffer from the pool, or a new empty one.
    pub fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, buf: Vec<u8>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(buf);
    }
}

/// Concurrent whole-object transfers against one store.
pub struct Transfer {
    store: Arc<dyn Store>,
    jobs: usize,
    part_size: u64,
    multipart_threshold: u64,
    retries: AtomicU64,
    trust: Trust,
}

/// What one transfer did, for the summary line and `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time of the transfer.
    pub seconds: f64,
    /// Requests retried after a temporary fault, in the whole command so far.
    pub retries: u64,
    /// sha256 of the content, hex, when it was computed.
    pub sha256: Option<String>,
}

impl Transfer {
    /// A transfer engine using the configured concurrency and part sizes, that neither
    /// signs nor checks signatures (see [`Transfer::open`]).
    pub fn new(store: Arc<dyn Store>, config: &Config) -> Transfer {
        Transfer {
            store,
            jobs: config.jobs.value,
            part_size: config.part_size.value,
            multipart_threshold: config.multipart_threshold.value,
            retries: AtomicU64::new(0),
            trust: Trust::default(),
        }
    }

    /// The transfer engine of the configured store, signing and checking signatures
    /// with the configured keys.
    pub async fn open(config: &Config) -> anyhow::Result<Transfer> {
        let trust = Trust::from_config(config)?;
        let mut transfer = Transfer::new(crate::store::open(config).await?, config);
        transfer.trust = trust;
        Ok(transfer)
    }

    /// Which signatures this engine writes and accepts.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// The store this engine writes to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Runs `op` until it succeeds, fails permanently, or runs out of attempts.
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        let mut backoff = Backoff::default();
        loop {
            match op().await {
                Err(e) => self.pause_or_fail(what, e, &mut backoff).await?,
                ok => return ok,
            }
        }
    }

    /// Sleeps before the next attempt when `err` is worth retrying, else returns it.
    async fn pause_or_fail(
        &self,
        what: &str,
        err: StoreError,
        backoff: &mut Backoff,
    ) -> StoreResult<()> {
        let Some(delay) = backoff.next_delay(&err) else {
            return Err(err);
        };
        self.retries.fetch_add(1, Ordering::Relaxed);
        ui::verbose(format!("retrying {what} in {delay:?} after: {err}"));
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Concurrent requests per transfer.
    pub fn jobs(&self) -> usize {
        self.jobs
    }

    /// Retries done so far in this process, this engine's and the store's own: the
    /// summary of a command reports all of them.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed) + self.store.retries()
    }

    /// Metadata of `key` and its first `len` bytes, in one request where the store can
    /// (see [`Store::head_and_read`]), retrying temporary faults.
    pub async fn head_and_read(
        &self,
        key: &str,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> StoreResult<Option<ObjectInfo>> {
        let mut backoff = Backoff::default();
        loop {
            match self.store.head_and_read(key, len, buf).await {
                Err(e) => self.pause_or_fail("GET", e, &mut backoff).await?,
                ok => return ok,
            }
        }
    }

    /// Reads `range` of `key` into `buf`, retrying temporary faults; with `etag`, the
    /// object must still be that version.
    pub async fn read_range(
        &self,
        key: &str,
        etag: Option<&str>,
        range: Range<u64>,
        buf: &mut Vec<u8>,
    ) -> StoreResult<()> {
        let mut backoff = Backoff::default();
        loop {
            let read = self.store.read_range(key, range.clone(), etag, buf).await;
            match read {
                Err(e) => self.pause_or_fail("GET", e, &mut backoff).await?,
                ok => return ok,
            }
        }
    }

    /// Deletes `keys` in batches, retrying temporary faults (deleting twice is harmless).
    pub async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.retry("DELETE", || self.store.delete_many(keys)).await
    }

    /// Writes `data` to `key` in one request with a CRC32 the server checks, retrying
    /// temporary faults.
    pub async fn put_bytes(&self, key: &str, data: Bytes) -> StoreResult<()> {
        let opts = PutOptions {
            crc32: Some(crc32fast::hash(&data)),
            ..PutOptions::default()
        };
        self.retry("PUT", || {
            self.store.put(key, Body::Bytes(data.clone()), &opts)
        })
        .await
    }

    /// Writes the entry `data` (a manifest) to `key` as [`Transfer::put_bytes`] does,
    /// with its sha256 and, with a signing key, its signature; with `if_absent`, only
    /// if `key` does not exist (see [`PutOptions::if_absent`]).
    pub async fn put_entry(&self, key: &str, data: Bytes, if_absent: bool) -> StoreResult<()> {
        let sha256 = hex::encode(Sha256::digest(&data));
        let opts = PutOptions {
            crc32: Some(crc32fast::hash(&data)),
            signature: self.trust.sign(key, data.len() as u64, &sha256),
            sha256: Some(sha256),
            if_absent,
        };
        self.retry("PUT", || {
            self.store.put(key, Body::Bytes(data.clone()), &opts)
        })
        .await
    }

    /// Uploads the file at `path` to `key`. Every body carries a CRC32 the server
    /// checks; the sha256 is recorded with the object when the caller knows it, the
    /// file is small enough to go up in one request (hashing is then nearly free), or
    /// the upload is signed (the signature covers it: one more pass over a big file).
    /// With `if_absent`, returns `None` when another writer created the key first.
    pub async fn upload_file(
        &self,
        key: &str,
        path: &Path,
        sha256: Option<String>,
        if_absent: bool,
    ) -> anyhow::Result<Option<Report>> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        let size = meta.len();
        let sha256 = match sha256 {
            None if self.trust.can_sign() && size > self.multipart_threshold => {
                FileSlice::new(path, 0, size).checksums(true).await?.1
            }
            sha256 => sha256,
        };
        let progress = Progress::new(format!("uploading {key}"), size);

        let written = if size > self.multipart_threshold {
            let opts = PutOptions {
                crc32: None,
                signature: sha256.as_ref().and_then(|s| self.trust.sign(key, size, s)),
                sha256: sha256.clone(),
                if_absent,
            };
            self.upload_multipart(key, path, size, &opts, &progress)
                .await
                .map(|()| sha256)
        } else {
            let slice = FileSlice::new(path, 0, size);
            let want_sha = sha256.is_none();
            let (crc32, file_sha) = slice.clone().checksums(want_sha).await?;
            let sha256 = sha256.or(file_sha);
            let opts = PutOptions {
                crc32: Some(crc32),
                signature: sha256.as_ref().and_then(|s| self.trust.sign(key, size, s)),
                sha256,
                if_absent,
            };
            self.retry("PUT", || self.store.put(key, slice.body(), &opts))
                .await
                .map(|()| opts.sha256.clone())
                .with_context(|| format!("upload of {} to {key} failed", path.display()))
        };
        let sha256 = match written {
            Err(e) if matches!(e.downcast_ref::<StoreError>(), Some(StoreError::Exists(_))) => {
                return Ok(None);
            }
            other => other?,
        };
        if size <= self.multipart_threshold {
            progress.add(size);
        }
        let retries = self.retries();
        progress.finish("uploaded", key, &retry_note(retries));
        Ok(Some(Report {
            bytes: size,
            seconds: progress.elapsed().as_secs_f64(),
            retries,
            sha256,
        }))
    }

    /// Part size for `size` bytes: the configured one, grown to stay within 10,000 parts.
    fn part_size_for(&self, size: u64) -> u64 {
        self.part_size.max(size.div_ceil(MAX_PARTS))
    }

    async fn upload_multipart(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        opts: &PutOptions,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        let upload = self
            .retry("CREATE MULTIPART", || {
                self.store.multipart_start(key, size, opts)
            })
            .await
            .with_context(|| format!("cannot start the upload of {key}"))?;
        let part_size = self.part_size_for(size);
        let parts = (0..size.div_ceil(part_size)).map(|i| {
            let offset = i * part_size;
            (
                i as i32 + 1,
                FileSlice::new(path, offset, part_size.min(size - offset)),
            )
        });
        // Parts go up from memory: one big read per part costs far less than the SDK
        // streaming the file in small reads through tokio's blocking pool.
        let pool = BufferPool::default();
        let sent = futures::stream::iter(parts)
            .map(|(number, slice)| {
                let (upload, pool) = (&upload, &pool);
                async move {
                    let (data, crc32) = slice
                        .read(pool.take())
                        .await
                        .map_err(|e| StoreError::Permanent(format!("{e:#}")))?;
                    let part = self
                        .retry("PUT PART", || {
                            self.store.multipart_part(
                                upload,
                                number,
                                slice.offset,
                                Body::Bytes(data.clone()),
                                Some(crc32),
                            )
                        })
                        .await?;
                    progress.add(slice.len);
                    if let Ok(buf) = data.try_into_mut() {
                        pool.give(buf.into());
                    }
                    Ok::<_, StoreError>(part)
                }
            })
            .buffer_unordered(self.jobs)
            .try_collect::<Vec<_>>()
            .await;
        let result = match sent {
            Ok(mut parts) => {
                parts.sort_by_key(|p| p.number);
                self.retry("COMPLETE MULTIPART", || {
                    self.store.multipart_complete(&upload, parts.clone())
                })
                .await
            }
            Err(e) => Err(e),
        };
        // An upload that vanished was cancelled by the server because another writer
        // completed the same key first (Garage does this): the key holds their object.
        let result = result.map_err(|e| match e {
            StoreError::NotFound(_) => StoreError::Exists(key.to_string()),
            e => e,
        });
        if let Err(e) = result {
            let abort = self.store.multipart_abort(&upload).await;
            if let (Err(abort), false) = (abort, matches!(e, StoreError::Exists(_))) {
                ui::warn(format!(
                    "could not abort the multipart upload of {key}: {abort}"
                ));
            }
            return Err(e).with_context(|| format!("upload of {} to {key} failed", path.display()));
        }
        Ok(())
    }

    /// Metadata of the file object `key`, and its first range still on its way: what
    /// [`Transfer::download_file`] starts from. One request where the store can, so on
    /// a cache hit of a small file that request is the whole download (`aws s3 cp`
    /// makes two), and a large file's other ranges start once the metadata is in.
    pub async fn open_file<'a>(
        &'a self,
        key: &'a str,
    ) -> StoreResult<Option<(ObjectInfo, FirstBytes<'a>)>> {
        self.retry("GET", || self.store.open(key, RANGE_SIZE, Vec::new()))
            .await
    }

    /// Downloads the object `info` to `dest` through a temp file beside it; `first` is
    /// its first range, opened with `info` ([`Transfer::open_file`]). The object must
    /// be one [`Trust::check`] accepts, and its content must match the sha256 recorded
    /// with it and `expect_sha256` when given; otherwise `dest` is left as it was.
    pub async fn download_file(
        &self,
        info: &ObjectInfo,
        first: FirstBytes<'_>,
        dest: &Path,
        expect_sha256: Option<&str>,
    ) -> anyhow::Result<Report> {
        let key = info.key.as_str();
        self.trust.check(info)?;
        // A version recorded with another sha256 than the one pinned is not worth
        // reading: its bytes are checked against what was recorded anyway.
        pinned(key, expect_sha256, info.sha256.as_deref())?;
        let tmp = temp_beside(dest)?;
        let file = Arc::new(tmp.as_file().try_clone()?);
        file.set_len(info.size)
            .with_context(|| format!("cannot size the temp file for {}", dest.display()))?;
        let progress = Progress::new(format!("downloading {key}"), info.size);

        let pool = BufferPool::default();
        let etag = info.etag.as_deref();
        let first_len = info.size.min(RANGE_SIZE);
        let first = async move {
            match first.await {
                Ok(buf) => Ok((0, buf)),
                // Read again as any range is: pinned to the version, with retries.
                Err(e) if e.is_temporary() => {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    let mut buf = Vec::new();
                    self.read_range(key, etag, 0..first_len, &mut buf).await?;
                    Ok((0, buf))
                }
                Err(e) => Err(e),
            }
        };
        let rest = (first_len..info.size)
            .step_by(RANGE_SIZE as usize)
            .map(|start| start..(start + RANGE_SIZE).min(info.size))
            .map(|range| {
                let mut buf = pool.take();
                async move {
                    self.read_range(key, etag, range.clone(), &mut buf).await?;
                    Ok::<_, StoreError>((range.start, buf))
                }
                .boxed()
            });
        // One stream, so the first range's body is read beside the others.
        let mut fetched =
            futures::stream::iter(std::iter::once(first.boxed()).chain(rest)).buffered(self.jobs);
        // In-order results let one pass write and hash without re-reading the file.
        let mut hasher = (info.sha256.is_some() || expect_sha256.is_some()).then(Sha256::new);
        while let Some(next) = fetched.next().await {
            let (offset, buf) = next
                .map_err(|e| anyhow::Error::new(e).context(format!("download of {key} failed")))?;
            let file = file.clone();
            let (buf, hashed) = tokio::task::spawn_blocking(move || {
                let written = file.write_all_at(&buf, offset);
                if let Some(h) = hasher.as_mut() {
                    h.update(&buf);
                }
                (buf, written.map(|()| hasher))
            })
            .await?;
            hasher = hashed.with_context(|| format!("cannot write beside {}", dest.display()))?;
            progress.add(buf.len() as u64);
            pool.give(buf);
        }
        let sha256 = hasher.map(|h| hex::encode(h.finalize()));
        if let (Some(recorded), Some(sha256)) = (&info.sha256, &sha256)
            && !recorded.eq_ignore_ascii_case(sha256)
        {
            return Err(IntegrityError::Corrupt {
                key: key.to_string(),
                recorded: recorded.clone(),
                actual: sha256.clone(),
            }
            .into());
        }
        pinned(key, expect_sha256, sha256.as_deref())?;
        persist(tmp, dest)?;
        let retries = self.retries();
        progress.finish("downloaded", key, &retry_note(retries));
        Ok(Report {
            bytes: info.size,
            seconds: progress.elapsed().as_secs_f64(),
            retries,
            sha256,
        })
    }
}

/// [`IntegrityError::NotExpected`] unless the sha256 `actual` of `key` is the one
/// `expected` pins (either unknown passes).
fn pinned(key: &str, expected: Option<&str>, actual: Option<&str>) -> Result<(), IntegrityError> {
    match (expected, actual) {
        (Some(expected), Some(actual)) if !expected.eq_ignore_ascii_case(actual) => {
            Err(IntegrityError::NotExpected {
                key: key.to_string(),
                expected: expected.to_string(),
                actual: actual.to_string(),
            })
        }
        _ => Ok(()),
    }
}

/// A plain object read front to back by blocking code (a tar or zstd decoder), while
/// ranges are fetched `jobs` at a time ahead of it.
pub struct ObjectReader {
    rx: tokio::sync::mpsc::Receiver<StoreResult<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
    /// Bytes still to come: a stream that ends before is an error, never a short read.
    left: u64,
}

impl Transfer {
    /// Streams the object `info` through an [`ObjectReader`]; memory stays at about
    /// `2 x jobs` ranges. Read it from a blocking thread only.
    pub fn stream_object(self: &Arc<Self>, info: ObjectInfo) -> ObjectReader {
        let left = info.size;
        let (tx, rx) = tokio::sync::mpsc::channel(self.jobs);
        let transfer = self.clone();
        tokio::spawn(async move {
            let ranges = (0..info.size.div_ceil(RANGE_SIZE)).map(|i| {
                let start = i * RANGE_SIZE;
                start..(start + RANGE_SIZE).min(info.size)
            });
            let mut fetched = futures::stream::iter(ranges)
                .map(|range| {
                    let (transfer, info) = (&transfer, &info);
                    async move {
                        let mut buf = Vec::new();
                        transfer
                            .read_range(&info.key, info.etag.as_deref(), range, &mut buf)
                            .await
                            .map(|()| buf)
                    }
                })
                .buffered(transfer.jobs);
            while let Some(next) = fetched.next().await {
                let failed = next.is_err();
                if tx.send(next).await.is_err() || failed {
                    return;
                }
            }
        });
        ObjectReader {
            rx,
            current: Vec::new(),
            pos: 0,
            left,
        }
    }
}

impl std::io::Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.blocking_recv() {
                None if self.left > 0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the object stream stopped {} bytes early", self.left),
                    ));
                }
                None => return Ok(0),
                Some(Ok(next)) => {
                    self.left = self.left.saturating_sub(next.len() as u64);
                    self.current = next;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// `", N retries"` for summary lines, empty when there were none.
pub fn retry_note(retries: u64) -> String {
    match retries {
        0 => String::new(),
        1 => ", 1 retry".to_string(),
        n => format!(", {n} retries"),
    }
}

/// A byte range of a local file: the unit of upload bodies.
#[derive(Debug, Clone)]
struct FileSlice {
    path: PathBuf,
    offset: u64,
    len: u64,
}

impl FileSlice {
    fn new(path: &Path, offset: u64, len: u64) -> FileSlice {
        FileSlice {
            path: path.to_path_buf(),
            offset,
            len,
        }
    }

    /// A request body that re-reads the slice on every attempt.
    fn body(&self) -> Body {
        Body::FileSlice {
            path: self.path.clone(),
            offset: self.offset,
            len: self.len,
        }
    }

    /// The slice's bytes, read into `buf` in one call, and their CRC32.
    async fn read(&self, mut buf: Vec<u8>) -> anyhow::Result<(Bytes, u32)> {
        let slice = self.clone();
        tokio::task::spawn_blocking(move || {
            let FileSlice { path, offset, len } = slice;
            let file =
                File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            // A pooled buffer already has the part's length: resizing it is then free,
            // where clearing first would zero every byte again.
            buf.resize(len as usize, 0);
            file.read_exact_at(&mut buf, offset)
                .with_context(|| format!("cannot read {} (did it shrink?)", path.display()))?;
            let crc32 = crc32fast::hash(&buf);
            Ok((Bytes::from(buf), crc32))
        })
        .await?
    }

    /// CRC32 of the slice and, when asked, its sha256, in one read on a blocking thread.
    async fn checksums(self, want_sha: bool) -> anyhow::Result<(u32, Option<String>)> {
        tokio::task::spawn_blocking(move || {
            let file = File::open(&self.path)
                .with_context(|| format!("cannot open {}", self.path.display()))?;
            let mut sha = want_sha.then(Sha256::new);
            let mut crc = crc32fast::Hasher::new();
            let mut buf = vec![0u8; 1024 * 1024];
            let mut done = 0u64;
            while done < self.len {
                let want = buf.len().min((self.len - done) as usize);
                let n = file
                    .read_at(&mut buf[..want], self.offset + done)
                    .with_context(|| format!("cannot read {}", self.path.display()))?;
                if n == 0 {
                    bail!("{} shrank while it was being uploaded", self.path.display());
                }
                crc.update(&buf[..n]);
                if let Some(sha) = sha.as_mut() {
                    sha.update(&buf[..n]);
                }
                done += n as u64;
            }
            Ok((crc.finalize(), sha.map(|s| hex::encode(s.finalize()))))
        })
        .await?
    }
}
