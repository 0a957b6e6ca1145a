//! The CI recipes in docs/ci.md, run as written: each YAML block is parsed, its
//! variables pointed at the test S3 server, a local HTTP server (the release files and a
//! stand-in Go toolchain) and the local registry, and its shell run twice with the real
//! binary. The first run fills the cache; the second hits everything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

use crate::docker::{REGISTRY, build, daemon_ready, docker, rmi, run_bytes};
use crate::util::http::{HttpServer, Reply};
use crate::util::{TestEnv, server, unique};

/// The YAML block after `<!-- recipe: NAME -->` in docs/ci.md.
fn recipe(name: &str) -> Value {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ci.md"))
        .expect("docs/ci.md");
    let marker = format!("<!-- recipe: {name} -->");
    let after = &doc[doc.find(&marker).unwrap_or_else(|| panic!("no {marker}")) + marker.len()..];
    let body = after
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .unwrap_or_else(|| panic!("no yaml block after {marker}"))
        .0;
    serde_yaml::from_str(body).unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"))
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                    };
                    (k.as_str().unwrap().to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A stand-in Go toolchain: `go mod download` "fetches" each go.sum module into
/// ~/go/pkg/mod (read-only, as Go leaves it) and says so; `go test` checks they are all
/// there. What is under test is cacher and the recipes' shell, not Go.
fn go_tarball(dir: &Path) -> Vec<u8> {
    let go = dir.join("go-dist/go/bin/go");
    std::fs::create_dir_all(go.parent().unwrap()).unwrap();
    std::fs::write(
        &go,
        r#"#!/bin/sh
set -e
mods="$HOME/go/pkg/mod"
case "$1" in
  version) echo "go version go-stand-in linux/amd64" ;;
  mod)
    while read -r module version _; do
      d="$mods/$module@$version"
      [ -d "$d" ] && continue
      echo "go: downloading $module $version"
      mkdir -p "$d"
      head -c 300000 /dev/urandom > "$d/source.go"
      chmod -R a-w "$d"
    done < go.sum ;;
  test)
    while read -r module version _; do
      [ -s "$mods/$module@$version/source.go" ] || { echo "missing $module" >&2; exit 1; }
    done < go.sum
    echo "ok  	example.com/myproject" ;;
  *) echo "stand-in go: $*" >&2; exit 2 ;;
esac
"#,
    )
    .unwrap();
    crate::util::sh(
        "chmod +x go-dist/go/bin/go && tar -czf go.tar.gz -C go-dist go",
        dir,
    );
    std::fs::read(dir.join("go.tar.gz")).unwrap()
}

/// What the recipes download: the release (dist/ when built, else the test binary) and
/// the Go stand-in, and the image the recipes cache.
struct World {
    env: TestEnv,
    http: HttpServer,
    go_sha256: String,
    image: Option<String>,
    project: PathBuf,
}

fn world(name: &str, with_docker: bool) -> World {
    let env = TestEnv::s3(name);
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/cacher-linux-amd64");
    let binary = if dist.exists() {
        std::fs::read(&dist).unwrap()
    } else {
        std::fs::read(env!("CARGO_BIN_EXE_cacher")).unwrap()
    };
    // Like the real checksums.txt, it lists binaries the job does not download: the
    // recipes must check only their own line.
    let checksums = format!(
        "{}  cacher-linux-amd64\n{}  cacher-darwin-arm64\n",
        crate::plain::hex_sha256(&binary),
        "0".repeat(64)
    );
    let go = go_tarball(env.dir.path());
    let go_sha256 = crate::plain::hex_sha256(&go);
    let http = HttpServer::start(vec![
        ("/release/cacher-linux-amd64", Reply::Body(binary)),
        (
            "/release/checksums.txt",
            Reply::Body(checksums.into_bytes()),
        ),
        ("/dl/go1.23.4.linux-amd64.tar.gz", Reply::Body(go)),
    ]);
    let image = with_docker.then(|| {
        let tag = format!("{REGISTRY}/cacher-recipes/{}:16", unique("db"));
        build(&env, &tag, None, &[("db.bin", run_bytes(2 << 20, 61))]);
        let pushed = docker(&["push", &tag]);
        assert!(pushed.status.success(), "push to the local registry");
        rmi(&tag);
        tag
    });
    let project = env.path("home/myproject");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("go.mod"), "module example.com/myproject\n").unwrap();
    std::fs::write(
        project.join("go.sum"),
        "example.com/a v1.0.0 h1:a=\nexample.com/b v1.2.0 h1:b=\n",
    )
    .unwrap();
    World {
        env,
        http,
        go_sha256,
        image,
        project,
    }
}

