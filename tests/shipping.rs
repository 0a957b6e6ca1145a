//! What ships beside the binary: shell completions and the man page.

use crate::util::http::{HttpServer, Reply};
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
    // A fallback restores only entries made from the same directory.
    let fallback = env.run([
        "dir",
        "download",
        "deps/v2",
        tree.to_str().unwrap(),
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

/// Runs `cacher ARGS` on a pseudo-terminal (util-linux `script`) and returns what the
/// terminal showed.
fn on_a_terminal(env: &TestEnv, args: &[&str]) -> String {
    let quoted: Vec<String> = std::iter::once(env!("CARGO_BIN_EXE_cacher"))
        .chain(args.iter().copied())
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qefc", &quoted.join(" "), "/dev/null"])
        .env_clear()
        .env("TERM", "xterm")
        .current_dir(env.dir.path());
    for (n, v) in &env.vars {
        cmd.env(n, v);
    }
    let out = cmd.output().expect("run script(1)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn progress_bars_on_a_terminal_and_only_summaries_in_logs() {
    let env = TestEnv::s3("progress");
    for i in 0..4 {
        env.write(&format!("tree/f{i}"), crate::util::random_bytes(300_000, i));
    }
    let body = crate::util::random_bytes(200 * 1024, 9);
    let http = HttpServer::start(vec![(
        "/slow",
        Reply::Slow {
            body: body.clone(),
            pause_ms: 5,
        },
    )]);
    let url = http.url("/slow");
    let tree = env.path("tree").display().to_string();
    let restored = env.path("restored").display().to_string();

    let shown = [
        on_a_terminal(&env, &["download", "f", "f.bin", "--url", &url]),
        on_a_terminal(&env, &["dir", "upload", "d", &tree]),
        on_a_terminal(&env, &["dir", "download", "d", &restored]),
    ];
    for screen in &shown {
        assert!(
            screen.contains("] ") && screen.contains(" eta "),
            "a bar with bytes, rate and ETA: {screen:?}"
        );
        assert!(
            screen.contains("cacher: "),
            "and the summary line: {screen:?}"
        );
    }
    assert_eq!(crate::util::read(env.path("f.bin")), body);

    // Not a terminal (a CI log): one summary line per transfer, no escape codes.
    let run = env.run(["dir", "download", "d", env.path("again").to_str().unwrap()]);
    assert_eq!(run.ok().stderr.lines().count(), 1, "{}", run.stderr);
    assert!(!run.stderr.contains('\x1b') && !run.stderr.contains(" eta "));
}

fn doc(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn the_references_cover_every_command_flag_and_setting() {
    use clap::CommandFactory;
    let commands = doc("docs/commands.md");
    let config = doc("docs/config.md");
    let cli = cacher::cli::Cli::command();

    let mut todo: Vec<(String, &clap::Command)> = cli
        .get_subcommands()
        .map(|c| (c.get_name().to_string(), c))
        .collect();
    while let Some((path, command)) = todo.pop() {
        if command.get_name() == "help" {
            continue;
        }
        let subcommands: Vec<_> = command.get_subcommands().collect();
        if subcommands.is_empty() {
            assert!(
                commands.contains(&format!("## cacher {path}\n")),
                "docs/commands.md has no section for `cacher {path}`"
            );
        }
        for sub in subcommands {
            todo.push((format!("{path} {}", sub.get_name()), sub));
        }
        for arg in command.get_arguments().filter(|a| !a.is_global_set()) {
            if let Some(long) = arg.get_long().filter(|l| *l != "help") {
                assert!(
                    commands.contains(&format!("--{long}")),
                    "docs/commands.md does not mention `cacher {path} --{long}`"
                );
            }
        }
    }

    let every_field = cacher::config::ConfigFile::every_field();
    let fields = serde_json::to_value(every_field).unwrap();
    for field in fields.as_object().unwrap().keys() {
        let env = format!("CACHER_{}", field.to_uppercase());
        assert!(
            config.contains(&format!("| `{field}` |")) && config.contains(&env),
            "docs/config.md lacks the field {field} or {env}"
        );
    }
    for arg in cli.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let documented = if ["json", "quiet", "verbose", "help"].contains(&long) {
            &commands
        } else {
            &config
        };
        assert!(
            documented.contains(&format!("--{long}")),
            "--{long} is not documented"
        );
    }
}
