//! Cache keys: templates, content digests, the arch suffix and the prefix join.
//!
//! The digest promise is byte-compatible with coreutils: one regular file hashes to
//! `sha256sum FILE | head -c N`; anything else hashes to the sha256 of the lines
//! `sha256sum` prints for the expanded file list (see docs/keys.md).

use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::cli::InputError;

/// Longest digest: a full sha256 in hex.
pub const MAX_HASH_LENGTH: usize = 64;
/// Longest full key S3 accepts.
pub const MAX_KEY_BYTES: usize = 1024;

/// `-<os>-<arch>` in Go's spelling, for the platform this binary was built for.
pub fn arch_suffix() -> String {
    format!("-{}", crate::version::go_platform())
}

/// Builds a key from a template: `{hash}` becomes the digest of `hash_from`; without
/// `{hash}`, `-<digest>` goes before the trailing extensions of the last segment (see
/// [`extension_start`]). The arch suffix, when asked for, is appended.
pub fn render_template(
    template: &str,
    hash_from: &[PathBuf],
    hash_length: usize,
    arch: bool,
) -> anyhow::Result<String> {
    if !(1..=MAX_HASH_LENGTH).contains(&hash_length) {
        bail!("--hash-length must be between 1 and {MAX_HASH_LENGTH}, got {hash_length}");
    }
    let has_placeholder = template.contains("{hash}");
    let mut key = if hash_from.is_empty() {
        if has_placeholder {
            bail!("key `{template}` uses {{hash}} but no --hash-from was given");
        }
        template.to_string()
    } else {
        let digest = digest_paths(hash_from)?;
        let digest = &digest[..hash_length];
        if has_placeholder {
            template.replace("{hash}", digest)
        } else {
            insert_before_extension(template, &format!("-{digest}"))
        }
    };
    if arch {
        key = with_arch_suffix(&key);
    }
    validate_key(&key)?;
    Ok(key)
}

/// Appends the arch suffix unless the key already ends with it, so applying it twice
/// is the same as once.
pub fn with_arch_suffix(key: &str) -> String {
    let suffix = arch_suffix();
    if key.ends_with(&suffix) {
        key.to_string()
    } else {
        format!("{key}{suffix}")
    }
}

/// Whether `key` already carries this platform's arch suffix (so fallback candidates
/// of other platforms can be told apart).
pub fn has_arch_suffix(key: &str) -> bool {
    key.ends_with(&arch_suffix())
}

/// Inserts `insert` before the trailing extensions of the last path segment.
fn insert_before_extension(key: &str, insert: &str) -> String {
    let (dir, name) = split_last_segment(key);
    let at = extension_start(name);
    format!("{dir}{}{insert}{}", &name[..at], &name[at..])
}

/// Where the trailing extensions of a file name start: the trailing run of
/// dot-separated parts that start with a letter (`.tar.gz` of `go-1.26.3.tar.gz`, none
/// in `v1.2`). A leading dot belongs to the name (`.bashrc` has no extension).
fn extension_start(name: &str) -> usize {
    let mut at = name.len();
    while let Some(dot) = name[..at].rfind('.') {
        let part = &name[dot + 1..at];
        if dot == 0 || !part.starts_with(|c: char| c.is_ascii_alphabetic()) {
            break;
        }
        at = dot;
    }
    at
}

fn split_last_segment(key: &str) -> (&str, &str) {
    match key.rfind('/') {
        Some(i) => key.split_at(i + 1),
        None => ("", key),
    }
}

