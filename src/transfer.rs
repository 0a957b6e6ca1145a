//! Moving whole objects between files and a [`Store`]: multipart uploads and ranged,
//! concurrent downloads with bounded memory, retries, integrity checks and temp files.
//!
//! Uploads checksum every body (CRC32, verified by the server) and record the sha256 of
//! the whole file as metadata; downloads pin every range to one object version, verify
//! size and sha256, and only then rename the temp file over the destination.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use crate::config::Config;
use crate::store::{Body, ObjectInfo, PutOptions, Store, StoreError, StoreResult};
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

/// Concurrent whole-object transfers against one store.
pub struct Transfer {
    store: Arc<dyn Store>,
    jobs: usize,
    part_size: u64,
    multipart_threshold: u64,
    retries: AtomicU64,
}

/// What one transfer did, for the summary line.
#[derive(Debug, Clone)]
pub struct Report {
    /// Bytes moved.
    pub bytes: u64,
    /// Requests retried after a temporary fault.
    pub retries: u64,
    /// sha256 of the content, hex.
    pub sha256: String,
}

impl Transfer {
    /// A transfer engine using the configured concurrency and part sizes.
    pub fn new(store: Arc<dyn Store>, config: &Config) -> Transfer {
        Transfer {
            store,
            jobs: config.jobs.value,
            part_size: config.part_size.value,
            multipart_threshold: config.multipart_threshold.value,
            retries: AtomicU64::new(0),
        }
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
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if e.is_temporary() && attempt < ATTEMPTS => {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    ui::verbose(format!("retrying {what} after: {e}"));
                    tokio::time::sleep(Duration::from_millis(500 * 2u64.pow(attempt))).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Uploads the file at `path` to `key`. `sha256` skips hashing when already known.
    pub async fn upload_file(
        &self,
        key: &str,
        path: &Path,
        sha256: Option<String>,
    ) -> anyhow::Result<Report> {
        let before =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if !before.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        let size = before.len();
        let part_size = self.part_size_for(size);
        let multipart = size > self.multipart_threshold;
        let span = if multipart { part_size } else { size.max(1) };
        let (file_sha, crcs) = {
            let path = path.to_path_buf();
            let want_sha = sha256.is_none();
            tokio::task::spawn_blocking(move || checksum_file(&path, span, want_sha)).await??
        };
        let sha256 = sha256.or(file_sha).unwrap_or_default();
        let opts = PutOptions {
            crc32: None,
            sha256: Some(sha256.clone()),
        };
        let progress = Progress::new(format!("uploading {key}"), size);
        let retries_before = self.retries.load(Ordering::Relaxed);

        if multipart {
            self.upload_multipart(key, path, size, part_size, &crcs, &opts, &progress)
                .await?;
        } else {
            let body = Body::FileSlice {
                path: path.to_path_buf(),
                offset: 0,
                len: size,
            };
            let opts = PutOptions {
                crc32: crcs.first().copied(),
                ..opts
            };
            self.retry("PUT", || self.store.put(key, body.clone(), &opts))
                .await
                .with_context(|| format!("upload of {} to {key} failed", path.display()))?;
            progress.add(size);
        }
        let retries = self.retries.load(Ordering::Relaxed) - retries_before;
        progress.finish("uploaded", key, &retry_note(retries));
        Ok(Report {
            bytes: size,
            retries,
            sha256,
        })
    }

    /// Part size for `size` bytes: the configured one, grown to stay within 10,000 parts.
    fn part_size_for(&self, size: u64) -> u64 {
        self.part_size.max(size.div_ceil(MAX_PARTS))
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_multipart(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        part_size: u64,
        crcs: &[u32],
        opts: &PutOptions,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        let upload = self
            .retry("CREATE MULTIPART", || {
                self.store.multipart_start(key, size, opts)
            })
            .await
            .with_context(|| format!("cannot start the upload of {key}"))?;
        let parts = (0..size.div_ceil(part_size)).map(|i| {
            let offset = i * part_size;
            let len = part_size.min(size - offset);
            (i as i32 + 1, offset, len, crcs[i as usize])
        });
        let sent = futures::stream::iter(parts)
            .map(|(number, offset, len, crc)| {
                let upload = &upload;
                async move {
                    let body = Body::FileSlice {
                        path: path.to_path_buf(),
                        offset,
                        len,
                    };
                    let part = self
                        .retry("PUT PART", || {
                            self.store.multipart_part(
                                upload,
                                number,
                                offset,
                                body.clone(),
                                Some(crc),
                            )
                        })
                        .await?;
                    progress.add(len);
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
        if let Err(e) = result {
            if let Err(abort) = self.store.multipart_abort(&upload).await {
                ui::warn(format!(
                    "could not abort the multipart upload of {key}: {abort}"
                ));
            }
            return Err(e).with_context(|| format!("upload of {} to {key} failed", path.display()));
        }
        Ok(())
    }

    /// Downloads the object `info` to `dest` through a temp file beside it. The content
    /// must match the sha256 recorded with the object and `expect_sha256` when given;
    /// otherwise `dest` is left as it was.
    pub async fn download_file(
        &self,
        info: &ObjectInfo,
        dest: &Path,
        expect_sha256: Option<&str>,
    ) -> anyhow::Result<Report> {
        let key = info.key.as_str();
        let tmp = temp_beside(dest)?;
        let file = Arc::new(tmp.as_file().try_clone()?);
        file.set_len(info.size)
            .with_context(|| format!("cannot size the temp file for {}", dest.display()))?;
        let progress = Progress::new(format!("downloading {key}"), info.size);
        let retries_before = self.retries.load(Ordering::Relaxed);

        let ranges = (0..info.size.div_ceil(RANGE_SIZE)).map(|i| {
            let start = i * RANGE_SIZE;
            start..(start + RANGE_SIZE).min(info.size)
        });
        let mut fetched = futures::stream::iter(ranges)
            .map(|range| async move {
                let data = self
                    .retry("GET", || {
                        self.store
                            .get_range(key, range.clone(), info.etag.as_deref())
                    })
                    .await?;
                Ok::<(u64, Bytes), StoreError>((range.start, data))
            })
            .buffered(self.jobs);
        // In-order results let one pass write and hash without re-reading the file.
        let mut hasher = Sha256::new();
        while let Some(next) = fetched.next().await {
            let (offset, data) = next.map_err(|e| match e {
                StoreError::Changed(_) => anyhow::anyhow!(
                    "{key} was replaced while it was being downloaded; run the command again"
                ),
                e => anyhow::Error::new(e).context(format!("download of {key} failed")),
            })?;
            let len = data.len() as u64;
            let file = file.clone();
            hasher = tokio::task::spawn_blocking(move || {
                file.write_all_at(&data, offset)?;
                hasher.update(&data);
                Ok::<_, std::io::Error>(hasher)
            })
            .await?
            .with_context(|| format!("cannot write beside {}", dest.display()))?;
            progress.add(len);
        }
        let sha256 = hex::encode(hasher.finalize());
        if let Some(recorded) = &info.sha256
            && !recorded.eq_ignore_ascii_case(&sha256)
        {
            return Err(IntegrityError::Corrupt {
                key: key.to_string(),
                recorded: recorded.clone(),
                actual: sha256,
            }
            .into());
        }
        if let Some(expected) = expect_sha256
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(IntegrityError::NotExpected {
                key: key.to_string(),
                expected: expected.to_string(),
                actual: sha256,
            }
            .into());
        }
        persist(tmp, dest)?;
        let retries = self.retries.load(Ordering::Relaxed) - retries_before;
        progress.finish("downloaded", key, &retry_note(retries));
        Ok(Report {
            bytes: info.size,
            retries,
            sha256,
        })
    }
}

fn retry_note(retries: u64) -> String {
    match retries {
        0 => String::new(),
        1 => ", 1 retry".to_string(),
        n => format!(", {n} retries"),
    }
}

/// Reads `path` once, returning its sha256 (when asked) and the CRC32 of each `span`.
fn checksum_file(
    path: &Path,
    span: u64,
    want_sha: bool,
) -> anyhow::Result<(Option<String>, Vec<u32>)> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut sha = want_sha.then(Sha256::new);
    let mut crcs = Vec::new();
    let mut crc = crc32fast::Hasher::new();
    let mut in_span = 0u64;
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let want = buf.len().min((span - in_span) as usize);
        let n = file
            .read(&mut buf[..want])
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        if let Some(sha) = sha.as_mut() {
            sha.update(&buf[..n]);
        }
        crc.update(&buf[..n]);
        in_span += n as u64;
        if in_span == span {
            crcs.push(std::mem::take(&mut crc).finalize());
            in_span = 0;
        }
    }
    if in_span > 0 || crcs.is_empty() {
        crcs.push(crc.finalize());
    }
    Ok((sha.map(|s| hex::encode(s.finalize())), crcs))
}

/// A temp file in the destination's directory, removed unless persisted.
pub fn temp_beside(dest: &Path) -> anyhow::Result<NamedTempFile> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if dest.is_dir() {
        bail!("{} is a directory; give a file path", dest.display());
    }
    tempfile::Builder::new()
        .prefix(".cacher-")
        .suffix(".part")
        .tempfile_in(&dir)
        .with_context(|| format!("cannot create a temp file in {}", dir.display()))
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
