//! `cacher exists KEY`: exit 0 when cached, 1 when not, 2 when the store cannot tell.

use super::Outcome;
use crate::chunk::store::Stored;
use crate::config::Config;
use crate::key::full_key;
use crate::ui;
use serde_json::json;

pub async fn run(config: &Config, key: &crate::cli::KeySpec) -> anyhow::Result<Outcome> {
    let key = full_key(config, key)?;
    let chunks = super::dir::chunk_store(config).await?;
    let info = match chunks.transfer().store().head(&key).await? {
        // What a restore would refuse is not cached for this job.
        Some(info) => super::heal(
            &key,
            chunks.transfer().trust().check(&info).map_err(Into::into),
        )?
        .map(|_| info),
        None => None,
    };
    if ui::json_enabled() {
        // What the entry holds, not the few hundred bytes of a manifest: read only for
        // --json, so a plain `exists` stays one HEAD.
        let (bytes, stored_bytes) = match &info {
            Some(info) => match chunks.read_listed(info).await? {
                Some(Stored::Manifest(m)) => {
                    let mut chunks = m.table.chunks.clone();
                    chunks.sort_unstable_by_key(|c| c.id);
                    chunks.dedup_by_key(|c| c.id);
                    let stored: u64 = chunks.iter().map(|c| u64::from(c.stored_len)).sum();
                    (Some(m.stream_len), Some(stored))
                }
                _ => (Some(info.size), Some(info.size)),
            },
            None => (None, None),
        };
        ui::json(json!({
            "command": "exists", "key": key, "cached": info.is_some(),
            "size": info.as_ref().map(|i| i.size), "bytes": bytes, "stored_bytes": stored_bytes,
        }));
    }
    Ok(match info {
        Some(_) => Outcome::Success,
        None => Outcome::Miss,
    })
}
