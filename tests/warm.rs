//! The warm path against Garage: an upload after a restore or an upload reads only the
//! files that changed (the tree state under the cache directory says which did not),
//! and still writes the manifest a full read writes.

use std::path::{Path, PathBuf};

use cacher::chunk::format::Manifest;

use crate::util::{TestEnv, random_bytes, sh, snapshot, stored};

/// A module-cache-like tree of `packages` directories, each with a few source files
/// and one larger blob.
fn make_tree(env: &TestEnv, name: &str, packages: usize) -> PathBuf {
    for p in 0..packages {
        for f in 0..4 {
            let text = format!(
                "// pkg {p} file {f}\n{}",
                "let x = 1;\n".repeat(200 + p * 7 + f)
            );
            env.write(&format!("{name}/pkg{p:03}/src/f{f}.rs"), text);
        }
        env.write(
            &format!("{name}/pkg{p:03}/blob.bin"),
            random_bytes(60_000 + p * 1_000, p as u64),
        );
    }
    env.write(&format!("{name}/top.txt"), "top level file\n");
    env.path(name)
}

/// The `stats` object of a `--json` chunked transfer.
fn json_stats(stdout: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON record");
    v["stats"].clone()
}

fn manifest(env: &TestEnv, key: &str) -> Manifest {
    let data = stored(&format!("{}/{key}", env.prefix)).expect("manifest stored");
    Manifest::decode(key, &data).unwrap()
}

fn state_dir(env: &TestEnv) -> PathBuf {
    env.home().join(".cache/cacher/trees")
}

/// Adds, deletes, renames and edits in place, and rewrites one file with the same size
/// and its old mtime (`touch -r`), which only the ctime gives away.
fn change(work: &Path) {
    sh(
        "set -e
         mkdir -p pkg005a/src && printf 'new crate\\n' > pkg005a/src/lib.rs
         head -c 70000 /dev/urandom > pkg005a/blob.bin
         rm -r pkg012
         mv pkg020/src/f1.rs pkg020/src/f1-renamed.rs
         printf 'appended\\n' >> pkg030/src/f2.rs
         cp -p pkg040/blob.bin ref && printf 'X' | dd of=pkg040/blob.bin bs=1 seek=100 conv=notrunc status=none
         touch -r ref pkg040/blob.bin && rm ref",
        work,
    );
}

#[test]
fn an_upload_after_a_restore_reads_only_what_changed_and_writes_what_a_full_read_writes() {
    let env = TestEnv::s3("warmup");
    let src = make_tree(&env, "src", 60);
    env.run(["dir", "upload", "mods/1", src.to_str().unwrap()])
        .ok();
    let work = env.path("work");
    env.run(["dir", "download", "mods/1", work.to_str().unwrap()])
        .ok();
    change(&work);

    let warm = env.run(["dir", "upload", "mods/2", work.to_str().unwrap(), "--json"]);
    let stats = json_stats(&warm.ok().stdout);
    let total = stats["stream_bytes"].as_u64().unwrap();
    let read = stats["disk_bytes"].as_u64().unwrap();
    // Files the restore completed in its last few milliseconds are read again (their
    // stamps are too recent to trust), and so are the chunks around each change.
    assert!(
        read * 2 < total,
        "a warm upload read {read} of {total} bytes: {stats}"
    );
    assert!(stats["unchanged_files"].as_u64().unwrap() > 200, "{stats}");

    // The same tree read in full (no state) gives the same entry.
    std::fs::remove_dir_all(state_dir(&env)).unwrap();
    let cold = env.run(["dir", "upload", "mods/3", work.to_str().unwrap(), "--json"]);
    let cold_stats = json_stats(&cold.ok().stdout);
    assert_eq!(
        cold_stats["disk_bytes"].as_u64(),
        Some(total),
        "{cold_stats}"
    );
    assert_eq!(cold_stats["unchanged_files"].as_u64(), Some(0));
    let (m2, m3) = (manifest(&env, "mods/2"), manifest(&env, "mods/3"));
    assert_eq!(m2.table, m3.table);
    assert_eq!(m2.entries, m3.entries);

    // And it restores to the tree uploaded.
    let check = env.path("check");
    env.run(["dir", "download", "mods/2", check.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&check), snapshot(&work));
}

#[test]
fn an_upload_after_an_upload_reads_nothing_unchanged() {
    let env = TestEnv::s3("warmtwice");
    let src = make_tree(&env, "src", 20);
    // Past the racy window: stamps as recent as the upload are not recorded.
    std::thread::sleep(std::time::Duration::from_millis(300));
    env.run(["dir", "upload", "a", src.to_str().unwrap()]).ok();
    // Another key, same directory, nothing changed: no file is read.
    let again = env.run(["dir", "upload", "b", src.to_str().unwrap(), "--json"]);
    let stats = json_stats(&again.ok().stdout);
    assert_eq!(stats["disk_bytes"].as_u64(), Some(0), "{stats}");
    assert!(
        again.stderr.contains("files (101 unchanged"),
        "{}",
        again.stderr
    );
    assert_eq!(manifest(&env, "a").table, manifest(&env, "b").table);
}

#[test]
fn a_corrupt_state_or_one_from_another_prefix_still_gives_a_complete_entry() {
    let mut env = TestEnv::s3("warmstale");
    let src = make_tree(&env, "src", 20);
    std::thread::sleep(std::time::Duration::from_millis(300));
    env.run(["dir", "upload", "a", src.to_str().unwrap()]).ok();

    // A state whose chunks the other prefix does not hold: they are read and sent.
    let other = format!("{}-other", env.prefix);
    env.set("CACHER_PREFIX", &other);
    env.prefix = other;
    let moved = env.run(["dir", "upload", "a", src.to_str().unwrap(), "--json"]);
    let stats = json_stats(&moved.ok().stdout);
    assert_eq!(stats["chunks_new"], stats["chunks"], "{stats}");
    let out = env.path("out");
    env.run(["dir", "download", "a", out.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&out), snapshot(&src));

    // A flipped byte in the record: ignored, everything read.
    for record in std::fs::read_dir(state_dir(&env)).unwrap() {
        let path = record.unwrap().path();
        let mut data = std::fs::read(&path).unwrap();
        let mid = data.len() / 2;
        data[mid] ^= 0x40;
        std::fs::write(&path, data).unwrap();
    }
    env.write("src/pkg003/src/f0.rs", "changed\n");
    let full = env.run(["dir", "upload", "b", src.to_str().unwrap(), "--json"]);
    let stats = json_stats(&full.ok().stdout);
    assert_eq!(stats["disk_bytes"], stats["stream_bytes"], "{stats}");
    let out = env.path("out-b");
    env.run(["dir", "download", "b", out.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&out), snapshot(&src));
}
