//! The local-directory backend (`endpoint = "file:///dir"`).
//!
//! The directory plays the bucket: the object `a/b` is the file `DIR/a/b`. Writes go
//! to a temp file under `DIR/.cacher-tmp/` and are renamed into place, so readers
//! see the old or the new object, never a partial one, as on S3. Runners sharing a
//! disk can share a cache this way; tests of logic that needs no S3 run against it.
//! What S3 keeps as an object's metadata (its sha256 and signature) is the file
//! `DIR/.cacher-meta/a/b`, written after the object, naming the object version it
//! describes (metadata of any other version is ignored), and removed with it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{
    Body, CompletedPart, Listing, MultipartId, ObjectInfo, PutOptions, Store, StoreError,
    StoreResult,
};
use crate::ui;

/// Directory (below the root) holding writes in progress; never listed.
const TMP_DIR: &str = ".cacher-tmp";
/// Directory (below the root) holding each object's metadata at the object's key;
/// never listed.
const META_DIR: &str = ".cacher-meta";
/// The field of a metadata file naming the object version it describes (its etag).
const VERSION_FIELD: &str = "object";

/// A bucket stored as a local directory.
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Opens (creating if needed) the store rooted at `dir`.
    pub fn open(dir: &str) -> anyhow::Result<FileStore> {
        let root = crate::config::expand_tilde(dir);
        if !root.is_absolute() {
            anyhow::bail!("file:// endpoint needs an absolute path, got `{dir}`");
        }
        Ok(FileStore { root })
    }

    fn object_path(&self, key: &str) -> StoreResult<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key.split('/').any(|seg| {
                seg.is_empty() || seg == "." || seg == ".." || seg == TMP_DIR || seg == META_DIR
            })
        {
            return Err(StoreError::Permanent(format!(
                "key `{key}` cannot be stored in a file:// store"
            )));
        }
        Ok(self.root.join(key))
    }

    fn tmp_path(&self, name: &str) -> PathBuf {
        self.root.join(TMP_DIR).join(name)
    }

    /// The file holding the metadata of the object `key` (already checked).
    fn meta_path(&self, key: &str) -> PathBuf {
        self.root.join(META_DIR).join(key)
    }

    /// Publishes the finished temp file `tmp` as `key` (see [`FileStore::publish`]),
    /// then records `meta` (see [`encode_meta`]) for it. The metadata names the version it
    /// describes, the temp file's identity (a rename and a link keep it): two writers
    /// finishing together, or a reader between the two steps, see a version without
    /// metadata, never one with another version's.
    fn publish_with_meta(
        &self,
        tmp: &Path,
        key: &str,
        if_absent: bool,
        meta: Option<String>,
    ) -> StoreResult<()> {
        let version = fs::metadata(tmp)
            .map(|m| info(key, &m).etag)
            .map_err(|e| io_error("stat", tmp, e))?;
        self.publish(tmp, key, if_absent)?;
        let meta = meta
            .zip(version)
            .map(|(meta, version)| format!("{VERSION_FIELD} {version}\n{meta}"));
        self.record_meta(key, meta)
    }

    /// Records `meta` as the metadata of `key`, replacing what was there; `None`
    /// removes it.
    fn record_meta(&self, key: &str, meta: Option<String>) -> StoreResult<()> {
        let path = self.meta_path(key);
        let Some(meta) = meta else {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error("remove", &path, e)),
                _ => Ok(()),
            };
        };
        let (tmp, mut file) = self.new_tmp_file()?;
        let written = io::Write::write_all(&mut file, meta.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error("write", &tmp, e))
            // A directory there holds metadata of keys below this one, which cannot
            // exist beside this object in a directory store: left over, so replaced.
            .and_then(|()| match path.is_dir() {
                true => fs::remove_dir_all(&path).map_err(|e| io_error("remove", &path, e)),
                false => Ok(()),
            })
            .and_then(|()| self.make_meta_dirs(&path))
            .and_then(|()| fs::rename(&tmp, &path).map_err(|e| io_error("rename into", &path, e)));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    /// Creates the directories above the metadata file `path`. A file where one of
    /// them goes is the metadata of an object that cannot exist beside this one (a
    /// directory store holds no `a` beside `a/b`): left over, so it is removed.
    fn make_meta_dirs(&self, path: &Path) -> StoreResult<()> {
        let root = self.root.join(META_DIR);
        let Some(parent) = path.parent() else {
            return Ok(());
        };
        for dir in parent
            .ancestors()
            .take_while(|d| d.starts_with(&root) && *d != root)
        {
            if dir.is_file() {
                fs::remove_file(dir).map_err(|e| io_error("remove", dir, e))?;
            }
        }
        fs::create_dir_all(parent).map_err(|e| io_error("create", parent, e))
    }

    fn new_tmp_file(&self) -> StoreResult<(PathBuf, File)> {
        let dir = self.root.join(TMP_DIR);
        fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
        let path = dir.join(crate::temp::unique_tag());
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error("create", &path, e))?;
        Ok((path, file))
    }

    /// Moves a finished temp file to `key`; with `if_absent`, a hard link makes the
    /// creation atomic and fails when the key exists.
    fn publish(&self, tmp: &Path, key: &str, if_absent: bool) -> StoreResult<()> {
        let dest = self.object_path(key)?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| io_error("create", parent, e))?;
        }
        let result = if if_absent {
            let linked = fs::hard_link(tmp, &dest);
            let _ = fs::remove_file(tmp);
            linked.map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => StoreError::Exists(key.to_string()),
                _ => io_error("link into", &dest, e),
            })
        } else {
            fs::rename(tmp, &dest).map_err(|e| io_error("rename into", &dest, e))
        };
        if result.is_err() {
            let _ = fs::remove_file(tmp);
        }
        result
    }
}

