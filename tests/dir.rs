//! `cacher dir`: chunked directory trees against a real Garage node.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cacher::chunk::Id;
use cacher::chunk::format::{ChunkTable, Entry, EntryKind, Manifest, ManifestKind};

use crate::util::{TestEnv, bucket, random_bytes, rt, sh, stored, temp_leftovers, upload_stats};

/// Everything a user would compare between two trees.
fn snapshot(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let entry = entry.unwrap();
        let rel = entry
            .path()
            .strip_prefix(root)
            .unwrap()
            .display()
            .to_string();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        let what = if meta.file_type().is_symlink() {
            format!(
                "link -> {}",
                std::fs::read_link(entry.path()).unwrap().display()
            )
        } else if meta.is_dir() {
            format!(
                "dir {:o} mtime {}.{}",
                meta.mode() & 0o7777,
                meta.mtime(),
                meta.mtime_nsec()
            )
        } else {
            let digest = Id::of(&std::fs::read(entry.path()).unwrap()).to_hex();
            format!(
                "file {:o} mtime {}.{} {} bytes {digest}",
                meta.mode() & 0o7777,
                meta.mtime(),
                meta.mtime_nsec(),
                meta.len()
            )
        };
        out.push((rel, what));
    }
    out
}

/// A small module-like tree: text files, a large random file, an executable, an empty
/// dir, a symlink, odd names, and fixed mtimes.
fn make_tree(env: &TestEnv, name: &str, seed: u64) -> PathBuf {
    let root = env.path(name);
    for i in 0..40 {
        let text = format!("package m{i}\n{}\n", "fn f() {}\n".repeat(i * 50 + 1));
        env.write(&format!("{name}/pkg/mod{i:02}/lib.rs"), text);
    }
    env.write(
        &format!("{name}/big/blob.bin"),
        random_bytes(3 * 1024 * 1024 + 11, seed),
    );
    env.write(
        &format!("{name}/big/other.bin"),
        random_bytes(1024 * 1024, seed + 1),
    );
    let tool = env.write(&format!("{name}/bin/tool"), "#!/bin/sh\necho tool\n");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.write(&format!("{name}/odd names/with space & ü.txt"), "odd");
    env.write(&format!("{name}/empty-file"), "");
    std::fs::create_dir_all(root.join("empty/dir")).unwrap();
    std::os::unix::fs::symlink("bin/tool", root.join("tool-link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    sh(
        &format!(
            "find '{}' -exec touch -h -d '2021-02-03 04:05:06.123456789' {{}} +",
            root.display()
        ),
        env.dir.path(),
    );
    root
}

#[test]
fn round_trip_restores_content_modes_mtimes_symlinks_and_empty_dirs() {
    let env = TestEnv::s3("dirtrip");
    let src = make_tree(&env, "src", 1);
    env.run(["dir", "exists", "gomod/a"]).code(1);
    env.run(["dir", "download", "gomod/a", "out"]).code(1);
    let up = env.run(["dir", "upload", "gomod/a", src.to_str().unwrap()]);
    up.ok();
    assert!(up.stderr.contains("45 files"), "{}", up.stderr);
    env.run(["dir", "exists", "gomod/a"]).ok();
    let out = env.path("restore/out");
    let run = env.run(["dir", "download", "gomod/a", out.to_str().unwrap()]);
    assert_eq!(run.ok().stdout.trim(), "gomod/a");
    assert_eq!(snapshot(&out), snapshot(&src));
    assert!(temp_leftovers(&env.path("restore")).is_empty());
    // The manifest sits under the key; the chunks in packs beside it.
    let manifest = stored(&format!("{}/gomod/a", env.prefix)).unwrap();
    assert!(manifest.starts_with(b"CACHERMF"));
    let listed = env.run(["list", "--recursive"]);
    assert!(
        listed.ok().stdout.contains(".cacher/packs/"),
        "{}",
        listed.stdout
    );

    // A second upload of the same tree under another key sends no chunk.
    let again = env.run(["dir", "upload", "gomod/b", src.to_str().unwrap()]);
    let (_, new, _) = upload_stats(&again.ok().stderr);
    assert_eq!(new, 0, "{}", again.stderr);
}

#[test]
fn changing_one_file_sends_only_a_few_chunks() {
    let env = TestEnv::s3("dirbump");
    let src = make_tree(&env, "src", 2);
    let first = env.run(["dir", "upload", "k1", src.to_str().unwrap()]);
    let (total, new, _) = upload_stats(&first.ok().stderr);
    assert_eq!(total, new);
    assert!(total > 40, "{}", first.stderr);

    // Rewrite 100 bytes in the middle of the big blob.
    let blob = src.join("big/blob.bin");
    let mut data = std::fs::read(&blob).unwrap();
    data[1_500_000..1_500_100].copy_from_slice(&[0xAB; 100]);
    std::fs::write(&blob, data).unwrap();
    let second = env.run(["dir", "upload", "k2", src.to_str().unwrap()]);
    let (total2, new2, sent2) = upload_stats(&second.ok().stderr);
    assert!(
        (1..=3).contains(&new2),
        "only the chunks around the change: {}",
        second.stderr
    );
    assert!(total2 >= total - 2);
    assert!(sent2.ends_with("KiB"), "sent a few chunks only: {sent2}");

    let out = env.path("out");
    env.run(["dir", "download", "k2", out.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&out), snapshot(&src));
}

#[test]
fn mtime_only_change_sends_no_chunk() {
    let env = TestEnv::s3("dirtouch");
    let src = make_tree(&env, "src", 3);
    env.run(["dir", "upload", "k1", src.to_str().unwrap()]).ok();
    sh(
        &format!("find '{}' -exec touch -h {{}} +", src.display()),
        env.dir.path(),
    );
    let run = env.run(["dir", "upload", "k2", src.to_str().unwrap()]);
    let (_, new, sent) = upload_stats(&run.ok().stderr);
    assert_eq!(new, 0, "{}", run.stderr);
    assert!(
        sent.ends_with("KiB") || sent.ends_with(" B"),
        "only the manifest: {sent}"
    );
    let out = env.path("out");
    env.run(["dir", "download", "k2", out.to_str().unwrap()])
        .ok();
    assert_eq!(
        snapshot(&out),
        snapshot(&src),
        "the new mtimes are restored"
    );
}

/// The pack keys of an uploaded entry.
fn packs_of(env: &TestEnv, key: &str) -> Vec<String> {
    let data = stored(&format!("{}/{key}", env.prefix)).unwrap();
    let manifest = Manifest::decode(key, &data).unwrap();
    manifest
        .table
        .packs
        .iter()
        .map(|p| format!("{}/.cacher/packs/{}", env.prefix, p.to_hex()))
        .collect()
}

fn put(key: &str, data: Vec<u8>) {
    let store = bucket();
    rt().block_on(store.put(
        key,
        cacher::store::Body::Bytes(data.into()),
        &Default::default(),
    ))
    .unwrap();
}

#[test]
fn corrupted_or_missing_pack_fails_with_2_and_leaves_dir_untouched() {
    let env = TestEnv::s3("dircorrupt");
    let src = make_tree(&env, "src", 4);
    env.run(["dir", "upload", "k", src.to_str().unwrap()]).ok();
    let packs = packs_of(&env, "k");
    let mut data = stored(&packs[0]).unwrap();
    for b in data.iter_mut().skip(100).step_by(997) {
        *b ^= 0x5a;
    }
    put(&packs[0], data);

    let out = env.path("out");
    env.write("out/precious.txt", "keep me");
    let before = snapshot(&out);
    let run = env.run(["dir", "download", "k", out.to_str().unwrap()]);
    run.code(2);
    assert!(run.stderr.contains("corrupt"), "{}", run.stderr);
    assert_eq!(snapshot(&out), before, "DIR untouched");
    assert!(
        temp_leftovers(env.dir.path()).is_empty(),
        "no temp dir left"
    );

    let store = bucket();
    rt().block_on(store.delete(&packs[0])).unwrap();
    let run = env.run(["dir", "download", "k", out.to_str().unwrap()]);
    run.code(2);
    assert!(run.stderr.contains("missing"), "{}", run.stderr);
    assert_eq!(snapshot(&out), before);

    // The next upload does not trust the index for the deleted pack: it sends it again.
    let run = env.run(["dir", "upload", "k", src.to_str().unwrap(), "--force"]);
    let (_, new, _) = upload_stats(&run.ok().stderr);
    assert!(new > 0, "{}", run.stderr);
    env.run(["dir", "download", "k", out.to_str().unwrap()])
        .ok();
    assert_eq!(
        snapshot(&out)
            .into_iter()
            .filter(|(p, _)| p != "precious.txt")
            .collect::<Vec<_>>(),
        snapshot(&src),
        "restored, merged into the existing DIR"
    );
    assert!(
        out.join("precious.txt").exists(),
        "merge keeps unrelated files"
    );
}

fn hostile(entries: Vec<Entry>, stream_len: u64) -> Vec<u8> {
    Manifest {
        kind: ManifestKind::Dir,
        created: 0,
        label: String::new(),
        stream_len,
        table: ChunkTable::default(),
        entries,
    }
    .encode()
}

fn entry(path: &[u8], kind: EntryKind) -> Entry {
    Entry {
        path: path.to_vec(),
        kind,
        mode: 0o644,
        mtime: 0,
        mtime_nsec: 0,
    }
}

#[test]
fn hostile_manifests_fail_with_2_and_write_nothing_outside() {
    let env = TestEnv::s3("dirhostile");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "traversal",
            hostile(vec![entry(b"../escaped", EntryKind::File { size: 0 })], 0),
        ),
        (
            "absolute",
            hostile(vec![entry(b"/tmp/escaped", EntryKind::File { size: 0 })], 0),
        ),
        (
            "symlink-redirect",
            hostile(
                vec![
                    entry(
                        b"l",
                        EntryKind::Symlink {
                            target: b"..".to_vec(),
                        },
                    ),
                    entry(b"l/escaped", EntryKind::File { size: 0 }),
                ],
                0,
            ),
        ),
        (
            "absurd-size",
            hostile(vec![entry(b"f", EntryKind::File { size: u64::MAX })], 0),
        ),
        (
            "garbage",
            b"CACHERMF\x01\x00\x01\x00\xff\xff\xff\xff\xff\xff\xff\x7fjunk".to_vec(),
        ),
        (
            "truncated",
            hostile(vec![entry(b"f", EntryKind::Dir)], 0)[..25].to_vec(),
        ),
    ];
    for (name, data) in cases {
        put(&format!("{}/{name}", env.prefix), data);
        let out = env.path(&format!("work/{name}/out"));
        let run = env.run(["dir", "download", name, out.to_str().unwrap()]);
        run.code(2);
        assert_eq!(run.stderr.lines().count(), 1, "{name}: {}", run.stderr);
        assert!(!out.exists(), "{name}: nothing restored");
        assert!(!env.path(&format!("work/{name}/escaped")).exists());
        assert!(!env.path("work/escaped").exists());
    }
}

