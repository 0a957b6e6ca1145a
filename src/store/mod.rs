//! Object storage behind one narrow async trait.
//!
//! A [`Store`] only moves bytes under full keys (the configured prefix is already
//! joined): hashing, compression, retries of whole transfers and temp-file handling
//! live one layer up in [`crate::transfer`]. Two backends implement it: S3 (Garage,
//! MinIO, AWS) in [`s3`] and a local directory (`file://`) in [`file`].

pub mod connector;
pub mod file;
pub mod s3;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::Config;

/// Metadata key (without the `x-amz-meta-` prefix) holding the sha256 of a plain object.
pub const META_SHA256: &str = "cacher-sha256";
pub use crate::sign::META_SIGNATURE;

/// What a HEAD or a listing says about one object.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    /// Full key in the bucket.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time, when the backend reports one.
    pub modified: Option<SystemTime>,
    /// Opaque version tag; ranged reads pinned to it fail if the object changes.
    pub etag: Option<String>,
    /// Lowercase hex sha256 of the content, when the writer recorded it.
    pub sha256: Option<String>,
    /// The writer's signature of key, size and sha256 (see [`crate::sign`]), when a
    /// HEAD returned it; listings leave it out.
    pub signature: Option<String>,
}

/// One page-independent listing result: objects, and common prefixes when delimited.
#[derive(Debug, Default)]
pub struct Listing {
    /// Common prefixes (each ends with the delimiter), sorted.
    pub prefixes: Vec<String>,
    /// Objects directly matched, sorted by key.
    pub objects: Vec<ObjectInfo>,
}

/// The bytes of one write: in memory, or a slice of a file that can be re-read on retry.
#[derive(Debug, Clone)]
pub enum Body {
    /// Bytes already in memory.
    Bytes(Bytes),
    /// `len` bytes of the file at `path`, starting at `offset`.
    FileSlice {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

impl Body {
    /// Number of bytes this body holds.
    pub fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::FileSlice { len, .. } => *len,
        }
    }

    /// Whether the body holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the writer knows about a body, checked by the server or recorded with it.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    /// CRC32 of the body: the server rejects the write if the bytes it got differ.
    pub crc32: Option<u32>,
    /// sha256 of the whole object, stored as metadata for later verification.
    pub sha256: Option<String>,
    /// Signature of key, size and sha256 (see [`crate::sign`]), stored as metadata.
    pub signature: Option<String>,
    /// Write only if no object exists yet (`If-None-Match: *`); fails with
    /// [`StoreError::Exists`] otherwise. Servers that ignore the header (Garage 2.5)
    /// overwrite instead, which is still atomic.
    pub if_absent: bool,
}

impl PutOptions {
    /// The metadata these options record with the object, as (name, value) pairs.
    pub fn metadata(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            (META_SHA256, self.sha256.as_deref()),
            (META_SIGNATURE, self.signature.as_deref()),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
    }
}

/// A multipart upload in progress.
#[derive(Debug, Clone)]
pub struct MultipartId {
    /// Full key being written.
    pub key: String,
    /// Backend-specific upload handle.
    pub upload_id: String,
    /// Complete only if no object exists yet (see [`PutOptions::if_absent`]).
    pub if_absent: bool,
}

/// One finished part, as needed to complete the upload.
#[derive(Debug, Clone)]
pub struct CompletedPart {
    /// 1-based part number.
    pub number: i32,
    /// Backend-specific tag of the part (the ETag on S3).
    pub tag: String,
    /// CRC32 sent with the part, repeated at completion as S3 requires.
    pub crc32: Option<u32>,
}