/// Rejects keys S3 or a `file://` store cannot hold safely.
pub fn validate_key(key: &str) -> anyhow::Result<()> {
    if key.is_empty() {
        bail!("the key is empty");
    }
    if key.starts_with('/') {
        bail!("key `{key}` is absolute: keys are relative to the configured prefix");
    }
    if key.split('/').any(|seg| seg == ".." || seg == ".") {
        bail!("key `{key}` contains a `.` or `..` segment");
    }
    if key.split('/').any(str::is_empty) {
        bail!("key `{key}` contains an empty segment (`//` or a trailing `/`)");
    }
    if let Some(seg) = key
        .split('/')
        .find(|seg| crate::chunk::layout::is_reserved_segment(seg))
    {
        bail!("key `{key}` uses the segment `{seg}`, which is reserved for cacher's own objects");
    }
    if key.chars().any(char::is_control) {
        bail!("key {key:?} contains control characters");
    }
    if key.len() > MAX_KEY_BYTES {
        bail!(
            "key is {} bytes long; S3 allows at most {MAX_KEY_BYTES}",
            key.len()
        );
    }
    Ok(())
}

/// The full key in the bucket for a key the user typed: its template resolved with
/// `--hash-from` exactly as `cacher key` does, the configured arch suffix appended
/// (idempotently), validated, and joined to the prefix.
pub fn full_key(
    config: &crate::config::Config,
    spec: &crate::cli::KeySpec,
) -> anyhow::Result<String> {
    let input_error = |e: anyhow::Error| anyhow::Error::new(InputError(format!("{e:#}")));
    let key = render_template(
        &spec.key,
        &spec.hash_from,
        spec.hash_length,
        config.arch_suffix.value,
    )
    .map_err(input_error)?;
    let full = join_prefix(&config.prefix.value, &key);
    if full.len() > MAX_KEY_BYTES {
        return Err(input_error(anyhow::anyhow!(
            "key `{full}` is longer than {MAX_KEY_BYTES} bytes with the prefix"
        )));
    }
    Ok(full)
}

/// Joins the configured prefix and a key with exactly one `/`.
pub fn join_prefix(prefix: &str, key: &str) -> String {
    let prefix = prefix.trim_matches('/');
    let key = key.trim_start_matches('/');
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}/{key}")
    }
}

/// Lowercase hex sha256 digest of the given paths (see the module doc for the rule).
pub fn digest_paths(paths: &[PathBuf]) -> anyhow::Result<String> {
    let paths = &expand_patterns(paths)?[..];
    if let [single] = paths {
        let meta = std::fs::metadata(single)
            .with_context(|| format!("--hash-from {}", single.display()))?;
        if meta.is_file() {
            return hash_file(single);
        }
    }
    let files = expand_paths(paths)?;
    let digests: Vec<String> = files
        .par_iter()
        .map(|f| hash_file(&f.path))
        .collect::<anyhow::Result<_>>()?;
    let mut listing = Sha256::new();
    for (file, digest) in files.iter().zip(&digests) {
        listing.update(sha256sum_line(digest, file.name.as_os_str().as_bytes()));
    }
    Ok(hex::encode(listing.finalize()))
}

/// Each argument as given, or for a pattern the regular files it matches, in byte
/// order of their paths, as if each had been given by that path: the key then does
/// not depend on the shell (an unquoted glob, `globstar`, an empty match).
fn expand_patterns(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        match is_pattern(path) {
            true => out.extend(matching_files(path)?),
            false => out.push(path.clone()),
        }
    }
    Ok(out)
}

/// Whether a `--hash-from` argument is a pattern: it has glob characters and names no
/// existing path (a file really called `a[1]` is taken as it is).
fn is_pattern(path: &Path) -> bool {
    has_glob_chars(path.as_os_str().as_bytes()) && std::fs::symlink_metadata(path).is_err()
}

fn has_glob_chars(s: &[u8]) -> bool {
    s.iter().any(|b| matches!(b, b'*' | b'?' | b'[' | b'{'))
}