/// `info` with the metadata recorded in the file `meta_path` for this version of the
/// object (none when it is absent or describes another version). A metadata file that
/// exists but cannot be read is an error: taken as none, it would silently drop the
/// sha256 check.
fn with_meta(mut info: ObjectInfo, meta_path: &Path) -> StoreResult<ObjectInfo> {
    let text = match fs::read_to_string(meta_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_error("read", meta_path, e)),
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map(str::to_string)
    };
    if field(VERSION_FIELD).is_none() || field(VERSION_FIELD) != info.etag {
        return Ok(info);
    }
    info.sha256 = field(super::META_SHA256).map(|s| s.to_ascii_lowercase());
    info.signature = field(super::META_SIGNATURE);
    Ok(info)
}

/// The metadata file's text for `opts`: one `name value` line per field; `None` when
/// there is nothing to record.
fn encode_meta(opts: &PutOptions) -> Option<String> {
    let text: String = opts
        .metadata()
        .map(|(name, value)| format!("{name} {value}\n"))
        .collect();
    (!text.is_empty()).then_some(text)
}

fn io_error(what: &str, path: &Path, e: io::Error) -> StoreError {
    StoreError::Permanent(format!("cannot {what} {}: {e}", path.display()))
}

fn info(key: &str, meta: &fs::Metadata) -> ObjectInfo {
    ObjectInfo {
        key: key.to_string(),
        size: meta.len(),
        modified: meta.modified().ok(),
        etag: Some(format!(
            "{:x}-{:x}-{:x}",
            meta.ino(),
            meta.len(),
            meta.mtime_nsec() as u64 ^ (meta.mtime() as u64).rotate_left(32)
        )),
        sha256: None,
        signature: None,
    }
}

/// Reads `range` of the object file into `buf`, checking the version tag first.
fn read_file_range(
    path: &Path,
    key: &str,
    range: Range<u64>,
    etag: Option<&str>,
    buf: &mut Vec<u8>,
) -> StoreResult<()> {
    let file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => StoreError::NotFound(key.to_string()),
        _ => io_error("open", path, e),
    })?;
    let meta = file.metadata().map_err(|e| io_error("stat", path, e))?;
    if etag.is_some() && info(key, &meta).etag.as_deref() != etag {
        return Err(StoreError::Changed(key.to_string()));
    }
    buf.clear();
    buf.resize((range.end - range.start) as usize, 0);
    file.read_exact_at(buf, range.start)
        .map_err(|e| io_error("read", path, e))
}

