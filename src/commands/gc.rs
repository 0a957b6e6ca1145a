//! `cacher gc` and `cacher prune`: reclaim space from packs and old entries.

use std::time::Instant;

use super::Outcome;
use crate::chunk::gc;
use crate::cli::{GcArgs, PruneArgs};
use crate::config::Config;
use crate::key::join_prefix;
use crate::ui;

pub async fn run_gc(config: &Config, args: &GcArgs) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let chunks = super::dir::chunk_store(config).await?;
    let r = gc::collect(&chunks, args.grace, args.dry_run).await?;
    let (condemn, delete) = match args.dry_run {
        true => ("would condemn", "would delete"),
        false => ("condemned", "deleted"),
    };
    ui::status(format!(
        "gc: {} manifests reference {} of {} packs; {condemn} {} unreferenced packs, {delete} {} condemned packs ({}); kept {} younger than the grace period, {} condemned less than the grace period ago, pardoned {}; {} index segments compacted; {delete} {} stale last-use markers; {} unfinished uploads aborted; took {:.2}s",
        r.manifests,
        r.referenced,
        r.packs,
        r.condemned,
        r.deleted,
        ui::human_bytes(r.deleted_bytes),
        r.young,
        r.waiting,
        r.pardoned,
        r.segments_deleted,
        r.markers_deleted,
        r.stale_writes,
        started.elapsed().as_secs_f64(),
    ));
    Ok(Outcome::Success)
}

pub async fn run_prune(config: &Config, args: &PruneArgs) -> anyhow::Result<Outcome> {
    let chunks = super::dir::chunk_store(config).await?;
    let prefix = join_prefix(&config.prefix.value, args.prefix.as_deref().unwrap_or(""));
    let pruned = gc::prune(&chunks, &prefix, args.older_than, args.dry_run).await?;
    for entry in &pruned {
        ui::line(&entry.key)?;
    }
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    ui::status(format!(
        "prune: {verb} {} entries unused for longer than the given age; run `cacher gc` to reclaim their chunks",
        pruned.len()
    ));
    Ok(Outcome::Success)
}