/// Errors of the storage layer, each marked as worth retrying or not.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key does not exist.
    #[error("no object at `{0}`")]
    NotFound(String),
    /// The bucket does not exist.
    #[error("bucket `{0}` does not exist: check `bucket` in the config or create it")]
    NoSuchBucket(String),
    /// The server refused the credentials or the permission.
    #[error(
        "access denied by the server ({0}): check the key id, the secret and the bucket permissions"
    )]
    AccessDenied(String),
    /// A conditional write found an object already there.
    #[error("`{0}` was written by someone else meanwhile")]
    Exists(String),
    /// The object changed while it was being read in ranges.
    #[error("`{0}` changed while it was being read; run the command again")]
    Changed(String),
    /// A fault that may pass: network, timeouts, 5xx, throttling.
    #[error("{0}")]
    Temporary(String),
    /// Anything else: bad request, local I/O errors, unexpected replies.
    #[error("{0}")]
    Permanent(String),
}

impl StoreError {
    /// Whether retrying the same request may succeed.
    pub fn is_temporary(&self) -> bool {
        matches!(self, StoreError::Temporary(_))
    }
}

/// Whether `e` says an object was replaced while it was being read (worth reading the
/// new version).
pub fn is_changed(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<StoreError>(), Some(StoreError::Changed(_)))
}

/// Whether `e` says an object is gone (deleted while it was being read).
pub fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<StoreError>(),
        Some(StoreError::NotFound(_))
    )
}

/// Result type of the storage layer.
pub type StoreResult<T> = Result<T, StoreError>;

/// The first bytes of an object [`Store::open`] opened, arriving after its metadata.
pub type FirstBytes<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = StoreResult<Vec<u8>>> + Send + 'a>>;

/// The storage operations cacher needs; every key is a full key in the bucket.
#[async_trait]
pub trait Store: Send + Sync {
    /// A short description for messages, e.g. `s3://bucket (http://127.0.0.1:3900)`.
    fn describe(&self) -> String;

    /// Requests the backend retried on its own so far (network faults, 5xx).
    fn retries(&self) -> u64 {
        0
    }

    /// Checks that the bucket exists and the credentials may read it.
    async fn check_bucket(&self) -> StoreResult<()>;

    /// Metadata of one object, `None` when it does not exist.
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectInfo>>;

