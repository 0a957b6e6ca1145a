//! What cacher last restored into or uploaded from a directory (its *tree state*), so
//! the next upload reads only the files that changed since.
//!
//! The record lives outside the tree, in cacher's state directory ([`state_dir`]), one
//! file per directory (named by the blake3 of its canonical path). It holds the entry's
//! manifest and, for each regular file, the stamp it had when cacher last vouched for
//! its content: device, inode, size, and modification and change times with
//! nanoseconds. A file whose stamp still matches holds the bytes the manifest says,
//! because any write, truncation, rename over it or `touch -r` changes its change time
//! (ctime), which no user can set. Stamps that were taken too close to the moment
//! they were recorded are dropped (git's "racy" rule, see [`TreeState::new`]), and a
//! missing, corrupt or foreign record is ignored: the cost is a full read, never a
//! wrong manifest. docs/format.md describes the record.

use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::chunk::format::{
    EntryKind, FormatError, MAX_PATH, Manifest, Reader, bad, put_bytes, put_varint, unwrap,
    unzigzag, wrap, zigzag,
};
use crate::ui;

/// Magic bytes of a tree state record.
const STATE_MAGIC: &[u8; 8] = b"CACHERST";
/// How close to the recording time a stamp may be on a filesystem with sub-second
/// timestamps: Linux takes file times from a clock that ticks every jiffy (at most
/// 10 ms), so twice that.
const FINE_GRANULARITY: Duration = Duration::from_millis(20);
/// The same on a filesystem that keeps whole seconds (FAT keeps two).
const COARSE_GRANULARITY: Duration = Duration::from_secs(2);

/// What identifies the state of a file's content: if any byte changed, one of these did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
}

impl Stamp {
    /// The stamp of a file as `lstat` or `fstat` saw it.
    pub fn of(meta: &Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec() as u32),
            ctime: (meta.ctime(), meta.ctime_nsec() as u32),
        }
    }

    /// The stamp of a file as `statat` saw it.
    // The field types of `stat` differ between systems.
    #[allow(clippy::unnecessary_cast)]
    pub fn of_stat(st: &rustix::fs::Stat) -> Stamp {
        Stamp {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            size: st.st_size as u64,
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as u32),
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as u32),
        }
    }

    /// The latest of its two times, in nanoseconds since the epoch.
    fn latest_ns(&self) -> i128 {
        nanos(self.mtime).max(nanos(self.ctime))
    }
}

/// A directory's recorded tree: the entry it matched and each file's stamp.
pub struct TreeState {
    /// The directory, canonical.
    pub dir: PathBuf,
    /// The key of the entry restored or uploaded.
    pub key: String,
    /// That entry's manifest: entries and chunk table of the content stream.
    pub manifest: Manifest,
    /// One per regular file of `manifest`, in stream order: its stamp when its content
    /// was exactly the manifest's, or `None` when that is not known.
    pub stamps: Vec<Option<Stamp>>,
}

impl TreeState {
    /// A record of `manifest` in `dir` from `stamps` (one per file, in stream order).
    /// `taken` is the earliest moment anything else could change a file after its
    /// stamp was taken (an upload: when its scan began; a restore: when its files
    /// became visible). A stamp whose mtime is within the timestamp granularity of
    /// `taken` (or later) is dropped: a write right after the stamp could leave it the
    /// same (git calls such index entries racy). Any later write sets the mtime to the
    /// time of writing, so only a rewrite that also puts back an old mtime and lands
    /// in the same clock tick as the stamp's ctime goes unseen, as in git. The rule
    /// compares file times with this machine's clock, so a network filesystem whose
    /// server clock lags may defeat it (as it does git's).
    pub fn new(
        dir: PathBuf,
        key: String,
        manifest: Manifest,
        mut stamps: Vec<Option<Stamp>>,
        taken: SystemTime,
    ) -> TreeState {
        let granularity = granularity(&stamps);
        let taken = taken
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let limit = taken.as_nanos() as i128 - granularity.as_nanos() as i128;
        let mut racy = 0;
        for stamp in &mut stamps {
            if stamp.is_some_and(|s| nanos(s.mtime) >= limit) {
                *stamp = None;
                racy += 1;
            }
        }
        if racy > 0 {
            ui::verbose(format!(
                "tree state of {}: {racy} files changed too recently to vouch for",
                dir.display()
            ));
        }
        TreeState {
            dir,
            key,
            manifest,
            stamps,
        }
    }