/// The regular files `pattern` matches (symlinks are not followed), with their paths
/// spelled from the pattern's start, sorted by bytes. `*`, `?`, `[...]` and `{a,b}`
/// stay within one path segment; `**` as a segment spans any number of directories,
/// none included. Matching nothing is an error.
fn matching_files(pattern: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let what = || format!("--hash-from '{}'", pattern.display());
    let text = pattern
        .to_str()
        .with_context(|| format!("{}: a pattern must be UTF-8", what()))?;
    let glob = globset::GlobBuilder::new(text.trim_start_matches("./"))
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .with_context(what)?
        .compile_matcher();
    // The walk starts at the segments before the first with a glob character, and
    // goes no deeper than the pattern unless it has `**`.
    let segments: Vec<&str> = text.split('/').collect();
    let literal = segments
        .iter()
        .take_while(|s| !has_glob_chars(s.as_bytes()))
        .count();
    let base = match segments[..literal].join("/") {
        b if b.is_empty() && text.starts_with('/') => "/".to_string(),
        b if b.is_empty() => ".".to_string(),
        b => b,
    };
    let mut walk = walkdir::WalkDir::new(&base).min_depth(1);
    // `**` anywhere, also inside braces (`{**/go.sum,go.work.sum}`), may span
    // directories.
    if !text.contains("**") {
        walk = walk.max_depth(segments.len() - literal);
    }
    let mut files = Vec::new();
    for entry in walk {
        let entry = entry.with_context(what)?;
        if !entry.file_type().is_file() {
            continue;
        }
        let path = entry.into_path();
        let rel = path.strip_prefix(".").unwrap_or(&path);
        if glob.is_match(rel) {
            // Named as the shell would spell the match: `./a/go.sum` for `./**/go.sum`.
            files.push(match text.starts_with("./") {
                true => Path::new(".").join(rel),
                false => rel.to_path_buf(),
            });
        }
    }
    if files.is_empty() {
        bail!("{} matched no file", what());
    }
    files.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    Ok(files)
}

/// A file whose content goes into a digest, and the name its line carries.
struct HashedFile {
    path: PathBuf,
    name: PathBuf,
}

/// Expands each argument in order: a file stays, named as written; a directory becomes
/// its regular files (symlinks not followed, as `find -type f`) named relative to it, in
/// byte order of those names, so it hashes the same however it is spelled.
fn expand_paths(paths: &[PathBuf]) -> anyhow::Result<Vec<HashedFile>> {
    let mut out = Vec::new();
    for path in paths {
        let meta =
            std::fs::metadata(path).with_context(|| format!("--hash-from {}", path.display()))?;
        if !meta.is_dir() {
            out.push(HashedFile {
                path: path.clone(),
                name: path.clone(),
            });
            continue;
        }
        let mut files = Vec::new();
        for entry in walkdir::WalkDir::new(path) {
            let entry = entry.with_context(|| format!("--hash-from {}", path.display()))?;
            if entry.file_type().is_file() {
                let name = entry
                    .path()
                    .strip_prefix(path)
                    .expect("walkdir yields paths under its root")
                    .to_path_buf();
                files.push(HashedFile {
                    path: entry.into_path(),
                    name,
                });
            }
        }
        files.sort_by(|a, b| {
            a.name
                .as_os_str()
                .as_bytes()
                .cmp(b.name.as_os_str().as_bytes())
        });
        out.extend(files);
    }
    Ok(out)
}

/// One line of `sha256sum` output, with its escaping of `\`, newline and CR in names.
fn sha256sum_line(digest: &str, name: &[u8]) -> Vec<u8> {
    let needs_escape = name.iter().any(|b| matches!(b, b'\\' | b'\n' | b'\r'));
    let mut line = Vec::with_capacity(digest.len() + name.len() + 4);
    if needs_escape {
        line.push(b'\\');
    }
    line.extend_from_slice(digest.as_bytes());
    line.extend_from_slice(b"  ");
    for &b in name {
        match (needs_escape, b) {
            (true, b'\\') => line.extend_from_slice(b"\\\\"),
            (true, b'\n') => line.extend_from_slice(b"\\n"),
            (true, b'\r') => line.extend_from_slice(b"\\r"),
            _ => line.push(b),
        }
    }
    line.push(b'\n');
    line
}

