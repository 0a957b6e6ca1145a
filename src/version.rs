//! Build identity: version, git commit and the platform in Go's spelling.

/// `cacher 0.1.0 (abc1234) linux-amd64`, printed by `cacher version`.
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("CACHER_GIT_COMMIT"),
    ")"
);

/// The full version line, with the platform.
pub fn version_line() -> String {
    format!("cacher {VERSION_LINE} {}", go_platform())
}

/// `<os>-<arch>` as Go spells them (`linux-amd64`, `darwin-arm64`), used by the arch suffix.
pub fn go_platform() -> String {
    let os = std::env::consts::OS;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    format!("{os}-{arch}")
}
