//! The warm path against Garage: an upload after a restore or an upload reads only the
//! files that changed (the tree state under the cache directory says which did not),
//! and still writes the manifest a full read writes.

use std::path::{Path, PathBuf};

use crate::util::{
    TestEnv, can_switch_users, json_stats, manifest, random_bytes, read, sh, snapshot,
};

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

/// Fails naming only the paths whose snapshot lines differ.
fn assert_same(got: &[(String, String)], want: &[(String, String)]) {
    let differ: Vec<_> = got
        .iter()
        .filter(|g| !want.contains(g))
        .map(|g| format!("got  {g:?}"))
        .chain(
            want.iter()
                .filter(|w| !got.contains(w))
                .map(|w| format!("want {w:?}")),
        )
        .collect();
    assert!(differ.is_empty(), "trees differ:\n{}", differ.join("\n"));
}

fn state_dir(env: &TestEnv) -> PathBuf {
    env.home().join(".local/state/cacher/trees")
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
fn a_tree_rewritten_with_the_same_bytes_is_checked_against_the_record_not_cut() {
    let env = TestEnv::s3("warmrewrite");
    let src = make_tree(&env, "src", 40);
    env.run(["dir", "upload", "npm/1", src.to_str().unwrap()])
        .ok();
    let work = env.path("work");
    env.run(["dir", "download", "npm/1", work.to_str().unwrap()])
        .ok();
    // As `npm ci` does: every file written anew (new inodes and ctimes; `cp -a` keeps
    // the mtimes), one with a byte changed in place and one grown.
    sh(
        "set -e
         cp -a . ../rewritten && cd .. && rm -r work && mv rewritten work && cd work
         printf 'Y' | dd of=pkg007/blob.bin bs=1 seek=5000 conv=notrunc status=none
         printf 'more\n' >> pkg021/src/f3.rs",
        &work,
    );

    let up = env.run(["dir", "upload", "npm/2", work.to_str().unwrap(), "--json"]);
    let stats = json_stats(&up.ok().stdout);
    let total = stats["stream_bytes"].as_u64().unwrap();
    let checked = stats["checked_bytes"].as_u64().unwrap();
    assert_eq!(stats["unchanged_files"].as_u64(), Some(0), "{stats}");
    // Every byte read, and the chunk holding the changed byte twice: once by the
    // checks made ahead of the cut, which find it changed, and once to cut it.
    let read = stats["disk_bytes"].as_u64().unwrap();
    assert!(total <= read && read <= total + 2 * 256 * 1024, "{stats}");
    assert!(checked * 10 > total * 9, "{stats}");
    assert!(stats["chunks_new"].as_u64().unwrap() <= 4, "{stats}");
    assert!(up.stderr.contains("of it as recorded"), "{}", up.stderr);

    // The entry a full read writes, and the tree back.
    std::fs::remove_dir_all(state_dir(&env)).unwrap();
    env.run(["dir", "upload", "npm/3", work.to_str().unwrap()])
        .ok();
    let (m2, m3) = (manifest(&env, "npm/2"), manifest(&env, "npm/3"));
    assert_eq!(m2.table, m3.table);
    assert_eq!(m2.entries, m3.entries);
    let check = env.path("check");
    env.run(["dir", "download", "npm/2", check.to_str().unwrap()])
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
fn a_restore_into_an_existing_dir_vouches_for_its_top_level_files_too() {
    top_level_files_vouched_for(&TestEnv::s3("warmtop"), false);
}

#[test]
fn top_level_files_are_vouched_for_as_nobody_over_a_read_only_tree() {
    top_level_files_vouched_for(&TestEnv::s3("warmtopro"), true);
}

/// Restores a tree with top-level files into an existing DIR, then uploads it: none is
/// read, and one rewritten afterwards with its size and mtime kept is. `unprivileged`:
/// as nobody, into a DIR nobody owns, the tree's files 0444 and directories 0555.
fn top_level_files_vouched_for(env: &TestEnv, unprivileged: bool) {
    let src = make_tree(env, "src", 5);
    // Top-level files of both kinds the restore writes: gathered for a writer thread,
    // and written as they arrive (above 256 KiB).
    env.write("src/small.txt", "small\n");
    env.write("src/large.bin", random_bytes(400_000, 7));
    if unprivileged {
        sh(
            "find src -type f -exec chmod 444 {} + && find src -mindepth 1 -type d -exec chmod 555 {} +",
            env.dir.path(),
        );
    }
    let files = sh("find . -type f | wc -l", &src)
        .trim()
        .parse::<u64>()
        .unwrap();
    env.run(["dir", "upload", "a", src.to_str().unwrap()]).ok();
    // DIR exists (a runner's workspace, a mount point): the swap renames each
    // top-level entry into it, which changes their ctime.
    let work = env.path("work");
    std::fs::create_dir(&work).unwrap();
    let run = |args: &[&str]| match unprivileged {
        true => env.run_unprivileged(args),
        false => env.run(args),
    };
    if unprivileged {
        env.give_to_nobody(&work);
    }
    run(&["dir", "download", "a", work.to_str().unwrap()]).ok();
    let again = run(&["dir", "upload", "b", work.to_str().unwrap(), "--json"]);
    let stats = json_stats(&again.ok().stdout);
    assert_eq!(stats["disk_bytes"].as_u64(), Some(0), "{stats}");
    assert_eq!(stats["unchanged_files"].as_u64(), Some(files), "{stats}");
    // A top-level file rewritten after the restore with its size and mtime kept is
    // still caught (its ctime moved).
    sh(
        "cp -p large.bin ../ref && chmod u+w large.bin \
         && printf 'X' | dd of=large.bin bs=1 seek=10 conv=notrunc status=none \
         && chmod --reference=../ref large.bin && touch -r ../ref large.bin",
        &work,
    );
    let changed = run(&["dir", "upload", "c", work.to_str().unwrap(), "--json"]);
    let stats = json_stats(&changed.ok().stdout);
    assert!(stats["disk_bytes"].as_u64().unwrap() >= 400_000, "{stats}");
    assert_eq!(
        stats["unchanged_files"].as_u64(),
        Some(files - 1),
        "{stats}"
    );
    assert_ne!(manifest(env, "a").table, manifest(env, "c").table);
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

/// Every kind of change between two versions of a tree, below and at the top level.
fn change_kinds(root: &Path) {
    sh(
        "set -e
         rm pkg001/src/f0.rs
         printf 'edited\\n' >> pkg002/src/f1.rs
         chmod 600 pkg003/src/f2.rs
         touch -d '2020-01-01 00:00:00' pkg004/src/f3.rs
         rm -r pkg005/src && printf 'now a file\\n' > pkg005/src
         rm pkg006/blob.bin && mkdir -p pkg006/blob.bin/inner && printf 'x' > pkg006/blob.bin/inner/y
         ln -s ../pkg000/blob.bin pkg007/link
         rm -r pkg008
         mkdir -p newtop/deep && printf 'new\\n' > newtop/deep/file
         chmod 700 pkg009",
        root,
    );
}

/// v1, a module tree of `packages` packages, and v2, a copy with [`change_kinds`].
fn two_versions(env: &TestEnv, packages: usize) -> (PathBuf, PathBuf) {
    let v1 = make_tree(env, "v1", packages);
    let v2 = env.path("v2");
    sh(
        &format!("cp -a '{}' '{}'", v1.display(), v2.display()),
        env.dir.path(),
    );
    change_kinds(&v2);
    (v1, v2)
}

#[test]
fn a_restore_over_the_previous_tree_writes_only_what_differs_and_ends_as_a_fresh_restore() {
    let env = TestEnv::s3("inplace");
    let (v1, v2) = two_versions(&env, 40);
    env.run(["dir", "upload", "t/1", v1.to_str().unwrap()]).ok();
    env.run(["dir", "upload", "t/2", v2.to_str().unwrap()]).ok();

    let work = env.path("work");
    env.run(["dir", "download", "t/1", work.to_str().unwrap()])
        .ok();
    // Beside the tree: a top-level entry of the user's, and a stray file inside a
    // top-level entry of the tree (a fresh restore keeps the first, not the second).
    env.write("work/mine.txt", "the user's");
    env.write("work/pkg010/stray.o", "stale");
    env.write("work/pkg011/src/stray.rs", "stale");
    // Other names of the tree's own files (cargo hard-links binaries in target/): a
    // stray as well inside a top-level entry, the user's at the top.
    let link = |from: &str, to: &str| std::fs::hard_link(env.path(from), env.path(to)).unwrap();
    link("work/pkg011/src/f0.rs", "work/pkg011/src/f0-link.rs");
    link("work/top.txt", "work/top-link.txt");
    let fresh = env.path("fresh");
    env.run(["dir", "download", "t/2", fresh.to_str().unwrap()])
        .ok();

    // What a fresh restore into `work` leaves: the entry, plus the top-level entries of
    // `work` that the entry lacks (the user's file, and pkg008, which v2 dropped).
    let fresh_names: Vec<String> = snapshot(&fresh).into_iter().map(|(p, _)| p).collect();
    let mut want = snapshot(&fresh);
    want.extend(snapshot(&work).into_iter().filter(|(p, _)| {
        let top = p.split('/').next().unwrap();
        !fresh_names.iter().any(|f| f == top)
    }));
    want.sort();
    assert!(want.iter().any(|(p, _)| p == "pkg008/blob.bin"));
    assert!(want.iter().any(|(p, _)| p == "top-link.txt"));
    // Older than the timestamp granularity, the directories can be listed ahead of the
    // update, which then opens a leaf only to write in it or to remove what the entry
    // lacks (pkg011/src's stray; the lister is likeliest to be there first this far in).
    std::thread::sleep(std::time::Duration::from_millis(50));
    let run = env.run(["dir", "download", "t/2", work.to_str().unwrap(), "--json"]);
    let stats = json_stats(&run.ok().stdout);
    assert_same(&snapshot(&work), &want);
    let written = stats["disk_bytes"].as_u64().unwrap();
    let total = stats["stream_bytes"].as_u64().unwrap();
    assert!(written * 5 < total, "wrote {written} of {total}: {stats}");
    assert!(stats["unchanged_files"].as_u64().unwrap() > 150, "{stats}");
    assert_eq!(crate::util::temp_leftovers(&work), Vec::<String>::new());

    // --delete makes DIR a mirror of the entry.
    env.run(["dir", "download", "t/2", work.to_str().unwrap(), "--delete"])
        .ok();
    assert_same(&snapshot(&work), &snapshot(&fresh));

    // Nothing differs: nothing is fetched or written, and the next upload reads nothing.
    let again = env.run(["dir", "download", "t/2", work.to_str().unwrap(), "--json"]);
    let stats = json_stats(&again.ok().stdout);
    assert_eq!(stats["disk_bytes"].as_u64(), Some(0), "{stats}");
    assert_eq!(stats["wire_bytes"].as_u64(), Some(0), "{stats}");
    let up = env.run(["dir", "upload", "t/3", work.to_str().unwrap(), "--json"]);
    assert_eq!(json_stats(&up.ok().stdout)["disk_bytes"].as_u64(), Some(0));
}

#[test]
fn an_update_that_fails_part_way_leaves_dir_exactly_as_it_was() {
    let env = TestEnv::s3("inplacefail");
    let (v1, v2) = two_versions(&env, 30);
    env.run(["dir", "upload", "t/1", v1.to_str().unwrap()]).ok();
    // t/2's new chunks go to packs of their own: delete those, so the update fails
    // after staging what it could.
    let before_packs = crate::util::keys_under(&format!("{}/.cacher/packs/", env.prefix));
    env.run(["dir", "upload", "t/2", v2.to_str().unwrap()]).ok();
    let work = env.path("work");
    env.run(["dir", "download", "t/1", work.to_str().unwrap()])
        .ok();
    sh("chmod -R a-w pkg011", &work);
    let before = snapshot(&work);
    for pack in crate::util::keys_under(&format!("{}/.cacher/packs/", env.prefix)) {
        if !before_packs.contains(&pack) {
            crate::util::rt()
                .block_on(crate::util::bucket().delete(&pack))
                .unwrap();
        }
    }
    let run = env.run(["dir", "download", "t/2", work.to_str().unwrap()]);
    run.code(1);
    assert!(run.stderr.contains("missing"), "{}", run.stderr);
    assert_eq!(
        snapshot(&work),
        before,
        "DIR as it was, directory times too"
    );
    let leftovers = sh("find . -name '.cacher-*'", &work);
    assert_eq!(leftovers.trim(), "");
    sh("chmod -R u+w .", &work);
}

/// The inode at `path`: a file kept or touched in place keeps it, one written anew
/// (staged, then renamed over the old) gets another.
fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap().ino()
}

#[test]
fn files_whose_neighbours_changed_are_compared_and_rewritten_only_if_they_differ() {
    let env = TestEnv::s3("inplacecompare");
    compared_not_rewritten(&env, false);
}

#[test]
fn files_are_compared_for_an_unprivileged_user_over_a_read_only_tree() {
    let env = TestEnv::s3("inplacecompare-ro");
    if !crate::util::can_switch_users("files_are_compared_for_an_unprivileged_user") {
        return;
    }
    compared_not_rewritten(&env, true);
}

/// Restores v1 into an existing DIR, then v2 over it, where v2 adds files between
/// files of several chunks and among small ones, edits one file in its middle (same
/// size) and gives another a new mtime; `unprivileged`: as nobody, with both versions
/// read-only (directories 0555, files 0444, as a Go module cache is).
fn compared_not_rewritten(env: &TestEnv, unprivileged: bool) {
    // Files of several chunks each: a new file between two of them changes the chunks
    // where the stream crosses into and out of it, so the new entry cuts a.bin's end
    // and c.bin's start otherwise than the record.
    for (name, len, seed) in [
        ("a.bin", 600_000, 1),
        ("c.bin", 500_000, 2),
        ("d.txt", 3_000, 3),
        ("e.bin", 700_000, 4),
        ("f.bin", 400_000, 5),
        ("h1", 1_000, 8),
        ("h2", 2_000, 9),
        ("h4", 3_000, 10),
    ] {
        env.write(&format!("v1/pkg/{name}"), random_bytes(len, seed));
    }
    sh(
        "touch -d '2022-01-01' v1/pkg/* && cp -a v1 v2",
        env.dir.path(),
    );
    env.write("v2/pkg/b.bin", random_bytes(90_000, 6));
    env.write("v2/pkg/g.bin", random_bytes(80_000, 7));
    // Small files sharing one chunk with a new one among them: all compared.
    env.write("v2/pkg/h3", random_bytes(500, 11));
    // e.bin: the same size, other bytes in its middle; f.bin: the same bytes, a new mtime.
    let mut e = random_bytes(700_000, 4);
    e[300_000..300_100].fill(b'X');
    env.write("v2/pkg/e.bin", e);
    sh(
        "cd v2/pkg && touch -d '2022-01-01' b.bin g.bin e.bin h3 && touch -d '2023-05-05' f.bin",
        env.dir.path(),
    );
    if unprivileged {
        sh(
            "chmod a-w v1/pkg/* v2/pkg/* && chmod 555 v1/pkg v2/pkg",
            env.dir.path(),
        );
    }
    let (v1, v2) = (env.path("v1"), env.path("v2"));
    env.run(["dir", "upload", "c/1", v1.to_str().unwrap()]).ok();
    env.run(["dir", "upload", "c/2", v2.to_str().unwrap()]).ok();
    let work = env.path("work");
    std::fs::create_dir(&work).unwrap();
    let run = |args: &[&str]| match unprivileged {
        true => env.run_unprivileged(args),
        false => env.run(args),
    };
    if unprivileged {
        env.give_to_nobody(&work);
    }
    run(&["dir", "download", "c/1", work.to_str().unwrap()]).ok();
    let inodes = || -> Vec<u64> {
        [
            "a.bin", "c.bin", "d.txt", "e.bin", "f.bin", "h1", "h2", "h4",
        ]
        .iter()
        .map(|n| inode(&work.join("pkg").join(n)))
        .collect()
    };
    let before = inodes();

    let run2 = run(&["dir", "download", "c/2", work.to_str().unwrap(), "--json"]);
    let stats = json_stats(&run2.ok().stdout);
    assert_same(&snapshot(&work), &snapshot(&v2));
    let after = inodes();
    assert_eq!(
        after[..3],
        before[..3],
        "a.bin, c.bin and d.txt left in place"
    );
    assert_ne!(after[3], before[3], "e.bin written anew");
    assert_eq!(after[4], before[4], "f.bin only given its new mtime");
    assert_eq!(after[5..], before[5..], "h1, h2 and h4 left in place");
    // Written: the new files and e.bin, nothing else.
    assert_eq!(
        stats["disk_bytes"].as_u64(),
        Some(90_000 + 80_000 + 500 + 700_000),
        "{stats}"
    );
    assert_eq!(stats["unchanged_files"].as_u64(), Some(7), "{stats}");
    assert_eq!(crate::util::temp_leftovers(&work), Vec::<String>::new());
    // The record vouches for what is there now: the next upload reads nothing.
    let up = run(&["dir", "upload", "c/3", work.to_str().unwrap(), "--json"]);
    assert_eq!(json_stats(&up.ok().stdout)["disk_bytes"].as_u64(), Some(0));
    let (m2, m3) = (manifest(env, "c/2"), manifest(env, "c/3"));
    assert_eq!((m2.table, m2.entries), (m3.table, m3.entries));
    if unprivileged {
        sh("chmod -R u+w v1 v2 work", env.dir.path());
    }
}

#[test]
fn bytes_that_move_across_a_file_boundary_are_written_not_kept() {
    let env = TestEnv::s3("inplacesizes");
    // One chunk holds both versions' stream: the same bytes, cut into files differently.
    env.write("v1/a", "0123456789");
    env.write("v1/b", "ABCDEFGHIJ");
    env.write("v1/c", "xyz");
    env.write("v2/a", "01234");
    env.write("v2/b", "56789ABCDEFGHIJ");
    env.write("v2/c", "");
    env.write("v2/d", "xyz");
    sh("touch -d '2022-01-01' v1/* v2/*", env.dir.path());
    let (v1, v2) = (env.path("v1"), env.path("v2"));
    env.run(["dir", "upload", "s/1", v1.to_str().unwrap()]).ok();
    env.run(["dir", "upload", "s/2", v2.to_str().unwrap()]).ok();
    let work = env.path("work");
    env.run(["dir", "download", "s/1", work.to_str().unwrap()])
        .ok();
    env.run(["dir", "download", "s/2", work.to_str().unwrap()])
        .ok();
    assert_same(&snapshot(&work), &snapshot(&v2));
}

#[test]
fn a_wide_tree_is_scanned_and_updated_within_a_small_open_file_limit() {
    let env = TestEnv::s3("wide");
    for d in 0..300 {
        env.write(&format!("wide/dir{d:03}/f"), format!("{d}\n"));
    }
    let wide = env.path("wide");
    let limited = |args: &[&str]| {
        let mut cmd = env.cmd(args);
        crate::util::limit_open_files(&mut cmd, 128);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    limited(&["dir", "upload", "w/1", wide.to_str().unwrap()]);
    env.write("wide/dir150/f", "changed\n");
    limited(&["dir", "upload", "w/2", wide.to_str().unwrap()]);
    let out = env.path("out");
    limited(&["dir", "download", "w/1", out.to_str().unwrap()]);
    limited(&["dir", "download", "w/2", out.to_str().unwrap()]);
    assert_same(&snapshot(&out), &snapshot(&wide));
}

#[test]
fn without_a_tree_state_the_files_dir_holds_still_spare_the_fetch() {
    let env = TestEnv::s3("seeded");
    let (v1, v2) = two_versions(&env, 40);
    env.run(["dir", "upload", "t/1", v1.to_str().unwrap()]).ok();
    env.run(["dir", "upload", "t/2", v2.to_str().unwrap()]).ok();
    let fresh = env.path("fresh");
    let cold = env.run(["dir", "download", "t/2", fresh.to_str().unwrap(), "--json"]);
    let cold_wire = json_stats(&cold.ok().stdout)["wire_bytes"]
        .as_u64()
        .unwrap();

    // DIR holds v1 (as another tool or a wiped runner would leave it), with no record.
    let work = env.path("work");
    env.run(["dir", "download", "t/1", work.to_str().unwrap()])
        .ok();
    std::fs::remove_dir_all(state_dir(&env)).unwrap();
    let run = env.run([
        "dir",
        "download",
        "t/2",
        work.to_str().unwrap(),
        "--delete",
        "--json",
    ]);
    let stats = json_stats(&run.ok().stdout);
    assert_same(&snapshot(&work), &snapshot(&fresh));
    let wire = stats["wire_bytes"].as_u64().unwrap();
    assert!(
        wire * 3 < cold_wire,
        "received {wire}, a fresh restore {cold_wire}: {stats}"
    );
}

#[test]
fn an_update_that_cannot_finish_in_place_restores_the_tree_whole() {
    let env = TestEnv::s3("inplacefallback");
    let (v1, v2) = two_versions(&env, 10);
    env.run(["dir", "upload", "t/1", v1.to_str().unwrap()]).ok();
    env.run(["dir", "upload", "t/2", v2.to_str().unwrap()]).ok();
    let work = env.path("work");
    env.run(["dir", "download", "t/1", work.to_str().unwrap()])
        .ok();
    // A file nobody may replace (as a root-owned file is to a CI user): the update
    // fails when it puts its new version in place.
    let stuck = work.join("pkg002/src/f1.rs");
    let immutable = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&stuck)
        .status()
        .is_ok_and(|s| s.success());
    if !immutable {
        eprintln!("skipped: chattr +i does not work here");
        return;
    }
    let run = env.run(["dir", "download", "t/2", work.to_str().unwrap()]);
    let _ = std::process::Command::new("chattr")
        .arg("-R")
        .arg("-i")
        .arg(&work)
        .status();
    run.ok();
    assert!(run.stderr.contains("restored it whole"), "{}", run.stderr);
    let fresh = env.path("fresh");
    env.run(["dir", "download", "t/2", fresh.to_str().unwrap()])
        .ok();
    // The whole restore swapped the top-level entries in; the old pkg002 it could not
    // delete stays aside, as cacher's own leftover.
    let got: Vec<_> = snapshot(&work)
        .into_iter()
        .filter(|(p, _)| !p.starts_with(".cacher-"))
        .collect();
    let want: Vec<_> = snapshot(&fresh)
        .into_iter()
        .chain(
            snapshot(&work)
                .into_iter()
                .filter(|(p, _)| p.starts_with("pkg008")),
        )
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_same(&got, &want);
}

#[test]
fn restores_racing_into_the_same_new_dir_both_succeed() {
    let env = TestEnv::s3("newdirrace");
    let src = make_tree(&env, "src", 30);
    env.run(["dir", "upload", "k", src.to_str().unwrap()]).ok();
    for round in 0..3 {
        // DIR does not exist: each builds the tree beside it; the second to finish
        // finds DIR made by the first and swaps its entries in.
        let out = env.path(&format!("out{round}"));
        let args: Vec<String> = ["dir", "download", "k", out.to_str().unwrap()]
            .iter()
            .map(|a| a.to_string())
            .collect();
        env.run_all_at_once(&[args.clone(), args]);
        assert_same(&snapshot(&out), &snapshot(&src));
        let leftovers = sh("ls -a", env.dir.path());
        assert!(!leftovers.contains(".cacher-"), "{leftovers}");
    }
}

#[test]
fn a_recorded_directory_now_a_symlink_is_replaced_not_read_through() {
    let env = TestEnv::s3("inplacelink");
    let (v1, v2) = two_versions(&env, 20);
    env.run(["dir", "upload", "t/1", v1.to_str().unwrap()]).ok();
    env.run(["dir", "upload", "t/2", v2.to_str().unwrap()]).ok();
    let work = env.path("work");
    env.run(["dir", "download", "t/1", work.to_str().unwrap()])
        .ok();
    // The recorded files move outside DIR with their stamps (a rename keeps them), and
    // a symlink takes their directory's place: through it every stamp still matches.
    let moved = env.path("moved");
    std::fs::rename(work.join("pkg010"), &moved).unwrap();
    std::os::unix::fs::symlink(&moved, work.join("pkg010")).unwrap();
    let outside = snapshot(&moved);
    let fresh = env.path("fresh");
    env.run(["dir", "download", "t/2", fresh.to_str().unwrap()])
        .ok();

    let run = env.run([
        "dir",
        "download",
        "t/2",
        work.to_str().unwrap(),
        "--delete",
        "--json",
    ]);
    let stats = json_stats(&run.ok().stdout);
    assert_same(&snapshot(&work), &snapshot(&fresh));
    assert!(work.join("pkg010").symlink_metadata().unwrap().is_dir());
    assert_same(&snapshot(&moved), &outside);
    // None of the files behind the symlink was taken as already in place: that would
    // have vouched for files outside DIR.
    let files = |dir: &std::path::Path| {
        walkdir::WalkDir::new(dir)
            .into_iter()
            .filter(|e| e.as_ref().unwrap().file_type().is_file())
            .count() as u64
    };
    let (all, behind) = (files(&work), files(&work.join("pkg010")));
    assert!(behind > 0);
    let unchanged = stats["unchanged_files"].as_u64().unwrap();
    assert!(unchanged > 0 && unchanged <= all - behind, "{stats}");
}

/// Every path below `root`, as bytes, with what is there: a file's bytes, a link's
/// target, or nothing for a directory. Exact where [`snapshot`] shows names lossily.
fn raw_tree(root: &Path) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    use std::os::unix::ffi::OsStrExt;
    walkdir::WalkDir::new(root)
        .min_depth(1)
        .sort_by_file_name()
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().as_os_str().as_bytes();
            let what = match e.file_type() {
                t if t.is_symlink() => Some(
                    std::fs::read_link(e.path())
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                ),
                t if t.is_file() => Some(std::fs::read(e.path()).unwrap()),
                _ => None,
            };
            (rel.to_vec(), what)
        })
        .collect()
}

