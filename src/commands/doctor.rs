//! `cacher doctor`: where each setting comes from, credential diagnostics that never
//! show the secret, and the smoke test (bucket reachable, 1-byte canary round trip).

use anyhow::{Context, bail};
use bytes::Bytes;

use super::Outcome;
use crate::config::{Config, Secret};
use crate::key::join_prefix;
use crate::sign::Trust;
use crate::store::{Body, PutOptions, Store};

pub async fn run(config: &Config) -> anyhow::Result<Outcome> {
    print_settings(config);
    let trust = print_keys(config);
    smoke_test(config).await?;
    trust?;
    let _ = crate::ui::line("ok: the cache is usable");
    Ok(Outcome::Success)
}

/// The signing and trusted keys by key id (never their contents); an error when a
/// key file cannot be used.
fn print_keys(config: &Config) -> anyhow::Result<()> {
    let trust = match Trust::from_config(config) {
        Ok(trust) => trust,
        Err(e) => {
            row("signatures", format!("ERROR: {}", crate::ui::one_line(&e)));
            return Err(e);
        }
    };
    let own = trust.signing_public_key();
    if let Some(key) = own {
        row(
            "signs as",
            format!("key id {} ({})", key.id, key.path.display()),
        );
    }
    for key in trust.trusted() {
        if own.is_some_and(|own| own.path == key.path) {
            continue;
        }
        row(
            "trusts",
            format!("key id {} ({})", key.id, key.path.display()),
        );
    }
    let restores = match (trust.required(), trust.checks()) {
        (true, _) => "only entries signed by a trusted key",
        (false, true) => {
            "unsigned entries (anyone's: set require_signature where that matters), and signed ones whose signature is trusted"
        }
        (false, false) => "any entry (no key configured: signatures are not checked)",
    };
    row("restores", restores);
    Ok(())
}

fn print_settings(config: &Config) {
    let file_note = if config.file_read { "" } else { " (not found)" };
    let file = match &config.path {
        Some(path) => format!("{}{file_note}", path.display()),
        None => "none (HOME is not set)".to_string(),
    };
    row("config file", file);
    for warning in &config.warnings {
        let _ = crate::ui::line(format_args!("  warning: {warning}"));
    }
    let trusted = config
        .trusted_keys
        .value
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>();
    let rows: [(&str, String, &crate::config::Source); 14] = [
        (
            "endpoint",
            config.endpoint.value.clone(),
            &config.endpoint.source,
        ),
        ("region", config.region.value.clone(), &config.region.source),
        ("bucket", config.bucket.value.clone(), &config.bucket.source),
        ("prefix", config.prefix.value.clone(), &config.prefix.source),
        (
            "arch_suffix",
            config.arch_suffix.value.to_string(),
            &config.arch_suffix.source,
        ),
        (
            "key_file",
            show_path(&config.key_file.value),
            &config.key_file.source,
        ),
        (
            "secret_file",
            show_path(&config.secret_file.value),
            &config.secret_file.source,
        ),
        (
            "ca_bundle",
            show_path(&config.ca_bundle.value),
            &config.ca_bundle.source,
        ),
        (
            "docker_bin",
            config.docker_bin.value.clone(),
            &config.docker_bin.source,
        ),
        ("jobs", config.jobs.value.to_string(), &config.jobs.source),
        (
            "on_error",
            config.on_error.value.to_string(),
            &config.on_error.source,
        ),
        (
            "signing_key",
            show_path(&config.signing_key.value),
            &config.signing_key.source,
        ),
        (
            "trusted_keys",
            match trusted.is_empty() {
                true => "-".into(),
                false => trusted.join(","),
            },
            &config.trusted_keys.source,
        ),
        (
            "require_signature",
            config.require_signature.value.to_string(),
            &config.require_signature.source,
        ),
    ];
    for (name, value, source) in rows {
        row(name, format!("{value:<40} ({source})"));
    }
    if config.is_file_store() {
        row("credentials", "not needed for a file:// store");
        return;
    }
    match config.credentials() {
        Ok(creds) => {
            describe_credential("key id", &creds.key_id, &creds.key_id_source);
            describe_credential("secret", &creds.secret, &creds.secret_source);
        }
        Err(e) => row("credentials", format!("MISSING: {e:#}")),
    }
}

/// Prints one line of the report: `name:`, padded so that every value starts in the
/// same column.
fn row(name: &str, value: impl std::fmt::Display) {
    // The exit code says whether the cache works, whoever reads this.
    let _ = crate::ui::line(format_args!("{:<19}{value}", format!("{name}:")));
}

fn show_path(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "-".into())
}

fn describe_credential(what: &str, value: &Secret, source: &str) {
    let v = value.expose();
    row(what, format!("{} chars from {source}", v.chars().count()));
    if v.trim() != v {
        crate::ui::warn(format!(
            "the {what} has leading or trailing whitespace; S3 will reject it"
        ));
    }
}

/// Bucket reachable, then a 1-byte canary written, read back and deleted.
pub async fn smoke_test(config: &Config) -> anyhow::Result<()> {
    let store = crate::store::open(config).await?;
    store
        .check_bucket()
        .await
        .with_context(|| format!("{} is not reachable", store.describe()))?;
    row("bucket", format!("reachable ({})", store.describe()));
    canary(store.as_ref(), &config.prefix.value).await?;
    row("canary", "1-byte write, read back and delete succeeded");
    Ok(())
}

async fn canary(store: &dyn Store, prefix: &str) -> anyhow::Result<()> {
    let key = join_prefix(
        prefix,
        &format!(".cacher-canary-{}", crate::temp::unique_tag()),
    );
    let byte = Bytes::from_static(b"c");
    store
        .put(&key, Body::Bytes(byte.clone()), &PutOptions::default())
        .await
        .context("canary write failed")?;
    let read = store.get_range(&key, 0..1).await;
    let deleted = store.delete(&key).await;
    if read.context("canary read failed")? != byte {
        bail!("canary read returned different bytes than were written");
    }
    deleted.context("canary delete failed")?;
    Ok(())
}
