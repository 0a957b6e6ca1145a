//! `cacher stats [PREFIX]`: what the entries under a prefix hold and what they cost in
//! the bucket, so a team can see what its cache is worth.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Outcome;
use crate::chunk::gc;
use crate::cli::StatsArgs;
use crate::config::Config;
use crate::key::join_prefix;
use crate::ui::{self, human_bytes};

pub async fn run(config: &Config, args: &StatsArgs) -> anyhow::Result<Outcome> {
    let chunks = super::dir::chunk_store(config).await?;
    let wanted = args.prefix.as_deref().unwrap_or("");
    let prefix = join_prefix(&config.prefix.value, wanted);
    let usage = gc::usage(&chunks, &prefix).await?;
    if ui::json_enabled() {
        let rfc3339 = |t: Option<std::time::SystemTime>| {
            t.map(OffsetDateTime::from)
                .and_then(|t| t.format(&Rfc3339).ok())
        };
        let mut record = serde_json::to_value(&usage)?;
        record["command"] = "stats".into();
        record["prefix"] = prefix.clone().into();
        record["entries"] = (usage.files + usage.trees + usage.images).into();
        record["stored_bytes"] = usage.stored_bytes().into();
        record["dedup_ratio"] = usage.dedup_ratio().into();
        record["newest_use"] = rfc3339(usage.newest_use).into();
        record["oldest_use"] = rfc3339(usage.oldest_use).into();
        ui::json(record);
        return Ok(Outcome::Success);
    }
    let shown = if wanted.is_empty() { "(all)" } else { wanted };
    ui::line(format_args!(
        "entries:      {} under {shown}: {} files, {} trees, {} images",
        usage.files + usage.trees + usage.images,
        usage.files,
        usage.trees,
        usage.images
    ))?;
    ui::line(format_args!(
        "logical:      {} (what restoring every entry writes)",
        human_bytes(usage.logical_bytes)
    ))?;
    ui::line(format_args!(
        "stored:       {} ({} in {} packs the trees and images use, {} of files and manifests)",
        human_bytes(usage.stored_bytes()),
        human_bytes(usage.pack_bytes),
        usage.packs,
        human_bytes(usage.entry_bytes)
    ))?;
    ui::line(format_args!("dedup ratio:  {:.2}x", usage.dedup_ratio()))?;
    if let (Some(newest), Some(oldest)) = (usage.newest_use, usage.oldest_use) {
        ui::line(format_args!(
            "last use:     {} (the least recently used entry: {})",
            super::list::format_time(Some(newest)),
            super::list::format_time(Some(oldest))
        ))?;
    }
    Ok(Outcome::Success)
}
