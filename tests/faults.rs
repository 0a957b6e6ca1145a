//! Faults injected between cacher and Garage by a proxy on loopback: transient ones are
//! retried to byte-identical results, permanent ones fail in bounded time with DEST
//! untouched and nothing published.

use std::time::{Duration, Instant};

use crate::util::proxy::{Fault, Proxy};
use crate::util::server::{Kind, Node};
use crate::util::{TestEnv, random_bytes, read, server, stored, temp_leftovers};

/// An env whose endpoint is a fresh proxy in front of Garage.
fn through_proxy(name: &str) -> (TestEnv, Proxy) {
    let mut env = TestEnv::s3(name);
    let proxy = Proxy::start(&server().endpoint);
    env.set("CACHER_ENDPOINT", &proxy.endpoint);
    // Small parts, so a 24 MiB file goes up in several.
    env.set("CACHER_MULTIPART_THRESHOLD", "8388608");
    env.set("CACHER_PART_SIZE", "8388608");
    (env, proxy)
}

#[test]
fn plain_transfers_survive_resets_and_slowdowns() {
    let (env, proxy) = through_proxy("faultplain");
    let data = random_bytes(24 * 1024 * 1024 + 5, 31);
    let src = env.write("src.bin", &data);

    proxy.plan(&[Fault::SlowDown, Fault::CutAfter(100), Fault::SlowDown]);
    let up = env.run(["upload", "big", src.to_str().unwrap()]);
    up.ok();
    assert_eq!(proxy.pending(), 0, "every planned fault was hit");
    assert!(
        up.stderr.contains("retr"),
        "the summary counts retries: {}",
        up.stderr
    );
    assert!(stored(&format!("{}/big", env.prefix)).unwrap() == data);

    proxy.plan(&[
        Fault::CutAfter(2_000_000),
        Fault::SlowDown,
        Fault::CutAfter(50),
    ]);
    let dest = env.path("dest.bin");
    let down = env.run(["download", "big", dest.to_str().unwrap()]);
    down.ok();
    assert_eq!(proxy.pending(), 0);
    assert!(read(&dest) == data, "byte-identical after retries");
    assert!(proxy.injected() >= 6);
}

#[test]
fn dir_transfers_survive_resets_and_slowdowns() {
    let (env, proxy) = through_proxy("faultdir");
    for i in 0..4 {
        env.write(
            &format!("tree/f{i}.bin"),
            random_bytes(3 * 1024 * 1024, 40 + i),
        );
    }
    env.write("tree/small.txt", "small");
    let tree = env.path("tree");
    proxy.plan(&[Fault::CutAfter(10), Fault::SlowDown, Fault::CutAfter(200)]);
    let up = env.run(["dir", "upload", "t", tree.to_str().unwrap()]);
    assert!(up.ok().stderr.contains("retr"), "{}", up.stderr);
    proxy.plan(&[
        Fault::CutAfter(1_000_000),
        Fault::SlowDown,
        Fault::CutAfter(3000),
    ]);
    let out = env.path("out");
    env.run(["dir", "download", "t", out.to_str().unwrap()])
        .ok();
    assert_eq!(proxy.pending(), 0);
    for i in 0..4 {
        assert!(read(out.join(format!("f{i}.bin"))) == random_bytes(3 * 1024 * 1024, 40 + i));
    }
    assert_eq!(read(out.join("small.txt")), b"small");
}

#[test]
fn a_hanging_server_fails_in_bounded_time_and_touches_nothing() {
    let (mut env, proxy) = through_proxy("faultstall");
    // Seed a key directly, then make every connection through the proxy hang.
    let src = env.write("src.bin", random_bytes(1024 * 1024, 32));
    env.run([
        "upload",
        "k",
        src.to_str().unwrap(),
        "--endpoint",
        &server().endpoint,
    ])
    .ok();
    proxy.stall_everything();
    env.set("CACHER_TIMEOUT", "1");

    let started = Instant::now();
    let dest = env.path("dest.bin");
    let run = env.run(["download", "k", dest.to_str().unwrap()]);
    run.code(2);
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(!dest.exists());
    assert!(temp_leftovers(env.dir.path()).is_empty());

    let started = Instant::now();
    env.run(["exists", "k"]).code(2);
    assert!(started.elapsed() < Duration::from_secs(40));

    let tree = env.path("tree");
    env.write("tree/a", "a");
    env.run(["dir", "upload", "d", tree.to_str().unwrap()])
        .code(2);
    let direct = env.run(["dir", "exists", "d", "--endpoint", &server().endpoint]);
    direct.code(1);
}