#[test]
fn names_that_are_not_utf8_go_through_the_warm_path_byte_for_byte() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let env = TestEnv::s3("warmbytes");
    let at = |root: &Path, rel: &[u8]| root.join(OsStr::from_bytes(rel));
    let v1 = make_tree(&env, "v1", 40);
    std::fs::create_dir_all(at(&v1, b"d\xff\xfe/sub")).unwrap();
    std::fs::write(at(&v1, b"d\xff\xfe/sub/caf\xe9.rs"), "latin-1 name\n").unwrap();
    std::fs::write(at(&v1, b"pkg001/src/\x80gone"), "removed in v2\n").unwrap();
    std::fs::write(at(&v1, b"pkg002/\xc3\x28edited"), "v1 text\n").unwrap();
    std::os::unix::fs::symlink(OsStr::from_bytes(b"to-\xe9"), at(&v1, b"link\xe9")).unwrap();
    let v2 = env.path("v2");
    sh(
        &format!("cp -a '{}' '{}'", v1.display(), v2.display()),
        env.dir.path(),
    );
    std::fs::remove_file(at(&v2, b"pkg001/src/\x80gone")).unwrap();
    std::fs::write(at(&v2, b"pkg002/\xc3\x28edited"), "v2 text, longer\n").unwrap();
    std::fs::write(at(&v2, b"d\xff\xfe/sub/new\xf0.rs"), "added in v2\n").unwrap();
    env.run(["dir", "upload", "t/1", v1.to_str().unwrap()]).ok();
    env.run(["dir", "upload", "t/2", v2.to_str().unwrap()]).ok();

    // Restored over v1, with extras of the user's whose names are not UTF-8 either.
    let work = env.path("work");
    env.run(["dir", "download", "t/1", work.to_str().unwrap()])
        .ok();
    std::fs::write(at(&work, b"mine\xe9"), "the user's").unwrap();
    std::fs::write(at(&work, b"d\xff\xfe/stray\xe9.o"), "stale").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let run = env.run(["dir", "download", "t/2", work.to_str().unwrap(), "--json"]);
    let stats = json_stats(&run.ok().stdout);
    let written = stats["disk_bytes"].as_u64().unwrap();
    assert!(
        written * 4 < stats["stream_bytes"].as_u64().unwrap(),
        "{stats}"
    );
    assert!(stats["unchanged_files"].as_u64().unwrap() > 150, "{stats}");
    let mut want = raw_tree(&v2);
    want.push((b"mine\xe9".to_vec(), Some(b"the user's".to_vec())));
    want.sort();
    assert_eq!(
        raw_tree(&work),
        want,
        "the entry, and the user's top-level file"
    );
    assert_same(&snapshot(&work), &{
        let mut s = snapshot(&v2);
        s.extend(
            snapshot(&work)
                .into_iter()
                .filter(|(p, _)| p.starts_with("mine")),
        );
        s.sort();
        s
    });

    // An upload from here takes every file the restore wrote or kept as unchanged;
    // it reads the two the entry lacks (and the bytes around them the cut needs).
    std::thread::sleep(std::time::Duration::from_millis(50));
    std::fs::write(at(&work, b"d\xff\xfe/sub/later\xfa"), "added after\n").unwrap();
    let up = env.run(["dir", "upload", "t/3", work.to_str().unwrap(), "--json"]);
    let stats = json_stats(&up.ok().stdout);
    let files_of_v2 = walkdir::WalkDir::new(&v2)
        .into_iter()
        .filter(|e| e.as_ref().unwrap().file_type().is_file())
        .count() as u64;
    assert_eq!(
        stats["unchanged_files"].as_u64(),
        Some(files_of_v2),
        "{stats}"
    );
    let read = stats["disk_bytes"].as_u64().unwrap();
    assert!(
        read * 4 < stats["stream_bytes"].as_u64().unwrap(),
        "{stats}"
    );
    let check = env.path("check");
    env.run(["dir", "download", "t/3", check.to_str().unwrap()])
        .ok();
    assert_eq!(raw_tree(&check), raw_tree(&work));
}

