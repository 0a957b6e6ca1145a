//! `kill -9` at arbitrary points: a key then reads as a miss or as the complete entry,
//! never as a corrupt hit, and a killed download leaves DEST untouched.

use std::time::Duration;

use crate::util::{TestEnv, random_bytes, read, temp_leftovers};

/// Starts `cacher ARGS`, kills it with SIGKILL after `after`, reaps it. Returns whether
/// it had already finished successfully.
fn kill_after(env: &TestEnv, args: &[&str], after: Duration) -> bool {
    let mut child = env
        .cmd(args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let finished = matches!(child.try_wait(), Ok(Some(status)) if status.success());
    let _ = child.kill();
    let _ = child.wait();
    finished
}

const DELAYS_MS: [u64; 6] = [5, 30, 80, 160, 320, 640];

#[test]
fn killed_uploads_leave_a_miss_or_the_complete_entry() {
    let mut env = TestEnv::s3("crashup");
    env.set("CACHER_MULTIPART_THRESHOLD", "8388608");
    let data = random_bytes(48 * 1024 * 1024, 61);
    let src = env.write("src.bin", &data);
    for (i, ms) in DELAYS_MS.iter().enumerate() {
        let key = format!("plain{i}");
        kill_after(
            &env,
            &["upload", &key, src.to_str().unwrap()],
            Duration::from_millis(*ms),
        );
        let exists = env.run(["exists", &key]);
        if exists.code == 0 {
            let dest = env.path(&format!("check{i}"));
            env.run(["download", &key, dest.to_str().unwrap()]).ok();
            assert!(read(&dest) == data, "{key}: a hit must be complete");
        } else {
            exists.code(1);
        }
    }
    for i in 0..3 {
        env.write(&format!("tree/f{i}"), random_bytes(6 * 1024 * 1024, 70 + i));
    }
    let tree = env.path("tree");
    for (i, ms) in DELAYS_MS.iter().enumerate() {
        let key = format!("dir{i}");
        kill_after(
            &env,
            &["dir", "upload", &key, tree.to_str().unwrap()],
            Duration::from_millis(*ms),
        );
        let out = env.path(&format!("out{i}"));
        let run = env.run(["dir", "download", &key, out.to_str().unwrap()]);
        if run.code == 0 {
            for f in 0..3 {
                assert!(read(out.join(format!("f{f}"))) == random_bytes(6 * 1024 * 1024, 70 + f));
            }
        } else {
            run.code(1);
            assert!(!out.exists());
        }
    }
    // A later complete upload works despite whatever the killed ones left.
    env.run(["dir", "upload", "dir0", tree.to_str().unwrap(), "--force"])
        .ok();
    env.run(["upload", "plain0", src.to_str().unwrap(), "--force"])
        .ok();
}

#[test]
fn killed_downloads_leave_dest_untouched_and_the_next_one_works() {
    let env = TestEnv::s3("crashdown");
    let data = random_bytes(96 * 1024 * 1024, 62);
    let src = env.write("src.bin", &data);
    env.run(["upload", "big", src.to_str().unwrap()]).ok();
    let dest = env.path("out/dest.bin");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(&dest, "old content").unwrap();
    for ms in DELAYS_MS {
        let done = kill_after(
            &env,
            &["download", "big", dest.to_str().unwrap()],
            Duration::from_millis(ms),
        );
        let now = read(&dest);
        if done {
            assert!(now == data);
            std::fs::write(&dest, "old content").unwrap();
        } else {
            assert!(
                now == b"old content" || now == data,
                "DEST is old or complete, never partial"
            );
        }
    }
    env.run(["download", "big", dest.to_str().unwrap()]).ok();
    assert!(read(&dest) == data);

    // Leftovers of the killed runs above (and more made here), once old, are removed by
    // the next download or restore beside them; fresh ones (a run in progress) stay.
    let out = dest.parent().unwrap();
    std::fs::write(out.join(".cacher-killed.part"), "half").unwrap();
    std::fs::create_dir_all(out.join(".cacher-restore-killed/ro")).unwrap();
    crate::util::sh(
        "chmod 555 .cacher-restore-killed/ro; \
         touch -d '2 days ago' .cacher-*.part .cacher-restore-killed; \
         echo live > .cacher-live.part",
        out,
    );
    env.run(["download", "big", dest.to_str().unwrap()]).ok();
    assert_eq!(temp_leftovers(out), vec![".cacher-live.part".to_string()]);
    std::fs::remove_file(out.join(".cacher-live.part")).unwrap();
    crate::util::sh(
        "mkdir -p .cacher-restore-old && touch -d '2 days ago' .cacher-restore-old",
        out,
    );
    let tree = env.write("small/f", "a small tree");
    let tree = tree.parent().unwrap().to_str().unwrap();
    env.run(["dir", "upload", "tree", tree]).ok();
    env.run([
        "dir",
        "download",
        "tree",
        out.join("restored").to_str().unwrap(),
    ])
    .ok();
    assert_eq!(temp_leftovers(out), Vec::<String>::new());
}
