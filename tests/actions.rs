//! The GitHub composite actions `restore/` and `save/`, run as a runner runs them: each
//! action.yml is parsed, its inputs (with their defaults) and `github.action_path`
//! substituted into its steps, and each step's shell run in order with GITHUB_OUTPUT,
//! GITHUB_PATH, RUNNER_OS, RUNNER_ARCH and RUNNER_TOOL_CACHE set, against Garage and a
//! local release server (the binary under test with its checksums.txt).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

use crate::util::http::{HttpServer, Reply};
use crate::util::{TestEnv, put_object, snapshot};

/// What one run of an action did.
struct ActionRun {
    code: Option<i32>,
    outputs: BTreeMap<String, String>,
    stderr: String,
}

/// The release server: `cacher-<os>-<arch>` (this build's binary) and checksums.txt,
/// or a checksums.txt that does not match when `tampered`.
fn release(tampered: bool) -> (HttpServer, String) {
    let name = format!("cacher-linux-{}", runner_arch().1);
    let binary = std::fs::read(env!("CARGO_BIN_EXE_cacher")).expect("the cacher binary");
    let sum = match tampered {
        false => crate::util::sh(
            &format!(
                "sha256sum '{}' | cut -d' ' -f1",
                env!("CARGO_BIN_EXE_cacher")
            ),
            Path::new("."),
        ),
        true => "0".repeat(64),
    };
    let sums = format!(
        "{}  {name}\n{}  cacher-darwin-arm64\n",
        sum.trim(),
        "1".repeat(64)
    );
    let server = HttpServer::start(vec![
        (&format!("/v1/{name}"), Reply::Body(binary)),
        ("/v1/checksums.txt", Reply::Body(sums.into_bytes())),
    ]);
    let url = server.url("/v1");
    (server, url)
}

/// RUNNER_ARCH and cacher's name for this machine's arch.
fn runner_arch() -> (&'static str, &'static str) {
    match std::env::consts::ARCH {
        "aarch64" => ("ARM64", "arm64"),
        _ => ("X64", "amd64"),
    }
}

/// Runs the action in `dir` (`restore` or `save`) with `inputs`, in `env`'s directory
/// and environment, as a runner would.
fn run_action(env: &TestEnv, dir: &str, inputs: &[(&str, &str)]) -> ActionRun {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let action_path = root.join(dir);
    let yaml: Value = serde_yaml::from_str(
        &std::fs::read_to_string(action_path.join("action.yml")).expect("action.yml"),
    )
    .expect("action.yml is YAML");
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for (name, spec) in yaml["inputs"].as_mapping().expect("inputs") {
        let name = name.as_str().unwrap().to_string();
        if let Some(default) = spec["default"].as_str() {
            values.insert(name.clone(), default.to_string());
        }
    }
    for (name, value) in inputs {
        assert!(
            yaml["inputs"].get(*name).is_some(),
            "{dir} has no input {name}"
        );
        values.insert(name.to_string(), value.to_string());
    }
    for (name, spec) in yaml["inputs"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        if spec["required"].as_bool() == Some(true) {
            assert!(values.contains_key(name), "{dir} needs input {name}");
        }
    }
    let expand = |text: &str| {
        let mut text = text.replace(
            "${{ github.action_path }}",
            &action_path.display().to_string(),
        );
        for (name, value) in &values {
            text = text.replace(&format!("${{{{ inputs.{name} }}}}"), value);
        }
        assert!(!text.contains("${{"), "unexpanded expression in {text}");
        text
    };
    assert_eq!(yaml["runs"]["using"].as_str(), Some("composite"));
    let output_file = env.path(&format!("github-output-{dir}"));
    let _ = std::fs::remove_file(&output_file);
    let mut step_outputs: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut stderr = String::new();
    let mut code = Some(0);
    for step in yaml["runs"]["steps"].as_sequence().expect("steps") {
        assert_eq!(step["shell"].as_str(), Some("bash"));
        let script = env.path("step.sh");
        std::fs::write(&script, expand(step["run"].as_str().expect("run"))).unwrap();
        std::fs::write(&output_file, "").unwrap();
        let mut cmd = Command::new("bash");
        cmd.args(["--noprofile", "--norc", "-eo", "pipefail"])
            .arg(&script)
            .env_clear()
            .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("GITHUB_OUTPUT", &output_file)
            .env("GITHUB_PATH", env.path("github-path"))
            .env("RUNNER_OS", "Linux")
            .env("RUNNER_ARCH", runner_arch().0)
            .env("RUNNER_TOOL_CACHE", env.path("toolcache"))
            .current_dir(env.dir.path());
        for (name, value) in step["env"].as_mapping().into_iter().flatten() {
            cmd.env(name.as_str().unwrap(), expand(value.as_str().unwrap_or("")));
        }
        let out = cmd.output().expect("bash");
        stderr.push_str(&String::from_utf8_lossy(&out.stderr));
        stderr.push_str(&String::from_utf8_lossy(&out.stdout));
        let mut outputs = BTreeMap::new();
        for line in std::fs::read_to_string(&output_file).unwrap().lines() {
            if let Some((k, v)) = line.split_once('=') {
                outputs.insert(k.to_string(), v.to_string());
            }
        }
        if let Some(id) = step["id"].as_str() {
            step_outputs.insert(id.to_string(), outputs);
        }
        code = out.status.code();
        if code != Some(0) {
            break;
        }
    }
    let mut outputs = BTreeMap::new();
    for (name, spec) in yaml["outputs"].as_mapping().into_iter().flatten() {
        let value = spec["value"].as_str().unwrap();
        let inner = value
            .trim_start_matches("${{ steps.")
            .trim_end_matches(" }}");
        let (id, output) = inner
            .split_once(".outputs.")
            .expect("steps.ID.outputs.NAME");
        let got = step_outputs
            .get(id)
            .and_then(|o| o.get(output))
            .cloned()
            .unwrap_or_default();
        outputs.insert(name.as_str().unwrap().to_string(), got);
    }
    ActionRun {
        code,
        outputs,
        stderr,
    }
}

