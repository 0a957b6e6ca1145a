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
    println!("{key}");
    Ok(Outcome::Success)
}
