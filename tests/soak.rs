//! A bounded soak: mixed plain and dir operations through the fault-injecting proxy,
//! checking every successful download against what was uploaded. It ends with a table
//! (operations, faults, retries, failures, bytes verified) and fails if anything came
//! back wrong. `CACHER_SOAK_OPS` sets the number of operations (default 150; the figures
//! in docs/reliability.md come from 3000).

use std::collections::HashMap;

use crate::util::proxy::{Fault, Proxy};
use crate::util::{TestEnv, random_bytes, read, server};

#[derive(Default)]
struct Tally {
    ops: usize,
    failures: usize,
    retries: u64,
    bytes_verified: u64,
    downloads_verified: usize,
}

fn retries_in(stderr: &str) -> u64 {
    stderr
        .split(" retr")
        .next()
        .filter(|_| stderr.contains(" retr"))
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn soak_mixed_operations_with_random_faults() {
    let ops: usize = std::env::var("CACHER_SOAK_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let mut env = TestEnv::s3("soak");
    let proxy = Proxy::start(&server().endpoint);
    env.set("CACHER_ENDPOINT", &proxy.endpoint);
    env.set("CACHER_MULTIPART_THRESHOLD", "8388608");
    env.set("CACHER_TIMEOUT", "5");
    let mut rng = fastrand::Rng::with_seed(0x50a4);
    // Every content a key may legitimately hold (a failed upload may or may not land).
    let mut plain: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    let mut trees: HashMap<String, Vec<u64>> = HashMap::new();
    let mut tally = Tally::default();

    for op in 0..ops {
        if rng.u8(..) < 64 {
            let fault = if rng.bool() {
                Fault::SlowDown
            } else {
                Fault::CutAfter(rng.usize(1..400_000))
            };
            proxy.plan(&[fault]);
        }
        let key = format!("k{}", rng.u8(..8));
        let dir_key = format!("d{}", rng.u8(..4));
        let run = match rng.u8(..6) {
            0 | 1 => {
                let size = if rng.u8(..10) == 0 {
                    9 << 20
                } else {
                    rng.usize(1..300_000)
                };
                let data = random_bytes(size, op as u64);
                let src = env.write(&format!("src{op}"), &data);
                let run = env.run(["upload", &key, src.to_str().unwrap(), "--force"]);
                let held = plain.entry(key.clone()).or_default();
                if run.code == 0 {
                    held.clear();
                }
                held.push(data);
                std::fs::remove_file(src).unwrap();
                run
            }
            2 => {
                let dest = env.path(&format!("dest{op}"));
                let run = env.run(["download", &key, dest.to_str().unwrap()]);
                if run.code == 0 {
                    let got = read(&dest);
                    let held = plain.get(&key).expect("a hit on a key never uploaded");
                    assert!(held.contains(&got), "op {op}: {key} restored wrong bytes");
                    tally.bytes_verified += got.len() as u64;
                    tally.downloads_verified += 1;
                    std::fs::remove_file(&dest).unwrap();
                } else {
                    assert!(!dest.exists(), "op {op}: a failed download left DEST");
                }
                run
            }
            3 => {
                let seed = rng.u64(..4);
                let tree = env.path(&format!("tree{op}"));
                for f in 0..3 {
                    env.write(
                        &format!("tree{op}/f{f}"),
                        random_bytes(100_000 * (f + 1), seed * 10 + f as u64),
                    );
                }
                let run = env.run(["dir", "upload", &dir_key, tree.to_str().unwrap(), "--force"]);
                let held = trees.entry(dir_key.clone()).or_default();
                if run.code == 0 {
                    held.clear();
                }
                held.push(seed);
                std::fs::remove_dir_all(tree).unwrap();
                run
            }
            4 => {
                let out = env.path(&format!("out{op}"));
                let run = env.run(["dir", "download", &dir_key, out.to_str().unwrap()]);
                if run.code == 0 {
                    let held = trees.get(&dir_key).expect("a hit on a tree never uploaded");
                    let ok = held.iter().any(|seed| {
                        (0..3).all(|f| {
                            read(out.join(format!("f{f}")))
                                == random_bytes(100_000 * (f + 1), seed * 10 + f as u64)
                        })
                    });
                    assert!(ok, "op {op}: {dir_key} restored a wrong tree");
                    tally.bytes_verified += 600_000;
                    tally.downloads_verified += 1;
                    std::fs::remove_dir_all(out).unwrap();
                } else {
                    assert!(!out.exists(), "op {op}: a failed restore left DIR");
                }
                run
            }
            _ => env.run(["exists", &key]),
        };
        tally.ops += 1;
        tally.retries += retries_in(&run.stderr);
        match run.code {
            0 | 1 | 3 => {}
            2 => tally.failures += 1,
            other => panic!("op {op}: unexpected exit {other}: {}", run.stderr),
        }
    }
    println!(
        "| operations | faults injected | retries | failed (exit 2) | downloads verified | bytes verified | lost or corrupt |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | 0 |",
        tally.ops,
        proxy.injected(),
        tally.retries,
        tally.failures,
        tally.downloads_verified,
        tally.bytes_verified
    );
    assert!(tally.downloads_verified > 0);
}