    /// The record for `dir`, if one exists and is intact; anything else is `None`
    /// (said with `-v`).
    pub fn load(dir: &Path) -> Option<TreeState> {
        let canonical = dir.canonicalize().ok()?;
        let path = record_path(&canonical)?;
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                ui::verbose(format!("ignoring the tree state {}: {e}", path.display()));
                return None;
            }
        };
        match decode(&path.display().to_string(), &data) {
            Ok(state) if state.dir == canonical => Some(state),
            Ok(_) => {
                ui::verbose(format!(
                    "ignoring the tree state {}: it is for another directory",
                    path.display()
                ));
                None
            }
            Err(e) => {
                ui::verbose(format!("ignoring the tree state: {e}"));
                None
            }
        }
    }

    /// Writes the record (temp file, then rename). Failing to is not an error of the
    /// command: the next upload reads everything, and `-v` says why.
    pub fn save(&self) {
        let Some(path) = record_path(&self.dir) else {
            return;
        };
        let written = (|| {
            let parent = crate::temp::parent_of(&path);
            std::fs::create_dir_all(&parent)?;
            let mut tmp = tempfile::Builder::new()
                .prefix(".cacher-")
                .suffix(".part")
                .tempfile_in(&parent)?;
            std::io::Write::write_all(&mut tmp, &encode(self))?;
            tmp.persist(&path)?;
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = written {
            ui::verbose(format!(
                "cannot record the tree state in {}: {e}",
                path.display()
            ));
        }
    }

    /// Removes the record of `dir`, if any.
    pub fn forget(dir: &Path) {
        if let Some(path) = dir.canonicalize().ok().and_then(|d| record_path(&d)) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A file time in nanoseconds since the epoch.
fn nanos((secs, nsec): (i64, u32)) -> i128 {
    i128::from(secs) * 1_000_000_000 + i128::from(nsec)
}

/// How far apart two moments must be for the filesystem that gave `stamps` to tell
/// them apart: sub-second timestamps anywhere mean fine ones.
fn granularity(stamps: &[Option<Stamp>]) -> Duration {
    let fine = stamps
        .iter()
        .flatten()
        .any(|s| s.ctime.1 % 1_000_000 != 0 || s.mtime.1 % 1_000_000 != 0);
    match fine {
        true => FINE_GRANULARITY,
        false => COARSE_GRANULARITY,
    }
}

/// Waits until every one of `stamps` is older than the timestamp granularity (at most
/// a few milliseconds, and only on filesystems with fine timestamps), so a record
/// taken from now on can vouch for all of them. A restore calls this before its files
/// become visible: the last files it wrote would otherwise be racy.
pub fn settle(stamps: &[Option<Stamp>]) {
    let granularity = granularity(stamps);
    if granularity != FINE_GRANULARITY {
        return;
    }
    let Some(latest) = stamps.iter().flatten().map(Stamp::latest_ns).max() else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i128;
    let wait = latest + granularity.as_nanos() as i128 - now;
    if wait > 0 {
        std::thread::sleep(Duration::from_nanos(
            wait.min(granularity.as_nanos() as i128) as u64 + 1_000_000,
        ));
    }
}

/// Where cacher keeps tree states: `$CACHER_STATE_DIR`, else `$XDG_STATE_HOME/cacher`,
/// else `~/.local/state/cacher` (`~/Library/Caches/cacher` on macOS). Not the cache
/// directory itself: that is the default `file://` store, whose keys it would mix with.
pub fn state_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("CACHER_STATE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_STATE_HOME") {
        return Some(PathBuf::from(dir).join("cacher"));
    }
    let home = PathBuf::from(var("HOME")?);
    Some(match cfg!(target_os = "macos") {
        true => home.join("Library/Caches/cacher"),
        false => home.join(".local/state/cacher"),
    })
}

/// The record file of the canonical directory `dir`.
fn record_path(dir: &Path) -> Option<PathBuf> {
    let name = blake3::hash(dir.as_os_str().as_bytes()).to_hex();
    Some(state_dir()?.join("trees").join(&name[..32]))
}

/// The record's bytes: a wrapped body (as manifests are) followed by the blake3 of
/// everything before it, so a torn or flipped record is refused whole.
fn encode(state: &TreeState) -> Vec<u8> {
    let mut body = Vec::new();
    put_bytes(&mut body, state.dir.as_os_str().as_bytes());
    put_bytes(&mut body, state.key.as_bytes());
    put_bytes(&mut body, &state.manifest.encode());
    put_varint(&mut body, state.stamps.len() as u64);
    for stamp in &state.stamps {
        let Some(s) = stamp else {
            body.push(0);
            continue;
        };
        body.push(1);
        put_varint(&mut body, s.dev);
        put_varint(&mut body, s.ino);
        put_varint(&mut body, zigzag(s.mtime.0));
        put_varint(&mut body, u64::from(s.mtime.1));
        put_varint(&mut body, zigzag(s.ctime.0));
        put_varint(&mut body, u64::from(s.ctime.1));
    }
    let mut out = wrap(STATE_MAGIC, 0, &body);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

fn decode(what: &str, data: &[u8]) -> Result<TreeState, FormatError> {
    let Some(split) = data.len().checked_sub(32) else {
        return Err(bad(what, "truncated"));
    };
    let (data, sum) = data.split_at(split);
    if blake3::hash(data).as_bytes() != sum {
        return Err(bad(what, "checksum mismatch"));
    }
    let (_, body) = unwrap(what, STATE_MAGIC, data)?;
    let mut r = Reader::new(what, &body);
    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(r.bytes(MAX_PATH)?));
    let key = String::from_utf8(r.bytes(MAX_PATH)?.to_vec())
        .map_err(|_| bad(what, "key is not UTF-8"))?;
    let manifest = Manifest::decode(what, r.bytes(usize::MAX)?)?;
    let sizes: Vec<u64> = manifest
        .entries
        .iter()
        .filter_map(|e| match e.kind {
            EntryKind::File { size } => Some(size),
            _ => None,
        })
        .collect();
    let count = r.varint_count(1)?;
    if count != sizes.len() {
        return Err(bad(what, "stamps do not match the files"));
    }
    let mut stamps = Vec::with_capacity(count);
    for size in sizes {
        if r.u8()? == 0 {
            stamps.push(None);
            continue;
        }
        let dev = r.varint()?;
        let ino = r.varint()?;
        let mut time = || -> Result<(i64, u32), FormatError> {
            let secs = unzigzag(r.varint()?);
            let nsec = u32::try_from(r.varint()?).map_err(|_| bad(what, "bad nanoseconds"))?;
            Ok((secs, nsec))
        };
        let mtime = time()?;
        let ctime = time()?;
        stamps.push(Some(Stamp {
            dev,
            ino,
            size,
            mtime,
            ctime,
        }));
    }
    r.finish()?;
    Ok(TreeState {
        dir,
        key,
        manifest,
        stamps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::format::{Entry, ManifestKind};

    /// A record of two files, the first modified and changed at `mtime`.
    fn state(taken: SystemTime, mtime: SystemTime) -> TreeState {
        let mtime = mtime.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let mtime = (mtime.as_secs() as i64, mtime.subsec_nanos() | 1);
        let file = |name: &str, size| Entry {
            path: name.as_bytes().to_vec(),
            kind: EntryKind::File { size },
            mode: 0o644,
            mtime: 1,
            mtime_nsec: 0,
        };
        let manifest = Manifest {
            kind: ManifestKind::Dir,
            created: 0,
            label: "x".into(),
            stream_len: 0,
            table: Default::default(),
            entries: vec![file("a", 0), file("b", 0)],
        };
        let stamp = Stamp {
            dev: 1,
            ino: 2,
            size: 0,
            mtime,
            ctime: mtime,
        };
        TreeState::new(
            "/d".into(),
            "k".into(),
            manifest,
            vec![Some(stamp), None],
            taken,
        )
    }

    #[test]
    fn records_round_trip_and_refuse_any_flipped_byte() {
        let now = SystemTime::now();
        let s = state(now, SystemTime::UNIX_EPOCH + Duration::from_secs(1000));
        let data = encode(&s);
        let back = decode("t", &data).unwrap();
        assert_eq!(back.stamps, s.stamps);
        assert_eq!(back.manifest, s.manifest);
        assert_eq!((back.dir, back.key), (s.dir, s.key));
        for at in [0, data.len() / 2, data.len() - 1] {
            let mut bad = data.clone();
            bad[at] ^= 1;
            assert!(decode("t", &bad).is_err(), "flip at {at}");
        }
        assert!(decode("t", &data[..data.len() - 1]).is_err());
    }

    #[test]
    fn stamps_as_recent_as_the_record_are_not_trusted() {
        let now = SystemTime::now();
        let ms = Duration::from_millis;
        assert!(state(now, now - ms(500)).stamps[0].is_some());
        assert!(state(now, now - ms(20)).stamps[0].is_none());
        assert!(
            state(now, now + ms(60_000)).stamps[0].is_none(),
            "a time in the future"
        );
    }
}
