//! The S3 backend (Garage, MinIO, AWS) on aws-sdk-s3.
//!
//! Client settings follow what Garage needs and AWS accepts: path-style addressing,
//! a signing region that matches the server's, and checksums only when required
//! (Garage rejects the SDK's trailing checksums), with a precomputed CRC32 header
//! instead so the server still verifies every body.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::connector::{PlainHttpConnector, ReqwestConnector};
use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, Delete, ObjectIdentifier};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use aws_smithy_types::byte_stream::Length;
use base64::Engine;

use super::{
    Body, CompletedPart, FirstBytes, Listing, META_SHA256, META_SIGNATURE, MultipartId, ObjectInfo,
    PutOptions, Store, StoreError, StoreResult,
};
use crate::config::Config;
use crate::ui;

/// Counts the SDK's own retries (attempts after the first), for summary lines.
#[derive(Debug, Default)]
struct RetryCounter(Arc<AtomicU64>);

impl Intercept for RetryCounter {
    fn name(&self) -> &'static str {
        "cacher-retry-counter"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if cfg
            .load::<RequestAttempts>()
            .is_some_and(|a| a.attempts() > 1)
        {
            self.0.fetch_add(1, Ordering::Relaxed);
            ui::verbose("retrying a request after a temporary fault");
        }
        Ok(())
    }
}

/// A bucket on an S3-compatible server.
pub struct S3Store {
    client: Client,
    retries: Arc<AtomicU64>,
    bucket: String,
    endpoint: String,
    /// Set once the bucket is known to exist (see [`S3Store::head`]).
    bucket_seen: tokio::sync::OnceCell<()>,
}

impl S3Store {
    /// Builds a client from the configuration; fails when credentials or bucket are missing.
    pub fn new(config: &Config) -> anyhow::Result<S3Store> {
        let endpoint = config.endpoint.value.clone();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            anyhow::bail!("endpoint `{endpoint}` must start with http://, https:// or file://");
        }
        if config.bucket.value.is_empty() {
            anyhow::bail!(
                "no bucket configured: pass --bucket, set CACHER_BUCKET or run `cacher init`"
            );
        }
        let creds = config.credentials()?;
        let credentials = aws_sdk_s3::config::Credentials::new(
            creds.key_id.expose(),
            creds.secret.expose(),
            None,
            None,
            "cacher",
        );
        let retries = Arc::new(AtomicU64::new(0));
        let timeout = Duration::from_secs(config.timeout.value);
        let connect_timeout = Duration::from_secs(5).min(timeout);
        let ca = config.ca_certificates()?;
        let http_client = match crate::http::plain_http(&endpoint) {
            true => SharedHttpClient::new(PlainHttpConnector::new(connect_timeout, timeout)),
            false => SharedHttpClient::new(ReqwestConnector::new(crate::http::client_builder(
                ca.as_deref(),
                false,
                connect_timeout,
                Some(timeout),
            )?)?),
        };
        let sdk_config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http_client)
            .credentials_provider(credentials)
            .region(Region::new(config.region.value.clone()))
            .endpoint_url(&endpoint)
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(4)
                    .with_initial_backoff(Duration::from_millis(200)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(connect_timeout)
                    .read_timeout(timeout)
                    .build(),
            )
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled()
                    .grace_period(timeout)
                    .build(),
            )
            .interceptor(RetryCounter(retries.clone()))
            .build();
        Ok(S3Store {
            client: Client::from_conf(sdk_config),
            retries,
            bucket: config.bucket.value.clone(),
            endpoint,
            bucket_seen: tokio::sync::OnceCell::new(),
        })
    }
}

/// Longest error text kept from the SDK.
const MAX_ERROR_LEN: usize = 600;
/// Most keys one DeleteObjects request may name (an S3 limit).
const DELETE_BATCH: usize = 1000;

