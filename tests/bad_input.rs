//! Bad input: each case gets a one-line error and exit 2 (or the documented code), and
//! nothing is lost. docs/reliability.md lists them with these tests.

use std::os::unix::ffi::OsStrExt;

use crate::util::{TestEnv, read, sh, temp_leftovers};

#[track_caller]
fn fails_with_one_line(run: &crate::util::Run, needle: &str) {
    run.code(2);
    assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.stderr);
    assert!(run.stderr.starts_with("cacher: "), "{}", run.stderr);
    assert!(
        run.stderr.contains(needle),
        "mentions {needle:?}: {}",
        run.stderr
    );
}

#[test]
fn bad_keys_exit_2() {
    let env = TestEnv::file_store();
    let f = env.write("f", "x");
    let f = f.to_str().unwrap();
    let long = "k".repeat(1025);
    for (key, needle) in [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("a/../b", ".."),
        ("a//b", "empty segment"),
        (long.as_str(), "1024"),
    ] {
        fails_with_one_line(&env.run(["upload", key, f]), needle);
        fails_with_one_line(&env.run(["exists", key]), needle);
    }
    // Not UTF-8: refused by the argument parser, also with exit 2.
    let bad = std::ffi::OsStr::from_bytes(b"k\xff");
    let run = env.run([std::ffi::OsStr::new("exists"), bad]);
    run.code(2);
}

#[test]
fn keys_with_a_cacher_segment_are_refused_and_nothing_is_written() {
    let env = TestEnv::s3("reserved");
    let f = env.write("f", "x");
    let f = f.to_str().unwrap();
    let pack = format!(".cacher/packs/{}", "0".repeat(64));
    for key in [pack.as_str(), "a/.cacher/index/x", "a/.cacher-canary-0123"] {
        for args in [
            vec!["upload", key, f],
            vec!["upload", key, f, "--force"],
            vec!["dir", "upload", key, env.dir.path().to_str().unwrap()],
            vec!["download", key, "dest"],
            vec!["exists", key],
            vec!["delete", key],
        ] {
            let run = env.run(&args);
            fails_with_one_line(&run, key);
            assert!(run.stderr.contains("reserved"), "{args:?}: {}", run.stderr);
        }
    }
    assert_eq!(
        crate::util::keys_under(&format!("{}/", env.prefix)),
        Vec::<String>::new(),
        "nothing written"
    );
    assert!(!env.path("dest").exists());
}

#[test]
fn wrong_kinds_of_paths_exit_2() {
    let env = TestEnv::file_store();
    env.write("dir/file", "x");
    let dir = env.path("dir");
    let file = env.path("dir/file");
    fails_with_one_line(
        &env.run(["upload", "k", dir.to_str().unwrap()]),
        "not a regular file",
    );
    fails_with_one_line(&env.run(["upload", "k", "missing-file"]), "missing-file");
    // A regular file is an entry of one path; a device or a symlink to a file is not.
    fails_with_one_line(
        &env.run(["dir", "upload", "k", "/dev/null"]),
        "not a directory or a regular file",
    );
    std::os::unix::fs::symlink(&file, env.path("link")).unwrap();
    fails_with_one_line(&env.run(["dir", "upload", "k", "link"]), "not a symlink");
    fails_with_one_line(
        &env.run(["dir", "upload", "k", "missing-dir"]),
        "missing-dir",
    );
    fails_with_one_line(
        &env.run(["key", "{hash}", "--hash-from", "missing"]),
        "missing",
    );

    env.run(["upload", "k", file.to_str().unwrap()]).ok();
    // DEST is a directory, or inside one that cannot exist.
    fails_with_one_line(
        &env.run(["download", "k", dir.to_str().unwrap()]),
        "directory",
    );
    fails_with_one_line(
        &env.run(["download", "k", "/proc/no-such-dir/dest"]),
        "/proc/no-such-dir",
    );
    assert_eq!(read(&file), b"x");
    assert!(temp_leftovers(&dir).is_empty());
}

#[test]
fn special_files_are_skipped_with_a_warning_and_odd_names_round_trip() {
    let env = TestEnv::file_store();
    let tree = env.path("tree");
    env.write("tree/regular", "data");
    sh(
        "mkfifo tree/fifo && ln -s loop tree/loop && python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('tree/sock')\"",
        env.dir.path(),
    );
    let odd = tree.join(std::ffi::OsStr::from_bytes(b"name-\xff\xfe-not-utf8"));
    std::fs::write(&odd, "odd").unwrap();
    let run = env.run(["dir", "upload", "k", tree.to_str().unwrap()]);
    run.ok();
    assert!(
        run.stderr.contains("skipping") && run.stderr.contains("fifo"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("sock"), "{}", run.stderr);

    let out = env.path("out");
    env.run(["dir", "download", "k", out.to_str().unwrap()])
        .ok();
    assert_eq!(read(out.join("regular")), b"data");
    assert_eq!(
        read(out.join(std::ffi::OsStr::from_bytes(b"name-\xff\xfe-not-utf8"))),
        b"odd"
    );
    assert_eq!(
        std::fs::read_link(out.join("loop")).unwrap().as_os_str(),
        "loop"
    );
    assert!(!out.join("fifo").exists() && !out.join("sock").exists());
}

#[test]
fn bad_numbers_and_durations_exit_2() {
    let mut env = TestEnv::file_store();
    fails_with_one_line(&env.run(["gc", "--grace", "soon"]), "soon");
    fails_with_one_line(&env.run(["prune", "--older-than", "3w"]), "3w");
    env.set("CACHER_JOBS", "many");
    fails_with_one_line(&env.run(["exists", "k"]), "CACHER_JOBS");
    env.set("CACHER_JOBS", "0");
    fails_with_one_line(&env.run(["exists", "k"]), "jobs");
    env.unset("CACHER_JOBS");
    env.set("CACHER_PART_SIZE", "1024");
    fails_with_one_line(&env.run(["exists", "k"]), "part_size");
}
