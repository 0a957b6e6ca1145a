//! Configuration: precedence flag > env > file > default, `init`, `doctor`, credentials.

use std::os::unix::fs::PermissionsExt;

use crate::util::{TestEnv, garage, read};

/// Writes the credential files and returns an env with no credentials in variables.
fn env_with_credential_files(name: &str) -> (TestEnv, String, String) {
    let mut env = TestEnv::on(garage(), name);
    env.unset("CACHER_S3_KEY_ID");
    env.unset("CACHER_S3_SECRET");
    let g = garage();
    let key = env.write("creds/key-id", format!("{}\n", g.key_id));
    let secret = env.write("creds/secret", format!("{}\n", g.secret));
    (env, key.display().to_string(), secret.display().to_string())
}

#[test]
fn init_writes_a_0600_config_then_every_command_uses_it() {
    let (mut env, key, secret) = env_with_credential_files("init");
    let g = garage();
    let prefix = env.prefix.clone();
    for var in [
        "CACHER_ENDPOINT",
        "CACHER_REGION",
        "CACHER_BUCKET",
        "CACHER_PREFIX",
    ] {
        env.unset(var);
    }
    let run = env.run([
        "init",
        "--endpoint",
        &g.endpoint,
        "--region",
        &g.region,
        "--bucket",
        &g.bucket,
        "--prefix",
        &prefix,
        "--key-file",
        &key,
        "--secret-file",
        &secret,
    ]);
    run.ok();
    let config = env.home().join(".config/cacher/config.toml");
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(&format!("prefix = \"{prefix}\"")), "{text}");
    assert!(
        !text.contains(&g.secret),
        "the config names the secret file, not the secret"
    );

    let f = env.write("f", "data");
    env.run(["upload", "k", f.to_str().unwrap()]).ok();
    env.run(["exists", "k"]).ok();
    let run = env.run(["list", "--root", &format!("{prefix}/")]);
    assert!(run.ok().stdout.contains(" k\n"), "{}", run.stdout);
}

#[test]
fn init_with_a_wrong_secret_writes_the_config_and_exits_2() {
    let (mut env, key, _) = env_with_credential_files("initbad");
    let bad = env.write(
        "creds/bad",
        "0000000000000000000000000000000000000000000000000000000000000000\n",
    );
    env.set("CACHER_SECRET_FILE", bad.to_str().unwrap());
    let endpoint = garage().endpoint.clone();
    let run = env.run(["init", "--endpoint", &endpoint, "--key-file", &key]);
    run.code(2);
    assert!(run.stderr.contains("smoke test failed"), "{}", run.stderr);
    assert!(env.home().join(".config/cacher/config.toml").exists());
}

#[test]
fn doctor_reports_sources_and_lengths_never_the_secret() {
    let (mut env, key, secret) = env_with_credential_files("doctor");
    env.set("CACHER_KEY_FILE", &key);
    let config = env.write(
        "conf.toml",
        format!("secret_file = \"{secret}\"\njobs = 3\n"),
    );
    env.set("CACHER_CONFIG", config.to_str().unwrap());
    let run = env.run(["doctor", "--region", "garage"]);
    run.ok();
    let out = &run.stdout;
    let g = garage();
    assert!(
        out.contains("(flag)") && out.contains("env CACHER_ENDPOINT"),
        "{out}"
    );
    assert!(
        out.contains("(env CACHER_KEY_FILE)") && out.contains("(config file)"),
        "{out}"
    );
    assert!(out.contains(&format!("{} chars", g.secret.len())), "{out}");
    assert!(out.contains("canary"), "{out}");
    assert!(!run.all_output().contains(&g.secret));
}

