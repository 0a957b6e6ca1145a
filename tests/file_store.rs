//! The `file://` store: the same commands and semantics without a server.

use crate::util::{TestEnv, random_bytes, read};

#[test]
fn file_store_round_trip_list_and_delete() {
    let env = TestEnv::file_store();
    let data = random_bytes(70 * 1024 * 1024 + 3, 9);
    let src = env.write("big", &data);
    env.run(["upload", "a/big", src.to_str().unwrap()]).ok();
    env.run(["exists", "a/big"]).ok();
    assert_eq!(
        read(env.path("store/a/big")),
        data,
        "stored as a plain file"
    );
    let dest = env.path("restored");
    env.run(["download", "a/big", dest.to_str().unwrap()]).ok();
    assert!(read(&dest) == data);
    let run = env.run(["list"]);
    assert_eq!(run.ok().stdout.trim_end(), format!("{:>30} a/", "PRE"));
    env.run(["delete", "a/big"]).ok();
    env.run(["exists", "a/big"]).code(1);
    let tmp = env.path("store/.cacher-tmp");
    let left = std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "no temp files left in the store");
}

#[test]
fn file_store_download_miss_exits_3() {
    let env = TestEnv::file_store();
    env.run(["download", "nope", env.path("d").to_str().unwrap()])
        .code(3);
    env.run(["exists", "nope"]).code(1);
}
