//! Faults injected between cacher and Garage by a proxy on loopback: transient ones are
//! retried to byte-identical results, permanent ones fail in bounded time with DEST
//! untouched and nothing published.

use std::time::{Duration, Instant};

use crate::util::proxy::{Fault, Proxy};
use crate::util::{TestEnv, garage, random_bytes, read, stored, temp_leftovers};

/// An env whose endpoint is a fresh proxy in front of Garage.
fn through_proxy(name: &str) -> (TestEnv, Proxy) {
    let mut env = TestEnv::s3(name);
    let proxy = Proxy::start(&garage().endpoint);
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
        &garage().endpoint,
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
    let direct = env.run(["dir", "exists", "d", "--endpoint", &garage().endpoint]);
    direct.code(1);
}

#[test]
fn a_slow_trickle_is_not_a_stall() {
    let (mut env, proxy) = through_proxy("faulttrickle");
    let data = random_bytes(2 * 1024 * 1024, 33);
    let src = env.write("src.bin", &data);
    env.run([
        "upload",
        "slow",
        src.to_str().unwrap(),
        "--endpoint",
        &garage().endpoint,
    ])
    .ok();
    // 4 KiB every 5 ms (~800 KiB/s) on every connection the download opens: slower
    // than the 1 s timeout would allow for a whole range, but never idle that long.
    env.set("CACHER_TIMEOUT", "1");
    proxy.plan(&[Fault::Trickle(5); 8]);
    let dest = env.path("dest.bin");
    env.run(["download", "slow", dest.to_str().unwrap()]).ok();
    assert!(read(&dest) == data);
}