fn tree(env: &TestEnv) -> Vec<PathBuf> {
    env.write("registry/index/serde", "serde 1.0\n");
    env.write("registry/cache/serde.crate", vec![7u8; 200_000]);
    env.write("Cargo.lock", "[[package]]\nname = \"serde\"\n");
    vec![env.path("registry"), env.path("Cargo.lock")]
}

const PATHS: &str = "registry\nCargo.lock\n";

#[test]
fn restore_and_save_behave_as_actions_cache_does() {
    let (server, url) = release(false);
    let env = TestEnv::s3("actions");
    let paths = tree(&env);
    let want = snapshot(&env.path("registry"));
    // Sources the build unpacks: left out by the save's `exclude`.
    env.write("registry/src/serde/lib.rs", "pub fn f() {}\n");
    let restore = |key: &str, extra: &[(&str, &str)]| {
        let mut inputs = vec![("path", PATHS), ("key", key), ("release-url", url.as_str())];
        inputs.extend_from_slice(extra);
        run_action(&env, "restore", &inputs)
    };
    let save = |key: &str| {
        run_action(
            &env,
            "save",
            &[
                ("path", PATHS),
                ("key", key),
                ("release-url", url.as_str()),
                ("exclude", "  src/\n*.tmp\n"),
            ],
        )
    };

    // Cold: a miss, then a save.
    let cold = restore("deps-1", &[]);
    assert_eq!(cold.code, Some(0), "{}", cold.stderr);
    assert_eq!(cold.outputs["cache-hit"], "false");
    assert_eq!(cold.outputs["cache-matched-key"], "");
    let saved = save("deps-1");
    assert_eq!(saved.code, Some(0), "{}", saved.stderr);
    assert_eq!(saved.outputs["saved"], "true");
    env.run(["dir", "exists", "deps-1"]).ok();
    // Saved again: already cached, not uploaded.
    assert_eq!(save("deps-1").outputs["saved"], "false");

    // Warm: the exact key, restored to each path.
    for p in &paths {
        let _ = std::fs::remove_dir_all(p);
        let _ = std::fs::remove_file(p);
    }
    let warm = restore("deps-1", &[]);
    assert_eq!(warm.code, Some(0), "{}", warm.stderr);
    assert_eq!(warm.outputs["cache-hit"], "true");
    assert_eq!(warm.outputs["cache-matched-key"], "deps-1");
    assert_eq!(snapshot(&env.path("registry")), want);
    assert!(env.path("Cargo.lock").is_file());
    // What the save excluded is left alone by a restore over it, also inside the
    // directories it restores (where other strays are removed).
    env.write("registry/cache/serde.crate.tmp", "partial download\n");
    env.write("registry/cache/stray", "stray\n");
    let again = restore("deps-1", &[]);
    assert_eq!(again.outputs["cache-hit"], "true", "{}", again.stderr);
    let tmp = std::fs::read(env.path("registry/cache/serde.crate.tmp")).unwrap();
    assert_eq!(tmp, b"partial download\n");
    assert!(!env.path("registry/cache/stray").exists());

    // restore-keys: the newest entry under a prefix, not an exact hit.
    let fallback = restore("deps-2", &[("restore-keys", "other-\ndeps-\n")]);
    assert_eq!(fallback.code, Some(0), "{}", fallback.stderr);
    assert_eq!(fallback.outputs["cache-hit"], "false");
    assert_eq!(fallback.outputs["cache-matched-key"], "deps-1");

    // lookup-only: says whether the key is cached, writes nothing.
    std::fs::remove_dir_all(env.path("registry")).unwrap();
    let lookup = restore("deps-1", &[("lookup-only", "true")]);
    assert_eq!(lookup.outputs["cache-hit"], "true", "{}", lookup.stderr);
    assert!(!env.path("registry").exists());

    // A broken entry: a warning and a miss, not a failure.
    put_object(&format!("{}/deps-3", env.prefix), b"CACHERMF garbage");
    let broken = restore("deps-3", &[]);
    assert_eq!(broken.code, Some(0), "{}", broken.stderr);
    assert_eq!(broken.outputs["cache-hit"], "false");
    assert!(broken.stderr.contains("warning"), "{}", broken.stderr);

    // The binary was downloaded once, then taken from the tool cache.
    let name = format!("/v1/cacher-linux-{}", runner_arch().1);
    assert_eq!(server.hits(&name), 1);
}

