//! `cacher docker`: real images built `FROM scratch`, a real daemon, a local registry.
//!
//! scripts/test.sh installs and starts dockerd and a registry on 127.0.0.1:5000. When no
//! daemon answers, each test prints why it is skipped (never silently).

use std::process::Command;

use crate::util::{TestEnv, json_stats, manifest, random_bytes, unique, upload_stats};

/// Bytes drawn from `seed` and this run's own salt: docker keeps layers by content, so
/// with the same bytes an image left over from an earlier, interrupted run would hold
/// the layers a test expects the daemon to lack.
pub fn run_bytes(len: usize, seed: u64) -> Vec<u8> {
    static SALT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    random_bytes(len, seed ^ *SALT.get_or_init(|| fastrand::u64(..)))
}

pub const REGISTRY: &str = "127.0.0.1:5000";

pub fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run docker")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether a daemon answers; prints the reason when not.
pub fn daemon_ready(test: &str) -> bool {
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED {test}: no docker daemon answers (scripts/test.sh starts one)");
    }
    ok
}

/// Builds `tag` from scratch (or from `base`) with the given files, each its own layer.
pub fn build(env: &TestEnv, tag: &str, base: Option<&str>, files: &[(&str, Vec<u8>)]) -> String {
    let ctx = env.path(&unique("ctx"));
    std::fs::create_dir_all(&ctx).unwrap();
    let mut dockerfile = format!("FROM {}\n", base.unwrap_or("scratch"));
    for (name, data) in files {
        std::fs::write(ctx.join(name), data).unwrap();
        dockerfile.push_str(&format!("COPY {name} /{name}\n"));
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    // The legacy builder can fail between consecutive COPY steps while other tests
    // build and remove images (moby#36573, moby#37965); that is docker's flake, not
    // what these tests check, so a build gets three tries.
    let mut failures = Vec::new();
    for _ in 0..3 {
        let out = Command::new("docker")
            .args(["build", "-q", "-t", tag])
            .arg(&ctx)
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .expect("docker build");
        if out.status.success() {
            return image_id(tag).expect("built image exists");
        }
        failures.push(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    panic!("build: {failures:?}")
}

pub fn image_id(tag: &str) -> Option<String> {
    let out = docker(&["image", "inspect", "--format", "{{.Id}}", tag]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Reads a file out of an image without running it.
fn file_in_image(tag: &str, path: &str, env: &TestEnv) -> Vec<u8> {
    let container = docker_ok(&["create", tag, "/nothing"]);
    let dest = env.path(&unique("copied"));
    docker_ok(&["cp", &format!("{container}:{path}"), dest.to_str().unwrap()]);
    docker_ok(&["rm", &container]);
    std::fs::read(dest).unwrap()
}

pub fn rmi(tag: &str) {
    let _ = docker(&["rmi", "-f", tag]);
}

#[test]
fn image_round_trip_keeps_id_and_files() {
    if !daemon_ready("image_round_trip_keeps_id_and_files") {
        return;
    }
    let env = TestEnv::s3("dockertrip");
    let tag = format!("cacher-test/{}:v1", unique("trip"));
    let big = run_bytes(8 * 1024 * 1024, 21);
    let id = build(
        &env,
        &tag,
        None,
        &[("big.bin", big.clone()), ("hello.txt", b"hello\n".to_vec())],
    );

    env.run(["docker", "exists", "img"]).code(1);
    let up = env.run(["docker", "upload", "img", &tag]);
    up.ok();
    assert!(up.stderr.contains("uploaded"), "{}", up.stderr);
    env.run(["docker", "exists", "img"]).ok();
    let skipped = env.run(["docker", "upload", "img", &tag]);
    assert!(skipped.ok().stderr.contains("skipped"));

    rmi(&tag);
    assert!(image_id(&tag).is_none());
    env.run(["docker", "download", "img", &tag]).ok();
    assert_eq!(
        image_id(&tag).as_deref(),
        Some(id.as_str()),
        "same image id"
    );
    assert_eq!(file_in_image(&tag, "/big.bin", &env), big);
    assert_eq!(file_in_image(&tag, "/hello.txt", &env), b"hello\n");

    // Loaded under another name: tagged as asked.
    let other = format!("cacher-test/{}:renamed", unique("other"));
    env.run(["docker", "download", "img", &other]).ok();
    assert_eq!(image_id(&other).as_deref(), Some(id.as_str()));
    rmi(&tag);
    rmi(&other);

    env.run(["docker", "download", "missing", &tag]).code(1);
}

#[test]
fn an_image_sharing_a_big_layer_sends_only_the_new_layer() {
    if !daemon_ready("an_image_sharing_a_big_layer_sends_only_the_new_layer") {
        return;
    }
    let env = TestEnv::s3("dockershare");
    let name = unique("share");
    let base = format!("cacher-test/{name}:base");
    let next = format!("cacher-test/{name}:next");
    build(
        &env,
        &base,
        None,
        &[("big.bin", run_bytes(24 * 1024 * 1024, 22))],
    );
    build(
        &env,
        &next,
        Some(&base),
        &[("app.bin", run_bytes(512 * 1024, 23))],
    );

    let first = env.run(["docker", "upload", "base", &base]);
    let (_, new_base, _) = upload_stats(&first.ok().stderr);
    let second = env.run(["docker", "upload", "next", &next]);
    let (_, new_next, sent) = upload_stats(&second.ok().stderr);
    assert!(new_base > 100, "{}", first.stderr);
    assert!(
        new_next < 20,
        "only the new layer's chunks: {}",
        second.stderr
    );
    assert!(sent.ends_with("KiB"), "well under the 24 MiB layer: {sent}");

    rmi(&next);
    env.run(["docker", "download", "next", &next]).ok();
    assert_eq!(
        file_in_image(&next, "/app.bin", &env),
        run_bytes(512 * 1024, 23)
    );
    rmi(&next);
    rmi(&base);
}

#[test]
fn pull_on_a_miss_seeds_the_cache_and_the_next_download_hits() {
    if !daemon_ready("pull_on_a_miss_seeds_the_cache_and_the_next_download_hits") {
        return;
    }
    let env = TestEnv::s3("dockerpull");
    let remote = format!("{REGISTRY}/cacher-test/{}:v1", unique("pulled"));
    let id = build(
        &env,
        &remote,
        None,
        &[("data.bin", run_bytes(1024 * 1024, 24))],
    );
    let pushed = docker(&["push", &remote]);
    if !pushed.status.success() {
        eprintln!(
            "SKIPPED pull test: no registry at {REGISTRY} ({})",
            String::from_utf8_lossy(&pushed.stderr).trim()
        );
        return;
    }
    rmi(&remote);

    env.run(["docker", "download", "pulled", &remote]).code(1);
    env.run(["docker", "download", "pulled", &remote, "--pull"])
        .ok();
    assert_eq!(
        image_id(&remote).as_deref(),
        Some(id.as_str()),
        "the image is local"
    );
    env.run(["docker", "exists", "pulled"]).ok();

    rmi(&remote);
    let run = env.run(["docker", "download", "pulled", &remote]);
    assert!(
        run.ok().stderr.contains("restored"),
        "a cache hit: {}",
        run.stderr
    );
    assert_eq!(image_id(&remote).as_deref(), Some(id.as_str()));
    rmi(&remote);

    let run = env.run([
        "docker",
        "download",
        "other",
        &format!("{REGISTRY}/cacher-test/nope:v0"),
        "--pull",
    ]);
    run.code(2);
    assert!(run.stderr.contains("pull"), "{}", run.stderr);

    // The cache down and errors of the cache soft: --pull still pulls, as --url fetches.
    let mut down = TestEnv::s3("dockerpull-down");
    down.set("CACHER_ENDPOINT", "http://127.0.0.1:9");
    down.set("CACHER_ON_ERROR", "warn");
    let run = down.run(["docker", "download", "pulled", &remote, "--pull"]);
    assert!(
        run.ok().stderr.contains("--on-error warn"),
        "{}",
        run.stderr
    );
    assert_eq!(image_id(&remote).as_deref(), Some(id.as_str()));
    rmi(&remote);
    // The registry's own failure is not the cache's: still exit 2.
    let nope = format!("{REGISTRY}/cacher-test/nope:v0");
    down.run(["docker", "download", "other", &nope, "--pull"])
        .code(2);
    // Without --pull, a miss.
    down.run(["docker", "download", "pulled", &remote]).code(1);
}

#[test]
fn failures_exit_2_and_publish_nothing() {
    if !daemon_ready("failures_exit_2_and_publish_nothing") {
        return;
    }
    let mut env = TestEnv::s3("dockerfail");
    let tag = format!("cacher-test/{}:v1", unique("fail"));
    build(
        &env,
        &tag,
        None,
        &[("x.bin", run_bytes(2 * 1024 * 1024, 25))],
    );

    let run = env.run([
        "docker",
        "upload",
        "unknown",
        "cacher-test/no-such-image:v9",
    ]);
    run.code(2);
    assert!(run.stderr.contains("no-such-image"), "{}", run.stderr);
    env.run(["docker", "exists", "unknown"]).code(1);

    let run = env.run([
        "docker",
        "upload",
        "nobin",
        &tag,
        "--docker-bin",
        "/nonexistent/docker",
    ]);
    run.code(2);
    assert!(run.stderr.contains("/nonexistent/docker"), "{}", run.stderr);

    // A `docker save` that dies mid-stream must not leave a manifest behind.
    let fake = env.write(
        "fake-docker",
        "#!/bin/sh\ncase \"$1\" in image) echo sha256:fake;; save) head -c 3000000 /dev/urandom; echo 'save: daemon went away' >&2; exit 1;; esac\n",
    );
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let run = env.run([
        "docker",
        "upload",
        "broken",
        &tag,
        "--docker-bin",
        fake.to_str().unwrap(),
    ]);
    run.code(2);
    assert!(run.stderr.contains("daemon went away"), "{}", run.stderr);
    env.run(["docker", "exists", "broken"]).code(1);

    // Daemon down: the docker CLI cannot reach it.
    env.set("DOCKER_HOST", "unix:///nonexistent/docker.sock");
    let run = env.run(["docker", "upload", "down", &tag]);
    run.code(2);
    assert!(
        run.stderr.to_lowercase().contains("docker"),
        "{}",
        run.stderr
    );
    env.run(["docker", "exists", "down"]).code(1);
    env.unset("DOCKER_HOST");

    // A corrupted chunk: the entry is broken, so a miss (exit 1) with one warning, and
    // the image is not loaded.
    env.run(["docker", "upload", "good", &tag]).ok();
    let packs = env.run(["list", "--recursive", ".cacher/packs/"]);
    let pack = packs
        .ok()
        .stdout
        .lines()
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    let key = format!("{}/{pack}", env.prefix);
    let mut data = crate::util::stored(&key).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    let store = crate::util::bucket();
    crate::util::rt()
        .block_on(store.put(
            &key,
            cacher::store::Body::Bytes(data.into()),
            &Default::default(),
        ))
        .unwrap();
    rmi(&tag);
    let run = env.run(["docker", "download", "good", &tag]);
    run.code(1);
    assert!(run.stderr.contains("corrupt"), "{}", run.stderr);
    assert!(image_id(&tag).is_none(), "nothing loaded");
}

#[test]
fn the_image_name_always_ends_up_on_the_loaded_image_and_broken_entries_pull() {
    if !daemon_ready("the_image_name_always_ends_up_on_the_loaded_image_and_broken_entries_pull") {
        return;
    }
    let env = TestEnv::s3("dockername");
    let cached = format!("cacher-test/{}:v1", unique("cached"));
    let id = build(&env, &cached, None, &[("a.txt", b"cached\n".to_vec())]);
    env.run(["docker", "upload", "img", &cached]).ok();

    // IMAGE already names another image: after the restore it names the loaded one.
    let name = format!("cacher-test/{}:latest", unique("name"));
    let other_id = build(&env, &name, None, &[("b.txt", b"other\n".to_vec())]);
    assert_ne!(other_id, id);
    env.run(["docker", "download", "img", &name]).ok();
    assert_eq!(image_id(&name).as_deref(), Some(id.as_str()));

    // A broken entry with --pull: pulled from the registry and the entry replaced.
    let remote = format!("127.0.0.1:5000/{}:v1", unique("pullheal"));
    docker_ok(&["tag", &cached, &remote]);
    docker_ok(&["push", &remote]);
    rmi(&remote);
    let store = crate::util::bucket();
    crate::util::rt()
        .block_on(store.put(
            &format!("{}/img", env.prefix),
            cacher::store::Body::Bytes(bytes::Bytes::from_static(b"CACHERMF\x01\x00garbage")),
            &Default::default(),
        ))
        .unwrap();
    let run = env.run(["docker", "download", "img", &remote]);
    run.code(1);
    assert!(run.stderr.contains("warning"), "{}", run.stderr);
    let run = env.run(["docker", "download", "img", &remote, "--pull"]);
    run.ok();
    assert!(run.stderr.contains("pulled"), "{}", run.stderr);
    assert_eq!(image_id(&remote).as_deref(), Some(id.as_str()));
    rmi(&remote);
    env.run(["docker", "download", "img", &remote]).ok();
    assert_eq!(image_id(&remote).as_deref(), Some(id.as_str()));
    for tag in [&cached, &name, &remote] {
        rmi(tag);
    }
}

/// Two images sharing a 24 MiB base layer: `base`, and `next` with a 512 KiB layer on
/// top, their bytes drawn from `seed` (docker's build cache would make two tests with
/// the same bytes share layers). Returns their tags and `next`'s id.
fn base_and_next(env: &TestEnv, name: &str, seed: u64) -> (String, String, String) {
    let base = format!("cacher-test/{name}:base");
    let next = format!("cacher-test/{name}:next");
    build(
        env,
        &base,
        None,
        &[("big.bin", run_bytes(24 * 1024 * 1024, seed))],
    );
    let id = build(
        env,
        &next,
        Some(&base),
        &[("app.bin", run_bytes(512 * 1024, seed + 1))],
    );
    (base, next, id)
}

/// Bytes of chunks a `--json` docker download fetched, and the layers it left out.
fn fetched(run: &crate::util::Run) -> (u64, u64) {
    let stats = json_stats(&run.stdout);
    (
        stats["new_bytes"].as_u64().expect("new_bytes"),
        stats["layers"]["present"].as_u64().unwrap_or(0),
    )
}

#[test]
fn a_restore_fetches_only_the_layers_the_daemon_lacks() {
    if !daemon_ready("a_restore_fetches_only_the_layers_the_daemon_lacks") {
        return;
    }
    let env = TestEnv::s3("dockerthin");
    let (base, next, id) = base_and_next(&env, &unique("thin"), 31);
    env.run(["docker", "upload", "next", &next]).ok();
    let map = manifest(&env, "next");
    assert_eq!(
        map.entries
            .iter()
            .filter(|e| e.path.contains(&b':'))
            .count(),
        2,
        "both layers are mapped: {:?}",
        map.entries
    );

    // The base is still loaded: only the top layer is fetched.
    rmi(&next);
    let run = env.run(["docker", "download", "next", &next, "--json"]);
    let (bytes, present) = fetched(run.ok());
    assert_eq!(present, 1, "{}", run.stderr);
    assert!(
        bytes < 1024 * 1024,
        "only the 512 KiB layer and the chunks around it: {bytes} bytes; {}",
        run.stderr
    );
    assert!(
        run.stderr.contains("the daemon had 1 of 2 layers"),
        "{}",
        run.stderr
    );
    assert_eq!(image_id(&next).as_deref(), Some(id.as_str()));
    assert_eq!(
        file_in_image(&next, "/app.bin", &env),
        run_bytes(512 * 1024, 32)
    );
    assert_eq!(
        file_in_image(&next, "/big.bin", &env),
        run_bytes(24 * 1024 * 1024, 31)
    );

    // The daemon has neither: everything is fetched and loaded.
    rmi(&next);
    rmi(&base);
    let run = env.run(["docker", "download", "next", &next, "--json"]);
    let (bytes, present) = fetched(run.ok());
    assert_eq!(present, 0, "{}", run.stderr);
    assert!(bytes > 24 * 1024 * 1024, "the whole image: {bytes} bytes");
    assert_eq!(image_id(&next).as_deref(), Some(id.as_str()));
    assert_eq!(
        file_in_image(&next, "/big.bin", &env),
        run_bytes(24 * 1024 * 1024, 31)
    );
    rmi(&next);
}

#[test]
fn a_daemon_that_refuses_the_thin_archive_gets_the_full_one() {
    if !daemon_ready("a_daemon_that_refuses_the_thin_archive_gets_the_full_one") {
        return;
    }
    let env = TestEnv::s3("dockerrefuse");
    let (base, next, id) = base_and_next(&env, &unique("refuse"), 33);
    env.run(["docker", "upload", "next", &next]).ok();
    // As another docker (or podman) might: refuse any archive with an empty layer
    // (an empty regular file named as docker names layers, before and since docker 25).
    let strict = env.write(
        "strict-docker",
        "#!/bin/sh\n\
         [ \"$1\" = load ] || exec docker \"$@\"\n\
         archive=$(mktemp)\n\
         cat > \"$archive\"\n\
         if tar -tvf \"$archive\" | awk '$1 ~ /^-/ && $3 == 0 && ($6 ~ /layer.tar$/ || $6 ~ /^blobs\\//) { found = 1 } END { exit !found }'; then\n\
           echo 'strict: empty layer in archive' >&2; rm -f \"$archive\"; exit 1\n\
         fi\n\
         docker load < \"$archive\"; status=$?; rm -f \"$archive\"; exit $status\n",
    );
    std::fs::set_permissions(&strict, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    rmi(&next);
    let run = env.run([
        "docker",
        "download",
        "next",
        &next,
        "--json",
        "--docker-bin",
        strict.to_str().unwrap(),
    ]);
    let (bytes, present) = fetched(run.ok());
    assert!(
        run.stderr.contains("strict: empty layer") && run.stderr.contains("loading the full image"),
        "says it retried: {}",
        run.stderr
    );
    assert_eq!(present, 0, "the full archive was loaded");
    assert!(bytes > 24 * 1024 * 1024, "{bytes}");
    assert_eq!(image_id(&next).as_deref(), Some(id.as_str()));
    assert_eq!(
        file_in_image(&next, "/app.bin", &env),
        run_bytes(512 * 1024, 34)
    );
    rmi(&next);
    rmi(&base);
}

#[test]
fn archives_stored_by_the_shell_loop_load_whole() {
    if !daemon_ready("archives_stored_by_the_shell_loop_load_whole") {
        return;
    }
    let env = TestEnv::s3("dockerloop");
    let (base, next, id) = base_and_next(&env, &unique("loop"), 37);
    // `docker save | zstd | aws s3 cp -`, and a plain `docker save` archive.
    let saved = Command::new("docker")
        .args(["save", &next])
        .output()
        .unwrap();
    assert!(saved.status.success());
    let compressed = zstd::encode_all(&saved.stdout[..], 3).unwrap();
    crate::util::put_object(&format!("{}/loop.tar.zst", env.prefix), compressed);
    crate::util::put_object(&format!("{}/plain.tar", env.prefix), &saved.stdout);
    for (key, says) in [
        ("loop.tar.zst", "legacy tar.zst"),
        ("plain.tar", "plain docker archive"),
    ] {
        rmi(&next);
        let run = env.run(["docker", "download", key, &next]);
        assert!(run.ok().stderr.contains(says), "{}", run.stderr);
        assert_eq!(image_id(&next).as_deref(), Some(id.as_str()));
    }
    rmi(&next);
    rmi(&base);
}

#[test]
fn entries_without_a_member_map_restore_whole() {
    if !daemon_ready("entries_without_a_member_map_restore_whole") {
        return;
    }
    let env = TestEnv::s3("dockernomap");
    let (base, next, id) = base_and_next(&env, &unique("nomap"), 35);
    env.run(["docker", "upload", "next", &next]).ok();
    // As cacher wrote docker entries before member maps: no entries.
    let mut old = manifest(&env, "next");
    old.entries.clear();
    crate::util::put_object(&format!("{}/next", env.prefix), old.encode());

    rmi(&next);
    let run = env.run(["docker", "download", "next", &next, "--json"]);
    let (bytes, present) = fetched(run.ok());
    assert_eq!(present, 0);
    assert!(bytes > 24 * 1024 * 1024, "{bytes}");
    assert_eq!(image_id(&next).as_deref(), Some(id.as_str()));
    rmi(&next);
    rmi(&base);
}

#[test]
fn signed_images_load_and_an_unsigned_replacement_is_refused_where_signatures_are_required() {
    if !daemon_ready(
        "signed_images_load_and_an_unsigned_replacement_is_refused_where_signatures_are_required",
    ) {
        return;
    }
    let mut env = TestEnv::s3("dockersigned");
    let private = env.path("main.key");
    env.run(["keygen", private.to_str().unwrap()]).ok();
    let tag = format!("cacher-test/{}:v1", unique("signed"));
    let planted = format!("cacher-test/{}:v1", unique("planted"));
    let id = build(&env, &tag, None, &[("app.bin", run_bytes(512 * 1024, 31))]);
    build(&env, &planted, None, &[("app.bin", b"planted".to_vec())]);

    env.set("CACHER_SIGNING_KEY", private.to_str().unwrap());
    env.set("CACHER_REQUIRE_SIGNATURE", "true");
    env.run(["docker", "upload", "img", &tag]).ok();
    rmi(&tag);
    env.run(["docker", "download", "img", &tag]).ok();
    assert_eq!(image_id(&tag).as_deref(), Some(id.as_str()));
    rmi(&tag);

    // A job without the private key overwrites the entry with another image.
    env.unset("CACHER_SIGNING_KEY");
    env.unset("CACHER_REQUIRE_SIGNATURE");
    env.run(["docker", "upload", "img", &planted, "--force"])
        .ok();
    env.set("CACHER_SIGNING_KEY", private.to_str().unwrap());
    env.set("CACHER_REQUIRE_SIGNATURE", "true");
    let run = env.run(["docker", "download", "img", &tag]);
    run.code(1);
    assert!(run.stderr.contains("is not trusted"), "{}", run.stderr);
    assert!(image_id(&tag).is_none(), "nothing loaded");

    // A job holding only the public key and requiring signatures pulls on the
    // refusal, and leaves the entry as it is: it cannot sign a replacement.
    let remote = format!("{REGISTRY}/cacher-test/{}:v1", unique("signedpull"));
    docker_ok(&["tag", &planted, &remote]);
    if docker(&["push", &remote]).status.success() {
        rmi(&remote);
        let entry = format!("{}/img", env.prefix);
        let before = crate::util::stored(&entry);
        env.unset("CACHER_SIGNING_KEY");
        env.set("CACHER_TRUSTED_KEYS", &format!("{}.pub", private.display()));
        let run = env.run(["docker", "download", "img", &remote, "--pull"]);
        assert!(run.ok().stderr.contains("not replaced"), "{}", run.stderr);
        assert!(image_id(&remote).is_some(), "pulled");
        assert_eq!(
            crate::util::stored(&entry),
            before,
            "the entry left as it was"
        );
        rmi(&remote);
        env.unset("CACHER_TRUSTED_KEYS");
        env.set("CACHER_SIGNING_KEY", private.to_str().unwrap());
    } else {
        eprintln!("SKIPPED the --pull part: no registry at {REGISTRY}");
    }

    // A `docker save` archive stored as a signed plain file: docker load would take it
    // in before its sha256 is checked, so its signature cannot be honoured.
    let archive = env.path("planted.tar");
    docker_ok(&["save", "-o", archive.to_str().unwrap(), &planted]);
    env.run(["upload", "archive", archive.to_str().unwrap()])
        .ok();
    rmi(&planted);
    let run = env.run(["docker", "download", "archive", &planted]);
    run.code(1);
    assert!(
        run.stderr.contains("cannot check before using it"),
        "{}",
        run.stderr
    );
    assert!(image_id(&planted).is_none(), "nothing loaded");
}