/// Uploads 2 MiB of noise from `seed` under `key` straight to the server, not through
/// the proxy; the bytes.
fn upload_around_the_proxy(env: &TestEnv, key: &str, seed: u64) -> Vec<u8> {
    let data = random_bytes(2 * 1024 * 1024, seed);
    let src = env.write(&format!("{key}.src"), &data);
    let direct = ["--endpoint", &server().endpoint];
    env.run(
        ["upload", key, src.to_str().unwrap()]
            .into_iter()
            .chain(direct),
    )
    .ok();
    data
}

#[test]
fn a_slow_trickle_is_not_a_stall() {
    let (mut env, proxy) = through_proxy("faulttrickle");
    let data = upload_around_the_proxy(&env, "slow", 33);
    // 4 KiB every 5 ms (~800 KiB/s) on every connection the download opens: slower
    // than the 1 s timeout would allow for a whole range, but never idle that long.
    env.set("CACHER_TIMEOUT", "1");
    proxy.plan(&[Fault::Trickle(5); 8]);
    let dest = env.path("dest.bin");
    env.run(["download", "slow", dest.to_str().unwrap()]).ok();
    assert!(read(&dest) == data);
}

#[test]
fn a_response_that_stops_part_way_is_abandoned_and_retried() {
    let (mut env, proxy) = through_proxy("faultmidbody");
    let data = upload_around_the_proxy(&env, "k", 34);
    env.set("CACHER_TIMEOUT", "1");
    // The headers and 300 kB of the body arrive, then nothing: the attempt must give
    // up on its own, and a later one completes the file. Twice: the GET that opened
    // the object, then the first read of that range again.
    proxy.plan(&[Fault::StallAfter(300_000); 2]);
    let dest = env.path("dest.bin");
    let run = env.run(["download", "k", dest.to_str().unwrap()]);
    run.ok();
    assert_eq!(proxy.pending(), 0, "the stall was hit");
    assert!(read(&dest) == data, "byte-identical after the retry");
    assert!(run.stderr.contains("retr"), "{}", run.stderr);
    assert!(temp_leftovers(env.dir.path()).is_empty());
}

/// A server that ignores `If-Match` on one range and sends another version's bytes
/// (ETag and body altered by the proxy): the range is refused as changed and the
/// download starts over, so the file is right and the entry stays. (The object went
/// up in parts, so no sha256 was recorded with it: a splice would be written as is.)
#[test]
fn a_range_of_another_version_is_refused_not_spliced() {
    let (env, proxy) = through_proxy("faultversion");
    let data = random_bytes(20 * 1024 * 1024, 35);
    let src = env.write("src.bin", &data);
    env.run(["upload", "k", src.to_str().unwrap()]).ok();
    // The first GET passes; the first range beside it comes from "another version".
    proxy.plan(&[Fault::Pass, Fault::OtherVersion]);
    let dest = env.path("dest.bin");
    env.run(["download", "k", dest.to_str().unwrap()]).ok();
    assert_eq!(proxy.pending(), 0, "both connections were made");
    assert!(read(&dest) == data, "byte-identical");
    assert!(
        stored(&format!("{}/k", env.prefix)).is_some(),
        "the entry is kept"
    );
}

/// An env on a Garage node of its own, which the test can kill and restart.
fn on_own_node(name: &str) -> (TestEnv, Node) {
    let node = Node::start(Kind::Garage, name);
    let env = TestEnv::on(&node.server, name);
    (env, node)
}