#[test]
fn legacy_tar_zst_entries_are_extracted() {
    let env = TestEnv::s3("dirlegacy");
    let src = make_tree(&env, "src", 5);
    sh(
        &format!(
            "tar -C '{}' -cf - . | zstd -q -3 > legacy.tar.zst",
            src.display()
        ),
        env.dir.path(),
    );
    env.run([
        "upload",
        "rocks/old.tar.zst",
        env.path("legacy.tar.zst").to_str().unwrap(),
    ])
    .ok();
    let out = env.path("out");
    env.run([
        "dir",
        "download",
        "rocks/old.tar.zst",
        out.to_str().unwrap(),
    ])
    .ok();
    // tar keeps whole-second mtimes, and extraction touches directories after their
    // mtime was set: compare everything else.
    let coarse = |v: Vec<(String, String)>| -> Vec<(String, String)> {
        v.into_iter()
            .map(|(p, w)| {
                let w = if w.starts_with("dir") {
                    "dir".to_string()
                } else {
                    w.replace(".123456789 ", ".0 ")
                };
                (p, w)
            })
            .collect()
    };
    assert_eq!(coarse(snapshot(&out)), coarse(snapshot(&src)));

    // A plain file that is neither a manifest nor a tar.zst is refused with 2.
    env.run([
        "upload",
        "plain",
        env.write("p", "not an archive").to_str().unwrap(),
    ])
    .ok();
    let run = env.run([
        "dir",
        "download",
        "plain",
        env.path("out2").to_str().unwrap(),
    ]);
    run.code(2);
    assert!(!env.path("out2").exists());
}

