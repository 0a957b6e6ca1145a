//! The release binaries from `scripts/release.sh` (in `dist/`, or `CACHER_DIST`): the
//! Linux ones are static and pass a smoke run against the S3 server (arm64 under
//! `qemu-aarch64-static`), the darwin ones are Mach-O, every one is under 20 MB, and
//! `checksums.txt` verifies with `sha256sum -c`. Skipped, saying so, when no release
//! was built; scripts/test.sh builds one first.

use std::path::PathBuf;
use std::process::Command;

use crate::util::{TestEnv, random_bytes, read};

fn dist() -> Option<PathBuf> {
    let dir = std::env::var_os("CACHER_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dist"));
    if dir.join("checksums.txt").exists() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED release tests: no {}/checksums.txt (run scripts/release.sh)",
            dir.display()
        );
        None
    }
}

fn stdout(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// version, upload, exists, download with the binary (run by `emulator` when given)
/// against the test server.
fn smoke_run(emulator: Option<&str>, binary: &PathBuf, platform: &str) {
    let env = TestEnv::s3(&format!("release-{platform}"));
    let data = random_bytes(3 * 1024 * 1024 + 17, 99);
    let src = env.write("src", &data);
    let dest = env.path("dest");
    let run = |args: &[&str]| {
        let mut cmd = match emulator {
            Some(emulator) => {
                let mut cmd = Command::new(emulator);
                cmd.arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        cmd.args(args)
            .env_clear()
            .envs(env.vars.iter().map(|(n, v)| (n, v)));
        cmd.output().expect("run the release binary")
    };
    let version = run(&["version"]);
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    assert!(version.ends_with(&format!(" {platform}\n")), "{version}");
    assert!(
        !version.contains("(unknown)"),
        "the git commit is embedded: {version}"
    );
    for args in [
        vec!["upload", "smoke", src.to_str().unwrap()],
        vec!["exists", "smoke"],
        vec!["download", "smoke", dest.to_str().unwrap()],
    ] {
        let out = run(&args);
        assert!(
            out.status.success(),
            "{platform} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(read(&dest), data);
    assert_eq!(run(&["exists", "missing"]).status.code(), Some(1));

    // A tree through the chunk store: chunk buffers of every size pass through the
    // static releases' own allocator (`cacher::memory::LargeBlocks`).
    let tree = env.path("tree");
    let sizes = [0, 17, 40_000, 300_000, 3 << 20];
    for (i, size) in sizes.into_iter().enumerate() {
        env.write(
            &format!("tree/d{}/f{i}", i % 2),
            random_bytes(size, i as u64),
        );
    }
    let restored = env.path("restored");
    for args in [
        vec!["dir", "upload", "tree", tree.to_str().unwrap()],
        vec!["dir", "download", "tree", restored.to_str().unwrap()],
    ] {
        let out = run(&args);
        assert!(
            out.status.success(),
            "{platform} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (i, size) in sizes.into_iter().enumerate() {
        let at = format!("d{}/f{i}", i % 2);
        assert_eq!(
            read(restored.join(&at)),
            random_bytes(size, i as u64),
            "{at}"
        );
    }
}

#[test]
fn release_binaries_are_static_small_verified_and_run() {
    let Some(dist) = dist() else { return };
    stdout(
        Command::new("sha256sum")
            .args(["-c", "checksums.txt"])
            .current_dir(&dist),
    );
    let listed = std::fs::read_to_string(dist.join("checksums.txt")).unwrap();
    for platform in ["linux-amd64", "linux-arm64", "darwin-amd64", "darwin-arm64"] {
        let name = format!("cacher-{platform}");
        assert!(
            listed.contains(&format!("  {name}\n")),
            "{name} in checksums.txt"
        );
        let size = std::fs::metadata(dist.join(&name)).unwrap().len();
        assert!(size < 20 * 1024 * 1024, "{name} is {size} bytes");
    }

    let amd64 = dist.join("cacher-linux-amd64");
    let ldd = Command::new("ldd").arg(&amd64).output().unwrap();
    let said =
        String::from_utf8_lossy(&ldd.stdout).to_string() + &String::from_utf8_lossy(&ldd.stderr);
    assert!(
        said.contains("not a dynamic executable") || said.contains("statically linked"),
        "{said}"
    );
    let file = stdout(Command::new("file").arg(&amd64));
    assert!(
        file.contains("statically linked") && file.contains("x86-64"),
        "{file}"
    );
    assert!(!file.contains("not stripped"), "{file}");
    smoke_run(None, &amd64, "linux-amd64");

    let arm64 = dist.join("cacher-linux-arm64");
    let file = stdout(Command::new("file").arg(&arm64));
    assert!(
        file.contains("statically linked") && file.contains("aarch64"),
        "{file}"
    );
    if Command::new("qemu-aarch64-static")
        .arg("--version")
        .output()
        .is_ok()
    {
        smoke_run(Some("qemu-aarch64-static"), &arm64, "linux-arm64");
    } else {
        eprintln!(
            "SKIPPED the arm64 smoke run: no qemu-aarch64-static (scripts/test.sh installs it)"
        );
    }

    for (platform, arch) in [("darwin-amd64", "x86_64"), ("darwin-arm64", "arm64")] {
        let file = stdout(Command::new("file").arg(dist.join(format!("cacher-{platform}"))));
        assert!(
            file.contains("Mach-O 64-bit") && file.contains(arch),
            "{file}"
        );
    }
}
