//! The chunk store behind `dir` and `docker` entries: content-defined chunks named by
//! their blake3 hash, compressed alone, grouped into pack objects, and described by a
//! manifest written last under the user's key. docs/format.md describes the bytes.

pub mod fetched;
pub mod format;
pub mod gc;
pub mod index;
pub mod layout;
pub mod paths;
pub mod store;
pub mod summary;

use std::fmt;

/// Chunk sizes for FastCDC: small enough for dedup, large enough to keep the manifest
/// small (see docs/format.md for the measurements behind them).
pub const CHUNK_MIN: u32 = 16 * 1024;
/// Average chunk size.
pub const CHUNK_AVG: u32 = 64 * 1024;
/// Largest chunk; also the most a chunk may decompress to.
pub const CHUNK_MAX: u32 = 256 * 1024;
/// Packs are sealed once they hold this many compressed bytes.
pub const PACK_TARGET: usize = 8 * 1024 * 1024;
/// zstd level for chunks: only new chunks are compressed, so a warm upload pays little.
pub const ZSTD_LEVEL: i32 = 3;

/// The blake3 hash of a chunk's uncompressed bytes, or of a pack's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(pub [u8; 32]);

impl Id {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Id {
        Id(*blake3::hash(data).as_bytes())
    }

    /// Parses 64 hex characters (an object name).
    pub fn from_hex(s: &str) -> Option<Id> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Id(out))
    }

    /// Lowercase hex, as used in object names.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..12])
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