#[test]
fn fallback_restores_the_newest_entry_under_a_prefix() {
    let env = TestEnv::s3("dirfallback");
    let old = make_tree(&env, "old", 6);
    let newer = make_tree(&env, "newer", 7);
    env.run(["dir", "upload", "gomod/aaa", old.to_str().unwrap()])
        .ok();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.run(["dir", "upload", "gomod/bbb", newer.to_str().unwrap()])
        .ok();

    let out = env.path("out");
    env.run(["dir", "download", "gomod/ccc", out.to_str().unwrap()])
        .code(1);
    let run = env.run([
        "dir",
        "download",
        "gomod/ccc",
        out.to_str().unwrap(),
        "--fallback",
        "nothing/",
        "--fallback",
        "gomod/",
    ]);
    assert_eq!(
        run.ok().stdout.trim(),
        "gomod/bbb",
        "stdout names the key restored"
    );
    assert_eq!(snapshot(&out), snapshot(&newer));
}

#[test]
fn concurrent_uploads_of_one_key_never_corrupt_it() {
    let env = TestEnv::s3("dirrace");
    let a = make_tree(&env, "a", 8);
    let b = make_tree(&env, "b", 9);
    let uploads: Vec<Vec<String>> = [&a, &b, &a, &b]
        .iter()
        .map(|tree| {
            let tree = tree.display().to_string();
            ["dir", "upload", "shared", &tree, "--force"]
                .map(String::from)
                .to_vec()
        })
        .collect();
    env.run_all_at_once(&uploads);
    let out = env.path("out");
    env.run(["dir", "download", "shared", out.to_str().unwrap()])
        .ok();
    let got = snapshot(&out);
    assert!(
        got == snapshot(&a) || got == snapshot(&b),
        "one complete tree"
    );
}