impl World {
    /// The value the test gives a recipe variable, or `None` to keep the recipe's.
    fn variable(&self, name: &str) -> Option<String> {
        let g = server();
        Some(match name {
            "CACHER_RELEASE" => self.http.url("/release"),
            "GO_DL" => self.http.url("/dl"),
            "GO_SHA256" => self.go_sha256.clone(),
            "S3_ENDPOINT" | "CACHER_ENDPOINT" => g.endpoint.clone(),
            "S3_REGION" | "CACHER_REGION" => g.region.clone(),
            "S3_BUCKET" | "CACHER_BUCKET" => g.bucket.clone(),
            "S3_PREFIX" | "CACHER_PREFIX" => self.env.prefix.clone(),
            "CACHER_S3_KEY_ID" => g.key_id.clone(),
            "CACHER_S3_SECRET" => g.secret.clone(),
            "DB_IMAGE" => self.image.clone()?,
            _ => return None,
        })
    }

    fn home(&self) -> PathBuf {
        self.env.home()
    }

    /// The recipe's variables with the test's values put in.
    fn environment(&self, declared: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let home = self.home().display().to_string();
        let mut vars: BTreeMap<String, String> = declared
            .iter()
            .map(|(k, v)| {
                let v = self
                    .variable(k)
                    .unwrap_or_else(|| v.replace("/home/build", &home));
                (k.clone(), v)
            })
            .collect();
        vars.insert("HOME".into(), home);
        vars.entry("PATH".into())
            .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
        vars
    }

    /// Runs `script` with bash `-e` (and pipefail) in `cwd`; returns what it printed.
    fn shell(&self, script: &str, cwd: &Path, vars: &BTreeMap<String, String>) -> String {
        let out = Command::new("bash")
            .args(["--noprofile", "--norc", "-eo", "pipefail", "-c", script])
            .current_dir(cwd)
            .env_clear()
            .envs(vars)
            .output()
            .expect("bash");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "step failed:\n{script}\n---\n{printed}"
        );
        assert!(
            !printed.contains(&server().secret),
            "a step printed the secret"
        );
        printed
    }
}

/// Checks what the cold (`first`) and the warm (`second`) run said, the same for every
/// recipe.
fn assert_cold_then_warm(world: &World, first: &str, second: &str) {
    let go_url = "/dl/go1.23.4.linux-amd64.tar.gz";
    assert_eq!(
        world.http.hits(go_url),
        1,
        "the toolchain came from the URL once"
    );
    assert!(first.contains("go: downloading example.com/a"), "{}", first);
    assert!(
        !second.contains("go: downloading"),
        "modules restored: {}",
        second
    );
    assert!(second.contains("already cached; skipped"), "{}", second);
    assert!(second.contains("ok  \texample.com/myproject"), "{}", second);
    if world.image.is_some() {
        assert!(
            second.contains("restored"),
            "image from the cache: {}",
            second
        );
    }
}

/// Resets what a fresh CI machine would not have: the toolchain, the module cache, the
/// image and cacher itself (the bucket keeps its cache).
fn fresh_machine(world: &World) {
    let home = world.home();
    crate::util::sh(
        "chmod -R u+w go .local 2>/dev/null || true; rm -rf go .local .config",
        &home,
    );
    if let Some(image) = &world.image {
        rmi(image);
    }
}

/// Whether dockerd and the local registry answer; says why not.
fn docker_usable(test: &str) -> bool {
    if !daemon_ready(test) {
        return false;
    }
    let registry = std::net::TcpStream::connect(REGISTRY).is_ok();
    if !registry {
        eprintln!("SKIPPED {test}: no registry at {REGISTRY}");
    }
    registry
}

#[test]
fn builds_sr_ht_manifest_runs_as_written() {
    if !docker_usable("builds_sr_ht_manifest_runs_as_written") {
        return;
    }
    let manifest = recipe("builds.sr.ht");
    let world = world("srht", true);
    let g = server();
    std::fs::write(
        world.home().join(".s3-cache-key-id"),
        format!("{}\n", g.key_id),
    )
    .unwrap();
    std::fs::write(
        world.home().join(".s3-cache-key-secret"),
        format!("{}\n", g.secret),
    )
    .unwrap();
    let vars = world.environment(&string_map(&manifest["environment"]));
    let tasks: Vec<(String, String)> = manifest["tasks"]
        .as_sequence()
        .expect("tasks")
        .iter()
        .flat_map(|t| string_map(t).into_iter())
        .collect();
    assert!(tasks.iter().any(|(n, _)| n == "cache_gomod"));
    let run_all = || {
        tasks
            .iter()
            // The runner's own setup (sudo) is done here already.
            .filter(|(name, _)| name != "start_docker")
            .map(|(_, script)| world.shell(&format!("set -x\n{script}"), &world.home(), &vars))
            .collect::<String>()
    };
    let first = run_all();
    fresh_machine(&world);
    let second = run_all();
    assert_cold_then_warm(&world, &first, &second);

    // A lockfile bump: the newest module cache is restored as the fallback, Go fetches
    // only the new module, and the upload sends only its chunks.
    let go_sum = world.project.join("go.sum");
    let mut sums = std::fs::read_to_string(&go_sum).unwrap();
    sums.push_str("example.com/c v0.3.0 h1:c=\n");
    std::fs::write(&go_sum, sums).unwrap();
    fresh_machine(&world);
    let third = run_all();
    assert!(third.contains("go: downloading example.com/c"), "{third}");
    assert!(!third.contains("go: downloading example.com/a"), "{third}");
    let (_, new, _) = crate::util::upload_stats(&third);
    assert!(new <= 8, "only the new module's chunks went up: {third}");
}

