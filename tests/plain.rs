//! Plain-file commands against a real S3 server (Garage, or moto): download, upload, exists, list,
//! delete, multipart, `--url` seeding and the failure exit codes.

use crate::util::http::{HttpServer, Reply};
use crate::util::{
    TestEnv, bucket, garage, random_bytes, read, rt, server, sh, stored, temp_leftovers, unique,
};

#[test]
fn upload_exists_download_round_trip_is_byte_exact() {
    let env = TestEnv::s3("roundtrip");
    let data = random_bytes(3 * 1024 * 1024 + 17, 1);
    let src = env.write("artifact.bin", &data);

    env.run(["exists", "art/a.bin"]).code(1);
    let up = env.run(["upload", "art/a.bin", src.to_str().unwrap()]);
    up.ok();
    assert!(up.stderr.contains("uploaded"), "{}", up.stderr);
    env.run(["exists", "art/a.bin"]).code(0);
    assert_eq!(
        stored(&format!("{}/art/a.bin", env.prefix)).as_deref(),
        Some(&data[..]),
        "stored byte-for-byte under prefix/key"
    );

    // Its directory is made, as `aws s3 cp` makes it.
    let dest = env.path("out/restored.bin");
    env.run(["download", "art/a.bin", dest.to_str().unwrap()])
        .ok();
    assert_eq!(read(&dest), data);
    let leftovers: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temp files left: {leftovers:?}");
}

/// A cache hit starts with one GET that brings the metadata and the first range: a
/// small file is one request (a HEAD first would be a round trip more), a large one's
/// other ranges follow; an empty one has no byte 0 to ask for (416), so a HEAD follows.
#[test]
fn a_download_starts_with_one_get_and_no_head() {
    let env = TestEnv::s3("oneget");
    let requests = |stderr: &str, verb: &str| {
        stderr
            .lines()
            .filter(|l| l.contains(&format!(" {verb} {}/", env.prefix)))
            .count()
    };
    for (name, size, gets, heads) in [
        ("small", 100 * 1024, 1, 0),
        ("one-range", 8 * 1024 * 1024, 1, 0),
        ("one-range-and-a-byte", 8 * 1024 * 1024 + 1, 2, 0),
        ("large", 20 * 1024 * 1024 + 5, 3, 0),
        ("empty", 0, 1, 1),
    ] {
        let data = random_bytes(size, 7);
        let src = env.write(&format!("{name}.bin"), &data);
        env.run(["upload", name, src.to_str().unwrap()]).ok();
        let dest = env.path(&format!("out-{name}.bin"));
        let run = env.run(["-v", "download", name, dest.to_str().unwrap()]);
        run.ok();
        assert_eq!(read(&dest), data, "{name}");
        assert_eq!(
            requests(&run.stderr, "HEAD"),
            heads,
            "{name}: {}",
            run.stderr
        );
        assert_eq!(requests(&run.stderr, "GET"), gets, "{name}: {}", run.stderr);
    }
    // An object another tool wrote (no cacher metadata) comes the same way.
    let data = random_bytes(300 * 1024, 8);
    crate::util::put_object(&format!("{}/foreign", env.prefix), data.clone());
    let dest = env.path("out-foreign.bin");
    let run = env.run(["-v", "download", "foreign", dest.to_str().unwrap()]);
    run.ok();
    assert_eq!(read(&dest), data);
    assert_eq!(requests(&run.stderr, "HEAD"), 0, "{}", run.stderr);
    assert_eq!(requests(&run.stderr, "GET"), 1, "{}", run.stderr);
}

