//! Signed entries: main-branch jobs sign with a private key, pull-request jobs hold only
//! the public key, and nothing a pull-request job writes is restored by main.

use std::path::{Path, PathBuf};

use cacher::store::{Body, PutOptions};

use crate::util::http::{HttpServer, Reply};
use crate::util::{TestEnv, bucket, random_bytes, read, rt, snapshot, stored};

/// A key pair made with `cacher keygen` in the test's dir: (private, public).
fn keygen(env: &TestEnv, name: &str) -> (PathBuf, PathBuf) {
    let private = env.path(name);
    env.run(["keygen", private.to_str().unwrap()]).ok();
    let public = PathBuf::from(format!("{}.pub", private.display()));
    (private, public)
}

/// The next commands run as a main-branch job: signing with `private`, restoring only
/// what a trusted key signed (its own).
fn as_main(env: &mut TestEnv, private: &Path) {
    env.set("CACHER_SIGNING_KEY", private.to_str().unwrap());
    env.unset("CACHER_TRUSTED_KEYS");
    env.set("CACHER_REQUIRE_SIGNATURE", "true");
}

/// The next commands run as a pull-request job: no private key, `public` trusted, and
/// unsigned entries (its own) accepted.
fn as_pull_request(env: &mut TestEnv, public: &Path) {
    env.unset("CACHER_SIGNING_KEY");
    env.set("CACHER_TRUSTED_KEYS", public.to_str().unwrap());
    env.unset("CACHER_REQUIRE_SIGNATURE");
}