#[test]
fn github_actions_job_runs_as_written() {
    if !docker_usable("github_actions_job_runs_as_written") {
        return;
    }
    let workflow = recipe("github-actions");
    let job = &workflow["jobs"]["test"];
    let world = world("gha", true);
    let declared = string_map(&job["env"]);
    assert!(
        declared["CACHER_S3_SECRET"].contains("secrets."),
        "secrets come from secrets"
    );
    let run_all = || {
        let github_path = world.env.path("github_path");
        std::fs::write(&github_path, "").unwrap();
        let mut printed = String::new();
        for step in job["steps"].as_sequence().expect("steps") {
            let Some(script) = step["run"].as_str() else {
                continue; // `uses:` steps: the checkout is world.project
            };
            let mut vars = world.environment(&declared);
            vars.insert("GITHUB_PATH".into(), github_path.display().to_string());
            let added: Vec<String> = std::fs::read_to_string(&github_path)
                .unwrap()
                .lines()
                .rev()
                .map(str::to_string)
                .collect();
            let path = added
                .into_iter()
                .chain([vars["PATH"].clone()])
                .collect::<Vec<_>>();
            vars.insert("PATH".into(), path.join(":"));
            printed += &world.shell(script, &world.project, &vars);
        }
        printed
    };
    let first = run_all();
    fresh_machine(&world);
    let second = run_all();
    assert_cold_then_warm(&world, &first, &second);
}

#[test]
fn gitlab_ci_job_runs_as_written() {
    let pipeline = recipe("gitlab-ci");
    let job = &pipeline["test"];
    let world = world("gitlab", false);
    let mut vars = world.environment(&string_map(&job["variables"]));
    // Masked CI/CD variables of the project.
    for name in ["CACHER_S3_KEY_ID", "CACHER_S3_SECRET"] {
        vars.insert(name.into(), world.variable(name).unwrap());
    }
    let lines = |key: &str| -> Vec<String> {
        job[key]
            .as_sequence()
            .unwrap_or_else(|| panic!("{key}"))
            .iter()
            .map(|l| l.as_str().expect("a shell line").to_string())
            .collect()
    };
    let script = [lines("before_script"), lines("script")]
        .concat()
        .join("\n");
    let first = world.shell(&script, &world.project, &vars);
    fresh_machine(&world);
    let second = world.shell(&script, &world.project, &vars);
    assert_cold_then_warm(&world, &first, &second);
}

/// The shell block of README.md that follows the line starting with `intro`.
fn readme_block(intro: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let after = &readme[readme
        .find(intro)
        .unwrap_or_else(|| panic!("README.md has no {intro:?}"))..];
    after
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .unwrap_or_else(|| panic!("no sh block after {intro:?}"))
        .0
        .to_string()
}

#[test]
fn the_readme_fallback_loop_misses_hits_and_fails_on_errors_as_it_says() {
    let mut env = TestEnv::s3("readme-fallback");
    let snippet = readme_block("Directory trees, keyed by a lockfile");
    // `cargo fetch` stands in as a function that adds a crate per lockfile line.
    let script = format!(
        r#"set -e
cargo() {{ echo "cargo fetch ran"; while read -r c; do mkdir -p ~/.cargo/registry/"$c"; echo "$c" > ~/.cargo/registry/"$c"/lib.rs; done < Cargo.lock; }}
PATH="{bin}:$PATH"
{snippet}
echo "got=$got"
"#,
        bin = Path::new(env!("CARGO_BIN_EXE_cacher"))
            .parent()
            .unwrap()
            .display(),
    );
    let run = |env: &TestEnv| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .env_clear()
            .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(env.dir.path())
            .output()
            .expect("bash");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    env.write("Cargo.lock", "serde\n");
    // A miss: the script goes on, fetches and uploads.
    let (code, stdout, stderr) = run(&env);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("got=\n"), "{stdout}");
    // An exact hit.
    let (code, stdout, stderr) = run(&env);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("got=cargo/"), "{stdout}");
    // A lockfile bump: a fallback hit, then an upload under the new key.
    env.write("Cargo.lock", "serde\ntokio\n");
    let (code, stdout, stderr) = run(&env);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("uploaded"), "{stderr}");
    // The cache is down: exit 2 stops the script before the build (with the status
    // of the failed `[ $? -eq 1 ]`, which CI counts as a failure all the same).
    env.set("CACHER_ENDPOINT", "http://127.0.0.1:9");
    let (code, stdout, stderr) = run(&env);
    assert_ne!(code, Some(0), "{stdout}{stderr}");
    assert!(!stdout.contains("cargo fetch ran"), "{stdout}");
    assert!(stderr.contains("cannot reach"), "{stderr}");
    // Unless errors of the cache are asked to be misses.
    env.set("CACHER_ON_ERROR", "warn");
    let (code, stdout, stderr) = run(&env);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("--on-error warn"), "{stderr}");
}