/// A destination a file cannot replace as asked is refused before anything is
/// fetched: a directory, a path ending in `/`, and a fifo or device, which a rename
/// would replace (`download KEY /dev/null` as root, as CI containers run).
#[test]
fn a_destination_that_is_no_file_path_is_refused_before_any_request() {
    let env = TestEnv::s3("destkinds");
    let src = env.write("f.bin", random_bytes(1000, 9));
    env.run(["upload", "k", src.to_str().unwrap()]).ok();
    let fifo = env.path("fifo");
    sh(&format!("mkfifo '{}'", fifo.display()), env.dir.path());
    let to_fifo = env.path("to-fifo");
    std::os::unix::fs::symlink(&fifo, &to_fifo).unwrap();
    let mut dests = vec![
        (fifo.clone(), "is a device, fifo or socket"),
        // As /dev/stdout is: a symlink to one.
        (to_fifo, "is a device, fifo or socket"),
        (env.path("newdir/"), "names a directory"),
        (env.path("newdir/.."), "names a directory"),
        (env.dir.path().to_path_buf(), "is a directory"),
    ];
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let null = env.path("null");
        sh(&format!("mknod '{}' c 1 3", null.display()), env.dir.path());
        dests.push((null, "is a device, fifo or socket"));
    }
    for (dest, says) in dests {
        let before = std::fs::symlink_metadata(&dest).map(|m| m.file_type()).ok();
        // A mistake in what was asked: not softened into a miss.
        let mut cmd = env.cmd(["-v", "download", "k", dest.to_str().unwrap()]);
        cmd.env("CACHER_ON_ERROR", "warn");
        let run = crate::util::Run::of(cmd.output().unwrap());
        run.code(2);
        let errors: Vec<_> = run.stderr.lines().filter(|l| !l.contains("[v]")).collect();
        assert_eq!(errors.len(), 1, "{}", run.stderr);
        assert!(errors[0].contains(says), "{}", run.stderr);
        assert!(
            !run.stderr.contains(" GET "),
            "nothing fetched: {}",
            run.stderr
        );
        let after = std::fs::symlink_metadata(&dest).map(|m| m.file_type()).ok();
        assert_eq!(before, after, "{} left as it was", dest.display());
    }
    assert!(!env.path("newdir").exists());
}

/// A cached version recorded with another sha256 than `--sha256` pins is refused on
/// its first GET: the rest of it is not worth fetching.
#[test]
fn a_pinned_sha256_the_object_was_not_recorded_with_stops_at_the_first_get() {
    let env = TestEnv::s3("pinfirst");
    let src = env.write("big.bin", random_bytes(20 * 1024 * 1024, 10));
    env.run(["upload", "k", src.to_str().unwrap()]).ok();
    let dest = env.write("dest.bin", "old");
    let other = "ab".repeat(32);
    let run = env.run([
        "-v",
        "download",
        "k",
        dest.to_str().unwrap(),
        "--sha256",
        &other,
    ]);
    run.code(2);
    assert!(run.stderr.contains(&other), "{}", run.stderr);
    assert_eq!(run.stderr.matches(" GET ").count(), 1, "{}", run.stderr);
    assert_eq!(read(&dest), b"old");
}

#[test]
fn upload_skips_an_existing_key_unless_forced() {
    let env = TestEnv::s3("skip");
    let first = env.write("v1", "version one");
    let second = env.write("v2", "version two");
    env.run(["upload", "k", first.to_str().unwrap()]).ok();
    let run = env.run(["upload", "k", second.to_str().unwrap()]);
    run.ok();
    assert!(run.stderr.contains("skipped"), "{}", run.stderr);
    let key = format!("{}/k", env.prefix);
    assert_eq!(stored(&key).unwrap(), b"version one");
    env.run(["upload", "k", second.to_str().unwrap(), "--force"])
        .ok();
    assert_eq!(stored(&key).unwrap(), b"version two");
}

