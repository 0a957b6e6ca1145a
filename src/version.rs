//! Build identity: version, git commit and the platform in Go's spelling.

/// `0.1.0 (abc1234) linux-amd64`: what `cacher version` and `cacher --version` print
/// after the name.
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("CACHER_GIT_COMMIT"),
    ") ",
    env!("CACHER_PLATFORM")
);

/// The full version line, `cacher 0.1.0 (abc1234) linux-amd64`.
pub fn version_line() -> String {
    format!("cacher {VERSION_LINE}")
}

/// `<os>-<arch>` as Go spells them (`linux-amd64`, `darwin-arm64`) for the platform this
/// binary was built for; the arch suffix uses it.
pub fn go_platform() -> &'static str {
    env!("CACHER_PLATFORM")
}