fn write_tree(root: &Path, files: &[(&str, &[u8])]) {
    for (rel, data) in files {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
}

/// The object under `full_key` with its metadata, as a HEAD and a GET return them.
fn object(full_key: &str) -> (Vec<u8>, PutOptions) {
    let info = rt()
        .block_on(bucket().head(full_key))
        .unwrap()
        .expect("object exists");
    let opts = PutOptions {
        sha256: info.sha256,
        signature: info.signature,
        ..PutOptions::default()
    };
    (stored(full_key).unwrap(), opts)
}

/// Writes `data` with metadata `opts` under `full_key`, as anyone holding the bucket's
/// credentials can (`aws s3 cp --metadata`).
fn put_with(full_key: &str, data: Vec<u8>, opts: &PutOptions) {
    let body = Body::Bytes(bytes::Bytes::from(data));
    rt().block_on(bucket().put(full_key, body, opts)).unwrap();
}

#[test]
fn a_signed_tree_restores_and_a_pull_request_cannot_replace_what_main_restores() {
    let mut env = TestEnv::s3("signed-dir");
    let (private, public) = keygen(&env, "main.key");
    let src = env.path("src");
    write_tree(
        &src,
        &[
            ("a.txt", b"from main"),
            ("sub/b.bin", &random_bytes(300_000, 1)),
        ],
    );
    let src_arg = src.to_str().unwrap().to_string();

    as_main(&mut env, &private);
    env.run(["dir", "upload", "deps", &src_arg]).ok();
    let (_, opts) = object(&format!("{}/deps", env.prefix));
    assert!(
        opts.signature
            .as_deref()
            .unwrap_or("")
            .starts_with("ed25519:"),
        "the manifest carries a signature: {opts:?}"
    );
    let fresh = env.path("fresh");
    env.run(["dir", "download", "deps", fresh.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&fresh), snapshot(&src));

    // A pull-request job reads main's entry, then overwrites it with its own tree.
    as_pull_request(&mut env, &public);
    let pr_copy = env.path("pr-copy");
    env.run(["dir", "download", "deps", pr_copy.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&pr_copy), snapshot(&src));
    let evil = env.path("evil");
    write_tree(&evil, &[("a.txt", b"planted"), ("sub/b.bin", b"x")]);
    env.run(["dir", "upload", "deps", evil.to_str().unwrap(), "--force"])
        .ok();
    // Its own unsigned entry is what it restores next.
    let pr_next = env.path("pr-next");
    env.run(["dir", "download", "deps", pr_next.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&pr_next), snapshot(&evil));

    // Main refuses it: a miss, and the directory it restores into stays as it was.
    as_main(&mut env, &private);
    let before = snapshot(&fresh);
    let run = env.run(["dir", "download", "deps", fresh.to_str().unwrap()]);
    run.code(1);
    assert!(
        run.stderr
            .contains("/deps is not trusted: it is not signed"),
        "the warning names the key and the reason: {}",
        run.stderr
    );
    assert_eq!(snapshot(&fresh), before, "nothing written");
    let empty = env.path("empty");
    env.run(["dir", "download", "deps", empty.to_str().unwrap()])
        .code(1);
    assert!(!empty.exists(), "no directory made for a refused entry");
    env.run(["dir", "exists", "deps"]).code(1);

    // Main's next upload replaces the entry without --force, signed again.
    let run = env.run(["dir", "upload", "deps", &src_arg]);
    assert!(
        run.ok().stderr.contains("replacing it with a signed entry"),
        "{}",
        run.stderr
    );
    let again = env.path("again");
    env.run(["dir", "download", "deps", again.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&again), snapshot(&src));

    // A pull-request job without the private key does not replace it without --force.
    as_pull_request(&mut env, &public);
    let run = env.run(["dir", "upload", "deps", evil.to_str().unwrap()]);
    assert!(run.ok().stderr.contains("skipped"), "{}", run.stderr);
}

#[test]
fn a_manifest_with_one_flipped_byte_or_another_entrys_signature_is_refused() {
    let mut env = TestEnv::s3("signed-tamper");
    let (private, _) = keygen(&env, "main.key");
    as_main(&mut env, &private);
    let (one, two) = (env.path("one"), env.path("two"));
    write_tree(&one, &[("f", &random_bytes(100_000, 2))]);
    write_tree(&two, &[("f", &random_bytes(100_000, 3))]);
    env.run(["dir", "upload", "one", one.to_str().unwrap()])
        .ok();
    env.run(["dir", "upload", "two", two.to_str().unwrap()])
        .ok();
    let key_one = format!("{}/one", env.prefix);
    let (manifest, opts) = object(&key_one);

    // One byte of the chunk table flipped, metadata kept: the bytes no longer hash to
    // the signed sha256.
    let mut flipped = manifest.clone();
    let at = flipped.len() - 5;
    flipped[at] ^= 0x01;
    put_with(&key_one, flipped.clone(), &opts);
    let dest = env.path("dest");
    let run = env.run(["dir", "download", "one", dest.to_str().unwrap()]);
    run.code(1);
    assert!(
        run.stderr.contains("does not hash to the sha256"),
        "{}",
        run.stderr
    );
    assert!(!dest.exists());

    // The same bytes with their own sha256 and the old signature: the signature fails.
    let resigned = PutOptions {
        sha256: Some(sha256_hex(&flipped)),
        ..opts.clone()
    };
    put_with(&key_one, flipped, &resigned);
    let run = env.run(["dir", "download", "one", dest.to_str().unwrap()]);
    run.code(1);
    assert!(
        run.stderr
            .contains("does not match its key, size and sha256"),
        "{}",
        run.stderr
    );

    // Entry two's manifest and signature copied under key one: signed for another key.
    let (manifest_two, opts_two) = object(&format!("{}/two", env.prefix));
    put_with(&key_one, manifest_two, &opts_two);
    env.run(["dir", "download", "one", dest.to_str().unwrap()])
        .code(1);
    assert!(!dest.exists());

    // The original, put back as it was, restores.
    put_with(&key_one, manifest, &opts);
    env.run(["dir", "download", "one", dest.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&dest), snapshot(&one));
}

/// A private key written by `openssl genpkey -algorithm ed25519` (OpenSSL 3.0).
const OPENSSL_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIIjE/UBZRwP6kVw5kmx755TWTxcSXyOCrGk4cXN5Ef8J
-----END PRIVATE KEY-----
";

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[test]
fn plain_files_are_signed_in_metadata_and_a_replaced_body_is_refused() {
    let mut env = TestEnv::s3("signed-plain");
    let (private, public) = keygen(&env, "main.key");
    let data = random_bytes(6 * 1024 * 1024 + 5, 4);
    let small = env.write("small.bin", b"small file");
    let big = env.write("big.bin", &data);
    // Big files go up in parts, whose sha256 (and so signature) needs a pass first.
    env.set("CACHER_MULTIPART_THRESHOLD", "1048576");
    as_main(&mut env, &private);
    env.run(["upload", "small", small.to_str().unwrap()]).ok();
    env.run(["upload", "big", big.to_str().unwrap()]).ok();
    let big_key = format!("{}/big", env.prefix);
    assert_eq!(
        stored(&big_key).unwrap(),
        data,
        "the body is the file itself"
    );
    let (_, big_opts) = object(&big_key);
    assert_eq!(big_opts.sha256.as_deref(), Some(sha256_hex(&data).as_str()));
    assert!(big_opts.signature.is_some());
    for key in ["small", "big"] {
        let dest = env.path(&format!("{key}.out"));
        env.run(["download", key, dest.to_str().unwrap()]).ok();
    }
    assert_eq!(read(env.path("big.out")), data);
    assert_eq!(read(env.path("small.out")), b"small file");

    // Another body under main's metadata (`aws s3 cp --metadata` can do it): its bytes
    // no longer hash to the signed sha256, so it is not restored.
    let small_key = format!("{}/small", env.prefix);
    let (_, small_opts) = object(&small_key);
    put_with(&small_key, b"planted!!!".to_vec(), &small_opts);
    let dest = env.path("small.out");
    let run = env.run(["download", "small", dest.to_str().unwrap()]);
    run.code(3);
    assert!(run.stderr.contains("is corrupt"), "{}", run.stderr);
    assert_eq!(read(&dest), b"small file", "destination untouched");
    // Deleted, so the next upload writes it again instead of skipping it as cached.
    assert!(stored(&small_key).is_none());
    env.run(["upload", "small", small.to_str().unwrap()]).ok();
    env.run(["download", "small", dest.to_str().unwrap()]).ok();
    assert_eq!(read(&dest), b"small file");

    // A pull-request job's unsigned file is a miss for main; with --url main fetches
    // the file, and (as it signs) replaces the entry.
    as_pull_request(&mut env, &public);
    let planted = env.write("planted.bin", b"planted");
    env.run(["upload", "small", planted.to_str().unwrap(), "--force"])
        .ok();
    env.run(["download", "small", env.path("pr.out").to_str().unwrap()])
        .ok();
    assert_eq!(read(env.path("pr.out")), b"planted");
    let server = HttpServer::start(vec![("/small", Reply::Body(b"from the url".to_vec()))]);
    as_main(&mut env, &private);
    let run = env.run(["download", "small", dest.to_str().unwrap()]);
    run.code(3);
    assert!(run.stderr.contains("not trusted"), "{}", run.stderr);
    assert_eq!(read(&dest), b"small file");
    // Without the private key (trusting main, requiring signatures) --url fetches but
    // leaves the entry alone.
    env.unset("CACHER_SIGNING_KEY");
    env.set("CACHER_TRUSTED_KEYS", public.to_str().unwrap());
    let url = server.url("/small");
    let run = env.run(["download", "small", dest.to_str().unwrap(), "--url", &url]);
    assert!(run.ok().stderr.contains("not replaced"), "{}", run.stderr);
    assert_eq!(read(&dest), b"from the url");
    assert_eq!(stored(&small_key).unwrap(), b"planted");
    as_main(&mut env, &private);
    env.run(["download", "small", dest.to_str().unwrap(), "--url", &url])
        .ok();
    let other = env.path("other.out");
    env.run(["download", "small", other.to_str().unwrap()]).ok();
    assert_eq!(read(&other), b"from the url", "seeded, signed");
}

#[test]
fn a_job_that_signs_restores_only_signed_entries_unless_told_otherwise() {
    let mut env = TestEnv::s3("signed-default");
    let (private, _) = keygen(&env, "main.key");
    let file = env.write("f", b"written by anyone");
    env.run(["upload", "k", file.to_str().unwrap()]).ok();
    env.set("CACHER_SIGNING_KEY", private.to_str().unwrap());
    let dest = env.path("out");
    let run = env.run(["download", "k", dest.to_str().unwrap()]);
    run.code(3);
    assert!(run.stderr.contains("it is not signed"), "{}", run.stderr);
    assert!(!dest.exists());
    env.set("CACHER_REQUIRE_SIGNATURE", "false");
    env.run(["download", "k", dest.to_str().unwrap()]).ok();
    assert_eq!(read(&dest), b"written by anyone");
}

#[test]
fn a_fallback_skips_candidates_no_trusted_key_signed() {
    let mut env = TestEnv::s3("signed-fallback");
    let (private, public) = keygen(&env, "main.key");
    let (stranger, _) = keygen(&env, "stranger.key");
    // Every job works in the same directory, as CI checkouts do.
    let dest = env.path("work");
    write_tree(&dest, &[("lib.rs", b"main's version")]);
    as_main(&mut env, &private);
    env.run(["dir", "upload", "cargo-aaa", dest.to_str().unwrap()])
        .ok();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // Newer candidates: one unsigned, one signed by a key main does not trust.
    write_tree(&dest, &[("lib.rs", b"planted")]);
    as_pull_request(&mut env, &public);
    env.run(["dir", "upload", "cargo-bbb", dest.to_str().unwrap()])
        .ok();
    env.set("CACHER_SIGNING_KEY", stranger.to_str().unwrap());
    env.run(["dir", "upload", "cargo-ccc", dest.to_str().unwrap()])
        .ok();

    as_main(&mut env, &private);
    std::fs::remove_dir_all(&dest).unwrap();
    let run = env.run([
        "dir",
        "download",
        "cargo-zzz",
        dest.to_str().unwrap(),
        "--fallback",
        "cargo-",
    ]);
    run.ok();
    assert_eq!(read(dest.join("lib.rs")), b"main's version");
    assert!(
        run.stderr.contains("which is not among the trusted keys")
            && run.stderr.contains("it is not signed"),
        "both newer candidates refused, each with its reason: {}",
        run.stderr
    );
    // Without require_signature, unsigned entries are fine but a foreign signature is
    // still refused.
    env.set("CACHER_REQUIRE_SIGNATURE", "false");
    env.run([
        "dir",
        "download",
        "cargo-ccc",
        env.path("c").to_str().unwrap(),
    ])
    .code(1);
    env.run([
        "dir",
        "download",
        "cargo-bbb",
        env.path("b").to_str().unwrap(),
    ])
    .ok();
}

#[test]
fn a_fallback_takes_the_newest_entry_made_not_an_older_one_put_back() {
    let mut env = TestEnv::s3("signed-rollback");
    let (private, _) = keygen(&env, "main.key");
    as_main(&mut env, &private);
    let work = env.path("work");
    write_tree(&work, &[("lib.rs", b"old, vulnerable")]);
    env.run(["dir", "upload", "deps-aaa", work.to_str().unwrap()])
        .ok();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write_tree(&work, &[("lib.rs", b"new, fixed")]);
    env.run(["dir", "upload", "deps-bbb", work.to_str().unwrap()])
        .ok();
    // The older signed manifest put back as it was: uploaded last, made first.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let old_key = format!("{}/deps-aaa", env.prefix);
    let (manifest, opts) = object(&old_key);
    put_with(&old_key, manifest, &opts);

    std::fs::remove_dir_all(&work).unwrap();
    let run = env.run([
        "dir",
        "download",
        "deps-zzz",
        work.to_str().unwrap(),
        "--fallback",
        "deps-",
    ]);
    run.ok();
    assert!(run.stdout.contains("deps-bbb"), "{}", run.stdout);
    assert_eq!(read(work.join("lib.rs")), b"new, fixed");
}

#[test]
fn keygen_writes_a_private_key_only_its_owner_reads_and_doctor_shows_only_key_ids() {
    use std::os::unix::fs::PermissionsExt;
    let mut env = TestEnv::file_store();
    let private = env.path("ci.key");
    let run = env.run(["keygen", private.to_str().unwrap(), "--json"]);
    let record: serde_json::Value = serde_json::from_str(run.ok().stdout.trim()).unwrap();
    let id = record["key_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 16);
    let mode = std::fs::metadata(&private).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem = String::from_utf8(read(&private)).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    // Never overwritten.
    let run = env.run(["keygen", private.to_str().unwrap()]);
    run.code(2);
    assert_eq!(read(&private), pem.as_bytes());

    env.set("CACHER_SIGNING_KEY", private.to_str().unwrap());
    let run = env.run(["doctor"]);
    let output = run.ok().all_output();
    assert!(output.contains(&format!("key id {id}")), "{output}");
    let secret_line = pem.lines().nth(1).unwrap();
    assert!(!output.contains(secret_line), "no key material: {output}");

    // cacher signs with a key `openssl genpkey -algorithm ed25519` wrote.
    let theirs = env.write("openssl.key", OPENSSL_KEY);
    env.set("CACHER_SIGNING_KEY", theirs.to_str().unwrap());
    let file = env.write("signed.txt", b"signed with an openssl key");
    env.run(["upload", "openssl", file.to_str().unwrap()]).ok();
    env.run(["download", "openssl", env.path("o").to_str().unwrap()])
        .ok();
    // And OpenSSL reads the key cacher wrote, where it is installed.
    match std::process::Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(&private)
        .output()
    {
        Ok(read_back) => assert!(read_back.status.success(), "{read_back:?}"),
        Err(e) => eprintln!("SKIPPED reading the key back with openssl: {e}"),
    }

    // Key material pasted where a path belongs: refused without echoing it.
    env.set("CACHER_SIGNING_KEY", &pem);
    let run = env.run(["doctor"]);
    run.code(2);
    assert!(run.stderr.contains("holds key material"), "{}", run.stderr);
    assert!(
        !run.all_output().contains(secret_line),
        "{}",
        run.all_output()
    );

    // Keys that cannot be used are a one-line error, exit 2, for any command.
    std::fs::write(env.path("junk.key"), "not a key").unwrap();
    env.set("CACHER_SIGNING_KEY", env.path("junk.key").to_str().unwrap());
    let run = env.run(["upload", "k", private.to_str().unwrap()]);
    run.code(2);
    assert!(
        run.stderr.contains("is not an ed25519 private key") && run.stderr.lines().count() == 1,
        "{}",
        run.stderr
    );
    env.unset("CACHER_SIGNING_KEY");
    env.set("CACHER_REQUIRE_SIGNATURE", "true");
    let run = env.run(["exists", "k"]);
    run.code(2);
    assert!(run.stderr.contains("no trusted_keys"), "{}", run.stderr);
    env.set(
        "CACHER_TRUSTED_KEYS",
        env.path("missing.pub").to_str().unwrap(),
    );
    env.run(["exists", "k"]).code(2);
}

#[test]
fn a_file_store_never_pairs_an_object_with_another_versions_metadata() {
    // Two writers replacing one key while others read it, no keys configured: every
    // read gets one whole version, and none is taken for corrupt (the metadata of one
    // version beside the bytes of the other would be, and would be deleted).
    let env = TestEnv::file_store();
    let a = env.write("a", random_bytes(4000, 5));
    let b = env.write("b", random_bytes(4000, 6));
    env.run(["upload", "k", a.to_str().unwrap()]).ok();
    for round in 0..15 {
        let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
        let out = env.path(&format!("out{round}"));
        let runs = env.run_all_at_once(&[
            vec!["upload".into(), "k".into(), a.into(), "--force".into()],
            vec!["upload".into(), "k".into(), b.into(), "--force".into()],
            vec!["download".into(), "k".into(), out.display().to_string()],
        ]);
        for run in &runs {
            run.ok();
            assert!(!run.stderr.contains("corrupt"), "{}", run.stderr);
        }
        let got = read(&out);
        assert!(got == read(env.path("a")) || got == read(env.path("b")));
    }
    env.run(["download", "k", env.path("last").to_str().unwrap()])
        .ok();
}

#[test]
fn a_file_store_keeps_signatures_beside_the_objects() {
    let mut env = TestEnv::file_store();
    let (private, public) = keygen(&env, "main.key");
    let store = env.path("store");
    let file = env.write("f.txt", b"contents");
    as_main(&mut env, &private);
    env.run(["upload", "k", file.to_str().unwrap()]).ok();
    assert_eq!(read(store.join("k")), b"contents", "the object is the file");
    let meta = String::from_utf8(read(store.join(".cacher-meta/k"))).unwrap();
    assert!(meta.contains("cacher-signature ed25519:"), "{meta}");
    let listed = env.run(["list"]);
    assert!(
        !listed.ok().stdout.contains(".cacher-meta"),
        "{}",
        listed.stdout
    );
    env.run(["download", "k", env.path("out").to_str().unwrap()])
        .ok();

    // Replaced by a job without the key: its metadata goes with the old object.
    as_pull_request(&mut env, &public);
    let other = env.write("g.txt", b"other");
    env.run(["upload", "k", other.to_str().unwrap(), "--force"])
        .ok();
    let meta = String::from_utf8(read(store.join(".cacher-meta/k"))).unwrap();
    assert!(!meta.contains("cacher-signature"), "{meta}");
    as_main(&mut env, &private);
    env.run(["download", "k", env.path("out2").to_str().unwrap()])
        .code(3);
    env.run(["delete", "k"]).ok();
    assert!(!store.join("k").exists());
    assert!(
        !store.join(".cacher-meta/k").exists(),
        "deleted with the object"
    );
}