#[test]
fn multipart_round_trip_of_200_mib_is_byte_exact() {
    let env = TestEnv::s3("multipart");
    let data = random_bytes(200 * 1024 * 1024 + 123, 2);
    let src = env.write("big.bin", &data);
    env.run(["upload", "big.bin", src.to_str().unwrap()]).ok();
    let info = rt()
        .block_on(bucket().head(&format!("{}/big.bin", env.prefix)))
        .unwrap()
        .expect("object exists");
    assert_eq!(info.size, data.len() as u64);
    assert!(
        info.etag.as_deref().unwrap_or("").contains('-'),
        "a multipart ETag has a part count: {:?}",
        info.etag
    );
    let dest = env.path("big.out");
    env.run(["download", "big.bin", dest.to_str().unwrap()])
        .ok();
    assert!(read(&dest) == data, "downloaded bytes differ");
}

#[test]
fn download_miss_without_url_exits_3_and_writes_nothing() {
    let env = TestEnv::s3("miss");
    let dest = env.path("never");
    env.run(["download", "nothing/here", dest.to_str().unwrap()])
        .code(3);
    assert!(!dest.exists());
}

#[test]
fn download_url_on_miss_writes_dest_and_seeds_the_cache() {
    let env = TestEnv::s3("url");
    let body = random_bytes(1024 * 1024 + 5, 3);
    let server = HttpServer::start(vec![("/go.tar.gz", Reply::Body(body.clone()))]);
    let url = server.url("/go.tar.gz");
    let digest = hex_sha256(&body);

    let dest = env.path("go.tar.gz");
    let args = [
        "download",
        "golang/go.tar.gz",
        dest.to_str().unwrap(),
        "--url",
        &url,
        "--sha256",
        &digest,
    ];
    env.run(args).ok();
    assert_eq!(read(&dest), body);
    assert_eq!(server.hits("/go.tar.gz"), 1);
    assert_eq!(
        stored(&format!("{}/golang/go.tar.gz", env.prefix)).unwrap(),
        body,
        "the miss seeded the cache"
    );

    std::fs::remove_file(&dest).unwrap();
    env.run(args).ok();
    assert_eq!(read(&dest), body);
    assert_eq!(
        server.hits("/go.tar.gz"),
        1,
        "the second run hit the cache, not the URL"
    );
}

#[test]
fn sha256_mismatch_exits_2_uploads_nothing_and_keeps_dest() {
    let env = TestEnv::s3("mismatch");
    let server = HttpServer::start(vec![("/f", Reply::Body(b"tampered".to_vec()))]);
    let wrong = "0".repeat(64);
    let dest = env.path("dest");
    let run = env.run([
        "download",
        "k",
        dest.to_str().unwrap(),
        "--url",
        &server.url("/f"),
        "--sha256",
        &wrong,
    ]);
    run.code(2);
    assert!(run.stderr.contains("sha256 mismatch"), "{}", run.stderr);
    assert!(!dest.exists(), "DEST not created");
    env.run(["exists", "k"]).code(1);

    std::fs::write(&dest, "previous content").unwrap();
    env.run([
        "download",
        "k",
        dest.to_str().unwrap(),
        "--url",
        &server.url("/f"),
        "--sha256",
        &wrong,
    ])
    .code(2);
    assert_eq!(read(&dest), b"previous content", "DEST left as it was");
    assert_eq!(temp_leftovers(env.dir.path()), Vec::<String>::new());
}

#[test]
fn a_cached_object_that_fails_the_pinned_sha256_is_not_restored() {
    let env = TestEnv::s3("stale");
    let src = env.write("old", "old release");
    env.run(["upload", "tool.tgz", src.to_str().unwrap()]).ok();
    let dest = env.path("tool.tgz");
    let run = env.run([
        "download",
        "tool.tgz",
        dest.to_str().unwrap(),
        "--sha256",
        &hex_sha256(b"new release"),
    ]);
    run.code(2);
    assert!(!dest.exists());

    // With --url the stale entry is replaced by the verified download.
    let server = HttpServer::start(vec![("/t", Reply::Body(b"new release".to_vec()))]);
    env.run([
        "download",
        "tool.tgz",
        dest.to_str().unwrap(),
        "--sha256",
        &hex_sha256(b"new release"),
        "--url",
        &server.url("/t"),
    ])
    .ok();
    assert_eq!(read(&dest), b"new release");
    assert_eq!(
        stored(&format!("{}/tool.tgz", env.prefix)).unwrap(),
        b"new release"
    );
}