#[test]
fn garage_restarted_during_dir_upload_and_download() {
    let (env, node) = on_own_node("restart");
    for i in 0..6 {
        env.write(&format!("tree/f{i}"), random_bytes(6 * 1024 * 1024, 80 + i));
    }
    let tree = env.path("tree");
    let check = |out: &std::path::Path| {
        (0..6).all(|i| read(out.join(format!("f{i}"))) == random_bytes(6 * 1024 * 1024, 80 + i))
    };
    let mut outcomes = Vec::new();
    for (round, pause_ms) in [100u64, 300, 600].into_iter().enumerate() {
        let key = format!("t{round}");
        let upload = env
            .cmd(["dir", "upload", &key, tree.to_str().unwrap()])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(pause_ms));
        node.kill();
        std::thread::sleep(Duration::from_millis(500));
        node.restart();
        let up = upload.wait_with_output().unwrap();
        let code = up.status.code().unwrap();
        assert!(
            code == 0 || code == 2,
            "{}",
            String::from_utf8_lossy(&up.stderr)
        );
        let exists = env.run(["dir", "exists", &key]).code;
        if code == 2 {
            assert_eq!(exists, 1, "a failed upload published nothing");
            env.run(["dir", "upload", &key, tree.to_str().unwrap()])
                .ok();
        }

        let out = env.path(&format!("out{round}"));
        let download = env
            .cmd(["dir", "download", &key, out.to_str().unwrap()])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(pause_ms / 4));
        node.kill();
        std::thread::sleep(Duration::from_millis(500));
        node.restart();
        let down = download.wait_with_output().unwrap();
        match down.status.code().unwrap() {
            0 => assert!(check(&out), "a restore that succeeds is complete"),
            2 => assert!(!out.exists(), "a failed restore leaves nothing"),
            other => panic!("exit {other}: {}", String::from_utf8_lossy(&down.stderr)),
        }
        outcomes.push((code, down.status.code().unwrap()));
    }
    eprintln!("upload/download exit codes across restarts: {outcomes:?}");
}

/// Asserts a failed command printed one readable line: the phrase, no debug dump.
#[track_caller]
fn one_readable_line(run: &crate::util::Run, phrase: &str) {
    run.code(2);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(
        !run.stderr.contains('{') && !run.stderr.contains("Error {"),
        "no debug dump: {}",
        run.stderr
    );
    assert!(
        run.stderr.to_lowercase().contains(phrase),
        "says `{phrase}`: {}",
        run.stderr
    );
}

#[test]
fn network_failures_are_one_readable_line() {
    let mut env = TestEnv::s3("messages");
    env.set("CACHER_TIMEOUT", "1");
    env.set("CACHER_ENDPOINT", "http://127.0.0.1:1");
    one_readable_line(&env.run(["exists", "k"]), "connection refused");
    let doctor = env.run(["doctor"]);
    doctor.code(2);
    assert!(
        !doctor.stderr.contains(" :"),
        "an operation is named: {}",
        doctor.stderr
    );
    one_readable_line(&doctor, "connection refused");

    env.set("CACHER_ENDPOINT", "http://no-such-host.invalid:3900");
    one_readable_line(&env.run(["exists", "k"]), "cannot resolve");

    let front = crate::util::tls::TlsFront::start(&server().endpoint);
    env.set("CACHER_ENDPOINT", &front.endpoint);
    one_readable_line(&env.run(["exists", "k"]), "certificate");

    let proxy = Proxy::start(&server().endpoint);
    proxy.stall_everything();
    env.set("CACHER_ENDPOINT", &proxy.endpoint);
    one_readable_line(&env.run(["exists", "k"]), "timed out");

    env.set("CACHER_ENDPOINT", &server().endpoint);
    env.set(
        "CACHER_S3_SECRET",
        "0000000000000000000000000000000000000000000000000000000000000000",
    );
    if server().kind == Kind::Garage {
        one_readable_line(&env.run(["exists", "k"]), "access denied");
    }
}