/// A filesystem that keeps whole seconds (ext4 with 128-byte inodes, on a loop device)
/// mounted for the length of a test; `None` (and SKIPPED) where it cannot be.
struct WholeSecondFs {
    mount: PathBuf,
}

impl WholeSecondFs {
    fn mount(env: &TestEnv, test: &str) -> Option<WholeSecondFs> {
        if !can_switch_users(test) {
            return None;
        }
        let (image, mount) = (env.path("seconds.img"), env.path("seconds"));
        std::fs::create_dir_all(&mount).unwrap();
        let made = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "truncate -s 32M '{0}' && mkfs.ext4 -q -I 128 -F '{0}' && mount -o loop '{0}' '{1}'",
                image.display(),
                mount.display()
            ))
            .status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED {test}: cannot make and mount an ext4 image");
            return None;
        }
        Some(WholeSecondFs { mount })
    }
}

impl Drop for WholeSecondFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.mount)
            .status();
    }
}

/// Sleeps until just past the start of a second, so what follows within a few tenths
/// of a second lands in one second.
fn at_a_second_start() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into = now.subsec_nanos();
    std::thread::sleep(std::time::Duration::from_nanos(
        1_000_000_000 - u64::from(into) + 5_000_000,
    ));
}

/// Where times are whole seconds, files rewritten in the second the restore stamped
/// them, with their size and old mtime kept (as `npm` and `tar -x` leave files), show
/// the very stamps the restore recorded: neither the next upload nor the next restore
/// may take them as the entry's.
#[test]
fn on_whole_second_times_a_rewrite_in_the_restores_second_is_not_missed() {
    let test = "on_whole_second_times_a_rewrite_in_the_restores_second_is_not_missed";
    let env = TestEnv::s3("wholesecond");
    let Some(fs) = WholeSecondFs::mount(&env, test) else {
        return;
    };
    for i in 0..20 {
        env.write(&format!("src/pkg/f{i}"), "AAAA\n");
    }
    sh("touch -d 2020-01-01 src/pkg/*", env.dir.path());
    let src = env.path("src");
    env.run(["dir", "upload", "k1", src.to_str().unwrap()]).ok();
    let rewrite = |dir: &Path| {
        sh(
            "for f in pkg/f*; do printf 'ZZZZ\\n' > $f; done; touch -d 2020-01-01 pkg/f*",
            dir,
        )
    };
    let all_hold = |dir: &Path, what: &str| {
        (0..20).all(|i| read(dir.join(format!("pkg/f{i}"))) == what.as_bytes())
    };

    // Restores k1 into a new `name` and rewrites it there, within one second if it can
    // (a loaded machine may take longer: then it tries again).
    let restore_and_rewrite = |name: &str| {
        for attempt in 0.. {
            let dir = fs.mount.join(format!("{name}{attempt}"));
            at_a_second_start();
            let second = std::time::UNIX_EPOCH.elapsed().unwrap().as_secs();
            env.run(["dir", "download", "k1", dir.to_str().unwrap()])
                .ok();
            rewrite(&dir);
            if std::time::UNIX_EPOCH.elapsed().unwrap().as_secs() == second || attempt == 4 {
                return dir;
            }
        }
        unreachable!()
    };

    // The upload after the rewrite sends the new bytes.
    let work = restore_and_rewrite("up");
    let stat = sh("stat -c %z pkg/f0", &work);
    assert!(stat.contains(".000000000"), "whole seconds: {stat}");
    env.run(["dir", "upload", "k2", work.to_str().unwrap()])
        .ok();
    let fresh = env.path("fresh");
    env.run(["dir", "download", "k2", fresh.to_str().unwrap()])
        .ok();
    assert!(all_hold(&fresh, "ZZZZ\n"), "{:?}", snapshot(&fresh));

    // A restore over the rewritten tree puts the entry's bytes back.
    let over = restore_and_rewrite("over");
    env.run(["dir", "download", "k1", over.to_str().unwrap()])
        .ok();
    assert!(all_hold(&over, "AAAA\n"), "{:?}", snapshot(&over));
}