#[test]
fn url_failures_exit_2_without_dest_or_upload() {
    let env = TestEnv::s3("urlfail");
    let server = HttpServer::start(vec![
        ("/500", Reply::Status(500)),
        (
            "/short",
            Reply::Truncated {
                body: vec![7u8; 1000],
                len: 5000,
            },
        ),
    ]);
    for path in ["/500", "/short", "/404"] {
        let dest = env.path("d");
        let run = env.run([
            "download",
            "k",
            dest.to_str().unwrap(),
            "--url",
            &server.url(path),
        ]);
        run.code(2);
        assert!(!dest.exists(), "{path}: no DEST");
        env.run(["exists", "k"]).code(1);
    }
}

#[test]
fn list_is_delimited_recursive_and_root_relative() {
    let env = TestEnv::s3("list");
    let f = env.write("f", "12345");
    for key in ["a/one", "a/two", "a/deep/three", "top"] {
        env.run(["upload", key, f.to_str().unwrap()]).ok();
    }
    let run = env.run(["list"]);
    let lines: Vec<&str> = run.ok().stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0], format!("{:>30} a/", "PRE"));
    assert!(lines[1].ends_with("          5 top"), "{}", lines[1]);
    assert!(lines[1].chars().nth(4) == Some('-') && lines[1].chars().nth(13) == Some(':'));

    let run = env.run(["list", "a/"]);
    let names: Vec<&str> = run
        .ok()
        .stdout
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(names, ["deep/", "one", "two"]);

    let run = env.run(["list", "--recursive"]);
    let names: Vec<&str> = run
        .ok()
        .stdout
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(names, ["a/deep/three", "a/one", "a/two", "top"]);

    let run = env.run(["list", "--root", &format!("{}/a/d", env.prefix)]);
    assert_eq!(run.ok().stdout.trim_end(), format!("{:>30} deep/", "PRE"));
}

