//! `cacher gc` and `cacher prune`: reclaim space from packs and old entries.

use super::Outcome;
use crate::chunk::gc;
use crate::cli::{GcArgs, PruneArgs};
use crate::config::Config;
use crate::key::join_prefix;
use crate::ui;

pub async fn run_gc(config: &Config, args: &GcArgs) -> anyhow::Result<Outcome> {
    let chunks = super::dir::chunk_store(config).await?;
    let report = gc::collect(&chunks, args.grace, args.dry_run).await?;
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    ui::status(format!(
        "gc: {} manifests reference {} of {} packs; {verb} {} unreferenced packs ({}), kept {} younger than the grace period; {} index segments compacted; {} unfinished uploads aborted",
        report.manifests,
        report.referenced,
        report.packs,
        report.deleted,
        ui::human_bytes(report.deleted_bytes),
        report.young,
        report.segments_deleted,
        report.stale_writes,
    ));
    Ok(Outcome::Success)
}

pub async fn run_prune(config: &Config, args: &PruneArgs) -> anyhow::Result<Outcome> {
    let chunks = super::dir::chunk_store(config).await?;
    let prefix = join_prefix(&config.prefix.value, args.prefix.as_deref().unwrap_or(""));
    let pruned = gc::prune(&chunks, &prefix, args.older_than, args.dry_run).await?;
    for entry in &pruned {
        println!("{}", entry.key);
    }
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    ui::status(format!(
        "prune: {verb} {} entries; run `cacher gc` to reclaim their chunks",
        pruned.len()
    ));
    Ok(Outcome::Success)
}
