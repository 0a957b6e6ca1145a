//! `cacher gc` and `cacher prune`: space is reclaimed, referenced chunks never are, and
//! a pack is deleted only a grace period after gc first condemned it.

use cacher::chunk::format::ChunkTable;
use cacher::chunk::store::Stored;
use futures::{StreamExt, TryStreamExt};

use crate::util::{
    TestEnv, bucket, chunk_store, keys_under, put_object, random_bytes, read, rt, server, sh,
    stored,
};

fn tree(env: &TestEnv, name: &str, seed: u64) -> String {
    env.write(
        &format!("{name}/a.bin"),
        random_bytes(2 * 1024 * 1024, seed),
    );
    env.write(&format!("{name}/b.txt"), format!("tree {name}\n"));
    env.path(name).display().to_string()
}

fn pack_count(env: &TestEnv) -> usize {
    let listed = env.run(["list", "--recursive", ".cacher/packs/"]);
    listed.ok().stdout.lines().count()
}

fn condemned_state(env: &TestEnv) -> Option<String> {
    stored(&format!("{}/.cacher/gc/condemned", env.prefix))
        .map(|b| String::from_utf8(b).expect("the condemned list is text"))
}

#[test]
fn gc_condemns_unreferenced_old_packs_and_deletes_them_on_a_later_run() {
    let env = TestEnv::s3("gc");
    let a = tree(&env, "a", 1);
    let b = tree(&env, "b", 2);
    env.run(["dir", "upload", "k1", &a]).ok();
    env.run(["dir", "upload", "k2", &b]).ok();
    let before = pack_count(&env);
    assert!(before >= 2);

    env.run(["delete", "k1"]).ok();
    let run = env.run(["gc"]);
    assert!(
        run.ok()
            .stderr
            .contains("condemned 0 unreferenced packs, deleted 0 condemned packs"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("took "), "{}", run.stderr);
    assert_eq!(pack_count(&env), before, "default grace keeps young packs");

    let run = env.run(["gc", "--grace", "0s", "--dry-run"]);
    assert!(run.ok().stdout.contains("would condemn"), "{}", run.stdout);
    assert_eq!(pack_count(&env), before, "dry run deletes nothing");
    assert_eq!(condemned_state(&env), None, "dry run writes nothing");

    // First run: condemned, not deleted.
    let run = env.run(["gc", "--grace", "0s"]);
    assert!(
        run.ok().stderr.contains("deleted 0 condemned packs"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("condemned 0 "), "{}", run.stderr);
    assert_eq!(pack_count(&env), before, "the first run only condemns");
    let state = condemned_state(&env).expect("the condemned list is written");
    assert!(state.starts_with("cacher-condemned-packs 1\n"), "{state}");

    // A dry run of the second pass names what it would delete, and deletes nothing.
    let run = env.run(["gc", "--grace", "0s", "--dry-run"]);
    assert!(run.ok().stdout.contains("would delete"), "{}", run.stdout);
    assert_eq!(pack_count(&env), before);

    // Second run: deleted.
    env.run(["gc", "--grace", "0s"]).ok();
    let after = pack_count(&env);
    assert!(after < before, "{after} < {before}");
    assert_eq!(condemned_state(&env), None, "nothing left condemned");
    let out = env.path("out");
    env.run(["dir", "download", "k2", out.to_str().unwrap()])
        .ok();
    assert_eq!(
        crate::util::read(out.join("a.bin")),
        random_bytes(2 * 1024 * 1024, 2)
    );

    // k1's chunks are gone, and the index no longer offers them: re-uploading sends them.
    let run = env.run(["dir", "upload", "k1", &a]);
    assert!(!run.ok().stderr.contains(" 0 new"), "{}", run.stderr);
}

#[test]
fn packs_referenced_again_are_pardoned() {
    let env = TestEnv::s3("gcpardon");
    let a = tree(&env, "a", 21);
    env.run(["dir", "upload", "k1", &a]).ok();
    env.run(["delete", "k1"]).ok();
    env.run(["gc", "--grace", "0s"]).ok();
    assert!(condemned_state(&env).is_some());
    // The same tree again reuses the condemned packs.
    let run = env.run(["dir", "upload", "k2", &a]);
    assert!(run.ok().stderr.contains(" 0 new"), "{}", run.stderr);
    let run = env.run(["gc", "--grace", "0s"]);
    assert!(run.ok().stderr.contains("pardoned 1"), "{}", run.stderr);
    assert!(
        run.stderr.contains("deleted 0 condemned packs"),
        "{}",
        run.stderr
    );
    assert_eq!(condemned_state(&env), None);
    let out = env.path("out");
    env.run(["dir", "download", "k2", out.to_str().unwrap()])
        .ok();
    assert_eq!(read(out.join("a.bin")), random_bytes(2 * 1024 * 1024, 21));
}

#[test]
fn a_restore_that_read_its_manifest_before_a_prune_survives_the_next_gc() {
    let env = TestEnv::s3("gcrestore");
    let a = tree(&env, "a", 22);
    env.run(["dir", "upload", "k", &a]).ok();
    // The restore starts: it has read the manifest.
    let chunks = chunk_store(&env.prefix);
    let key = format!("{}/k", env.prefix);
    let Some(Stored::Manifest(manifest)) = rt().block_on(chunks.fetch(&key)).unwrap() else {
        panic!("k is a manifest");
    };
    let restore = |table: &cacher::chunk::format::ChunkTable| {
        rt().block_on(chunks.restore_in_order(table, Vec::new()))
            .map(|(stream, _)| stream)
    };
    // Meanwhile: the entry is pruned and gc runs at once, with the default grace and
    // even with none.
    let run = env.run(["prune", "--older-than", "0s"]);
    assert_eq!(run.ok().stdout.trim(), key);
    env.run(["gc"]).ok();
    env.run(["gc", "--grace", "0s"]).ok();
    // The restore fetches its packs: all there, the bytes exact.
    let stream = restore(&manifest.table).expect("the restore in flight succeeds");
    assert_eq!(
        &stream[..2 * 1024 * 1024],
        &random_bytes(2 * 1024 * 1024, 22)[..]
    );
    // A second gc (a grace period later; here 0s) deletes them: only a restore that
    // outlives the grace period can fail.
    env.run(["gc", "--grace", "0s"]).ok();
    assert_eq!(pack_count(&env), 0);
    let err = restore(&manifest.table).expect_err("the packs are gone now");
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
}

#[test]
fn with_the_default_grace_old_packs_of_a_pruned_entry_wait_a_grace_period_after_condemnation() {
    // A file:// store lets the test age packs and the condemned list; the protocol is
    // the same as on S3.
    let env = TestEnv::file_store();
    let a = tree(&env, "a", 23);
    env.run(["dir", "upload", "k", &a]).ok();
    sh(
        "find store/.cacher/packs -type f -exec touch -d '2 days ago' {} +",
        env.dir.path(),
    );
    // A restore that read the manifest before the prune keeps a copy of it.
    std::fs::copy(env.path("store/k"), env.path("manifest-read-earlier")).unwrap();
    env.run(["prune", "--older-than", "0s"]).ok();
    let before = pack_count(&env);
    let run = env.run(["gc"]);
    assert!(
        run.ok().stderr.contains("deleted 0 condemned packs"),
        "{}",
        run.stderr
    );
    assert_eq!(pack_count(&env), before, "old packs are only condemned");
    env.run(["gc"]).ok();
    assert_eq!(
        pack_count(&env),
        before,
        "condemned less than the grace ago"
    );
    std::fs::copy(env.path("manifest-read-earlier"), env.path("store/k")).unwrap();
    let out = env.path("out");
    env.run(["dir", "download", "k", out.to_str().unwrap()])
        .ok();
    assert_eq!(read(out.join("a.bin")), random_bytes(2 * 1024 * 1024, 23));
    std::fs::remove_file(env.path("store/k")).unwrap();

    // Condemned two days ago (the list says when): now deleted.
    let state = std::fs::read_to_string(env.path("store/.cacher/gc/condemned")).unwrap();
    let two_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 2 * 86400;
    let aged: String = state
        .lines()
        .map(|line| match line.split_once(' ') {
            Some((id, _)) if id.len() == 64 => format!("{id} {two_days_ago}\n"),
            _ => format!("{line}\n"),
        })
        .collect();
    std::fs::write(env.path("store/.cacher/gc/condemned"), aged).unwrap();
    let run = env.run(["gc"]);
    assert!(
        run.ok()
            .stderr
            .contains(&format!("deleted {before} condemned packs")),
        "{}",
        run.stderr
    );
    assert_eq!(pack_count(&env), 0);
}

#[test]
fn gc_deletes_nothing_while_a_manifest_is_unreadable() {
    let env = TestEnv::s3("gcbad");
    let a = tree(&env, "a", 3);
    env.run(["dir", "upload", "k1", &a]).ok();
    env.run(["delete", "k1"]).ok();
    let store = bucket();
    let broken = cacher::store::Body::Bytes(bytes::Bytes::from_static(b"CACHERMF\x01\x00garbage"));
    rt().block_on(store.put(
        &format!("{}/broken", env.prefix),
        broken,
        &Default::default(),
    ))
    .unwrap();
    let before = pack_count(&env);
    let run = env.run(["gc", "--grace", "0s"]);
    run.code(2);
    assert!(run.stderr.contains("broken"), "{}", run.stderr);
    assert_eq!(pack_count(&env), before);
}

#[test]
fn prune_deletes_old_entries_then_gc_reclaims_their_packs() {
    let env = TestEnv::s3("prune");
    let a = tree(&env, "a", 4);
    env.run(["dir", "upload", "old/tree", &a]).ok();
    env.run(["upload", "old/file", env.write("f", "x").to_str().unwrap()])
        .ok();
    env.run(["upload", "keep/file", env.write("g", "y").to_str().unwrap()])
        .ok();
    env.run(["prune", "--older-than", "1h"]).ok();
    env.run(["exists", "old/file"]).ok();
    let run = env.run(["prune", "--older-than", "0s", "old/"]);
    let pruned: Vec<&str> = run.ok().stdout.lines().collect();
    assert_eq!(pruned.len(), 2, "{pruned:?}");
    env.run(["exists", "old/file"]).code(1);
    env.run(["dir", "exists", "old/tree"]).code(1);
    env.run(["exists", "keep/file"]).ok();
    env.run(["gc", "--grace", "0s"]).ok();
    env.run(["gc", "--grace", "0s"]).ok();
    assert_eq!(pack_count(&env), 0);
}

#[test]
fn an_upload_reusing_old_packs_refreshes_them_so_gc_keeps_them() {
    // Packs are looked up up front when the tree state names them, and on demand when
    // only the index does (no state): both must be refreshed.
    for fresh_state in [false, true] {
        // A file:// store lets the test age packs; the protocol is the same as on S3.
        let mut env = TestEnv::file_store();
        let a = tree(&env, "a", 5);
        env.run(["dir", "upload", "k1", &a]).ok();
        env.run(["delete", "k1"]).ok();
        // The packs are now unreferenced and two days old.
        sh(
            "find store/.cacher/packs -type f -exec touch -d '2 days ago' {} +",
            env.dir.path(),
        );

        if fresh_state {
            let state = env.path("fresh-state");
            env.set("CACHER_STATE_DIR", state.to_str().unwrap());
        }
        let run = env.run(["dir", "upload", "k2", &a]);
        assert!(run.ok().stderr.contains(" 0 new"), "reused: {}", run.stderr);
        let age = sh(
            "find store/.cacher/packs -type f -mmin +5 | wc -l",
            env.dir.path(),
        );
        assert_eq!(
            age.trim(),
            "0",
            "reused packs were refreshed (fresh state: {fresh_state})"
        );

        // Even with the manifest gone, a gc with the default grace keeps the refreshed
        // packs.
        env.run(["delete", "k2"]).ok();
        env.run(["gc"]).ok();
        assert!(pack_count(&env) > 0);
        env.run(["gc", "--grace", "0s"]).ok();
        env.run(["gc", "--grace", "0s"]).ok();
        assert_eq!(pack_count(&env), 0);
    }
}

#[test]
fn gc_compacts_the_index_and_dedup_still_works() {
    let env = TestEnv::s3("gccompact");
    for (i, seed) in [(1, 11), (2, 12), (3, 13)] {
        let t = tree(&env, &format!("t{i}"), seed);
        env.run(["dir", "upload", &format!("k{i}"), &t]).ok();
    }
    let segments = || {
        env.run(["list", "--recursive", ".cacher/index/"])
            .ok()
            .stdout
            .lines()
            .count()
    };
    assert_eq!(segments(), 3, "one segment per upload that sent chunks");
    env.run(["gc"]).ok();
    assert_eq!(segments(), 1, "compacted into one");
    let t1 = env.path("t1").display().to_string();
    let run = env.run(["dir", "upload", "again", &t1]);
    assert!(run.ok().stderr.contains(" 0 new"), "{}", run.stderr);
}

#[test]
fn gc_aborts_unfinished_uploads_older_than_the_grace() {
    let env = TestEnv::s3("gcstale");
    let store = bucket();
    let key = format!("{}/killed-upload", env.prefix);
    let upload = rt()
        .block_on(store.multipart_start(&key, 6 << 20, &Default::default()))
        .unwrap();
    let part = |n| {
        let data = vec![0u8; 6 << 20];
        let crc = crc32fast::hash(&data);
        rt().block_on(store.multipart_part(
            &upload,
            n,
            0,
            cacher::store::Body::Bytes(bytes::Bytes::from(data)),
            Some(crc),
        ))
    };
    part(1).expect("the first part of the killed upload");
    let run = env.run(["gc"]);
    assert!(
        run.ok().stderr.contains("0 unfinished uploads aborted"),
        "{}",
        run.stderr
    );
    let run = env.run(["gc", "--grace", "0s"]);
    if server().lists_parts() {
        assert!(
            run.ok().stderr.contains("1 unfinished uploads aborted"),
            "{}",
            run.stderr
        );
        assert!(part(2).is_err(), "the upload was aborted");
    } else {
        // moto: its start times are fixed in 2010 and its ListParts reply unreadable,
        // so gc cannot tell a live upload from a dead one and keeps it.
        assert!(
            run.ok().stderr.contains("kept unfinished upload"),
            "{}",
            run.stderr
        );
        part(2).expect("the kept upload still takes parts");
    }

    // file:// stores: temp files of writes that died.
    let env = TestEnv::file_store();
    env.write("store/.cacher-tmp/0123456789abcdef", "half a write");
    sh(
        "touch -d '2 days ago' store/.cacher-tmp/0123456789abcdef",
        env.dir.path(),
    );
    env.write("store/.cacher-tmp/fedcba9876543210", "a write in progress");
    env.run(["gc"]).ok();
    assert!(!env.path("store/.cacher-tmp/0123456789abcdef").exists());
    assert!(env.path("store/.cacher-tmp/fedcba9876543210").exists());
}

/// The key of the last-use marker of `full_key` in the store under `prefix`.
fn marker_key(prefix: &str, full_key: &str) -> String {
    cacher::chunk::layout::Layout::new(prefix).used_key(full_key)
}

#[test]
fn a_download_hit_on_an_entry_younger_than_a_day_writes_no_marker() {
    let env = TestEnv::s3("markyoung");
    let src = env.write("f", "fresh");
    env.run(["upload", "k", src.to_str().unwrap()]).ok();
    let dest = env.path("dest");
    env.run(["download", "k", dest.to_str().unwrap()]).ok();
    assert_eq!(read(&dest), b"fresh");
    assert_eq!(
        keys_under(&format!("{}/.cacher/", env.prefix)),
        Vec::<String>::new(),
        "a hit on a fresh entry costs no request"
    );
}

#[test]
fn a_hit_on_an_old_entry_marks_it_once_a_day_and_prune_counts_from_the_mark() {
    // A file:// store lets the test age entries; S3 sets modification times itself.
    let env = TestEnv::file_store();
    for key in ["used", "unused"] {
        let src = env.write(key, key);
        env.run(["upload", key, src.to_str().unwrap()]).ok();
    }
    sh(
        "touch -d '3 days ago' store/used store/unused",
        env.dir.path(),
    );
    let dest = env.path("dest");
    env.run(["download", "used", dest.to_str().unwrap()]).ok();
    let marker = env.path(&format!("store/{}", marker_key("", "used")));
    assert_eq!(read(&marker), b"used", "the marker holds the full key");

    // Within a day, a hit does not write the marker again.
    sh(
        &format!("touch -d '2 hours ago' {}", marker.display()),
        env.dir.path(),
    );
    let mtime = || std::fs::metadata(&marker).unwrap().modified().unwrap();
    let before = mtime();
    env.run(["download", "used", dest.to_str().unwrap()]).ok();
    assert_eq!(mtime(), before);

    // Both were written 3 days ago; only `unused` has not been hit since.
    let run = env.run(["prune", "--older-than", "2d"]);
    assert_eq!(run.ok().stdout.trim(), "unused");
    env.run(["exists", "used"]).ok();
    env.run(["exists", "unused"]).code(1);

    // Unused for 3 days: pruned, and its marker with it.
    sh(
        &format!("touch -d '3 days ago' {}", marker.display()),
        env.dir.path(),
    );
    let run = env.run(["prune", "--older-than", "2d"]);
    assert_eq!(run.ok().stdout.trim(), "used");
    assert!(!marker.exists(), "the marker went with its entry");
}

#[test]
fn a_hit_whose_marker_cannot_be_written_still_succeeds_quietly() {
    let env = TestEnv::file_store();
    let src = env.write("src", "content");
    env.run(["upload", "k", src.to_str().unwrap()]).ok();
    sh("touch -d '3 days ago' store/k", env.dir.path());
    // A file where the marker directory should be: every marker write fails, as with
    // read-only credentials.
    env.write("store/.cacher/used", "in the way");
    let dest = env.path("dest");
    let run = env.run(["download", "k", dest.to_str().unwrap()]);
    assert!(!run.ok().stderr.contains("warning"), "{}", run.stderr);
    assert_eq!(read(&dest), b"content");
    let run = env.run(["download", "k", dest.to_str().unwrap(), "-v"]);
    assert!(run.ok().stderr.contains("could not mark"), "{}", run.stderr);
}

#[test]
fn prune_and_gc_delete_last_use_markers_with_their_entries() {
    let env = TestEnv::s3("markers");
    let src = env.write("f", "x");
    env.run(["upload", "k", src.to_str().unwrap()]).ok();
    let k = format!("{}/k", env.prefix);
    let (live, orphan) = (
        marker_key(&env.prefix, &k),
        marker_key(&env.prefix, &format!("{}/gone", env.prefix)),
    );
    put_object(&live, k.as_bytes());
    put_object(&orphan, b"gone");

    let run = env.run(["gc"]);
    assert!(
        run.ok().stderr.contains("deleted 1 stale last-use markers"),
        "{}",
        run.stderr
    );
    assert_eq!(keys_under(&format!("{}/.cacher/used/", env.prefix)), [live]);

    env.run(["prune", "--older-than", "1h"]).ok();
    env.run(["exists", "k"]).ok();
    let run = env.run(["prune", "--older-than", "0s"]);
    assert_eq!(run.ok().stdout.trim(), k);
    env.run(["exists", "k"]).code(1);
    assert_eq!(
        keys_under(&format!("{}/.cacher/used/", env.prefix)),
        Vec::<String>::new()
    );
}

#[test]
fn a_store_never_prunes_or_collects_the_internal_objects_of_a_store_nested_below_it() {
    let env = TestEnv::s3("outer");
    let mut nested = TestEnv::s3("nested");
    let nested_prefix = format!("{}/linux", env.prefix);
    nested.set("CACHER_PREFIX", &nested_prefix);
    nested.prefix = nested_prefix;
    let a = tree(&nested, "a", 25);
    nested.run(["dir", "upload", "k", &a]).ok();
    let src = env.write("top", "top");
    env.run(["upload", "top", src.to_str().unwrap()]).ok();
    let canaries = [
        format!("{}/.cacher-canary-0123456789abcdef", env.prefix),
        format!("{}/.cacher-canary-0123456789abcdef", nested.prefix),
    ];
    for canary in &canaries {
        put_object(canary, b"c");
    }
    let nested_internal = keys_under(&format!("{}/.cacher/", nested.prefix));
    assert!(nested_internal.len() >= 2, "{nested_internal:?}");

    // Outer: prune everything, then collect with no grace, twice.
    let run = env.run(["prune", "--older-than", "0s"]);
    let mut pruned: Vec<&str> = run.ok().stdout.lines().collect();
    pruned.sort();
    assert_eq!(
        pruned,
        [
            format!("{}/k", nested.prefix),
            format!("{}/top", env.prefix)
        ],
        "entries only, never internal objects"
    );
    env.run(["gc", "--grace", "0s"]).ok();
    env.run(["gc", "--grace", "0s"]).ok();
    assert_eq!(
        keys_under(&format!("{}/.cacher/", nested.prefix)),
        nested_internal
    );
    for canary in &canaries {
        assert!(stored(canary).is_some(), "{canary} kept");
    }
}

#[test]
fn prune_deletes_more_than_a_thousand_entries_in_batches() {
    let env = TestEnv::s3("prunebatch");
    let store = bucket();
    let keys: Vec<String> = (0..1500)
        .map(|i| format!("{}/many/{i:04}", env.prefix))
        .collect();
    rt().block_on(async {
        futures::stream::iter(&keys)
            .map(|key| {
                let body = cacher::store::Body::Bytes(bytes::Bytes::from_static(b"x"));
                let store = store.clone();
                async move { store.put(key, body, &Default::default()).await }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await
    })
    .unwrap();
    let run = env.run(["prune", "--older-than", "0s", "many/", "-v"]);
    assert_eq!(run.ok().stdout.lines().count(), 1500);
    assert!(run.stderr.contains("DELETE 1000 objects"), "{}", run.stderr);
    assert!(run.stderr.contains("DELETE 500 objects"), "{}", run.stderr);
    assert_eq!(
        keys_under(&format!("{}/many/", env.prefix)),
        Vec::<String>::new()
    );
}

#[test]
fn a_corrupt_index_segment_is_skipped_and_the_upload_still_publishes_a_restorable_entry() {
    let env = TestEnv::s3("badsegment");
    let a = tree(&env, "a", 26);
    env.run(["dir", "upload", "k1", &a]).ok();
    let segments = keys_under(&format!("{}/.cacher/index/", env.prefix));
    assert_eq!(segments.len(), 1);
    // Rewrite the segment under the same name with lying offsets: it still decodes,
    // but its bytes no longer hash to its name.
    let data = stored(&segments[0]).unwrap();
    let mut table = ChunkTable::decode_index("segment", &data).unwrap();
    for c in &mut table.chunks {
        c.offset += 1;
    }
    put_object(&segments[0], table.encode_index());

    // Without the tree state k1 left, which would reuse k1's chunks without the index.
    let states = env.home().join(".local/state/cacher/trees");
    std::fs::remove_dir_all(&states).unwrap();
    let run = env.run(["dir", "upload", "k2", &a]);
    let warnings: Vec<&str> = run
        .ok()
        .stderr
        .lines()
        .filter(|l| l.contains("warning"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", run.stderr);
    assert!(
        warnings[0].contains("do not match its name"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains(" 0 new"),
        "the lying segment was not trusted"
    );
    let out = env.path("out");
    env.run(["dir", "download", "k2", out.to_str().unwrap()])
        .ok();
    assert_eq!(read(out.join("a.bin")), random_bytes(2 * 1024 * 1024, 26));

    // The upload rewrote the segment it needed under its true name, healing it.
    assert_eq!(stored(&segments[0]).unwrap(), data);

    // A segment whose bytes are not what its name says is dropped by gc.
    let bogus = format!(
        "{}/.cacher/index/{}",
        env.prefix,
        cacher::chunk::Id::of(b"another segment")
    );
    put_object(&bogus, table.encode_index());
    std::fs::remove_dir_all(&states).unwrap();
    let run = env.run(["dir", "upload", "k3", &a]);
    assert!(run.ok().stderr.contains(" 0 new"), "{}", run.stderr);
    assert!(
        run.stderr.contains("do not match its name"),
        "{}",
        run.stderr
    );
    env.run(["gc"]).ok();
    let left = keys_under(&format!("{}/.cacher/index/", env.prefix));
    assert_eq!(left.len(), 1, "{left:?}");
    assert_ne!(left[0], bogus);
    let run = env.run(["dir", "upload", "k4", &a]);
    assert!(!run.ok().stderr.contains("warning"), "{}", run.stderr);
}

/// Uploads `dir` under `key` with a tree state of its own, so only the index can
/// spare it chunks the bucket holds; returns how many chunks it sent.
fn upload_fresh(env: &mut TestEnv, key: &str, dir: &str) -> (u64, String) {
    let state = env.path(&crate::util::unique("state"));
    env.set("CACHER_STATE_DIR", state.to_str().unwrap());
    let run = env.run(["-v", "dir", "upload", key, dir]);
    let sent = crate::util::upload_stats(&run.ok().stderr).1;
    (sent, run.stderr.clone())
}

#[test]
fn after_gc_uploads_dedup_through_the_summary_and_survive_a_broken_one() {
    let mut env = TestEnv::s3("gcsummary");
    let (t1, t2, t3) = (
        tree(&env, "t1", 41),
        tree(&env, "t2", 42),
        tree(&env, "t3", 43),
    );
    env.run(["dir", "upload", "k1", &t1]).ok();
    env.run(["dir", "upload", "k2", &t2]).ok();
    let prefix = env.prefix.clone();
    let summaries = || keys_under(&format!("{prefix}/.cacher/summary/"));
    let segments = || keys_under(&format!("{prefix}/.cacher/index/"));
    assert!(summaries().is_empty());
    env.run(["gc"]).ok();
    let (summary, sorted) = (summaries(), segments());
    assert_eq!(
        (summary.len(), sorted.len()),
        (1, 1),
        "one sorted segment, one summary"
    );
    env.run(["gc"]).ok();
    assert_eq!(
        (summaries(), segments()),
        (summary.clone(), sorted.clone()),
        "nothing to redo"
    );

    // Chunks only the summarised segment lists, and chunks of a segment written since.
    let (sent, log) = upload_fresh(&mut env, "again1", &t1);
    assert_eq!(sent, 0, "{log}");
    assert!(
        log.contains(&format!("GET {}", sorted[0])),
        "read for the lookups: {log}"
    );
    // New data: no fingerprint matches, so the sorted segment is not even read.
    let (sent, log) = upload_fresh(&mut env, "k3", &t3);
    assert!(sent > 0);
    assert!(!log.contains(&format!("GET {}", sorted[0])), "{log}");
    assert_eq!(
        segments().len(),
        2,
        "the new upload's segment beside the sorted one"
    );
    let (sent, log) = upload_fresh(&mut env, "again3", &t3);
    assert_eq!(sent, 0, "{log}");
    let (sent, log) = upload_fresh(&mut env, "again2", &t2);
    assert_eq!(sent, 0, "{log}");
    // Entries made of chunks found through the summary restore exact bytes.
    for (key, seed) in [("again1", 41), ("again3", 43)] {
        let out = env.path(&format!("out-{key}"));
        env.run(["dir", "download", key, out.to_str().unwrap()])
            .ok();
        assert_eq!(read(out.join("a.bin")), random_bytes(2 * 1024 * 1024, seed));
    }

    // A damaged summary is ignored with a warning: every segment is read whole.
    put_object(&summary[0], b"CACHERSM garbage");
    let (sent, log) = upload_fresh(&mut env, "again1b", &t1);
    assert_eq!(sent, 0, "{log}");
    assert!(log.contains("ignoring index summary"), "{log}");

    // gc replaces it; a summarised segment deleted behind gc's back costs dedup only
    // (a segment written since keeps the summary in use).
    env.run(["gc"]).ok();
    assert_eq!(summaries().len(), 1);
    assert_ne!(summaries(), summary);
    let sorted = segments();
    assert_eq!(sorted.len(), 1);
    let t4 = tree(&env, "t4", 44);
    assert!(upload_fresh(&mut env, "k4", &t4).0 > 0);
    rt().block_on(bucket().delete(&sorted[0])).unwrap();
    let (sent, log) = upload_fresh(&mut env, "again1c", &t1);
    assert!(sent > 0, "sent again: {log}");
    std::fs::remove_dir_all(&t1).unwrap();
    env.run(["dir", "download", "again1c", &t1]).ok();
    assert_eq!(
        read(format!("{t1}/a.bin")),
        random_bytes(2 * 1024 * 1024, 41)
    );
}

/// Chunk ids drawn from `rng`.
fn random_ids(rng: &mut fastrand::Rng, n: usize) -> Vec<cacher::chunk::Id> {
    (0..n)
        .map(|_| {
            let mut bytes = [0u8; 32];
            rng.fill(&mut bytes);
            cacher::chunk::Id(bytes)
        })
        .collect()
}

/// Writes `segments` (chunks and their packs) as index segments, named as the format
/// says, the way uploads leave them before a gc.
fn put_segments(
    layout: &cacher::chunk::layout::Layout,
    segments: &[Vec<(cacher::chunk::Id, cacher::chunk::store::Location)>],
) {
    for segment in segments {
        let data = cacher::chunk::store::table_of(segment.iter().copied()).encode_index();
        put_object(&layout.segment_key(&cacher::chunk::Id::of(&data)), data);
    }
}

/// Where crafted chunks are: `pack`, at offset `n`.
fn crafted_location(pack: cacher::chunk::Id, n: usize) -> cacher::chunk::store::Location {
    cacher::chunk::store::Location {
        pack,
        offset: n as u32,
        stored_len: 10,
        len: 20,
    }
}

#[test]
fn gc_sorts_dedups_and_splits_an_index_crafted_from_the_format() {
    use cacher::chunk::Id;
    use cacher::chunk::layout::Layout;
    let env = TestEnv::s3("gcsplit");
    let layout = Layout::new(&env.prefix);
    let mut rng = fastrand::Rng::with_seed(7);
    let packs = random_ids(&mut rng, 3);
    for pack in &packs {
        put_object(&layout.pack_key(pack), b"a pack");
    }
    let gone = random_ids(&mut rng, 1)[0];
    let live = random_ids(&mut rng, 250_000);
    // Five segments of random ids (so their ranges overlap), as uploads write them;
    // 2,000 chunks listed twice, and 500 in a pack that is gone.
    let mut segments: Vec<Vec<_>> = live
        .chunks(50_000)
        .map(|part| {
            let located = part.iter().enumerate();
            located
                .map(|(n, id)| (*id, crafted_location(packs[n % 3], n)))
                .collect()
        })
        .collect();
    let twice = segments[0][..2_000].to_vec();
    segments[4].extend(twice);
    let in_gone = random_ids(&mut rng, 500).into_iter().enumerate();
    segments[3].extend(in_gone.map(|(n, id)| (id, crafted_location(gone, n))));
    put_segments(&layout, &segments);

    env.run(["gc"]).ok();
    let keys = keys_under(&layout.index_prefix());
    let mut tables: Vec<ChunkTable> = keys
        .iter()
        .map(|k| ChunkTable::decode_index(k, &stored(k).unwrap()).unwrap())
        .collect();
    tables.sort_by_key(|t| t.chunks[0].id);
    // Full segments of 100,000 in id order, the last one smaller, ranges disjoint.
    let sizes: Vec<usize> = tables.iter().map(|t| t.chunks.len()).collect();
    assert_eq!(sizes, [100_000, 100_000, 50_000]);
    let ids: Vec<Id> = tables
        .iter()
        .flat_map(|t| t.chunks.iter().map(|c| c.id))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicate");
    let mut want = live.clone();
    want.sort_unstable();
    assert_eq!(ids, want, "every live chunk once, none of the pack gone");
    assert_eq!(keys_under(&layout.summary_prefix()).len(), 1);
    // Already in shape: a second gc rewrites nothing.
    env.run(["gc"]).ok();
    assert_eq!(keys_under(&layout.index_prefix()), keys);
}

#[test]
fn uploads_ask_for_a_gc_when_the_unsummarised_index_grows_large() {
    let env = TestEnv::s3("gcnudge");
    let layout = cacher::chunk::layout::Layout::new(&env.prefix);
    let mut rng = fastrand::Rng::with_seed(8);
    let pack = random_ids(&mut rng, 1)[0];
    put_object(&layout.pack_key(&pack), b"a pack");
    let ids = random_ids(&mut rng, 1_000_001);
    let segments: Vec<Vec<_>> = ids
        .chunks(100_000)
        .map(|part| {
            let located = part.iter().enumerate();
            located
                .map(|(n, id)| (*id, crafted_location(pack, n)))
                .collect()
        })
        .collect();
    put_segments(&layout, &segments);
    let t = tree(&env, "t", 21);
    let up = env.run(["dir", "upload", "k1", &t]);
    assert!(up.ok().stderr.contains("run `cacher gc`"), "{}", up.stderr);
    env.run(["gc"]).ok();
    let up = env.run(["dir", "upload", "k2", &t, "--force"]);
    assert!(!up.ok().stderr.contains("cacher gc"), "{}", up.stderr);
}

#[test]
fn uploads_between_gcs_read_segment_filters_and_fetch_a_segment_only_on_a_match() {
    let env = TestEnv::s3("filters");
    let layout = cacher::chunk::layout::Layout::new(&env.prefix);
    let (t1, t2) = (tree(&env, "t1", 31), tree(&env, "t2", 32));
    env.run(["dir", "upload", "k1", &t1]).ok();
    // Each segment an upload writes gets a filter named after it.
    let segments = keys_under(&layout.index_prefix());
    let filters = keys_under(&layout.filter_prefix());
    assert_eq!(segments.len(), 1);
    let segment_id = layout.segment_id(&segments[0]).unwrap();
    assert_eq!(filters, [layout.filter_key(&segment_id)]);
    let fetched = |stderr: &str, prefix: &str| {
        stderr
            .lines()
            .filter(|l| l.contains("GET ") && l.contains(prefix))
            .count()
    };

    // New data: the filter is read, the segment is not.
    let up = env.run(["-v", "dir", "upload", "k2", &t2]);
    let log = up.ok().stderr.clone();
    assert_eq!(fetched(&log, &layout.filter_prefix()), 1, "{log}");
    assert_eq!(fetched(&log, &layout.index_prefix()), 0, "{log}");
    // Known data in copies (no tree state vouches for them, so the index is asked):
    // the filter matches, the segment is fetched, and nothing is sent.
    sh("cp -a t1 t1b && cp -a t1 t1c", env.dir.path());
    let up = env.run(["-v", "dir", "upload", "k3", "t1b"]);
    let log = up.ok().stderr.clone();
    assert!(log.contains(" 0 new"), "{log}");
    assert_eq!(fetched(&log, &segments[0]), 1, "{log}");

    // A damaged filter: its segment is read whole, and dedup still works.
    let mut damaged = stored(&filters[0]).unwrap();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x55;
    put_object(&filters[0], damaged);
    let up = env.run(["-v", "dir", "upload", "k4", "t1c"]);
    let log = up.ok().stderr.clone();
    assert!(log.contains(" 0 new"), "{log}");
    assert!(log.contains("ignoring the segment filter"), "{log}");

    // gc summarises the segments and deletes them with their filters.
    env.run(["gc"]).ok();
    assert!(keys_under(&layout.filter_prefix()).is_empty());
    let up = env.run(["dir", "upload", "k5", &t2]);
    assert!(up.ok().stderr.contains(" 0 new"), "{}", up.stderr);
}