#[test]
fn list_paginates_through_10000_keys() {
    let env = TestEnv::s3("many");
    let store = bucket();
    let prefix = env.prefix.clone();
    rt().block_on(async {
        use futures::StreamExt;
        futures::stream::iter(0..10_000)
            .map(|i| {
                let store = store.clone();
                let key = format!("{prefix}/k/{i:05}");
                async move {
                    store
                        .put(
                            &key,
                            cacher::store::Body::Bytes(bytes::Bytes::from_static(b"x")),
                            &Default::default(),
                        )
                        .await
                        .expect("put")
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
    });
    let run = env.run(["list", "k/"]);
    let lines: Vec<&str> = run.ok().stdout.lines().collect();
    assert_eq!(lines.len(), 10_000);
    assert!(lines[9_999].ends_with(" 09999"), "{}", lines[9_999]);
    let run = env.run(["list", "--recursive"]);
    assert_eq!(run.ok().stdout.lines().count(), 10_000);
}

#[test]
fn delete_invalidates_and_reports_a_missing_key() {
    let env = TestEnv::s3("delete");
    let f = env.write("f", "x");
    env.run(["upload", "gone", f.to_str().unwrap()]).ok();
    env.run(["delete", "gone"]).ok();
    env.run(["exists", "gone"]).code(1);
    assert!(stored(&format!("{}/gone", env.prefix)).is_none());
    let run = env.run(["delete", "gone"]);
    run.code(1);
    assert!(run.stderr.contains("not cached"), "{}", run.stderr);
}

#[test]
fn missing_credentials_exit_2_naming_what_to_set() {
    let mut env = TestEnv::s3("nocreds");
    env.unset("CACHER_S3_KEY_ID");
    env.unset("CACHER_S3_SECRET");
    let run = env.run(["exists", "k"]);
    run.code(2);
    assert!(run.stderr.contains("CACHER_S3_KEY_ID"), "{}", run.stderr);
}

#[test]
fn wrong_secret_exits_2_never_1_and_never_prints_the_secret() {
    // Needs a server that checks signatures (moto accepts any secret).
    let mut env = TestEnv::on(garage(), "badsecret");
    let wrong = "f".repeat(64);
    env.set("CACHER_S3_SECRET", &wrong);
    let f = env.write("f", "x");
    for args in [
        vec!["exists", "k", "-v"],
        vec!["upload", "k", f.to_str().unwrap(), "-v"],
        vec!["download", "k", "out", "-v"],
        vec!["list", "-v"],
        vec!["delete", "k", "-v"],
        vec!["doctor", "-v"],
    ] {
        let run = env.run(&args);
        run.code(2);
        let all = run.all_output();
        assert!(!all.contains(&wrong), "{args:?} leaked the secret: {all}");
        assert!(
            !all.contains(&garage().secret),
            "{args:?} leaked the real secret"
        );
        assert!(
            all.to_lowercase().contains("access denied") || all.contains("403"),
            "{args:?}: {all}"
        );
    }
}

#[test]
fn unreachable_endpoint_exits_2() {
    let mut env = TestEnv::s3("unreachable");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.set("CACHER_ENDPOINT", &format!("http://127.0.0.1:{port}"));
    let started = std::time::Instant::now();
    let run = env.run(["exists", "k"]);
    run.code(2);
    assert!(run.stderr.starts_with("cacher: "), "{}", run.stderr);
    assert!(started.elapsed().as_secs() < 60);
}

#[test]
fn missing_bucket_exits_2_naming_the_bucket() {
    let mut env = TestEnv::s3("nobucket");
    let name = unique("no-such-bucket");
    env.set("CACHER_BUCKET", &name);
    let run = env.run(["exists", "k"]);
    run.code(2);
    assert!(run.stderr.contains(&name), "{}", run.stderr);
    let run = env.run(["doctor"]);
    run.code(2);
    assert!(run.stderr.contains(&name), "{}", run.stderr);
}

pub fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Sends `signal` to a `download --url` of a slow body and checks it exits with
/// `code`, leaving no DEST, no temp file and no upload.
fn a_signal_stops_a_download_cleanly(name: &str, signal: i32, code: i32) {
    let env = TestEnv::s3(name);
    let server = HttpServer::start(vec![(
        "/slow",
        Reply::Slow {
            body: vec![1u8; 64 * 1024],
            pause_ms: 20,
        },
    )]);
    let dest = env.path("dest.bin");
    let child = env
        .cmd([
            "download",
            "k",
            dest.to_str().unwrap(),
            "--url",
            &server.url("/slow"),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dest.exists(), "DEST not created");
    assert_eq!(temp_leftovers(env.dir.path()), Vec::<String>::new());
    env.run(["exists", "k"]).code(1);
}

#[test]
fn ctrl_c_exits_130_and_leaves_no_partial_file() {
    a_signal_stops_a_download_cleanly("sigint", libc::SIGINT, 130);
}

#[test]
fn sigterm_exits_143_and_leaves_no_partial_file() {
    a_signal_stops_a_download_cleanly("sigterm-plain", libc::SIGTERM, 143);
}

#[test]
fn racing_uploads_without_force_leave_one_complete_object() {
    // Single PUTs and multipart uploads (9 MiB over an 8 MiB threshold), on S3 and file://.
    let cases = [300_000, 9 * 1024 * 1024]
        .into_iter()
        .flat_map(|size| [(size, TestEnv::s3("race")), (size, TestEnv::file_store())]);
    for (size, mut env) in cases {
        env.set("CACHER_MULTIPART_THRESHOLD", "8388608");
        let contents: Vec<Vec<u8>> = (0..6).map(|i| random_bytes(size, 50 + i)).collect();
        let uploads: Vec<Vec<String>> = contents
            .iter()
            .enumerate()
            .map(|(i, data)| {
                let path = env.write(&format!("src{i}"), data).display().to_string();
                ["upload", "raced", &path].map(String::from).to_vec()
            })
            .collect();
        let runs = env.run_all_at_once(&uploads);
        let dest = env.path("dest");
        env.run(["download", "raced", dest.to_str().unwrap()]).ok();
        let got = read(&dest);
        assert!(contents.contains(&got), "one writer's complete content");

        let winners: Vec<usize> = (0..runs.len())
            .filter(|&i| !runs[i].stderr.contains("skipped"))
            .collect();
        assert!(
            winners.iter().any(|&w| contents[w] == got),
            "a writer that reported success is the one cached: {runs:?}"
        );
        if env.prefix.is_empty() {
            // The file store's conditional write is a hard link: exactly one wins.
            assert_eq!(winners.len(), 1, "{runs:?}");
        } else if server().honours_if_none_match() {
            // Conditional writes refused some writers with 412. Not exactly one winner:
            // moto checks If-None-Match and completes in two steps, so racing
            // completions can both pass (AWS does this atomically); Garage ignores the
            // header and lets the last complete write win.
            assert!(winners.len() < runs.len(), "{runs:?}");
        }
    }
}

#[test]
fn a_stalled_url_download_is_abandoned_after_the_timeout() {
    let mut env = TestEnv::s3("urlstall");
    env.set("CACHER_TIMEOUT", "2");
    let server = HttpServer::start(vec![(
        "/stall",
        Reply::Stall {
            body: vec![7u8; 10_000],
            len: 1_000_000,
        },
    )]);
    let dest = env.path("dest.bin");
    let started = std::time::Instant::now();
    let run = env.run([
        "download",
        "k",
        dest.to_str().unwrap(),
        "--url",
        &server.url("/stall"),
    ]);
    run.code(2);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "gave up in bounded time: {:?}",
        started.elapsed()
    );
    assert!(!dest.exists(), "DEST not created");
    assert_eq!(temp_leftovers(env.dir.path()), Vec::<String>::new());
    env.run(["exists", "k"]).code(1);
}

#[test]
fn list_prints_local_time_as_aws_s3_ls_does() {
    let mut env = TestEnv::s3("listtz");
    env.run(["upload", "k", env.write("f", "x").to_str().unwrap()])
        .ok();
    let time_of = |run: &crate::util::Run| {
        let line = run.stdout.lines().next().unwrap_or_default().to_string();
        let stamp = line.get(..19).unwrap_or_default().to_string();
        time::PrimitiveDateTime::parse(
            &stamp,
            time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]"),
        )
        .unwrap_or_else(|e| panic!("{stamp:?}: {e}"))
    };
    env.set("TZ", "UTC0");
    let utc = time_of(env.run(["list"]).ok());
    env.set("TZ", "IST-5:30");
    let india = time_of(env.run(["list"]).ok());
    assert_eq!(india - utc, time::Duration::minutes(330));
}

#[test]
fn stats_and_exists_say_what_entries_hold_and_cost() {
    let env = TestEnv::s3("stats");
    let file = random_bytes(300_000, 31);
    env.write("file.bin", &file);
    // Two trees sharing most of their bytes: the second costs little.
    let shared = random_bytes(3 * 1024 * 1024, 32);
    env.write("v1/shared.bin", &shared);
    env.write("v1/own.txt", "one");
    env.write("v2/shared.bin", &shared);
    env.write("v2/own.txt", "two!");
    env.run(["upload", "files/a", "file.bin"]).ok();
    env.run(["dir", "upload", "trees/1", "v1"]).ok();
    env.run(["dir", "upload", "trees/2", "v2"]).ok();

    let tree_bytes = |own: u64| shared.len() as u64 + own;
    let exists = env.run(["--json", "dir", "exists", "trees/1"]);
    let record: serde_json::Value = serde_json::from_str(exists.ok().stdout.trim()).unwrap();
    assert_eq!(record["bytes"], tree_bytes(3), "{record}");
    let stored = record["stored_bytes"].as_u64().unwrap();
    assert!(stored > 1000 && stored < 4 * 1024 * 1024, "{record}");
    assert!(
        record["size"].as_u64().unwrap() < 10_000,
        "the manifest: {record}"
    );
    let plain = env.run(["--json", "exists", "files/a"]);
    let record: serde_json::Value = serde_json::from_str(plain.ok().stdout.trim()).unwrap();
    assert_eq!(record["bytes"], file.len() as u64, "{record}");

    let run = env.run(["--json", "stats"]);
    let s: serde_json::Value = serde_json::from_str(run.ok().stdout.trim()).unwrap();
    assert_eq!(
        (
            s["entries"].as_u64(),
            s["files"].as_u64(),
            s["trees"].as_u64()
        ),
        (Some(3), Some(1), Some(2)),
        "{s}"
    );
    assert_eq!(
        s["logical_bytes"].as_u64().unwrap(),
        file.len() as u64 + tree_bytes(3) + tree_bytes(4),
        "{s}"
    );
    // Stored: the packs the trees use (as listed in the bucket) plus the entries.
    let packs: u64 = rt()
        .block_on(bucket().list(&format!("{}/.cacher/packs/", env.prefix), None))
        .unwrap()
        .objects
        .iter()
        .map(|o| o.size)
        .sum();
    assert_eq!(s["pack_bytes"].as_u64(), Some(packs), "{s}");
    assert_eq!(
        s["stored_bytes"].as_u64().unwrap(),
        packs + s["entry_bytes"].as_u64().unwrap(),
        "{s}"
    );
    assert!(
        s["dedup_ratio"].as_f64().unwrap() > 1.5,
        "shared bytes stored once: {s}"
    );
    assert!(s["newest_use"].is_string(), "{s}");
    // Under a prefix: only the trees.
    let run = env.run(["--json", "stats", "trees/"]);
    let t: serde_json::Value = serde_json::from_str(run.ok().stdout.trim()).unwrap();
    assert_eq!(
        (t["entries"].as_u64(), t["files"].as_u64()),
        (Some(2), Some(0)),
        "{t}"
    );
    // The text form names the same figures.
    let text = env.run(["stats"]);
    assert!(
        text.ok()
            .stdout
            .contains("3 under (all): 1 files, 2 trees, 0 images"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("dedup ratio:"), "{}", text.stdout);

    // `cacher stats | head -1`: a reader that goes away early ends it quietly.
    let mut child = env
        .cmd(["stats"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let closed = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&closed.stderr);
    assert_eq!(closed.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn list_shows_what_entries_hold_not_their_manifests_size() {
    let env = TestEnv::s3("list-sizes");
    let tree = random_bytes(1_500_000, 33);
    env.write("t/blob.bin", &tree);
    env.write("plain.bin", b"twelve bytes");
    env.run(["dir", "upload", "tree", "t"]).ok();
    env.run(["upload", "plain", "plain.bin"]).ok();
    let listed = env.run(["--json", "list"]);
    let records: Vec<serde_json::Value> = listed
        .ok()
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |name: &str| records.iter().find(|r| r["name"] == name).unwrap().clone();
    let t = find("tree");
    assert_eq!(
        (t["entry"].as_str(), t["bytes"].as_u64()),
        (Some("tree"), Some(tree.len() as u64)),
        "{t}"
    );
    assert!(
        t["size"].as_u64().unwrap() < 10_000,
        "the manifest's own size: {t}"
    );
    let p = find("plain");
    assert_eq!(
        (p["entry"].as_str(), p["bytes"].as_u64()),
        (Some("file"), Some(12)),
        "{p}"
    );
    let text = env.run(["list"]);
    assert!(
        text.ok()
            .stdout
            .lines()
            .any(|l| l.contains(&format!(" {} tree (tree)", tree.len()))),
        "{}",
        text.stdout
    );
}