#[test]
fn doctor_warns_about_whitespace_in_credentials() {
    let mut env = TestEnv::on(garage(), "ws");
    let g = garage();
    env.set("CACHER_S3_SECRET", &format!(" {}", g.secret));
    let run = env.run(["doctor"]);
    run.code(2);
    assert!(run.stderr.contains("whitespace"), "{}", run.stderr);
    assert!(!run.all_output().contains(&g.secret));
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let mut env = TestEnv::on(garage(), "prec");
    let base = env.prefix.clone();
    let config = env.write("c.toml", format!("prefix = \"{base}/file\"\n"));
    env.set("CACHER_CONFIG", config.to_str().unwrap());
    let f = env.write("f", "x");
    let f = f.to_str().unwrap();

    env.unset("CACHER_PREFIX");
    env.run(["upload", "from-file", f]).ok();
    env.set("CACHER_PREFIX", &format!("{base}/env"));
    env.run(["upload", "from-env", f]).ok();
    env.run([
        "upload",
        "from-flag",
        f,
        "--prefix",
        &format!("{base}/flag"),
    ])
    .ok();

    let run = env.run(["list", "--root", "--recursive", &format!("{base}/")]);
    let keys: Vec<&str> = run
        .ok()
        .stdout
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            format!("{base}/env/from-env"),
            format!("{base}/file/from-file"),
            format!("{base}/flag/from-flag")
        ]
    );
    // Default: no config file, no env: the embedded file:// store, not S3.
    let bare = TestEnv::bare();
    let run = bare.run(["doctor"]);
    assert!(run.ok().stdout.contains("file://"), "{}", run.stdout);
}

#[test]
fn credential_env_vars_beat_files() {
    let (mut env, key, _) = env_with_credential_files("credprec");
    let bad = env.write("creds/bad", "not-the-secret\n");
    env.set("CACHER_KEY_FILE", &key);
    env.set("CACHER_SECRET_FILE", bad.to_str().unwrap());
    env.run(["exists", "k"]).code(2);
    env.set("CACHER_S3_SECRET", &garage().secret);
    env.run(["exists", "k"]).code(1);
}

#[test]
fn unknown_config_fields_warn_and_wrong_types_exit_2_naming_field_and_line() {
    let mut env = TestEnv::file_store();
    let config = env.write("c.toml", "bucket = \"\"\nbukcet = \"typo\"\n");
    env.set("CACHER_CONFIG", config.to_str().unwrap());
    // A field of a newer cacher (or a typo) is a warning, and the command runs.
    let run = env.run(["exists", "k"]);
    run.code(1);
    assert!(
        run.stderr.contains("warning")
            && run.stderr.contains("`bukcet`")
            && run.stderr.contains("line 2"),
        "{}",
        run.stderr
    );
    let run = env.run(["doctor"]);
    assert!(
        run.ok().stdout.contains("`bukcet`"),
        "doctor lists it: {}",
        run.stdout
    );
    std::fs::write(&config, "jobs = \"many\"\n").unwrap();
    let run = env.run(["exists", "k"]);
    run.code(2);
    assert!(
        run.stderr.contains("line 1") && run.stderr.contains("`jobs`"),
        "{}",
        run.stderr
    );
    std::fs::write(&config, "region = \"r\"\nendpoint = 42\n").unwrap();
    let run = env.run(["exists", "k"]);
    run.code(2);
    assert!(
        run.stderr.contains("line 2")
            && run.stderr.contains("`endpoint`")
            && run.stderr.contains("expected a string"),
        "{}",
        run.stderr
    );
}

