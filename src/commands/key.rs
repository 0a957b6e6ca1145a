//! `cacher key TEMPLATE [--hash-from PATH]...`: print a key, touching no store.

use super::Outcome;
use crate::cli::KeyTemplateArgs;
use crate::config::Config;

pub fn run(config: &Config, args: &KeyTemplateArgs) -> anyhow::Result<Outcome> {
    let key = crate::key::render_template(
        &args.template,
        &args.hash_from,
        args.hash_length,
        config.arch_suffix.value,
    )?;
    if crate::ui::json_enabled() {
        crate::ui::json(serde_json::json!({ "command": "key", "key": key }));
    } else {
        crate::ui::line(&key)?;
    }
    Ok(Outcome::Success)
}
