//! What ships beside the binary: shell completions and the man page.

use crate::util::{TestEnv, sh};

#[test]
fn completions_load_in_bash_and_man_page_renders() {
    let env = TestEnv::bare();
    let run = env.run(["completions", "bash"]);
    let script = env.write("cacher.bash", &run.ok().stdout);
    let loaded = sh(
        &format!("source '{}' && complete -p cacher", script.display()),
        env.dir.path(),
    );
    assert!(loaded.contains("_cacher"), "{loaded}");
    for shell in ["zsh", "fish"] {
        let run = env.run(["completions", shell]);
        assert!(run.ok().stdout.contains("upload"), "{shell}");
    }
    env.run(["completions", "tcsh"]).code(2);

    let man = env.run(["man"]);
    let page = &man.ok().stdout;
    assert!(page.contains(".TH cacher 1"), "{page}");
    assert!(page.contains("download"), "subcommands listed");
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn json_lets_scripts_tell_hit_fallback_and_miss() {
    let env = TestEnv::file_store();
    let f = env.write("f", "12345");
    env.write("tree/a", "a");
    let tree = env.path("tree");

    let run = env.run(["upload", "k", f.to_str().unwrap(), "--json"]);
    let up = &json_lines(&run.ok().stdout)[0];
    assert_eq!(up["result"], "uploaded");
    assert_eq!(up["transfer"]["bytes"], 5);

    let run = env.run(["exists", "k", "--json"]);
    assert_eq!(json_lines(&run.ok().stdout)[0]["cached"], true);
    let run = env.run(["exists", "nope", "--json"]);
    assert_eq!(json_lines(&run.code(1).stdout)[0]["cached"], false);

    let run = env.run([
        "key",
        "x/{hash}",
        "--hash-from",
        f.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        json_lines(&run.ok().stdout)[0]["key"]
            .as_str()
            .unwrap()
            .starts_with("x/")
    );

    env.run(["dir", "upload", "deps/v1", tree.to_str().unwrap()])
        .ok();
    let out = env.path("out");
    let exact = env.run([
        "dir",
        "download",
        "deps/v1",
        out.to_str().unwrap(),
        "--json",
    ]);
    let exact = &json_lines(&exact.ok().stdout)[0];
    assert_eq!(exact["result"], "hit");
    assert_eq!(exact["stats"]["chunks"], 1);
    let fallback = env.run([
        "dir",
        "download",
        "deps/v2",
        out.to_str().unwrap(),
        "--fallback",
        "deps/",
        "--json",
    ]);
    let fallback = &json_lines(&fallback.ok().stdout)[0];
    assert_eq!(fallback["result"], "fallback");
    assert_eq!(fallback["restored"], "deps/v1");
    let miss = env.run([
        "dir",
        "download",
        "deps/v3",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(json_lines(&miss.code(1).stdout)[0]["result"], "miss");

    let listed = env.run(["list", "--json"]);
    let names: Vec<String> = json_lines(&listed.ok().stdout)
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        names.contains(&"k".to_string()) && names.contains(&"deps/".to_string()),
        "{names:?}"
    );
}

#[test]
fn json_reports_skipped_uploads() {
    let env = TestEnv::file_store();
    let f = env.write("f", "x");
    env.write("tree/a", "a");
    let tree = env.path("tree");
    env.run(["upload", "k", f.to_str().unwrap()]).ok();
    env.run(["dir", "upload", "d", tree.to_str().unwrap()]).ok();
    let run = env.run(["upload", "k", f.to_str().unwrap(), "--json"]);
    assert_eq!(json_lines(&run.ok().stdout)[0]["result"], "skipped");
    let run = env.run(["dir", "upload", "d", tree.to_str().unwrap(), "--json"]);
    assert_eq!(json_lines(&run.ok().stdout)[0]["result"], "skipped");
}