    /// Metadata of `key`, and its first bytes (at most `len`, of the version the
    /// metadata describes) still on their way, into `buf`'s memory; `None` when it does
    /// not exist. One request where the backend can, so a reader that needs more starts
    /// its other requests as soon as the metadata is in (where the bucket is far, each
    /// request is a round trip); by default [`Store::head`], then [`Store::read_range`].
    async fn open<'a>(
        &'a self,
        key: &'a str,
        len: u64,
        mut buf: Vec<u8>,
    ) -> StoreResult<Option<(ObjectInfo, FirstBytes<'a>)>> {
        let Some(info) = self.head(key).await? else {
            return Ok(None);
        };
        let (first, etag) = (0..info.size.min(len), info.etag.clone());
        let bytes = async move {
            self.read_range(key, first, etag.as_deref(), &mut buf)
                .await?;
            Ok(buf)
        };
        Ok(Some((info, Box::pin(bytes))))
    }

    /// [`Store::open`], waiting for the first bytes, which replace the contents of
    /// `buf` (an entry's restore starts with it).
    async fn head_and_read(
        &self,
        key: &str,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> StoreResult<Option<ObjectInfo>> {
        let Some((info, first)) = self.open(key, len, std::mem::take(buf)).await? else {
            return Ok(None);
        };
        *buf = first.await?;
        Ok(Some(info))
    }

    /// Replaces the contents of `buf` with bytes `range` of `key` (the caller reuses
    /// buffers so big reads do not fault in fresh memory each time). With `etag`, fails
    /// with [`StoreError::Changed`] if the object is no longer that version.
    async fn read_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        buf: &mut Vec<u8>,
    ) -> StoreResult<()>;

    /// Bytes `range` of `key` in a new buffer.
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let mut buf = Vec::new();
        self.read_range(key, range, None, &mut buf).await?;
        Ok(Bytes::from(buf))
    }

    /// Writes a whole object in one request; readers see the old or the new object only.
    async fn put(&self, key: &str, body: Body, opts: &PutOptions) -> StoreResult<()>;

    /// Starts a multipart write of `key` of `size` bytes in total.
    async fn multipart_start(
        &self,
        key: &str,
        size: u64,
        opts: &PutOptions,
    ) -> StoreResult<MultipartId>;

    /// Writes part `number` (1-based), which covers bytes from `offset` of the object.
    async fn multipart_part(
        &self,
        upload: &MultipartId,
        number: i32,
        offset: u64,
        body: Body,
        crc32: Option<u32>,
    ) -> StoreResult<CompletedPart>;

    /// Publishes the object from its parts (sorted by number).
    async fn multipart_complete(
        &self,
        upload: &MultipartId,
        parts: Vec<CompletedPart>,
    ) -> StoreResult<()>;

    /// Drops an unfinished multipart write and what it stored.
    async fn multipart_abort(&self, upload: &MultipartId) -> StoreResult<()>;

    /// Aborts unfinished writes (multipart uploads, temp files) under `prefix` started
    /// more than `age` ago, such as those of a killed upload; returns how many.
    async fn abort_stale_writes(
        &self,
        prefix: &str,
        age: std::time::Duration,
    ) -> StoreResult<usize>;

    /// One page of [`Store::list`]: from `token` (`None` for the first page), the page
    /// and the token of the next one (`None` after the last). Each page is sorted, and
    /// every key of a page sorts after every key of the page before.
    async fn list_page(
        &self,
        prefix: &str,
        delimiter: Option<char>,
        token: Option<String>,
    ) -> StoreResult<(Listing, Option<String>)>;

    /// Objects under `prefix`; with `delimiter`, deeper keys fold into common prefixes.
    /// Follows pagination to the end, holding every key; [`Store::list_page`] does not.
    async fn list(&self, prefix: &str, delimiter: Option<char>) -> StoreResult<Listing> {
        let mut listing = Listing::default();
        let mut token = None;
        loop {
            let (page, next) = self.list_page(prefix, delimiter, token).await?;
            listing.prefixes.extend(page.prefixes);
            listing.objects.extend(page.objects);
            match next {
                Some(next) => token = Some(next),
                None => return Ok(listing),
            }
        }
    }

    /// Sets the object's modification time to now without changing its bytes (a
    /// server-side copy onto itself on S3); fails with `NotFound` if it is gone.
    async fn touch(&self, key: &str) -> StoreResult<()>;

    /// Deletes one object; deleting a missing key succeeds.
    async fn delete(&self, key: &str) -> StoreResult<()>;

    /// Deletes many objects, in as few requests as the backend allows; missing keys
    /// succeed. On an error some of the keys may already be gone.
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        for key in keys {
            self.delete(key).await?;
        }
        Ok(())
    }
}

/// Opens the store the configuration points at.
pub async fn open(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let given = config.s3_settings_without_endpoint();
    if !given.is_empty() {
        return Err(crate::cli::InputError(format!(
            "{} set, but no endpoint: set --endpoint, CACHER_ENDPOINT or `endpoint` in {} (the local store needs endpoint = \"file:///dir\")",
            given.join(", "),
            config
                .path
                .as_deref()
                .map_or("the config file".into(), |p| p.display().to_string())
        ))
        .into());
    }
    // Without a HOME there is no default store: a job whose endpoint is missing
    // (secrets not given to a fork's build) fails instead of caching into its
    // working directory.
    if config.endpoint.value.is_empty() {
        return Err(crate::cli::InputError(
            "no endpoint: set CACHER_ENDPOINT or --endpoint (HOME is not set, so there is no default store in ~/.cache/cacher)".into(),
        )
        .into());
    }
    match config.endpoint.value.strip_prefix("file://") {
        Some(dir) => Ok(Arc::new(file::FileStore::open(dir)?)),
        None => Ok(Arc::new(s3::S3Store::new(config)?)),
    }
}
