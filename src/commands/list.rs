//! `cacher list [PREFIX] [--recursive] [--root]`: keys in `aws s3 ls` format.
//!
//! One level at a time (`PRE dir/` lines, then objects) unless `--recursive`, which
//! prints whole keys relative to the configured prefix (or the bucket with `--root`).
//! Times are UTC.

use std::io::Write;
use std::time::SystemTime;

use time::OffsetDateTime;
use time::macros::format_description;

use super::Outcome;
use crate::cli::ListArgs;
use crate::config::Config;

pub async fn run(config: &Config, args: &ListArgs) -> anyhow::Result<Outcome> {
    let base = if args.root || config.prefix.value.is_empty() {
        String::new()
    } else {
        format!("{}/", config.prefix.value)
    };
    let wanted = args.prefix.as_deref().unwrap_or("").trim_start_matches('/');
    let full = format!("{base}{wanted}");
    let store = crate::store::open(config).await?;
    let delimiter = (!args.recursive).then_some('/');
    let listing = store.list(&full, delimiter).await?;

    // Names are shown relative to the last `/` of the listed prefix, as `aws s3 ls` does.
    let level = &full[..full.rfind('/').map_or(0, |i| i + 1)];
    let shown_from = if args.recursive {
        base.len()
    } else {
        level.len()
    };
    let mut out = std::io::stdout().lock();
    for prefix in &listing.prefixes {
        writeln!(out, "{:>30} {}", "PRE", &prefix[shown_from..])?;
    }
    for object in &listing.objects {
        writeln!(
            out,
            "{} {:>10} {}",
            format_time(object.modified),
            object.size,
            &object.key[shown_from..]
        )?;
    }
    Ok(Outcome::Success)
}

fn format_time(t: Option<SystemTime>) -> String {
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    t.map(OffsetDateTime::from)
        .and_then(|t| t.format(format).ok())
        .unwrap_or_else(|| "????-??-?? ??:??:??".to_string())
}
