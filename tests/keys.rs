//! `cacher key`: digests byte-compatible with coreutils, templates, the arch suffix.

use crate::util::{TestEnv, sh};

fn platform() -> String {
    let os = std::env::consts::OS;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    format!("{os}-{arch}")
}

#[test]
fn single_file_digest_equals_sha256sum_head_c_16() {
    let env = TestEnv::bare();
    env.write("go.sum", "golang.org/x/sys v0.1.0 h1:abc\n");
    let expected = sh("sha256sum go.sum | head -c 16", env.dir.path());
    let run = env.run(["key", "gomod/{hash}.tar.zst", "--hash-from", "go.sum"]);
    run.ok();
    assert_eq!(run.stdout, format!("gomod/{expected}.tar.zst\n"));
}

#[test]
fn hash_length_truncates_the_full_hex_digest() {
    let env = TestEnv::bare();
    env.write("f", "x");
    let full = sh("sha256sum f | cut -d' ' -f1", env.dir.path());
    let run = env.run(["key", "{hash}", "--hash-from", "f", "--hash-length", "64"]);
    assert_eq!(run.ok().stdout.trim(), full.trim());
    let run = env.run(["key", "{hash}", "--hash-from", "f", "--hash-length", "7"]);
    assert_eq!(run.ok().stdout.trim(), &full[..7]);
    for bad in ["0", "65"] {
        let run = env.run(["key", "{hash}", "--hash-from", "f", "--hash-length", bad]);
        run.code(2);
        assert!(run.stderr.contains("--hash-length"), "{}", run.stderr);
    }
}

#[test]
fn directories_and_several_paths_match_the_shell_recipe() {
    let env = TestEnv::bare();
    env.write("tree/b.txt", "b");
    env.write("tree/a dir/with space.txt", "spaces");
    env.write("tree/a.txt", "a");
    env.write("tree/a/nested", "nested");
    env.write("tree/Z", "upper");
    env.write("lock", "lockfile");
    std::os::unix::fs::symlink("b.txt", env.path("tree/link")).unwrap();

    let recipe = "(cd tree && find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | head -c 16";
    let expected = sh(recipe, env.dir.path());
    // However the directory is spelled, names are relative to it.
    let absolute = env.path("tree").display().to_string();
    for spelling in ["tree", "./tree", "tree/", absolute.as_str()] {
        let run = env.run(["key", "k/{hash}", "--hash-from", spelling]);
        assert_eq!(
            run.ok().stdout.trim(),
            format!("k/{expected}"),
            "{spelling}"
        );
    }

    let recipe = "{ sha256sum lock; (cd tree && find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum); } | sha256sum | head -c 16";
    let expected = sh(recipe, env.dir.path());
    let run = env.run([
        "key",
        "k/{hash}",
        "--hash-from",
        "lock",
        "--hash-from",
        "tree",
    ]);
    assert_eq!(run.ok().stdout.trim(), format!("k/{expected}"));
}

