//! Embeds the git commit, the target triple and the platform in Go's spelling so
//! `cacher version` can report them.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=7", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=CACHER_GIT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=CACHER_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    // The platform in Go's spelling, as the arch suffix and `version` print it.
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let os = match var("CARGO_CFG_TARGET_OS").as_str() {
        "macos" => "darwin".to_string(),
        other => other.to_string(),
    };
    let arch = match var("CARGO_CFG_TARGET_ARCH").as_str() {
        "x86_64" => "amd64".to_string(),
        "aarch64" => "arm64".to_string(),
        "x86" => "386".to_string(),
        other => other.to_string(),
    };
    println!("cargo:rustc-env=CACHER_PLATFORM={os}-{arch}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-env-changed=CACHER_GIT_COMMIT");
}
