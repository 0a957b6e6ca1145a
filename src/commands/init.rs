//! `cacher init`: record the global flags in the config file (mode 0600), keeping what
//! it already holds, then run the smoke test so bad credentials fail the job right away.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use anyhow::Context;

use super::Outcome;
use crate::config::Config;

pub async fn run(config: &Config) -> anyhow::Result<Outcome> {
    if config.endpoint.source != crate::config::Source::Flag {
        anyhow::bail!(
            "init needs --endpoint (an S3 URL, or file:///dir for a local store); nothing written"
        );
    }
    let Some(path) = &config.path else {
        anyhow::bail!("HOME is not set: give --config PATH for the file to write; nothing written");
    };
    write_config(config, path)?;
    // The smoke test runs even if no one reads this.
    let _ = crate::ui::line(format_args!("wrote {}", path.display()));
    super::doctor::smoke_test(config)
        .await
        .with_context(|| format!("{} was written, but the smoke test failed", path.display()))?;
    crate::ui::line("ok: the cache is usable")?;
    Ok(Outcome::Success)
}

fn write_config(config: &Config, path: &std::path::Path) -> anyhow::Result<()> {
    let text = toml::to_string(&config.to_file()).context("cannot encode the config")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("toml.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    // A leftover temp file keeps its old mode; the config names secret files.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