#[test]
fn quoted_patterns_expand_inside_cacher_as_the_shell_would() {
    let env = TestEnv::bare();
    env.write("package-lock.json", "root");
    env.write("web/package-lock.json", "web");
    env.write("web/app/package-lock.json", "app");
    env.write("web/.hidden/package-lock.json", "hidden");
    env.write("web/yarn.lock", "yarn");
    env.write("other.json", "not a lock");
    std::os::unix::fs::symlink("web/yarn.lock", env.path("linked.lock")).unwrap();
    let key = |patterns: &[&str]| {
        let mut args = vec!["key", "k/{hash}"];
        for p in patterns {
            args.extend(["--hash-from", p]);
        }
        env.run(&args).ok().stdout.trim().to_string()
    };
    // `**` spans any number of directories, none included; the matches go in sorted,
    // named by their relative paths, exactly as sha256sum lists them.
    let all = "sha256sum package-lock.json web/.hidden/package-lock.json web/app/package-lock.json web/package-lock.json | sha256sum | head -c 16";
    let want = format!("k/{}", sh(all, env.dir.path()));
    assert_eq!(key(&["**/package-lock.json"]), want);
    // Spelled from `./`, the names are too, as the shell would spell them.
    let dotted = "sha256sum ./package-lock.json ./web/.hidden/package-lock.json ./web/app/package-lock.json ./web/package-lock.json | sha256sum | head -c 16";
    assert_eq!(
        key(&["./**/package-lock.json"]),
        format!("k/{}", sh(dotted, env.dir.path()))
    );
    // `**` inside braces spans directories too.
    let braced = "sha256sum web/.hidden/package-lock.json web/app/package-lock.json web/yarn.lock | sha256sum | head -c 16";
    assert_eq!(
        key(&["web/{**/*/package-lock.json,yarn.lock}"]),
        format!("k/{}", sh(braced, env.dir.path()))
    );
    // The same as naming the files one by one, in that order.
    let named = [
        "package-lock.json",
        "web/.hidden/package-lock.json",
        "web/app/package-lock.json",
        "web/package-lock.json",
    ];
    assert_eq!(key(&named), want);
    // One segment does not cross a `/`; braces pick alternatives; symlinks are not
    // followed.
    let one = format!(
        "k/{}",
        sh("sha256sum web/yarn.lock | head -c 16", env.dir.path())
    );
    assert_eq!(
        key(&["web/*.lock"]),
        one,
        "a single match hashes as that one file"
    );
    // `*.lock` neither reaches into web/ nor follows linked.lock: nothing matches.
    env.run(["key", "k/{hash}", "--hash-from", "*.lock"])
        .code(2);
    let braces = "sha256sum web/package-lock.json web/yarn.lock | sha256sum | head -c 16";
    assert_eq!(
        key(&["web/{package-lock.json,yarn.lock}"]),
        format!("k/{}", sh(braces, env.dir.path()))
    );
}

