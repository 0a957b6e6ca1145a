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
