//! https endpoints: certificates are checked by default, and `ca_bundle` (flag, env or
//! config) adds a private CA, for the S3 endpoint and for `download --url`.

use crate::util::http::{HttpServer, Reply};
use crate::util::tls::TlsFront;
use crate::util::{TestEnv, random_bytes, read, server};

#[test]
fn an_unknown_ca_is_refused_and_a_ca_bundle_makes_it_trusted() {
    let front = TlsFront::start(&server().endpoint);
    let mut env = TestEnv::s3("tls");
    env.set("CACHER_ENDPOINT", &front.endpoint);
    env.set("CACHER_TIMEOUT", "5");

    let run = env.run(["exists", "k"]);
    run.code(2);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.to_lowercase().contains("certificate"),
        "names the certificate problem: {}",
        run.stderr
    );

    let data = random_bytes(300_000, 7);
    let src = env.write("src", &data);
    let dest = env.path("dest");
    let ca = front.ca_pem.display().to_string();
    env.run(["upload", "k", src.to_str().unwrap(), "--ca-bundle", &ca])
        .ok();
    env.set("CACHER_CA_BUNDLE", &ca);
    env.run(["exists", "k"]).ok();
    env.run(["download", "k", dest.to_str().unwrap()]).ok();
    assert_eq!(read(&dest), data);

    let doctor = env.run(["doctor"]);
    assert!(
        doctor.ok().stdout.contains("ca_bundle:") && doctor.stdout.contains("CACHER_CA_BUNDLE"),
        "{}",
        doctor.stdout
    );
}

#[test]
fn download_url_over_https_trusts_the_ca_bundle() {
    let body = random_bytes(100_000, 8);
    let http = HttpServer::start(vec![("/f", Reply::Body(body.clone()))]);
    let base = http.url("");
    let front = TlsFront::start(base.trim_end_matches('/'));
    let url = format!("{}/f", front.endpoint);
    let mut env = TestEnv::s3("tlsurl");
    let dest = env.path("dest");
    let args = ["download", "k", dest.to_str().unwrap(), "--url", &url];

    let run = env.run(args);
    run.code(2);
    assert!(
        run.stderr.to_lowercase().contains("certificate"),
        "{}",
        run.stderr
    );
    assert!(!dest.exists());
    env.run(["exists", "k"]).code(1);

    env.set("CACHER_CA_BUNDLE", front.ca_pem.to_str().unwrap());
    env.run(args).ok();
    assert_eq!(read(&dest), body);
}

#[test]
fn an_unreadable_or_empty_ca_bundle_exits_2_naming_it() {
    let mut env = TestEnv::s3("tlsbad");
    let missing = env.path("missing.pem");
    env.set("CACHER_CA_BUNDLE", missing.to_str().unwrap());
    let run = env.run(["exists", "k"]);
    run.code(2);
    assert!(run.stderr.contains("ca_bundle"), "{}", run.stderr);
    assert!(run.stderr.contains("missing.pem"), "{}", run.stderr);

    let empty = env.write("empty.pem", "not a certificate\n");
    env.set("CACHER_CA_BUNDLE", empty.to_str().unwrap());
    let run = env.run(["exists", "k"]);
    run.code(2);
    assert!(run.stderr.contains("no PEM certificate"), "{}", run.stderr);
}

#[test]
fn ssl_cert_file_ssl_cert_dir_and_the_system_store_are_trusted() {
    let front = TlsFront::start(&server().endpoint);
    let mut env = TestEnv::s3("tlssystem");
    env.set("CACHER_ENDPOINT", &front.endpoint);
    env.set("CACHER_TIMEOUT", "5");
    env.run(["exists", "k"]).code(2);

    // Exit 1 (not cached) means the https endpoint was reached and trusted.
    let ca = front.ca_pem.display().to_string();
    env.set("SSL_CERT_FILE", &ca);
    env.run(["exists", "k"]).code(1);
    env.unset("SSL_CERT_FILE");

    let dir = env.path("certs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(&front.ca_pem, dir.join("private-ca.pem")).unwrap();
    env.set("SSL_CERT_DIR", dir.to_str().unwrap());
    env.run(["exists", "k"]).code(1);
    env.unset("SSL_CERT_DIR");

    // The CA only in the system store: a private mount namespace in which Debian's
    // bundle file holds it (root only; the host's store is not touched).
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    if !crate::util::can_switch_users("the system-store part")
        || !std::path::Path::new(bundle).exists()
    {
        return;
    }
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("mount --bind \"$0\" {bundle} && exec \"$@\""))
        .arg(&ca)
        .arg(env!("CARGO_BIN_EXE_cacher"))
        .args(["exists", "k"])
        .env_clear()
        .current_dir(env.dir.path());
    for (name, value) in &env.vars {
        cmd.env(name, value);
    }
    let out = cmd.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
