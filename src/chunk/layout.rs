//! Where cacher keeps its own objects in the bucket, in one place.
//!
//! Everything internal lives under `<prefix>/.cacher/` (packs, index segments, gc
//! state, last-use markers), and `doctor` writes `<prefix>/.cacher-canary-*`. Commands
//! that walk entries (gc, prune, the `dir` fallback) skip internal keys with
//! [`Layout::is_internal`], which looks at every segment so a store at `ci` never
//! mistakes the objects of a nested store at `ci/linux` for entries; user keys may not
//! contain such segments ([`is_reserved_segment`], checked by `key::validate_key`).

use super::Id;
use crate::key::join_prefix;

/// The key segment under which cacher keeps its own objects.
pub const INTERNAL_DIR: &str = ".cacher";

/// Whether a key segment is reserved for cacher: `.cacher` itself or any `.cacher-*`
/// (canaries, `file://` temp files).
pub fn is_reserved_segment(segment: &str) -> bool {
    segment == INTERNAL_DIR
        || segment
            .strip_prefix(INTERNAL_DIR)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// The keys of one chunk store: entries and internal objects under one prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// The layout of the store under the configured `prefix`.
    pub fn new(prefix: &str) -> Layout {
        Layout {
            prefix: prefix.trim_matches('/').to_string(),
        }
    }

    /// The configured prefix (no leading or trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Key prefix under which entries (the user's keys) are listed.
    pub fn entries_prefix(&self) -> String {
        join_prefix(&self.prefix, "")
    }

    /// Key prefix of everything cacher keeps for itself.
    pub fn internal_prefix(&self) -> String {
        join_prefix(&self.prefix, &format!("{INTERNAL_DIR}/"))
    }

    /// Whether `full_key` is one of cacher's own objects (of this store or of a store
    /// nested below it) rather than an entry: some segment after the prefix is reserved.
    pub fn is_internal(&self, full_key: &str) -> bool {
        let rest = match self.prefix.is_empty() {
            true => Some(full_key),
            false => full_key
                .strip_prefix(self.prefix.as_str())
                .and_then(|r| r.strip_prefix('/')),
        };
        // Outside the prefix: not an entry of this store either.
        rest.is_none_or(|rest| rest.split('/').any(is_reserved_segment))
    }

    /// Key prefix of pack objects.
    pub fn packs_prefix(&self) -> String {
        format!("{}packs/", self.internal_prefix())
    }

    /// Key of a pack object.
    pub fn pack_key(&self, id: &Id) -> String {
        format!("{}{id}", self.packs_prefix())
    }

    /// The pack id named by a key under [`Layout::packs_prefix`], if it is one.
    pub fn pack_id(&self, key: &str) -> Option<Id> {
        Id::from_hex(key.strip_prefix(&self.packs_prefix())?)
    }

    /// Key prefix of index segments.
    pub fn index_prefix(&self) -> String {
        format!("{}index/", self.internal_prefix())
    }

    /// Key of the index segment whose bytes hash to `id`.
    pub fn segment_key(&self, id: &Id) -> String {
        format!("{}{id}", self.index_prefix())
    }

    /// The id an index segment's key claims for its bytes, if the key is one.
    pub fn segment_id(&self, key: &str) -> Option<Id> {
        Id::from_hex(key.strip_prefix(&self.index_prefix())?)
    }

    /// Key prefix of index segment filters.
    pub fn filter_prefix(&self) -> String {
        format!("{}filter/", self.internal_prefix())
    }

    /// Key of the filter of the index segment `segment` (named by the segment's id).
    pub fn filter_key(&self, segment: &Id) -> String {
        format!("{}{segment}", self.filter_prefix())
    }

    /// The segment id a filter's key names, if the key is one.
    pub fn filter_segment(&self, key: &str) -> Option<Id> {
        Id::from_hex(key.strip_prefix(&self.filter_prefix())?)
    }

    /// Key prefix of index summaries.
    pub fn summary_prefix(&self) -> String {
        format!("{}summary/", self.internal_prefix())
    }

    /// Key of the index summary whose bytes hash to `id`.
    pub fn summary_key(&self, id: &Id) -> String {
        format!("{}{id}", self.summary_prefix())
    }

    /// The id an index summary's key claims for its bytes, if the key is one.
    pub fn summary_id(&self, key: &str) -> Option<Id> {
        Id::from_hex(key.strip_prefix(&self.summary_prefix())?)
    }

    /// Key of gc's list of condemned packs (docs/format.md, "Garbage collection").
    pub fn condemned_key(&self) -> String {
        format!("{}gc/condemned", self.internal_prefix())
    }

    /// Key prefix of last-use markers.
    pub fn used_prefix(&self) -> String {
        format!("{}used/", self.internal_prefix())
    }

    /// Key of the last-use marker of the entry at `full_key`: named by the blake3 of
    /// the key, so any key fits and the marker sits beside the other internal objects.
    pub fn used_key(&self, full_key: &str) -> String {
        format!("{}{}", self.used_prefix(), Id::of(full_key.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_keys_are_recognised_at_any_depth_below_the_prefix() {
        let l = Layout::new("ci");
        for key in [
            "ci/.cacher/packs/00",
            "ci/.cacher-canary-0123456789abcdef",
            "ci/linux/.cacher/index/00",
            "ci/linux/.cacher-canary-01",
            "other/key",
        ] {
            assert!(l.is_internal(key), "{key} is internal (or not ours)");
        }
        for key in ["ci/k", "ci/linux/k", "ci/.cacherx/k", "ci/a.cacher/k"] {
            assert!(!l.is_internal(key), "{key} is an entry");
        }
        let root = Layout::new("");
        assert!(root.is_internal(".cacher/packs/00"));
        assert!(!root.is_internal("go/mod.tar"));
    }

    #[test]
    fn keys_are_built_under_the_prefix() {
        let l = Layout::new("/ci/");
        let id = Id::of(b"x");
        assert_eq!(l.pack_key(&id), format!("ci/.cacher/packs/{id}"));
        assert_eq!(l.pack_id(&l.pack_key(&id)), Some(id));
        assert_eq!(l.segment_id(&l.segment_key(&id)), Some(id));
        assert_eq!(l.pack_id(&l.segment_key(&id)), None);
        assert_eq!(l.condemned_key(), "ci/.cacher/gc/condemned");
        assert!(l.used_key("ci/k").starts_with("ci/.cacher/used/"));
        assert_eq!(Layout::new("").pack_key(&id), format!(".cacher/packs/{id}"));
    }
}