/// Lowercase hex sha256 of one file's content, streamed.
pub fn hash_file(path: &Path) -> anyhow::Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_goes_before_the_trailing_extensions_of_the_last_segment() {
        let cases = [
            ("img/build.tar.zst", "img/build-x.tar.zst"),
            ("bin/cacher", "bin/cacher-x"),
            ("a.b/c.d.e", "a.b/c-x.d.e"),
            ("go-1.26.3.tar.gz", "go-1.26.3-x.tar.gz"),
            ("v1.2", "v1.2-x"),
            ("foo/.bashrc", "foo/.bashrc-x"),
            (".config.tar.gz", ".config-x.tar.gz"),
            ("archive.7z", "archive.7z-x"),
        ];
        for (key, expected) in cases {
            assert_eq!(insert_before_extension(key, "-x"), expected, "{key}");
        }
    }

    #[test]
    fn arch_suffix_is_appended_once() {
        let once = with_arch_suffix("go-1.26.3.tar.gz");
        assert_eq!(once, format!("go-1.26.3.tar.gz{}", arch_suffix()));
        assert_eq!(with_arch_suffix(&once), once);
        let dotfile = with_arch_suffix("foo/.bashrc");
        assert_eq!(dotfile, format!("foo/.bashrc{}", arch_suffix()));
    }

    #[test]
    fn prefix_join_uses_exactly_one_slash() {
        assert_eq!(join_prefix("proj", "k"), "proj/k");
        assert_eq!(join_prefix("proj/", "/k"), "proj/k");
        assert_eq!(join_prefix("/proj/", "a/b"), "proj/a/b");
        assert_eq!(join_prefix("", "k"), "k");
    }

    #[test]
    fn bad_keys_are_rejected() {
        for key in [
            "",
            "/abs",
            "a/../b",
            "a//b",
            "a/",
            "./a",
            "a\nb",
            ".cacher/packs/00",
            "a/.cacher",
            "a/.cacher-canary-01/b",
        ] {
            assert!(validate_key(key).is_err(), "{key:?} should be rejected");
        }
        assert!(validate_key(&"k".repeat(1025)).is_err());
        assert!(validate_key("go-mod/abc.tar.zst").is_ok());
        assert!(validate_key("a/.cacherx/b.cacher").is_ok());
    }

    #[test]
    fn sha256sum_escapes_backslash_and_newline() {
        let line = sha256sum_line("ab", b"a\\b\nc");
        assert_eq!(line, b"\\ab  a\\\\b\\nc\n");
        assert_eq!(sha256sum_line("ab", b"plain name"), b"ab  plain name\n");
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn arch_suffix_applies_once(dir in "([a-z0-9._-]{1,8}/){0,3}", name in "[a-z0-9-]{1,12}(\\.[a-z0-9]{1,4}){0,2}") {
            let key = format!("{dir}{name}");
            let once = with_arch_suffix(&key);
            prop_assert_eq!(with_arch_suffix(&once), once.clone());
            prop_assert_eq!(once, format!("{key}{}", arch_suffix()));
        }

        #[test]
        fn the_digest_lands_before_the_trailing_extensions(dir in "([a-z.]{1,8}/){0,3}", stem in "[a-z-]{1,12}(\\.[0-9][a-z0-9]{0,3}){0,2}", ext in "(\\.[a-z][a-z0-9]{0,3}){0,2}") {
            let key = insert_before_extension(&format!("{dir}{stem}{ext}"), "-X");
            prop_assert_eq!(key, format!("{dir}{stem}-X{ext}"));
        }

        #[test]
        fn joined_keys_have_no_double_or_leading_slash(prefix in "/?[a-z]{0,6}(/[a-z]{1,6}){0,2}/?", key in "[a-z]{1,6}(/[a-z]{1,6}){0,2}") {
            let full = join_prefix(&prefix, &key);
            prop_assert!(!full.contains("//"));
            prop_assert!(!full.starts_with('/'));
            prop_assert!(full.ends_with(&key));
        }
    }
}