/// Maps an SDK error to a [`StoreError`], deciding what is worth retrying.
fn classify<E>(op: &str, key: &str, store: &S3Store, err: SdkError<E>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let bucket = store.bucket.as_str();
    let what = match key {
        "" => format!("{op} bucket {bucket}"),
        key => format!("{op} {key}"),
    };
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().unwrap_or("").to_string();
    // The SDK's context can quote a whole response body: keep the line readable.
    let detail = || {
        let mut text = format!("{what}: {}", DisplayErrorContext(&err));
        if text.len() > MAX_ERROR_LEN {
            let cut = (0..=MAX_ERROR_LEN)
                .rev()
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(0);
            text.truncate(cut);
            text.push_str(" […]");
        }
        text
    };
    match &err {
        SdkError::TimeoutError(_) => {
            return StoreError::Temporary(format!(
                "{what}: cannot reach {}: timed out",
                store.endpoint
            ));
        }
        SdkError::DispatchFailure(_) => {
            return StoreError::Temporary(format!(
                "{what}: cannot reach {}: {}",
                store.endpoint,
                crate::http::network_cause(&err)
            ));
        }
        SdkError::ResponseError(_) => {
            return StoreError::Temporary(format!(
                "{what}: the reply from {} broke off: {}",
                store.endpoint,
                crate::http::network_cause(&err)
            ));
        }
        SdkError::ServiceError(_) => {}
        _ => return StoreError::Permanent(detail()),
    }
    match (status, code.as_str()) {
        (_, "NoSuchBucket") => StoreError::NoSuchBucket(bucket.to_string()),
        (Some(404), _) | (_, "NoSuchKey") => StoreError::NotFound(key.to_string()),
        (Some(412), _) | (_, "PreconditionFailed") => StoreError::Changed(key.to_string()),
        (_, "AuthorizationHeaderMalformed") => StoreError::Permanent(format!(
            "{what}: the server rejected the signing region ({}): set `region` to the server's region",
            err.message().unwrap_or("AuthorizationHeaderMalformed")
        )),
        (Some(401 | 403), _)
        | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
            let why = if code.is_empty() {
                format!("HTTP {}", status.unwrap_or(403))
            } else {
                code.clone()
            };
            StoreError::AccessDenied(format!("{what}: {why}"))
        }
        (Some(s), _) if s >= 500 || s == 429 => StoreError::Temporary(detail()),
        (_, "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable") => {
            StoreError::Temporary(detail())
        }
        _ => StoreError::Permanent(detail()),
    }
}

/// On a write, a failed precondition is an `If-None-Match: *` that found an object.
fn precondition_means_exists(e: StoreError) -> StoreError {
    match e {
        StoreError::Changed(key) => StoreError::Exists(key),
        other => other,
    }
}