#[test]
fn s3_settings_without_an_endpoint_are_an_error_naming_them() {
    let mut env = TestEnv::bare();
    env.set("CACHER_BUCKET", "ci-cache");
    let run = env.run(["exists", "k"]);
    run.code(2);
    assert!(
        run.stderr.contains("bucket") && run.stderr.contains("endpoint"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    env.unset("CACHER_BUCKET");
    env.set("CACHER_S3_KEY_ID", "GK0000");
    let run = env.run(["upload", "k", env.write("f", "x").to_str().unwrap()]);
    run.code(2);
    assert!(run.stderr.contains("CACHER_S3_KEY_ID"), "{}", run.stderr);
    assert!(
        !env.home().join(".cache/cacher").exists(),
        "nothing went to the local store"
    );
    // With no S3 setting at all, the local store is the default.
    env.unset("CACHER_S3_KEY_ID");
    env.run(["exists", "k"]).code(1);
}

#[test]
fn init_records_its_command_line_not_the_environment_and_needs_an_endpoint() {
    let (mut env, key, secret) = env_with_credential_files("initflags");
    let g = garage();
    let run = env.run(["init", "--bucket", &g.bucket]);
    run.code(2);
    assert!(run.stderr.contains("--endpoint"), "{}", run.stderr);
    let config = env.home().join(".config/cacher/config.toml");
    assert!(!config.exists(), "nothing written");

    env.set("CACHER_JOBS", "3");
    env.set("CACHER_KEY_FILE", &key);
    let run = env.run([
        "init",
        "--endpoint",
        &g.endpoint,
        "--bucket",
        &g.bucket,
        "--secret-file",
        &secret,
    ]);
    run.ok();
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("endpoint") && text.contains("bucket") && text.contains("secret_file"),
        "{text}"
    );
    for from_env in ["jobs", "key_file", "prefix"] {
        assert!(
            !text.contains(from_env),
            "{from_env} came from the environment: {text}"
        );
    }
}

#[test]
fn arch_suffix_flag_takes_true_and_false_and_version_flags_print_the_version() {
    let mut env = TestEnv::bare();
    env.set("CACHER_ARCH_SUFFIX", "true");
    let suffixed = env.run(["key", "bin/tool"]).ok().stdout.clone();
    assert_ne!(suffixed.trim(), "bin/tool");
    let run = env.run(["key", "bin/tool", "--arch-suffix=false"]);
    assert_eq!(
        run.ok().stdout.trim(),
        "bin/tool",
        "the flag overrides the variable"
    );
    env.unset("CACHER_ARCH_SUFFIX");
    let run = env.run(["key", "bin/tool", "--arch-suffix=true"]);
    assert_eq!(run.ok().stdout, suffixed);
    let version = env.run(["version"]).ok().stdout.clone();
    for flag in ["--version", "-V"] {
        assert_eq!(env.run([flag]).ok().stdout, version, "{flag}");
    }
}

#[test]
fn arch_suffix_in_config_applies_to_data_commands_idempotently() {
    let mut env = TestEnv::on(garage(), "arch");
    env.set("CACHER_ARCH_SUFFIX", "true");
    let f = env.write("f", "x");
    env.run(["upload", "bin/tool", f.to_str().unwrap()]).ok();
    let printed = env.run(["key", "bin/tool"]);
    let printed = printed.ok().stdout.trim().to_string();
    env.run(["exists", &printed]).ok();
    env.run(["exists", "bin/tool"]).ok();
    let run = env.run(["list", "bin/"]);
    assert_eq!(run.ok().stdout.lines().count(), 1, "{}", run.stdout);
    assert!(
        run.stdout.trim_end().ends_with(&printed["bin/".len()..]),
        "{}",
        run.stdout
    );
}

#[test]
fn version_names_version_commit_and_platform() {
    let run = TestEnv::bare().run(["version"]);
    let out = run.ok().stdout.trim().to_string();
    assert!(
        out.starts_with(&format!("cacher {} (", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    assert!(
        out.ends_with("linux-amd64") || out.ends_with("linux-arm64"),
        "{out}"
    );
}

#[test]
fn no_command_prints_the_secret_even_verbose() {
    let (mut env, key, secret) = env_with_credential_files("secrets");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    env.set("CACHER_KEY_FILE", &key);
    env.set("CACHER_SECRET_FILE", &secret);
    let g = garage();
    let f = env.write("f", "data");
    let f = f.to_str().unwrap();
    let tree = env.path("tree");
    env.write("tree/a", "a");
    let tree = tree.to_str().unwrap();
    let dest = env.path("dest");
    let out = env.path("out");
    let runs = [
        vec!["doctor", "-v"],
        vec!["upload", "k", f, "-v"],
        vec!["exists", "k", "-v"],
        vec!["download", "k", dest.to_str().unwrap(), "-v"],
        vec!["list", "-v", "--recursive"],
        vec!["dir", "upload", "d", tree, "-v"],
        vec!["dir", "download", "d", out.to_str().unwrap(), "-v"],
        vec!["delete", "k", "-v"],
        vec!["prune", "--older-than", "1h", "-v"],
        vec!["gc", "-v"],
        vec!["key", "x/{hash}", "--hash-from", f, "-v"],
    ];
    for args in runs {
        let run = env.run(&args);
        run.ok();
        assert!(
            !run.all_output().contains(&g.secret),
            "{args:?} printed the secret"
        );
    }
    // The same secret from the environment, with a wrong key id: errors stay clean.
    env.set("CACHER_S3_SECRET", &g.secret);
    env.set("CACHER_S3_KEY_ID", "GK000000000000000000000000");
    let run = env.run(["upload", "k2", f, "-v"]);
    run.code(2);
    assert!(!run.all_output().contains(&g.secret));
}

#[test]
fn a_world_readable_secret_file_gets_a_warning() {
    let (mut env, key, secret) = env_with_credential_files("secretmode");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.set("CACHER_KEY_FILE", &key);
    env.set("CACHER_SECRET_FILE", &secret);
    let run = env.run(["exists", "k"]);
    run.code(1);
    assert!(run.stderr.contains("chmod 600"), "{}", run.stderr);
    let run = env.run(["doctor"]);
    assert_eq!(
        run.ok().stderr.matches("chmod 600").count(),
        1,
        "once: {}",
        run.stderr
    );
}

#[test]
fn requests_go_through_the_proxy_named_in_the_environment() {
    // The endpoint's host does not resolve; only the proxy (a TCP relay to Garage that
    // takes the absolute-form requests an HTTP proxy gets) can reach it.
    let proxy = crate::util::proxy::Proxy::start(&garage().endpoint);
    let mut env = TestEnv::on(garage(), "proxy");
    env.set("CACHER_ENDPOINT", "http://cacher-s3.invalid:3900");
    env.set("CACHER_TIMEOUT", "5");
    let src = env.write("src", "through the proxy");
    env.run(["exists", "k"]).code(2);

    env.set("HTTP_PROXY", &proxy.endpoint);
    env.run(["upload", "k", src.to_str().unwrap()]).ok();
    env.run(["exists", "k"]).ok();
    env.set("NO_PROXY", "cacher-s3.invalid");
    env.run(["exists", "k"]).code(2);
}

/// A CI container may run jobs without a HOME: the CACHER_* variables are all cacher
/// needs then, as with no config file (the tree state is not kept).
#[test]
fn without_a_home_the_environment_is_enough() {
    let env = TestEnv::s3("nohome");
    env.write("tree/a.txt", "tree data");
    let file = env.write("f.txt", "file data");
    let file = file.to_str().unwrap();
    for args in [
        vec!["upload", "k", file],
        vec!["exists", "k"],
        vec!["download", "k", "out.txt"],
        vec!["dir", "upload", "t", "tree"],
        vec!["dir", "download", "t", "restored"],
    ] {
        let mut cmd = env.cmd(&args);
        cmd.env_remove("HOME");
        crate::util::Run::of(cmd.output().unwrap()).ok();
    }
    assert_eq!(read(env.path("out.txt")), b"file data");
    assert_eq!(read(env.path("restored/a.txt")), b"tree data");

    // Without an endpoint as well there is no default store: a one-line error (not a
    // store in the working directory), while `key` needs none; `init` has no file to
    // write without --config.
    let bare = |args: &[&str], vars: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cacher"));
        cmd.args(args).env_clear().current_dir(env.dir.path());
        cmd.envs(vars.iter().copied());
        crate::util::Run::of(cmd.output().unwrap())
    };
    let missing = bare(&["exists", "k"], &[]);
    missing.code(2);
    assert!(
        missing.stderr.contains("CACHER_ENDPOINT"),
        "{}",
        missing.stderr
    );
    assert_eq!(missing.stderr.lines().count(), 1, "{}", missing.stderr);
    let key = bare(&["key", "x-{hash}", "--hash-from", file], &[]);
    assert!(key.ok().stdout.starts_with("x-"), "{}", key.stdout);
    let init = bare(&["init", "--endpoint", "file:///tmp/nowhere"], &[]);
    init.code(2);
    assert!(init.stderr.contains("--config"), "{}", init.stderr);
    assert!(
        !env.path("~").exists(),
        "nothing written in the working directory"
    );
    assert!(!env.path(".cacher").exists());
}
