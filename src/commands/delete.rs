//! `cacher delete KEY`: invalidate one cached key (exit 1 when it was not cached).

use super::Outcome;
use crate::config::Config;
use crate::key::full_key;
use crate::ui;

pub async fn run(config: &Config, key: &crate::cli::KeySpec) -> anyhow::Result<Outcome> {
    let key = full_key(config, key)?;
    let store = crate::store::open(config).await?;
    if store.head(&key).await?.is_none() {
        ui::status(format!("{key} is not cached; nothing to delete"));
        return Ok(Outcome::Miss);
    }
    store.delete(&key).await?;
    ui::status(format!("deleted {key}"));
    Ok(Outcome::Success)
}
