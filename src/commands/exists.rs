//! `cacher exists KEY`: exit 0 when cached, 1 when not, 2 when the store cannot tell.

use super::Outcome;
use crate::config::Config;
use crate::key::full_key;

pub async fn run(config: &Config, key: &str) -> anyhow::Result<Outcome> {
    let key = full_key(config, key)?;
    let store = crate::store::open(config).await?;
    Ok(match store.head(&key).await? {
        Some(_) => Outcome::Success,
        None => Outcome::Miss,
    })
}