#[test]
fn without_credentials_the_actions_warn_and_the_job_goes_on() {
    let (_server, url) = release(false);
    let mut env = TestEnv::s3("actions-nocreds");
    env.unset("CACHER_S3_KEY_ID");
    env.unset("CACHER_S3_SECRET");
    tree(&env);
    let inputs = [("path", PATHS), ("key", "k"), ("release-url", url.as_str())];
    let restored = run_action(&env, "restore", &inputs);
    assert_eq!(restored.code, Some(0), "{}", restored.stderr);
    assert_eq!(restored.outputs["cache-hit"], "false");
    assert!(
        restored.stderr.contains("no S3 key id"),
        "{}",
        restored.stderr
    );
    let saved = run_action(&env, "save", &inputs);
    assert_eq!(saved.code, Some(0), "{}", saved.stderr);
    assert_eq!(saved.outputs["saved"], "false");
    assert!(saved.stderr.contains("warning"), "{}", saved.stderr);
    // fail-on-error: the step fails instead.
    let strict = run_action(
        &env,
        "restore",
        &[
            ("path", PATHS),
            ("key", "k"),
            ("release-url", url.as_str()),
            ("fail-on-error", "true"),
        ],
    );
    assert_ne!(strict.code, Some(0), "{}", strict.stderr);
}

#[test]
fn a_release_that_does_not_match_its_checksums_is_never_run() {
    let (server, url) = release(true);
    let env = TestEnv::s3("actions-tampered");
    tree(&env);
    let run = run_action(
        &env,
        "restore",
        &[("path", PATHS), ("key", "k"), ("release-url", url.as_str())],
    );
    assert_ne!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("does not match"), "{}", run.stderr);
    assert_eq!(server.hits("/v1/checksums.txt"), 1);
    let installed: Vec<_> = walkdir::WalkDir::new(env.path("toolcache"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && e.file_name() == "cacher")
        .collect();
    assert!(installed.is_empty(), "nothing installed: {installed:?}");
    // A release server that is down is an error of the cache: a warning.
    let down = run_action(
        &env,
        "restore",
        &[
            ("path", PATHS),
            ("key", "k"),
            ("release-url", "http://127.0.0.1:9/v1"),
        ],
    );
    assert_eq!(down.code, Some(0), "{}", down.stderr);
    assert!(
        down.stderr.contains("could not be installed"),
        "{}",
        down.stderr
    );
}
