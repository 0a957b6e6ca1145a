//! `cacher exists KEY`: exit 0 when cached, 1 when not, 2 when the store cannot tell.

use super::Outcome;
use crate::config::Config;
use crate::key::full_key;
use crate::ui;
use serde_json::json;

pub async fn run(config: &Config, key: &crate::cli::KeySpec) -> anyhow::Result<Outcome> {
    let key = full_key(config, key)?;
    let store = crate::store::open(config).await?;
    let info = store.head(&key).await?;
    if ui::json_enabled() {
        ui::json(
            json!({ "command": "exists", "key": key, "cached": info.is_some(), "size": info.as_ref().map(|i| i.size) }),
        );
    }
    Ok(match info {
        Some(_) => Outcome::Success,
        None => Outcome::Miss,
    })
}