/// `x-amz-copy-source` wants the key URL-encoded; `/` stays as the separator.
fn urlencode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn crc32_header(crc: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

async fn byte_stream(body: Body) -> StoreResult<ByteStream> {
    match body {
        Body::Bytes(b) => Ok(ByteStream::from(b)),
        Body::FileSlice { path, offset, len } => ByteStream::read_from()
            .path(&path)
            .offset(offset)
            .length(Length::Exact(len))
            .build()
            .await
            .map_err(|e| StoreError::Permanent(format!("cannot read {}: {e}", path.display()))),
    }
}

fn to_system_time(t: &aws_sdk_s3::primitives::DateTime) -> Option<std::time::SystemTime> {
    std::time::SystemTime::try_from(*t).ok()
}

/// What a HEAD or GET of `key` said of the object.
fn object_info(
    key: &str,
    size: u64,
    modified: Option<&aws_sdk_s3::primitives::DateTime>,
    etag: Option<&str>,
    metadata: Option<&std::collections::HashMap<String, String>>,
) -> ObjectInfo {
    let meta = |name: &str| metadata.and_then(|m| m.get(name));
    ObjectInfo {
        key: key.to_string(),
        size,
        modified: modified.and_then(to_system_time),
        etag: etag.map(str::to_string),
        sha256: meta(META_SHA256).map(|s| s.to_ascii_lowercase()),
        signature: meta(META_SIGNATURE).cloned(),
    }
}

/// Reads a GET's `body` into `buf`, which must come to exactly `want` bytes: fewer is a
/// reply broken off (worth retrying), more a server that ignored the range asked for
/// (read no further: it may be sending a whole large object).
async fn read_body(
    key: &str,
    body: &mut aws_sdk_s3::primitives::ByteStream,
    want: u64,
    buf: &mut Vec<u8>,
) -> StoreResult<()> {
    buf.reserve(want as usize);
    while let Some(chunk) = body
        .try_next()
        .await
        .map_err(|e| StoreError::Temporary(format!("GET {key}: body: {e}")))?
    {
        if (buf.len() + chunk.len()) as u64 > want {
            return Err(StoreError::Permanent(format!(
                "GET {key}: the server sent more than the {want} bytes asked for"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    if buf.len() as u64 != want {
        return Err(StoreError::Temporary(format!(
            "GET {key}: got {} bytes of the {want} asked for",
            buf.len()
        )));
    }
    Ok(())
}

impl S3Store {
    /// When the newest part of an unfinished upload was written (`None`: no part yet, or
    /// the upload is gone).
    async fn last_part_written(
        &self,
        upload: &MultipartId,
    ) -> StoreResult<Option<std::time::SystemTime>> {
        let mut newest = None;
        let mut marker: Option<String> = None;
        loop {
            ui::verbose(format!("LIST PARTS {}", upload.key));
            let out = match self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(&upload.key)
                .upload_id(&upload.upload_id)
                .set_part_number_marker(marker.take())
                .send()
                .await
                .map_err(|e| classify("LIST PARTS", &upload.key, self, e))
            {
                Ok(out) => out,
                Err(StoreError::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            let written = out
                .parts()
                .iter()
                .filter_map(|p| p.last_modified().and_then(to_system_time));
            newest = newest.into_iter().chain(written).max();
            match out.next_part_number_marker() {
                Some(next) if out.is_truncated() == Some(true) => marker = Some(next.to_string()),
                _ => return Ok(newest),
            }
        }
    }
}

#[async_trait]
impl Store for S3Store {
    fn describe(&self) -> String {
        format!("s3://{} ({})", self.bucket, self.endpoint)
    }

    fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    async fn check_bucket(&self) -> StoreResult<()> {
        ui::verbose(format!("HEAD bucket {}", self.bucket));
        let head = self.client.head_bucket().bucket(&self.bucket).send().await;
        match head.map_err(|e| classify("HEAD", "", self, e)) {
            Ok(_) => Ok(()),
            Err(StoreError::NotFound(_)) => Err(StoreError::NoSuchBucket(self.bucket.clone())),
            // Some servers and policies refuse HEAD on the bucket but allow listing.
            Err(StoreError::AccessDenied(_)) => {
                ui::verbose(format!("LIST {} max-keys=1", self.bucket));
                self.client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .max_keys(1)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify("LIST", "", self, e))
            }
            Err(e) => Err(e),
        }
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectInfo>> {
        ui::verbose(format!("HEAD {key}"));
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        match out.map_err(|e| classify("HEAD", key, self, e)) {
            Ok(out) => Ok(Some(object_info(
                key,
                out.content_length().unwrap_or(0).max(0) as u64,
                out.last_modified(),
                out.e_tag(),
                out.metadata(),
            ))),
            Err(StoreError::NotFound(_)) => {
                // HEAD replies have no body, so a missing bucket is a bare 404 too: a
                // miss must not hide it (exit 1 would read as "not cached").
                self.bucket_seen
                    .get_or_try_init(|| self.check_bucket())
                    .await?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn open<'a>(
        &'a self,
        key: &'a str,
        len: u64,
        mut buf: Vec<u8>,
    ) -> StoreResult<Option<(ObjectInfo, FirstBytes<'a>)>> {
        buf.clear();
        let nothing = || -> FirstBytes<'a> { Box::pin(std::future::ready(Ok(Vec::new()))) };
        if len == 0 {
            return Ok(self.head(key).await?.map(|info| (info, nothing())));
        }
        ui::verbose(format!("GET {key} bytes=0-{}", len - 1));
        let sent = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes=0-{}", len - 1))
            .send()
            .await;
        let mut out = match sent {
            Ok(out) => out,
            // An empty object has no byte 0 to ask for (HTTP 416): its HEAD says the rest,
            // unless it was written meanwhile (then it is read again, as changed).
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                return match self.head(key).await? {
                    Some(info) if info.size > 0 => Err(StoreError::Changed(key.to_string())),
                    head => Ok(head.map(|info| (info, nothing()))),
                };
            }
            Err(e) => match classify("GET", key, self, e) {
                // Not every server names a missing bucket in a GET's error: as for a
                // HEAD, a miss must not hide one (exit 1 would read as "not cached").
                StoreError::NotFound(_) => {
                    self.bucket_seen
                        .get_or_try_init(|| self.check_bucket())
                        .await?;
                    return Ok(None);
                }
                e => return Err(e),
            },
        };
        // `bytes 0-N/SIZE` on a ranged reply. Without it, the server sent the whole
        // object, unless it cut it at the length asked for without saying so: the HEAD
        // then tells (and a version other than the GET's is read again, as changed).
        let length = out.content_length().unwrap_or(0).max(0) as u64;
        let size = match out.content_range() {
            Some(range) => range
                .rsplit_once('/')
                .and_then(|(_, size)| size.parse().ok())
                .ok_or_else(|| {
                    StoreError::Permanent(format!("GET {key}: unreadable Content-Range {range}"))
                })?,
            None if length < len => length,
            None => match self.head(key).await? {
                Some(head) if head.etag.as_deref() == out.e_tag() => head.size,
                _ => return Err(StoreError::Changed(key.to_string())),
            },
        };
        let info = object_info(key, size, out.last_modified(), out.e_tag(), out.metadata());
        let bytes = async move {
            read_body(key, &mut out.body, size.min(len), &mut buf).await?;
            Ok(buf)
        };
        Ok(Some((info, Box::pin(bytes))))
    }

    async fn read_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        buf: &mut Vec<u8>,
    ) -> StoreResult<()> {
        buf.clear();
        if range.is_empty() {
            return Ok(());
        }
        ui::verbose(format!("GET {key} bytes={}-{}", range.start, range.end - 1));
        let mut out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_if_match(etag.map(str::to_string))
            .send()
            .await
            .map_err(|e| classify("GET", key, self, e))?;
        // A server (or a proxy) that ignores If-Match or Range would hand out another
        // version's bytes, or other bytes: the reply says which it sent.
        // (Quotes aside: a listing's ETags may come without them.)
        let bare = |etag: &str| etag.trim_start_matches("W/").trim_matches('"').to_string();
        if let (Some(want), Some(got)) = (etag, out.e_tag())
            && bare(want) != bare(got)
        {
            return Err(StoreError::Changed(key.to_string()));
        }
        let asked = format!("bytes {}-{}", range.start, range.end - 1);
        if let Some(sent) = out.content_range()
            && sent.split('/').next() != Some(&asked)
        {
            return Err(StoreError::Permanent(format!(
                "GET {key}: asked for {asked}, the server sent {sent}"
            )));
        }
        read_body(key, &mut out.body, range.end - range.start, buf).await
    }

    async fn put(&self, key: &str, body: Body, opts: &PutOptions) -> StoreResult<()> {
        ui::verbose(format!("PUT {key} ({} bytes)", body.len()));
        let len = body.len();
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(len as i64)
            .body(byte_stream(body).await?)
            .set_checksum_crc32(opts.crc32.map(crc32_header));
        for (name, value) in opts.metadata() {
            req = req.metadata(name, value);
        }
        // The CRC32 header (signed) protects the body; signing the payload as well would
        // hash every byte twice more, here and on the server.
        req.set_if_none_match(opts.if_absent.then(|| "*".to_string()))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map(|_| ())
            .map_err(|e| precondition_means_exists(classify("PUT", key, self, e)))
    }

    async fn multipart_start(
        &self,
        key: &str,
        size: u64,
        opts: &PutOptions,
    ) -> StoreResult<MultipartId> {
        ui::verbose(format!("CREATE MULTIPART {key} ({size} bytes)"));
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Crc32);
        for (name, value) in opts.metadata() {
            req = req.metadata(name, value);
        }
        let out = req
            .send()
            .await
            .map_err(|e| classify("CREATE MULTIPART", key, self, e))?;
        let upload_id = out.upload_id().ok_or_else(|| {
            StoreError::Permanent(format!("CREATE MULTIPART {key}: no upload id in the reply"))
        })?;
        Ok(MultipartId {
            key: key.to_string(),
            upload_id: upload_id.to_string(),
            if_absent: opts.if_absent,
        })
    }

    async fn multipart_part(
        &self,
        upload: &MultipartId,
        number: i32,
        _offset: u64,
        body: Body,
        crc32: Option<u32>,
    ) -> StoreResult<CompletedPart> {
        ui::verbose(format!(
            "PUT PART {} #{number} ({} bytes)",
            upload.key,
            body.len()
        ));
        let len = body.len();
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&upload.key)
            .upload_id(&upload.upload_id)
            .part_number(number)
            .content_length(len as i64)
            .set_checksum_crc32(crc32.map(crc32_header))
            .body(byte_stream(body).await?)
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| classify("PUT PART", &upload.key, self, e))?;
        Ok(CompletedPart {
            number,
            tag: out.e_tag().unwrap_or_default().to_string(),
            crc32,
        })
    }

    async fn multipart_complete(
        &self,
        upload: &MultipartId,
        parts: Vec<CompletedPart>,
    ) -> StoreResult<()> {
        ui::verbose(format!(
            "COMPLETE MULTIPART {} ({} parts)",
            upload.key,
            parts.len()
        ));
        let parts = parts
            .into_iter()
            .map(|p| {
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(p.number)
                    .e_tag(p.tag)
                    .set_checksum_crc32(p.crc32.map(crc32_header))
                    .build()
            })
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&upload.key)
            .upload_id(&upload.upload_id)
            .set_if_none_match(upload.if_absent.then(|| "*".to_string()))
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                precondition_means_exists(classify("COMPLETE MULTIPART", &upload.key, self, e))
            })
    }

    async fn multipart_abort(&self, upload: &MultipartId) -> StoreResult<()> {
        ui::verbose(format!("ABORT MULTIPART {}", upload.key));
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&upload.key)
            .upload_id(&upload.upload_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("ABORT MULTIPART", &upload.key, self, e))
    }

    async fn abort_stale_writes(&self, prefix: &str, age: Duration) -> StoreResult<usize> {
        let cutoff = std::time::SystemTime::now() - age;
        let mut stale = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            ui::verbose(format!("LIST MULTIPART {prefix}"));
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| classify("LIST MULTIPART", prefix, self, e))?;
            for upload in out.uploads() {
                let started = upload.initiated().and_then(to_system_time);
                if let (Some(key), Some(id), Some(started)) =
                    (upload.key(), upload.upload_id(), started)
                    && started < cutoff
                {
                    stale.push(MultipartId {
                        key: key.to_string(),
                        upload_id: id.to_string(),
                        if_absent: false,
                    });
                }
            }
            if out.is_truncated() != Some(true) {
                break;
            }
            key_marker = out.next_key_marker().map(str::to_string);
            id_marker = out.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() {
                break;
            }
        }
        // A slow upload started long ago may still be sending parts, and some servers
        // (moto) report a fixed, ancient start time: the newest part decides too.
        let mut aborted = 0;
        for upload in &stale {
            match self.last_part_written(upload).await {
                Ok(written) if written > Some(cutoff) => continue,
                Ok(_) => {}
                Err(e) => {
                    // Aborting a live upload fails a CI job; a leftover costs storage.
                    ui::warn(format!("kept unfinished upload {}: {e}", upload.key));
                    continue;
                }
            }
            aborted += 1;
            match self.multipart_abort(upload).await {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(aborted)
    }

    async fn list_page(
        &self,
        prefix: &str,
        delimiter: Option<char>,
        token: Option<String>,
    ) -> StoreResult<(Listing, Option<String>)> {
        ui::verbose(format!("LIST {prefix}"));
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_delimiter(delimiter.map(String::from))
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| classify("LIST", prefix, self, e))?;
        let listing = Listing {
            prefixes: out
                .common_prefixes()
                .iter()
                .filter_map(|p| p.prefix().map(str::to_string))
                .collect(),
            objects: out
                .contents()
                .iter()
                .filter_map(|o| {
                    Some(ObjectInfo {
                        key: o.key()?.to_string(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        modified: o.last_modified().and_then(to_system_time),
                        etag: o.e_tag().map(str::to_string),
                        sha256: None,
                        signature: None,
                    })
                })
                .collect(),
        };
        let next = match out.next_continuation_token() {
            Some(next) if out.is_truncated() == Some(true) => Some(next.to_string()),
            _ => None,
        };
        Ok((listing, next))
    }

    async fn touch(&self, key: &str) -> StoreResult<()> {
        ui::verbose(format!("COPY {key} onto itself"));
        // REPLACE is what lets a copy onto itself through, and it drops the metadata:
        // only packs, which carry none, are touched (never a signed entry).
        self.client
            .copy_object()
            .bucket(&self.bucket)
            .key(key)
            .copy_source(format!("{}/{}", self.bucket, urlencode_key(key)))
            .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| match classify("COPY", key, self, e) {
                StoreError::Permanent(msg) if msg.contains("NoSuchKey") => {
                    StoreError::NotFound(key.to_string())
                }
                other => other,
            })
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        ui::verbose(format!("DELETE {key}"));
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("DELETE", key, self, e))
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        for batch in keys.chunks(DELETE_BATCH) {
            ui::verbose(format!("DELETE {} objects", batch.len()));
            let first = batch.first().map_or("", String::as_str);
            let objects = batch
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StoreError::Permanent(format!("DELETE {first}: {e}")))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| StoreError::Permanent(format!("DELETE {first}: {e}")))?;
            // DeleteObjects requires a body checksum: with `WhenRequired` the SDK adds
            // a CRC32 header itself (Garage and moto check it).
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| classify("DELETE", first, self, e))?;
            // The request succeeds as a whole even when some keys fail: look at each.
            let failed: Vec<_> = out
                .errors()
                .iter()
                .filter(|e| e.code() != Some("NoSuchKey"))
                .collect();
            if let Some(e) = failed.first() {
                let key = e.key().unwrap_or_default();
                let code = e.code().unwrap_or("unknown error");
                let text = format!(
                    "DELETE {key}: {code} {} ({} of {} keys in the batch failed)",
                    e.message().unwrap_or_default(),
                    failed.len(),
                    batch.len()
                );
                return Err(match code {
                    "AccessDenied" => StoreError::AccessDenied(text),
                    "InternalError" | "SlowDown" | "ServiceUnavailable" => {
                        StoreError::Temporary(text)
                    }
                    _ => StoreError::Permanent(text),
                });
            }
        }
        Ok(())
    }
}
