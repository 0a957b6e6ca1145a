//! `--exclude` patterns: paths of a tree that an entry leaves out on upload and a
//! restore leaves alone.
//!
//! Patterns are gitignore-style and match paths relative to the tree's root: one
//! without a `/` (other than a trailing one) matches a name at any depth
//! (`incremental`), one with a `/` is anchored at the root (`registry/src`,
//! `target/*/incremental`); a trailing `/` matches directories only; `*` and `?` stay
//! within one name and `**` crosses directories; `!` re-includes what an earlier
//! pattern excluded, the last matching pattern deciding. As in git, nothing below an
//! excluded directory is looked at, so it cannot be re-included; braces are literal
//! and trailing spaces are dropped (unless escaped with `\`).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// A compiled list of `--exclude` patterns (possibly empty: nothing excluded).
#[derive(Clone, Default)]
pub struct Exclude {
    patterns: Vec<String>,
    set: GlobSet,
    rules: Vec<Rule>,
    /// Which patterns decided a match so far, to name those that never did (they are
    /// probably written relative to the wrong directory).
    used: Arc<[AtomicBool]>,
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
                return Err(invalid("a pattern is one line, without NUL bytes"));
            }
            let pattern = trim_trailing_spaces(pattern);
            let (negated, rest) = match pattern.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, pattern),
            };
            if rest.starts_with('~') {
                return Err(invalid(
                    "patterns are relative to each DIR and `~` is not expanded (`\\~x` matches a name starting with ~)",
                ));
            }
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
                    "it names no path (write `x`, not `./x`; empty and `..` segments match nothing)",
                ));
            }
            let rest = literal_braces(rest);
            let glob = match anchored {
                true => rest,
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
            used: rules.iter().map(|_| AtomicBool::new(false)).collect(),
            rules,
        })
    }

    /// The patterns that excluded nothing (nor took anything back) in what was
    /// matched so far.
    pub fn unused(&self) -> Vec<&str> {
        self.patterns
            .iter()
            .zip(self.used.iter())
            .filter(|(_, used)| !used.load(Ordering::Relaxed))
            .map(|(p, _)| p.as_str())
            .collect()
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
        let mut matched = self.set.matches(OsStr::from_bytes(rel));
        matched.retain(|&i| is_dir || !self.rules[i].dir_only);
        for &i in &matched {
            self.used[i].store(true, Ordering::Relaxed);
        }
        matched.last().is_some_and(|&i| !self.rules[i].negated)
    }

    /// Whether anything below `root` is excluded, or it cannot tell (an unreadable
    /// directory): whether replacing `root`'s contents whole could lose such paths.
    pub fn holds_excluded(&self, root: &Path) -> bool {
        fn walk(e: &Exclude, dir: &Path, rel: &[u8]) -> std::io::Result<bool> {
            for item in std::fs::read_dir(dir)? {
                let item = item?;
                let name = item.file_name();
                let path = crate::restore::join_path(rel, name.as_bytes());
                let is_dir = item.file_type()?.is_dir();
                if e.excludes(&path, is_dir) || (is_dir && walk(e, &item.path(), &path)?) {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        !self.is_empty() && walk(self, root, &[]).unwrap_or(true)
    }

    /// Whether `name`, a child of the open directory `dir` at `rel`, is excluded,
    /// looking at it (without following a symlink) to tell a directory.
    pub fn excludes_at(&self, dir: std::os::fd::BorrowedFd<'_>, name: &OsStr, rel: &[u8]) -> bool {
        if self.is_empty() {
            return false;
        }
        let st = rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW);
        let is_dir = st.is_ok_and(|st| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
        });
        self.excludes(rel, is_dir)
    }
}

/// `pattern` without its trailing spaces, as git reads a pattern, but for one escaped
/// with a backslash.
fn trim_trailing_spaces(pattern: &str) -> &str {
    let mut end = pattern.trim_end_matches(' ').len();
    if end < pattern.len() && pattern[..end].ends_with('\\') {
        end += 1;
    }
    &pattern[..end]
}

/// `glob` with its braces escaped: in gitignore patterns they are literal, where
/// globset would read `{a,b}` as alternatives.
fn literal_braces(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len());
    let mut escaped = false;
    let mut in_class = false;
    for c in glob.chars() {
        match c {
            '{' | '}' if !escaped && !in_class => out.push('\\'),
            '[' if !escaped => in_class = true,
            ']' if !escaped => in_class = false,
            _ => {}
        }
        escaped = c == '\\' && !escaped;
        out.push(c);
    }
    out
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
    fn braces_are_literal_and_trailing_spaces_dropped_as_in_git() {
        let e = exclude(&["a{1,2}", "sp ace  ", "keep\\ ", "[{]x"]);
        assert!(e.excludes(b"a{1,2}", false));
        assert!(!e.excludes(b"a1", false));
        assert!(e.excludes(b"sp ace", false));
        assert!(!e.excludes(b"sp ace ", false));
        assert!(e.excludes(b"keep ", false));
        assert!(e.excludes(b"{x", false));
    }

    #[test]
    fn patterns_that_never_decided_are_reported() {
        let e = exclude(&["*.o", "registry/src", "!keep.o"]);
        assert!(e.excludes(b"a.o", false));
        assert!(!e.excludes(b"src", true));
        assert_eq!(e.unused(), ["registry/src", "!keep.o"]);
        assert!(!e.excludes(b"d/keep.o", false));
        assert_eq!(e.unused(), ["registry/src"]);
        // A pattern that matched counts, even where a later one took the path back.
        let e = exclude(&["*.log", "!keep.log"]);
        assert!(!e.excludes(b"keep.log", false));
        assert!(e.unused().is_empty());
    }

    #[test]
    fn patterns_that_name_no_path_are_refused() {
        for bad in [
            "", "/", "!", "a//b", "../x", "./x", "a\nb", "[z-a", "~/x", "!~/x", "  ",
        ] {
            assert!(
                Exclude::new(&[bad.to_string()]).is_err(),
                "{bad:?} was accepted"
            );
        }
    }
}