/// Copies `body` into `file` at `at`.
fn write_body(file: &File, at: u64, body: &Body) -> StoreResult<()> {
    match body {
        Body::Bytes(b) => file
            .write_all_at(b, at)
            .map_err(|e| StoreError::Permanent(format!("write: {e}"))),
        Body::FileSlice { path, offset, len } => {
            let src = File::open(path).map_err(|e| io_error("open", path, e))?;
            let mut buf = vec![0u8; 1024 * 1024];
            let mut done = 0u64;
            while done < *len {
                let want = buf.len().min((*len - done) as usize);
                let n = src
                    .read_at(&mut buf[..want], offset + done)
                    .map_err(|e| io_error("read", path, e))?;
                if n == 0 {
                    return Err(StoreError::Permanent(format!(
                        "{} is shorter than expected",
                        path.display()
                    )));
                }
                file.write_all_at(&buf[..n], at + done)
                    .map_err(|e| StoreError::Permanent(format!("write: {e}")))?;
                done += n as u64;
            }
            Ok(())
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Permanent(format!("worker failed: {e}")))?
}

#[async_trait]
impl Store for FileStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn check_bucket(&self) -> StoreResult<()> {
        let root = self.root.clone();
        blocking(move || fs::create_dir_all(&root).map_err(|e| io_error("create", &root, e))).await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectInfo>> {
        let path = self.object_path(key)?;
        let meta_path = self.meta_path(key);
        let key = key.to_string();
        blocking(move || match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => with_meta(info(&key, &meta), &meta_path).map(Some),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("stat", &path, e)),
        })
        .await
    }

    async fn read_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        buf: &mut Vec<u8>,
    ) -> StoreResult<()> {
        let path = self.object_path(key)?;
        let key = key.to_string();
        let etag = etag.map(str::to_string);
        let mut owned = std::mem::take(buf);
        let (owned, result) = tokio::task::spawn_blocking(move || {
            let result = read_file_range(&path, &key, range, etag.as_deref(), &mut owned);
            (owned, result)
        })
        .await
        .map_err(|e| StoreError::Permanent(format!("worker failed: {e}")))?;
        *buf = owned;
        result
    }

    async fn put(&self, key: &str, body: Body, opts: &PutOptions) -> StoreResult<()> {
        ui::verbose(format!("PUT {key} ({} bytes)", body.len()));
        let (tmp, file) = self.new_tmp_file()?;
        let written = blocking(move || {
            write_body(&file, 0, &body)?;
            file.sync_all()
                .map_err(|e| StoreError::Permanent(format!("sync: {e}")))
        })
        .await;
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.publish_with_meta(&tmp, key, opts.if_absent, encode_meta(opts))
    }

    async fn multipart_start(
        &self,
        key: &str,
        size: u64,
        opts: &PutOptions,
    ) -> StoreResult<MultipartId> {
        self.object_path(key)?;
        let (tmp, file) = self.new_tmp_file()?;
        file.set_len(size).map_err(|e| io_error("size", &tmp, e))?;
        let upload_id = tmp
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Kept until the upload completes, when it becomes the object's metadata.
        let meta = self.tmp_path(&format!("{upload_id}.meta"));
        fs::write(&meta, encode_meta(opts).unwrap_or_default())
            .map_err(|e| io_error("write", &meta, e))?;
        Ok(MultipartId {
            key: key.to_string(),
            upload_id,
            if_absent: opts.if_absent,
        })
    }

    async fn multipart_part(
        &self,
        upload: &MultipartId,
        number: i32,
        offset: u64,
        body: Body,
        crc32: Option<u32>,
    ) -> StoreResult<CompletedPart> {
        let tmp = self.tmp_path(&upload.upload_id);
        blocking(move || {
            let file = OpenOptions::new()
                .write(true)
                .open(&tmp)
                .map_err(|e| io_error("open", &tmp, e))?;
            write_body(&file, offset, &body)
        })
        .await?;
        Ok(CompletedPart {
            number,
            tag: format!("{offset}"),
            crc32,
        })
    }

    async fn multipart_complete(
        &self,
        upload: &MultipartId,
        _parts: Vec<CompletedPart>,
    ) -> StoreResult<()> {
        let tmp = self.tmp_path(&upload.upload_id);
        let synced = tmp.clone();
        blocking(move || {
            File::open(&synced)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_error("sync", &synced, e))
        })
        .await?;
        let meta_tmp = self.tmp_path(&format!("{}.meta", upload.upload_id));
        let meta = fs::read_to_string(&meta_tmp).map_err(|e| io_error("read", &meta_tmp, e))?;
        let _ = fs::remove_file(&meta_tmp);
        let meta = (!meta.is_empty()).then_some(meta);
        self.publish_with_meta(&tmp, &upload.key, upload.if_absent, meta)
    }

    async fn multipart_abort(&self, upload: &MultipartId) -> StoreResult<()> {
        let _ = fs::remove_file(self.tmp_path(&format!("{}.meta", upload.upload_id)));
        let tmp = self.tmp_path(&upload.upload_id);
        match fs::remove_file(&tmp) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", &tmp, e)),
        }
    }

    async fn abort_stale_writes(
        &self,
        _prefix: &str,
        age: std::time::Duration,
    ) -> StoreResult<usize> {
        // Temp files are not named by key: any old one belongs to a write that died.
        let dir = self.root.join(TMP_DIR);
        blocking(move || {
            let cutoff = std::time::SystemTime::now() - age;
            let Ok(entries) = fs::read_dir(&dir) else {
                return Ok(0);
            };
            let mut removed = 0;
            for entry in entries.flatten() {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < cutoff);
                if old && fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
            Ok(removed)
        })
        .await
    }

    /// A local directory is walked whole: one page.
    async fn list_page(
        &self,
        prefix: &str,
        delimiter: Option<char>,
        _token: Option<String>,
    ) -> StoreResult<(Listing, Option<String>)> {
        Ok((self.list(prefix, delimiter).await?, None))
    }

    async fn list(&self, prefix: &str, delimiter: Option<char>) -> StoreResult<Listing> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            let mut listing = Listing::default();
            if !root.exists() {
                return Ok(listing);
            }
            let walker = walkdir::WalkDir::new(&root)
                .min_depth(1)
                .into_iter()
                .filter_entry(|e| {
                    e.depth() != 1 || (e.file_name() != TMP_DIR && e.file_name() != META_DIR)
                });
            for entry in walker {
                let entry = entry.map_err(|e| StoreError::Permanent(format!("list: {e}")))?;
                if !entry.file_type().is_file() {
                    continue;
                }
                let rel = entry.path().strip_prefix(&root).unwrap_or(entry.path());
                let Some(key) = rel.to_str().map(str::to_string) else {
                    continue;
                };
                let Some(rest) = key.strip_prefix(prefix.as_str()) else {
                    continue;
                };
                if let Some(d) = delimiter
                    && let Some(i) = rest.find(d)
                {
                    listing.prefixes.push(format!("{prefix}{}", &rest[..=i]));
                    continue;
                }
                let meta = entry
                    .metadata()
                    .map_err(|e| StoreError::Permanent(format!("list: {e}")))?;
                listing.objects.push(info(&key, &meta));
            }
            listing.prefixes.sort();
            listing.prefixes.dedup();
            listing.objects.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(listing)
        })
        .await
    }

    async fn touch(&self, key: &str) -> StoreResult<()> {
        let path = self.object_path(key)?;
        let key = key.to_string();
        blocking(move || {
            filetime::set_file_mtime(&path, filetime::FileTime::now()).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => StoreError::NotFound(key),
                _ => io_error("touch", &path, e),
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        ui::verbose(format!("DELETE {key}"));
        let path = self.object_path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => self.record_meta(key, None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.record_meta(key, None),
            Err(e) => Err(io_error("remove", &path, e)),
        }
    }
}