#[test]
fn a_pattern_that_matches_nothing_is_an_error() {
    let env = TestEnv::bare();
    env.write("go.sum", "sum");
    let run = env.run(["key", "k/{hash}", "--hash-from", "**/Cargo.lock"]);
    run.code(2);
    assert!(
        run.stderr.contains("'**/Cargo.lock' matched no file"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
}

#[test]
fn names_sha256sum_escapes_are_hashed_the_same_way() {
    let env = TestEnv::bare();
    env.write("t/back\\slash", "1");
    env.write("t/new\nline", "2");
    let expected = sh(
        "(cd t && find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | head -c 16",
        env.dir.path(),
    );
    let run = env.run(["key", "{hash}", "--hash-from", "t"]);
    assert_eq!(run.ok().stdout.trim(), expected);
}

#[test]
fn digest_without_placeholder_goes_before_the_trailing_extensions() {
    let env = TestEnv::bare();
    env.write("Dockerfile", "FROM scratch\n");
    let digest = sh("sha256sum Dockerfile | head -c 16", env.dir.path());
    let run = env.run(["key", "img/build.tar.zst", "--hash-from", "Dockerfile"]);
    assert_eq!(
        run.ok().stdout.trim(),
        format!("img/build-{digest}.tar.zst")
    );
    let run = env.run(["key", "img/build", "--hash-from", "Dockerfile"]);
    assert_eq!(run.ok().stdout.trim(), format!("img/build-{digest}"));
    let run = env.run(["key", "go-1.26.3.tar.gz", "--hash-from", "Dockerfile"]);
    assert_eq!(run.ok().stdout.trim(), format!("go-1.26.3-{digest}.tar.gz"));
}

#[test]
fn arch_suffix_is_appended_once() {
    let env = TestEnv::bare();
    let p = platform();
    let run = env.run(["key", "bin/cacher", "--arch-suffix"]);
    assert_eq!(run.ok().stdout.trim(), format!("bin/cacher-{p}"));

    env.write("Dockerfile", "FROM scratch\n");
    let digest = sh("sha256sum Dockerfile | head -c 16", env.dir.path());
    let run = env.run([
        "key",
        "img/b.tar.zst",
        "--hash-from",
        "Dockerfile",
        "--arch-suffix",
    ]);
    assert_eq!(
        run.ok().stdout.trim(),
        format!("img/b-{digest}.tar.zst-{p}")
    );
    let run = env.run(["key", "go-1.26.3.tar.gz", "--arch-suffix"]);
    assert_eq!(run.ok().stdout.trim(), format!("go-1.26.3.tar.gz-{p}"));
    let run = env.run(["key", &format!("foo/.bashrc-{p}"), "--arch-suffix"]);
    assert_eq!(
        run.ok().stdout.trim(),
        format!("foo/.bashrc-{p}"),
        "applied once"
    );

    let mut env = env;
    env.set("CACHER_ARCH_SUFFIX", "true");
    let run = env.run(["key", "bin/cacher"]);
    assert_eq!(
        run.ok().stdout.trim(),
        format!("bin/cacher-{p}"),
        "from the env var"
    );
}

#[test]
fn bad_templates_and_paths_exit_2_with_one_line() {
    let env = TestEnv::bare();
    let run = env.run(["key", "img/{hash}.tar"]);
    run.code(2);
    assert!(run.stderr.contains("{hash}"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);

    let run = env.run(["key", "k/{hash}", "--hash-from", "missing-file"]);
    run.code(2);
    assert!(run.stderr.contains("missing-file"), "{}", run.stderr);

    for bad in ["/abs", "a/../b", "a//b", ""] {
        let run = env.run(["key", bad]);
        run.code(2);
    }
}

#[test]
fn every_command_taking_a_key_resolves_templates_as_key_does() {
    let env = TestEnv::s3("keytemplates");
    env.write("go.sum", "example.com/m v1.0.0 h1:abc\n");
    env.write("mod/example.com/m@v1.0.0/go.mod", "module example.com/m\n");
    let digest = sh("sha256sum go.sum | head -c 16", env.dir.path());
    let key = env.run(["key", "go-mod/{hash}", "--hash-from", "go.sum"]);
    assert_eq!(key.ok().stdout.trim(), format!("go-mod/{digest}"));

    let with_hash = ["--hash-from", "go.sum"];
    let run = env.run([&["dir", "upload", "go-mod/{hash}", "mod"][..], &with_hash].concat());
    run.ok();
    env.run(["dir", "exists", &format!("go-mod/{digest}")]).ok();
    env.run([&["dir", "exists", "go-mod/{hash}"][..], &with_hash].concat())
        .ok();
    let out = env.path("out");
    let run = env.run(
        [
            &["dir", "download", "go-mod/{hash}", out.to_str().unwrap()][..],
            &with_hash,
        ]
        .concat(),
    );
    assert_eq!(run.ok().stdout.trim(), format!("go-mod/{digest}"));
    assert!(out.join("example.com/m@v1.0.0/go.mod").exists());

    // Plain files, and the digest placed before the extensions, as `key` places it.
    let run = env.run([&["upload", "sums.tar.gz", "go.sum"][..], &with_hash].concat());
    run.ok();
    env.run(["exists", &format!("sums-{digest}.tar.gz")]).ok();
    let dest = env.path("sums");
    env.run(
        [
            &["download", "sums.tar.gz", dest.to_str().unwrap()][..],
            &with_hash,
        ]
        .concat(),
    )
    .ok();
    env.run([&["delete", "sums.tar.gz"][..], &with_hash].concat())
        .ok();
    env.run(["exists", &format!("sums-{digest}.tar.gz")])
        .code(1);

    // `{hash}` without --hash-from is an error, never a key stored literally.
    for args in [
        vec!["upload", "k/{hash}", "go.sum"],
        vec!["dir", "upload", "k/{hash}", "mod"],
        vec!["exists", "k/{hash}"],
    ] {
        let run = env.run(&args);
        run.code(2);
        assert!(run.stderr.contains("{hash}"), "{}", run.stderr);
    }
    let listed = env.run(["list", "--recursive"]);
    assert!(!listed.ok().stdout.contains("{hash}"), "{}", listed.stdout);
}
