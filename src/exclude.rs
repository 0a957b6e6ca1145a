//! `--exclude` patterns: paths of a tree that an entry leaves out on upload and a
//! restore leaves alone.
//!
//! Patterns are gitignore-style and match paths relative to the tree's root: one
//! without a `/` (other than a trailing one) matches a name at any depth
//! (`incremental`), one with a `/` is anchored at the root (`registry/src`,
//! `target/*/incremental`); a trailing `/` matches directories only; `*` and `?` stay
//! within one name and `**` crosses directories; `!` re-includes what an earlier
//! pattern excluded, the last matching pattern deciding. As in git, nothing below an
//! excluded directory is looked at, so it cannot be re-included.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// A compiled list of `--exclude` patterns (possibly empty: nothing excluded).
#[derive(Clone, Default)]
pub struct Exclude {
    patterns: Vec<String>,
    set: GlobSet,
    rules: Vec<Rule>,
}

/// How one pattern applies once its glob matches.
#[derive(Clone, Copy)]
struct Rule {
    negated: bool,
    dir_only: bool,
}

impl Exclude {
    /// Compiles `patterns` as given on the command line; the error names the pattern
    /// that is not valid.
    pub fn new(patterns: &[String]) -> Result<Exclude, String> {
        let mut set = GlobSetBuilder::new();
        let mut rules = Vec::with_capacity(patterns.len());
        for pattern in patterns {
            let invalid = |why: &str| format!("--exclude '{pattern}': {why}");
            if pattern.contains(['\0', '\n']) {
                return Err(invalid("a pattern cannot hold a newline"));
            }
            let (negated, rest) = match pattern.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, pattern.as_str()),
            };
            let (dir_only, rest) = match rest.strip_suffix('/') {
                Some(rest) => (true, rest),
                None => (false, rest),
            };
            let anchored = rest.contains('/');
            let rest = rest.strip_prefix('/').unwrap_or(rest);
            if rest.is_empty()
                || rest
                    .split('/')
                    .any(|s| s.is_empty() || s == "." || s == "..")
            {
                return Err(invalid(
                    "it names no path (empty, `.` or `..` segments are not patterns)",
                ));
            }
            let glob = match anchored {
                true => rest.to_string(),
                false => format!("**/{rest}"),
            };
            let glob = GlobBuilder::new(&glob)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| invalid(&e.kind().to_string()))?;
            set.add(glob);
            rules.push(Rule { negated, dir_only });
        }
        let set = set.build().map_err(|e| format!("--exclude: {e}"))?;
        Ok(Exclude {
            patterns: patterns.to_vec(),
            set,
            rules,
        })
    }

    /// Whether no pattern is given, so nothing is excluded.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The patterns as given, to record in the entry.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether the node at `rel` (relative to the root, `/`-separated) is excluded;
    /// `is_dir` says whether it is a directory (not a symlink to one). Its ancestors
    /// are not looked at: a walk does not descend into an excluded directory.
    pub fn excludes(&self, rel: &[u8], is_dir: bool) -> bool {
        if self.is_empty() {
            return false;
        }
        let matched = self.set.matches(OsStr::from_bytes(rel));
        let last = matched
            .into_iter()
            .rev()
            .map(|i| self.rules[i])
            .find(|rule| is_dir || !rule.dir_only);
        last.is_some_and(|rule| !rule.negated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exclude(patterns: &[&str]) -> Exclude {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        Exclude::new(&patterns).unwrap()
    }

    #[test]
    fn names_match_at_any_depth_and_slashes_anchor() {
        let e = exclude(&["incremental", "registry/src", "/top", "target/*/deps"]);
        assert!(e.excludes(b"incremental", true));
        assert!(e.excludes(b"target/debug/incremental", true));
        assert!(!e.excludes(b"target/debug/incremental-not", true));
        assert!(e.excludes(b"registry/src", true));
        assert!(!e.excludes(b"x/registry/src", true));
        assert!(e.excludes(b"top", false));
        assert!(!e.excludes(b"a/top", false));
        assert!(e.excludes(b"target/debug/deps", true));
        assert!(!e.excludes(b"target/debug/x/deps", true));
        assert!(!e.excludes(b"target", true));
    }

    #[test]
    fn trailing_slash_means_directories_and_stars_stay_in_a_name() {
        let e = exclude(&["build/", "*.o", "cache/**"]);
        assert!(e.excludes(b"a/build", true));
        assert!(!e.excludes(b"a/build", false));
        assert!(e.excludes(b"x.o", false));
        assert!(e.excludes(b"deep/er/x.o", false));
        assert!(!e.excludes(b"x.od", false));
        assert!(e.excludes(b"cache/a/b", false));
        assert!(!e.excludes(b"cache", true));
    }

    #[test]
    fn the_last_matching_pattern_decides() {
        let e = exclude(&["*.log", "!keep.log", "keep.log/"]);
        assert!(e.excludes(b"a.log", false));
        assert!(!e.excludes(b"d/keep.log", false));
        // The third pattern matches directories only.
        assert!(e.excludes(b"d/keep.log", true));
        assert!(!exclude(&[]).excludes(b"anything", false));
    }

    #[test]
    fn patterns_that_name_no_path_are_refused() {
        for bad in ["", "/", "!", "a//b", "../x", "a/./b", "a\nb", "[z-a"] {
            assert!(
                Exclude::new(&[bad.to_string()]).is_err(),
                "{bad:?} was accepted"
            );
        }
    }
}
