//! `cacher dir`: chunked directory trees against a real Garage node.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cacher::chunk::Id;
use cacher::chunk::format::{ChunkTable, Entry, EntryKind, Manifest, ManifestKind};

use crate::util::{
    TestEnv, bucket, put_object, random_bytes, read, rt, sh, snapshot, stored, temp_leftovers,
    upload_stats,
};

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
    let listed = env.run(["list", "--recursive", "--all"]);
    assert!(
        listed.ok().stdout.contains(".cacher/packs/"),
        "{}",
        listed.stdout
    );
    // Without --all, only the user's keys.
    let root = format!("{}/", env.prefix);
    for args in [
        &["list", "--recursive"][..],
        &["list"],
        &["list", "--root", "--recursive", &root],
    ] {
        let listed = env.run(args);
        let stdout = &listed.ok().stdout;
        assert!(!stdout.contains(".cacher"), "{args:?}: {stdout}");
        assert!(stdout.contains("gomod/"), "{args:?}: {stdout}");
    }

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
fn a_file_the_tree_holds_twice_is_fetched_once_and_restored_in_both_places() {
    let env = TestEnv::s3("dirtwice");
    // The same 2 MiB in three places, 6 MiB between the first two; then 20 MiB twice
    // with 10 MiB between, more than a restore holds for later places (16 MiB).
    let twice = random_bytes(2 << 20, 7);
    let large = random_bytes(20 << 20, 9);
    env.write("src/a/first.bin", &twice);
    env.write("src/b/between.bin", random_bytes(6 << 20, 8));
    env.write("src/c/again.bin", &twice);
    env.write("src/c/third.bin", &twice);
    env.write("src/d/large.bin", &large);
    env.write("src/e/between.bin", random_bytes(10 << 20, 10));
    env.write("src/f/large-again.bin", &large);
    let src = env.path("src");
    let up = env.run(["dir", "upload", "k", src.to_str().unwrap(), "--json"]);
    let sent = crate::util::json_stats(&up.ok().stdout)["wire_bytes"]
        .as_u64()
        .unwrap();
    // The copies were stored once: 38 MiB of random bytes, not 62.
    assert!(sent < 40 << 20, "sent {sent}");

    let out = env.path("out");
    let down = env.run(["dir", "download", "k", out.to_str().unwrap(), "--json"]);
    let received = crate::util::json_stats(&down.ok().stdout)["wire_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(snapshot(&out), snapshot(&src));
    // Every stored byte once, and the 4 MiB of the large copy that did not fit what a
    // restore holds a second time. Fetching every place would receive over 20 MiB more.
    let again = received - sent.min(received);
    assert!(
        (3 << 20..5 << 20).contains(&again),
        "received {received}, sent {sent}"
    );
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

#[test]
fn broken_entries_are_a_miss_and_the_next_upload_replaces_them() {
    let env = TestEnv::s3("dirbroken");
    let src = make_tree(&env, "src", 4);
    env.run(["dir", "upload", "k", src.to_str().unwrap()]).ok();
    let packs = packs_of(&env, "k");
    let mut data = stored(&packs[0]).unwrap();
    for b in data.iter_mut().skip(100).step_by(997) {
        *b ^= 0x5a;
    }
    put_object(&packs[0], data);

    // A chunk that fails verification: one warning naming the key, then a miss.
    let out = env.path("out");
    env.write("out/precious.txt", "keep me");
    let before = snapshot(&out);
    let run = env.run(["dir", "download", "k", out.to_str().unwrap()]);
    run.code(1);
    let warning: Vec<_> = run
        .stderr
        .lines()
        .filter(|l| l.contains("cannot be restored"))
        .collect();
    assert_eq!(warning.len(), 1, "{}", run.stderr);
    assert!(
        warning[0].contains("/k") && warning[0].contains("corrupt"),
        "{}",
        run.stderr
    );
    assert_eq!(snapshot(&out), before, "DIR untouched");
    assert!(
        temp_leftovers(env.dir.path()).is_empty(),
        "no temp dir left"
    );
    assert!(temp_leftovers(&out).is_empty(), "no temp dir left");
    // The pack no longer matches its name: the restore deleted it, so uploads stop
    // reusing its chunks.
    assert!(run.stderr.contains("deleted pack"), "{}", run.stderr);
    assert!(stored(&packs[0]).is_none(), "the corrupt pack is gone");

    // A missing pack: the same, and the next candidate is tried.
    let store = bucket();
    rt().block_on(store.delete(&packs[0])).unwrap();
    let run = env.run(["dir", "download", "k", out.to_str().unwrap()]);
    run.code(1);
    assert!(run.stderr.contains("missing"), "{}", run.stderr);
    assert_eq!(snapshot(&out), before);

    // The next upload without --force replaces the entry instead of skipping it, and
    // sends the deleted pack's chunks again.
    let run = env.run(["dir", "upload", "k", src.to_str().unwrap()]);
    run.ok();
    assert!(run.stderr.contains("replacing it"), "{}", run.stderr);
    let (_, new, _) = upload_stats(&run.stderr);
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
    // A healthy entry is still skipped.
    let run = env.run(["dir", "upload", "k", src.to_str().unwrap()]);
    assert!(run.ok().stderr.contains("skipped"), "{}", run.stderr);

    // A manifest that does not decode is replaced too.
    put_object(&format!("{}/k", env.prefix), b"CACHERMF\x01\x00garbage");
    let run = env.run(["dir", "download", "k", out.to_str().unwrap()]);
    run.code(1);
    let run = env.run(["dir", "upload", "k", src.to_str().unwrap()]);
    assert!(run.ok().stderr.contains("replacing it"), "{}", run.stderr);
    env.run(["dir", "download", "k", out.to_str().unwrap()])
        .ok();
}

#[test]
fn a_stale_index_location_is_not_reused() {
    let env = TestEnv::s3("dirstale");
    let src = make_tree(&env, "src", 14);
    env.run(["dir", "upload", "k1", src.to_str().unwrap()]).ok();
    // Rewrite every index segment so its locations point at the wrong offsets.
    let store = bucket();
    let listed = rt()
        .block_on(store.list(&format!("{}/.cacher/index/", env.prefix), None))
        .unwrap();
    for seg in listed.objects {
        let data = stored(&seg.key).unwrap();
        let mut table = ChunkTable::decode_index("i", &data).unwrap();
        for c in &mut table.chunks {
            c.offset += 7;
            c.len = c.len.saturating_sub(1).max(1);
        }
        rt().block_on(store.delete(&seg.key)).unwrap();
        let encoded = table.encode_index();
        put_object(
            &format!("{}/.cacher/index/{}", env.prefix, Id::of(&encoded).to_hex()),
            encoded,
        );
    }
    let run = env.run(["dir", "upload", "k2", src.to_str().unwrap()]);
    run.ok();
    let out = env.path("out");
    env.run(["dir", "download", "k2", out.to_str().unwrap()])
        .ok();
    assert_eq!(
        snapshot(&out),
        snapshot(&src),
        "restorable despite the bad index"
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
fn hostile_manifests_are_a_miss_and_write_nothing_outside() {
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
        put_object(&format!("{}/{name}", env.prefix), data);
        let out = env.path(&format!("work/{name}/out"));
        let run = env.run(["dir", "download", name, out.to_str().unwrap()]);
        // The entry cannot be restored: one warning naming it, then a miss.
        run.code(1);
        let warnings: Vec<_> = run
            .stderr
            .lines()
            .filter(|l| l.contains("warning"))
            .collect();
        assert_eq!(warnings.len(), 1, "{name}: {}", run.stderr);
        assert!(warnings[0].contains(name), "{name}: {}", run.stderr);
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

/// Replaces the tree at `path` with a fresh one made from `seed`.
fn remake_tree(env: &TestEnv, path: &str, seed: u64) -> PathBuf {
    let _ = std::fs::remove_dir_all(env.path(path));
    make_tree(env, path, seed)
}

#[test]
fn fallback_restores_the_newest_entry_made_from_the_same_directory() {
    let env = TestEnv::s3("dirfallback");
    let work = remake_tree(&env, "work", 6);
    env.run(["dir", "upload", "gomod/aaa", work.to_str().unwrap()])
        .ok();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let work = remake_tree(&env, "work", 7);
    let newer = snapshot(&work);
    env.run(["dir", "upload", "gomod/bbb", work.to_str().unwrap()])
        .ok();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // Newest of all, but made from another directory, then things that are no tree.
    let other = make_tree(&env, "other", 8);
    env.run(["dir", "upload", "gomod/ccc", other.to_str().unwrap()])
        .ok();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.run([
        "upload",
        "gomod/plain",
        env.write("p", "plain").to_str().unwrap(),
    ])
    .ok();
    sh(
        "head -c 5000 /dev/urandom | zstd -q > notar.zst",
        env.dir.path(),
    );
    env.run([
        "upload",
        "gomod/notar.zst",
        env.path("notar.zst").to_str().unwrap(),
    ])
    .ok();
    put_object(
        &format!("{}/gomod/broken", env.prefix),
        b"CACHERMF\x01\x00garbage",
    );

    std::fs::remove_dir_all(&work).unwrap();
    env.run(["dir", "download", "gomod/zzz", work.to_str().unwrap()])
        .code(1);
    let run = env.run([
        "dir",
        "download",
        "gomod/zzz",
        work.to_str().unwrap(),
        "--fallback",
        "nothing/",
        "--fallback",
        "gomod/",
    ]);
    assert_eq!(
        run.ok().stdout.trim(),
        "gomod/bbb",
        "stdout names the key restored: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains("gomod/broken"),
        "the broken one is named: {}",
        run.stderr
    );
    assert_eq!(snapshot(&work), newer);

    // Into another directory, nothing fits unless asked for on purpose.
    let elsewhere = env.path("elsewhere");
    env.run([
        "dir",
        "download",
        "gomod/zzz",
        elsewhere.to_str().unwrap(),
        "--fallback",
        "gomod/",
    ])
    .code(1);
    assert!(!elsewhere.exists());
    let run = env.run([
        "dir",
        "download",
        "gomod/zzz",
        elsewhere.to_str().unwrap(),
        "--fallback",
        "gomod/",
        "--fallback-any-path",
    ]);
    assert_eq!(run.ok().stdout.trim(), "gomod/ccc");
    assert_eq!(snapshot(&elsewhere), snapshot(&other));
}

#[test]
fn fallback_with_an_arch_suffix_only_takes_this_platforms_entries() {
    let mut env = TestEnv::s3("dirarch");
    let work = remake_tree(&env, "work", 16);
    let ours = snapshot(&work);
    env.set("CACHER_ARCH_SUFFIX", "true");
    env.run(["dir", "upload", "rust/a", work.to_str().unwrap()])
        .ok();
    env.unset("CACHER_ARCH_SUFFIX");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // Another platform's newer entry from the same directory.
    remake_tree(&env, "work", 17);
    env.run([
        "dir",
        "upload",
        "rust/b-linux-s390x",
        work.to_str().unwrap(),
    ])
    .ok();
    std::fs::remove_dir_all(&work).unwrap();
    env.set("CACHER_ARCH_SUFFIX", "true");
    let run = env.run([
        "dir",
        "download",
        "rust/c",
        work.to_str().unwrap(),
        "--fallback",
        "rust/",
    ]);
    assert!(
        run.ok().stdout.trim().starts_with("rust/a-"),
        "{}",
        run.stdout
    );
    assert_eq!(snapshot(&work), ours);
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

#[test]
fn a_tree_past_the_readers_limits_is_refused_at_upload() {
    let env = TestEnv::s3("dirlimits");
    // A path of 21 x 201 bytes below the tree's root, longer than any reader accepts.
    let segment = "d".repeat(200);
    sh(
        &format!(
            "mkdir deep && cd deep && for i in $(seq 21); do mkdir {segment} && cd {segment}; done && touch f"
        ),
        env.dir.path(),
    );
    let run = env.run(["dir", "upload", "k", env.path("deep").to_str().unwrap()]);
    run.code(2);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("4096"), "{}", run.stderr);
    assert!(run.stderr.len() < 500, "the path is cut: {}", run.stderr);
    env.run(["dir", "exists", "k"]).code(1);
}

#[test]
fn a_directory_deeper_than_readers_allow_is_refused_at_upload() {
    let env = TestEnv::s3("dirdeep");
    env.write("src/a/file", "first in tree order");
    sh(
        "cd src && mkdir -p z && cd z && for i in $(seq 130); do mkdir d && cd d; done && touch f",
        env.dir.path(),
    );
    let src = env.path("src");
    let run = env.run(["dir", "upload", "k", src.to_str().unwrap()]);
    run.code(2);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    // The scan's refusal, before anything is cut (sealing the manifest would refuse too).
    assert!(
        run.stderr
            .contains("deeper than 128 directories, more than cacher restores"),
        "{}",
        run.stderr
    );
    env.run(["dir", "exists", "k"]).code(1);

    // Without the deep directory the same tree uploads and restores.
    std::fs::remove_dir_all(src.join("z")).unwrap();
    uploads_and_restores_as_is(&env, "k", &src);
}

#[test]
fn an_index_segment_that_cannot_be_written_costs_a_warning_not_the_entry() {
    // Segments only tell later uploads what the bucket holds; the manifest goes out
    // while they are written. A file where the index directory belongs makes every
    // segment write fail.
    let env = TestEnv::file_store();
    let src = make_tree(&env, "src", 22);
    std::fs::create_dir_all(env.path("store/.cacher")).unwrap();
    std::fs::write(env.path("store/.cacher/index"), "not a directory").unwrap();
    let run = env.run(["dir", "upload", "k", src.to_str().unwrap()]);
    run.ok();
    assert!(
        run.stderr
            .contains("later uploads may send its new chunks again"),
        "{}",
        run.stderr
    );
    let out = env.path("out");
    env.run(["dir", "download", "k", out.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&out), snapshot(&src));
}

/// Uploads `src` under `key`, restores it into a new DIR and checks nothing differs.
fn uploads_and_restores_as_is(env: &TestEnv, key: &str, src: &Path) {
    env.run(["dir", "upload", key, src.to_str().unwrap()]).ok();
    let out = env.path("out");
    env.run(["dir", "download", key, out.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&out), snapshot(src));
}

#[test]
fn a_pack_that_cannot_be_written_fails_the_upload_and_publishes_nothing() {
    // The manifest is sealed while the last pack uploads; it must not go out when
    // that upload fails. A file where the packs directory belongs makes every pack
    // write fail, root or not.
    let env = TestEnv::file_store();
    let src = make_tree(&env, "src", 21);
    std::fs::create_dir_all(env.path("store/.cacher")).unwrap();
    std::fs::write(env.path("store/.cacher/packs"), "not a directory").unwrap();
    let run = env.run(["dir", "upload", "k", src.to_str().unwrap()]);
    run.code(2);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("cannot upload pack"), "{}", run.stderr);
    env.run(["dir", "exists", "k"]).code(1);
    assert!(!env.path("store/k").exists(), "no manifest");
    assert!(
        !env.path("store/.cacher/index").exists(),
        "no index segment for packs that are not there"
    );

    std::fs::remove_file(env.path("store/.cacher/packs")).unwrap();
    uploads_and_restores_as_is(&env, "k", &src);
}

#[test]
fn a_fallback_over_the_whole_prefix_finds_nested_entries_without_listing_cachers_objects() {
    let env = TestEnv::s3("fallbackroot");
    let work = make_tree(&env, "work", 9);
    let want = snapshot(&work);
    env.run(["dir", "upload", "team/app/linux-1", work.to_str().unwrap()])
        .ok();
    assert!(
        !crate::util::keys_under(&format!("{}/.cacher/packs/", env.prefix)).is_empty(),
        "the prefix holds packs"
    );
    std::fs::remove_dir_all(&work).unwrap();
    let run = env.run([
        "-v",
        "dir",
        "download",
        "team/app/linux-2",
        work.to_str().unwrap(),
        "--fallback",
        "",
    ]);
    assert_eq!(run.ok().stdout.trim(), "team/app/linux-1", "{}", run.stderr);
    assert_eq!(snapshot(&work), want);
    let lists: Vec<&str> = run.stderr.lines().filter(|l| l.contains("LIST")).collect();
    assert!(
        lists.len() >= 3 && !lists.iter().any(|l| l.contains(".cacher")),
        "lists the levels down to the entry, never cacher's objects: {lists:#?}"
    );
}

#[test]
fn several_paths_make_one_entry_restored_each_to_its_place() {
    let env = TestEnv::s3("paths");
    let index = make_tree(&env, "registry/index", 40);
    let cache = make_tree(&env, "registry/cache", 41);
    let lock = env.write("Cargo.lock", "[[package]]\nname = \"serde\"\n");
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (want_index, want_cache) = (snapshot(&index), snapshot(&cache));
    let want_lock = std::fs::read(&lock).unwrap();
    let args = ["registry/index", "registry/cache", "Cargo.lock"];
    let run = |verb: &str, key: &str, extra: &[&str]| {
        let mut all = vec!["dir", verb, key];
        all.extend(args);
        all.extend(extra);
        env.run(&all)
    };
    run("upload", "deps/1", &[]).ok();
    // One manifest in the bucket, of the several-path kind, naming each path.
    let m = crate::util::manifest(&env, "deps/1");
    assert_eq!(m.kind, ManifestKind::Paths);
    assert_eq!(m.label, "registry/index\nregistry/cache\nCargo.lock");

    std::fs::remove_dir_all(env.path("registry")).unwrap();
    std::fs::remove_file(&lock).unwrap();
    let restored = run("download", "deps/1", &[]);
    assert_eq!(restored.ok().stdout.trim(), "deps/1");
    assert_eq!(snapshot(&index), want_index);
    assert_eq!(snapshot(&cache), want_cache);
    assert_eq!(std::fs::read(&lock).unwrap(), want_lock);
    let mode = std::fs::metadata(&lock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    assert!(temp_leftovers(&env.path("registry")).is_empty());

    // A change in one path: the next upload reads only it (each directory keeps its
    // tree state), and sends only its chunks.
    env.write("registry/cache/pkg/mod03/lib.rs", "changed\n");
    let up = run("upload", "deps/2", &["--json"]);
    let stats = crate::util::json_stats(&up.ok().stdout);
    let (read, total) = (
        stats["disk_bytes"].as_u64().unwrap(),
        stats["stream_bytes"].as_u64().unwrap(),
    );
    assert!(read * 10 < total, "read {read} of {total} bytes: {stats}");
    assert!(stats["unchanged_files"].as_u64().unwrap() >= 80, "{stats}");

    // A restore over the older version keeps the path that did not change whole and
    // fetches only the changed chunks.
    let back = run("download", "deps/1", &["--json"]);
    let stats = crate::util::json_stats(&back.ok().stdout);
    assert!(stats["unchanged_files"].as_u64().unwrap() >= 45, "{stats}");
    assert!(stats["wire_bytes"].as_u64().unwrap() < 300_000, "{stats}");
    assert_eq!(snapshot(&cache), want_cache);

    // Only the paths it was made from take it: fewer is a miss that touches nothing.
    let before = snapshot(&index);
    let short = env.run(["dir", "download", "deps/1", "registry/index"]);
    short.code(1);
    assert!(
        short.stderr.contains("was made from the paths"),
        "{}",
        short.stderr
    );
    assert_eq!(snapshot(&index), before);
}

#[test]
fn fallback_takes_only_entries_of_the_same_paths() {
    let env = TestEnv::s3("paths-fallback");
    make_tree(&env, "a", 50);
    make_tree(&env, "b", 51);
    env.run(["dir", "upload", "t/ab", "a", "b"]).ok();
    env.run(["dir", "upload", "t/a", "a"]).ok();
    env.run(["dir", "upload", "t/ba", "b", "a"]).ok();

    // Several paths: the newest entry made from the same paths in the same order.
    let run = env.run(["dir", "download", "t/new", "a", "b", "--fallback", "t/"]);
    assert_eq!(run.ok().stdout.trim(), "t/ab", "{}", run.stderr);
    // One directory: never an entry of several paths.
    let run = env.run(["dir", "download", "t/new", "a", "--fallback", "t/"]);
    assert_eq!(run.ok().stdout.trim(), "t/a", "{}", run.stderr);
    let solo = make_tree(&env, "c", 52);
    let run = env.run(["dir", "download", "t/new", "c", "--fallback", "t/", "-v"]);
    run.code(1);
    assert!(
        run.stderr.contains("made from (a, b), not (c)"),
        "{}",
        run.stderr
    );
    assert!(solo.exists());
    // A path that is not there is a mistake, exit 2, nothing written.
    env.run(["dir", "upload", "t/x", "a", "missing"]).code(2);
    env.run(["dir", "exists", "t/x"]).code(1);
}

#[test]
fn an_entry_of_several_paths_restores_only_into_the_same_paths() {
    let env = TestEnv::s3("paths-order");
    let blob = random_bytes(2 * 1024 * 1024, 60);
    env.write("a/blob.bin", &blob);
    env.write("b/blob.bin", &blob);
    env.write("b/own.txt", "b");
    env.write("Cargo.lock", "lock");
    // The same bytes in two paths are sent once.
    let up = env.run(["--json", "dir", "upload", "k", "a", "b", "Cargo.lock"]);
    let stats = crate::util::json_stats(&up.ok().stdout);
    let (new, all) = (
        stats["chunks_new"].as_u64().unwrap(),
        stats["chunks"].as_u64().unwrap(),
    );
    // a's blob, b's last blob chunk (cut together with own.txt), own.txt, Cargo.lock.
    assert!(new <= all / 2 + 3, "{stats}");

    // Paths given in another order: a miss, nothing touched (a file never lands where
    // a directory is).
    let before = (snapshot(&env.path("a")), snapshot(&env.path("b")));
    let swapped = env.run(["dir", "download", "k", "Cargo.lock", "a", "b"]);
    swapped.code(1);
    assert!(
        swapped.stderr.contains("was made from the paths"),
        "{}",
        swapped.stderr
    );
    assert_eq!((snapshot(&env.path("a")), snapshot(&env.path("b"))), before);
    assert!(env.path("Cargo.lock").is_file());

    // Overlapping paths are refused before anything is read.
    env.run(["dir", "upload", "k2", "a", "a/blob.bin"]).code(2);
    env.run(["dir", "upload", "k2", "b", "./b/"]).code(2);
    env.run(["dir", "exists", "k2"]).code(1);

    // A single file is an entry too, restored to its place.
    env.run(["dir", "upload", "lock", "Cargo.lock"]).ok();
    std::fs::remove_file(env.path("Cargo.lock")).unwrap();
    env.run(["dir", "download", "lock", "Cargo.lock"]).ok();
    assert_eq!(std::fs::read(env.path("Cargo.lock")).unwrap(), b"lock");
}

/// A Rust `target/` as a job leaves it: build outputs, incremental state and logs.
fn make_target(env: &TestEnv) -> PathBuf {
    let target = make_tree(env, "target", 70);
    env.write(
        "target/debug/incremental/app-1/dep-graph.bin",
        random_bytes(200_000, 71),
    );
    env.write("target/debug/incremental/app-1/query-cache.bin", "q");
    env.write("target/release/incremental/x.bin", "x");
    env.write("target/debug/build.log", "log");
    env.write("target/top.log", "top");
    env.write("target/pkg/keep.log", "keep");
    env.write("target/debug/app", "app v1");
    target
}

const EXCLUDES: [&str; 6] = [
    "--exclude",
    "incremental/",
    "--exclude",
    "*.log",
    "--exclude",
    "!keep.log",
];

/// `snapshot` without the paths [`EXCLUDES`] matches.
fn included(snap: Vec<(String, String)>) -> Vec<(String, String)> {
    snap.into_iter()
        .filter(|(p, _)| {
            let in_incremental = p.split('/').any(|s| s == "incremental");
            let log = p.ends_with(".log") && !p.ends_with("keep.log");
            !in_incremental && !log
        })
        .collect()
}

#[test]
fn excluded_paths_stay_out_of_the_entry_and_are_left_alone_by_restores() {
    let mut env = TestEnv::s3("exclude");
    let target = make_target(&env);
    let t = target.to_str().unwrap();
    let mut up = vec!["dir", "upload", "rust/1", "target"];
    up.extend(EXCLUDES);
    env.run(&up).ok();
    let m = crate::util::manifest(&env, "rust/1");
    // A newer format version: older readers refuse the entry (a miss) instead of
    // restoring it without leaving the excluded paths alone.
    let raw = stored(&format!("{}/rust/1", env.prefix)).unwrap();
    assert_eq!(&raw[8..10], &[2, 0]);
    assert_eq!(m.sources(), "target");
    assert_eq!(m.exclusions(), ["incremental/", "*.log", "!keep.log"]);
    let paths: Vec<String> = m
        .entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.path).into_owned())
        .collect();
    assert!(paths.iter().any(|p| p == "pkg/keep.log"), "{paths:?}");
    assert!(paths.iter().any(|p| p == "debug/app"), "{paths:?}");
    assert!(
        !paths
            .iter()
            .any(|p| p.contains("incremental") || p.ends_with("build.log") || p == "top.log"),
        "{paths:?}"
    );

    // Into an empty place: the tree without what was excluded.
    let want = included(snapshot(&target));
    env.run(["dir", "download", "rust/1", "fresh"]).ok();
    assert_eq!(snapshot(&env.path("fresh")), want);

    // In place (the upload recorded the tree): the build changed a tracked file, its
    // incremental state and its logs, and left a stray file. The restore puts the
    // tracked file back and removes the stray one, and leaves the excluded paths as
    // the build left them.
    env.write("target/debug/app", "app v2, rebuilt");
    env.write("target/debug/incremental/app-2/new.bin", "new");
    env.write("target/debug/build.log", "log 2");
    env.write("target/debug/stray.txt", "stray");
    let kept = |snap: Vec<(String, String)>| -> Vec<(String, String)> {
        let included = included(snap.clone());
        snap.into_iter().filter(|p| !included.contains(p)).collect()
    };
    let excluded_before = kept(snapshot(&target));
    assert!(excluded_before.len() >= 8, "{excluded_before:?}");
    // The tracked file is back, the stray one gone, the excluded ones as they were.
    let restored_keeping = |env: &TestEnv, excluded: &[(String, String)]| {
        assert_eq!(read(env.path("target/debug/app")), b"app v1");
        assert!(!env.path("target/debug/stray.txt").exists());
        assert_eq!(kept(snapshot(&env.path("target"))), excluded);
    };
    let run = env.run(["-v", "dir", "download", "rust/1", t]);
    assert!(
        run.ok().stderr.contains("files of"),
        "in place: {}",
        run.stderr
    );
    restored_keeping(&env, &excluded_before);
    assert_eq!(included(snapshot(&target)), want);

    // No record, and DIR holds far more than the entry, so it is not read: still
    // updated in place (never swapped whole, which would take the excluded paths with
    // the directories it replaces), every file written.
    env.write("target/debug/app", "app v3");
    env.write("target/debug/stray.txt", "stray");
    std::fs::File::create(env.path("target/huge.bin"))
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    let excluded_before = kept(snapshot(&target));
    let state = env.path("state-2");
    env.set("CACHER_STATE_DIR", state.to_str().unwrap());
    let run = env.run(["-v", "dir", "download", "rust/1", t]);
    assert!(
        run.ok().stderr.contains("far more than the entry")
            && run.stderr.contains("holds 0 files of"),
        "in place from nothing: {}",
        run.stderr
    );
    restored_keeping(&env, &excluded_before);
    assert!(
        env.path("target/huge.bin").exists(),
        "top-level extras stay"
    );
    assert!(
        temp_leftovers(&target).is_empty(),
        "{:?}",
        temp_leftovers(&target)
    );

    // --delete mirrors the entry at the top too, excluded paths aside.
    let state = env.path("state-3");
    env.set("CACHER_STATE_DIR", state.to_str().unwrap());
    env.run(["dir", "download", "rust/1", t, "--delete"]).ok();
    assert!(!env.path("target/huge.bin").exists());
    assert_eq!(kept(snapshot(&target)), excluded_before);
    assert_eq!(included(snapshot(&target)), want);
    // In place too.
    std::fs::write(env.path("target/extra-top"), "x").unwrap();
    let run = env.run(["-v", "dir", "download", "rust/1", t, "--delete"]);
    assert!(
        run.ok().stderr.contains("files of"),
        "in place: {}",
        run.stderr
    );
    assert!(!env.path("target/extra-top").exists());
    assert_eq!(kept(snapshot(&target)), excluded_before);

    // A directory the entry lacks goes, but for the excluded paths it holds; so does
    // one at the top with --delete.
    for dir in ["target/debug/examples", "target/newtop"] {
        env.write(&format!("{dir}/incremental/s.bin"), "s");
        env.write(&format!("{dir}/junk.rlib"), "j");
        env.write(&format!("{dir}/sub/junk.rlib"), "j");
    }
    env.run(["dir", "download", "rust/1", t, "--delete"]).ok();
    for dir in ["target/debug/examples", "target/newtop"] {
        assert_eq!(read(env.path(&format!("{dir}/incremental/s.bin"))), b"s");
        assert!(!env.path(&format!("{dir}/junk.rlib")).exists());
        assert!(!env.path(&format!("{dir}/sub")).exists());
    }
    std::fs::remove_dir_all(env.path("target/newtop")).unwrap();
    std::fs::remove_dir_all(env.path("target/debug/examples")).unwrap();
    assert_eq!(kept(snapshot(&target)), excluded_before);

    // A pattern that matches nothing is probably written from the wrong directory.
    let up = env.run([
        "dir",
        "upload",
        "rust/3",
        "target",
        "--exclude",
        "target/debug",
    ]);
    assert!(
        up.ok()
            .stderr
            .contains("--exclude 'target/debug' matched nothing in target"),
        "{}",
        up.stderr
    );
    // A pattern that names nothing is the job's mistake: exit 2, nothing written.
    let bad = env.run(["dir", "upload", "rust/bad", "target", "--exclude", "a//b"]);
    assert!(
        bad.code(2).stderr.contains("--exclude 'a//b'"),
        "{}",
        bad.stderr
    );
    env.run(["dir", "exists", "rust/bad"]).code(1);

    // The patterns do not change what --fallback takes: the same directory.
    let run = env.run(["dir", "download", "rust/2", "fresh", "--fallback", "rust/"]);
    run.code(1);
    let run = env.run(["dir", "download", "rust/2", "target", "--fallback", "rust/"]);
    assert_eq!(run.ok().stdout.trim(), "rust/3", "{}", run.stderr);
}

#[test]
fn exclusions_hold_for_an_unprivileged_user_over_read_only_dirs_and_several_paths() {
    let mut env = TestEnv::s3("exclude-ro");
    if !crate::util::can_switch_users("exclusions_hold_for_an_unprivileged_user") {
        return;
    }
    let target = make_target(&env);
    env.write("index/config.json", "{}");
    env.write("index/.cache/big.bin", random_bytes(100_000, 72));
    let ro = ["target/debug/incremental", "target/debug", "target/release"];
    let mut up = vec!["dir", "upload", "rust/ro", "target", "index"];
    up.extend(EXCLUDES);
    up.extend(["--exclude", ".cache"]);
    env.give_to_nobody(&target);
    env.give_to_nobody(&env.path("index"));
    for dir in ro {
        std::fs::set_permissions(env.path(dir), std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    env.run_unprivileged(&up).ok();
    let m = crate::util::manifest(&env, "rust/ro");
    assert_eq!(m.sources(), "target\nindex");
    assert_eq!(m.exclusions().len(), 4);

    let snap_all = (snapshot(&target), snapshot(&env.path("index")));
    std::fs::write(env.path("target/debug/app"), "changed").unwrap();
    // Whole: no record, and more than the entry on disk.
    std::fs::File::create(env.path("target/huge.bin"))
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    env.give_to_nobody(&env.path("target/huge.bin"));
    let state = env.path("state-ro");
    std::fs::create_dir_all(&state).unwrap();
    env.give_to_nobody(&state);
    env.set("CACHER_STATE_DIR", state.to_str().unwrap());
    let run = env.run_unprivileged(["-v", "dir", "download", "rust/ro", "target", "index"]);
    assert!(
        run.ok().stderr.contains("far more than the entry"),
        "{}",
        run.stderr
    );
    std::fs::remove_file(env.path("target/huge.bin")).unwrap();
    assert_eq!((snapshot(&target), snapshot(&env.path("index"))), snap_all);
    assert!(
        temp_leftovers(&target).is_empty(),
        "{:?}",
        temp_leftovers(&target)
    );

    // In place, from the record the restore left.
    std::fs::write(env.path("target/debug/app"), "changed again").unwrap();
    let run = env.run_unprivileged(["-v", "dir", "download", "rust/ro", "target", "index"]);
    assert!(run.ok().stderr.contains("files of"), "{}", run.stderr);
    assert_eq!((snapshot(&target), snapshot(&env.path("index"))), snap_all);

    // A read-only directory the entry lacks: its excluded paths stay, with its mode.
    env.write("target/debug/examples/incremental/s.bin", "s");
    env.write("target/debug/examples/junk.rlib", "j");
    env.give_to_nobody(&env.path("target/debug/examples"));
    let examples = env.path("target/debug/examples");
    std::fs::set_permissions(&examples, std::fs::Permissions::from_mode(0o555)).unwrap();
    let run = env.run_unprivileged(["dir", "download", "rust/ro", "target", "index"]);
    run.ok();
    assert!(env.path("target/debug/examples/incremental/s.bin").exists());
    assert!(!env.path("target/debug/examples/junk.rlib").exists());
    let mode = std::fs::metadata(&examples).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o555);

    // What another user owns cannot be removed: it stays, with a warning, and the
    // restore stands (the new tree is in place by then).
    env.write("target/debug/rootjunk/sub/j", "j");
    std::fs::write(env.path("target/debug/app"), "changed once more").unwrap();
    let run = env.run_unprivileged(["dir", "download", "rust/ro", "target", "index"]);
    assert!(
        run.ok()
            .stderr
            .contains("restored, but cannot remove `debug/rootjunk/sub/j`"),
        "{}",
        run.stderr
    );
    assert_eq!(read(env.path("target/debug/app")), b"app v1");
    assert!(env.path("target/debug/rootjunk/sub/j").exists());

    // An update that cannot write (a directory another user owns) is not followed by
    // a whole restore, which would take the excluded paths with it: exit 2, DIR as it
    // was.
    std::fs::remove_dir_all(env.path("target/debug/rootjunk")).unwrap();
    let owned_by_root = env.path("target/pkg/mod01");
    std::os::unix::fs::chown(&owned_by_root, Some(0), Some(0)).unwrap();
    std::fs::write(env.path("target/pkg/mod01/lib.rs"), "edited").unwrap();
    let before = snapshot(&target);
    let run = env.run_unprivileged(["dir", "download", "rust/ro", "target", "index"]);
    assert!(
        run.code(2).stderr.contains("holds paths it excludes"),
        "{}",
        run.stderr
    );
    assert_eq!(snapshot(&target), before);
}

#[test]
fn the_summary_line_counts_files_in_words() {
    let env = TestEnv::s3("dironefile");
    env.write("one/only.txt", "just one file");
    let one = env.run(["dir", "upload", "one", env.path("one").to_str().unwrap()]);
    assert!(
        one.ok().stderr.contains(": 1 file (0 unchanged"),
        "{}",
        one.stderr
    );
    env.write("two/a.txt", "a");
    env.write("two/b.txt", "b");
    let two = env.run(["dir", "upload", "two", env.path("two").to_str().unwrap()]);
    assert!(
        two.ok().stderr.contains(": 2 files (0 unchanged"),
        "{}",
        two.stderr
    );
}

#[test]
fn plain_objects_of_any_size_under_a_dir_key_are_refused_untouched() {
    // Written straight into the bucket, as `aws s3 cp` would: empty (a ranged read of
    // it is refused by the server), smaller and larger than an entry's first read.
    let env = TestEnv::s3("plainunder");
    env.write("src/a.txt", "a\n");
    let (src, out) = (env.path("src"), env.path("out"));
    for (key, len) in [("empty", 0), ("small", 1_000), ("large", 3 << 20)] {
        put_object(
            &format!("{}/{key}", env.prefix),
            random_bytes(len, len as u64),
        );
        let run = env.run(["dir", "download", key, out.to_str().unwrap()]);
        run.code(2);
        assert!(
            run.stderr
                .contains("is a plain file, not a directory entry"),
            "{key}: {}",
            run.stderr
        );
        assert!(!out.exists(), "{key}: nothing restored");
        // The key holds something: an upload leaves it.
        let up = env.run(["dir", "upload", key, src.to_str().unwrap()]);
        assert!(up.ok().stderr.contains("skipped"), "{key}: {}", up.stderr);
    }
}
