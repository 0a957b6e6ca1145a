//! `--on-error warn`: errors of the cache itself (no credentials, a server that is
//! down) turn into one warning and a miss or a skipped upload; mistakes in what was
//! asked and failures of the `--url` fetch stay errors.

use crate::util::http::{HttpServer, Reply};
use crate::util::{TestEnv, read};

/// An environment whose cache cannot be used: the shared server, no credentials.
fn without_credentials(name: &str) -> TestEnv {
    let mut env = TestEnv::s3(name);
    env.unset("CACHER_S3_KEY_ID");
    env.unset("CACHER_S3_SECRET");
    env
}

fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("warning")).collect()
}

#[test]
fn without_credentials_downloads_miss_and_uploads_are_skipped_with_one_warning() {
    let mut env = without_credentials("soft-creds");
    let file = env.write("artifact.bin", "payload");
    env.write("tree/a/b.txt", "tree content");
    let tree = env.path("tree");
    let dest = env.path("out/artifact.bin");
    let out = env.path("restored");

    // Strict by default: exit 2, as the seed specifies.
    let strict = env.run(["download", "k", dest.to_str().unwrap()]);
    strict.code(2);
    assert!(strict.stderr.contains("no S3 key id"), "{}", strict.stderr);

    env.set("CACHER_ON_ERROR", "warn");
    let download = env.run(["download", "k", dest.to_str().unwrap()]);
    download.code(3);
    let dir_download = env.run(["dir", "download", "t", out.to_str().unwrap()]);
    dir_download.code(1);
    let exists = env.run(["exists", "k"]);
    exists.code(1);
    for run in [&download, &dir_download, &exists] {
        let lines = warnings(&run.stderr);
        assert_eq!(lines.len(), 1, "one warning: {}", run.stderr);
        assert!(lines[0].contains("no S3 key id"), "{}", run.stderr);
        assert!(lines[0].contains("treated as a miss"), "{}", run.stderr);
    }
    assert!(!dest.exists() && !out.exists(), "nothing written");

    let upload = env.run(["upload", "k", file.to_str().unwrap()]);
    upload.code(0);
    let dir_upload = env.run(["--json", "dir", "upload", "t", tree.to_str().unwrap()]);
    dir_upload.code(0);
    for run in [&upload, &dir_upload] {
        let lines = warnings(&run.stderr);
        assert_eq!(lines.len(), 1, "one warning: {}", run.stderr);
        assert!(lines[0].contains("not uploaded"), "{}", run.stderr);
    }
    let record: serde_json::Value = serde_json::from_str(dir_upload.stdout.trim()).unwrap();
    assert_eq!(record["result"], "skipped", "{record}");
    assert!(record["error"].as_str().unwrap().contains("no S3 key id"));

    // The flag does the same as the variable, and beats it.
    env.unset("CACHER_ON_ERROR");
    env.run(["--on-error", "warn", "upload", "k", file.to_str().unwrap()])
        .code(0);
    env.set("CACHER_ON_ERROR", "warn");
    env.run([
        "--on-error",
        "strict",
        "upload",
        "k",
        file.to_str().unwrap(),
    ])
    .code(2);

    // Nothing reached the bucket.
    let g = crate::util::server();
    env.set("CACHER_S3_KEY_ID", &g.key_id);
    env.set("CACHER_S3_SECRET", &g.secret);
    env.run(["exists", "k"]).code(1);
    env.run(["dir", "exists", "t"]).code(1);
}

#[test]
fn mistakes_in_what_was_asked_stay_errors() {
    let mut env = without_credentials("soft-input");
    env.set("CACHER_ON_ERROR", "warn");
    let file = env.write("f", "x");
    // A key no store accepts, a bad digest, a --hash-from file that is missing.
    env.run(["upload", "a/.cacher/b", file.to_str().unwrap()])
        .code(2);
    env.run([
        "download",
        "k",
        "out",
        "--url",
        "http://127.0.0.1:9/",
        "--sha256",
        "xyz",
    ])
    .code(2);
    let missing = env.run([
        "dir",
        "download",
        "deps-{hash}",
        "out",
        "--hash-from",
        "no-such.lock",
    ]);
    missing.code(2);
    assert!(
        missing.stderr.contains("no-such.lock"),
        "{}",
        missing.stderr
    );
    // What to upload is not there; a bucket without an endpoint.
    env.run(["upload", "k", "no-such-file"]).code(2);
    env.run(["dir", "upload", "k", "no-such-dir"]).code(2);
    env.run(["dir", "upload", "k", "/dev/null"]).code(2);
    let mut no_endpoint = TestEnv::bare();
    no_endpoint.set("CACHER_BUCKET", "b");
    no_endpoint.set("CACHER_ON_ERROR", "warn");
    let run = no_endpoint.run(["exists", "k"]);
    run.code(2);
    assert!(run.stderr.contains("no endpoint"), "{}", run.stderr);
    // A value the setting does not take.
    env.set("CACHER_ON_ERROR", "sometimes");
    let bad = env.run(["exists", "k"]);
    bad.code(2);
    assert!(bad.stderr.contains("CACHER_ON_ERROR"), "{}", bad.stderr);
}

#[test]
fn with_the_server_down_a_download_with_url_still_fetches_the_file() {
    let body = b"release tarball".to_vec();
    let http = HttpServer::start(vec![
        ("/tool.tar.gz", Reply::Body(body.clone())),
        ("/gone", Reply::Status(404)),
    ]);
    let mut env = TestEnv::s3("soft-down");
    // Nothing listens on the discard port.
    env.set("CACHER_ENDPOINT", "http://127.0.0.1:9");
    env.set("CACHER_TIMEOUT", "2");
    let dest = env.path("tool.tar.gz");
    let url = http.url("/tool.tar.gz");

    env.run(["download", "k", dest.to_str().unwrap(), "--url", &url])
        .code(2);
    assert!(!dest.exists());

    env.set("CACHER_ON_ERROR", "warn");
    let run = env.run(["download", "k", dest.to_str().unwrap(), "--url", &url]);
    run.code(0);
    assert_eq!(read(&dest), body);
    assert!(
        run.stderr.contains("warning") && run.stderr.contains("127.0.0.1:9"),
        "{}",
        run.stderr
    );
    // The URL's own failure is not the cache's: still an error.
    let gone = env.path("gone");
    env.run([
        "download",
        "k2",
        gone.to_str().unwrap(),
        "--url",
        &http.url("/gone"),
    ])
    .code(2);
    assert!(!gone.exists());
}
