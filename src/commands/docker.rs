//! `cacher docker upload|download|exists`: docker images on the chunk store.
//!
//! `docker save` streams straight into the chunker (no temp file, no zstd binary); a
//! restore streams the reassembled archive straight into `docker load`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};

use super::dir::report;
use super::{Outcome, WriteMode, heal};
use crate::chunk::format::{Manifest, ManifestKind};
use crate::chunk::store::{
    ChunkStore, IndexReading, LayerStats, Stats, Stored, download_stats_line, now_secs,
    upload_stats_line,
};
use crate::cli::{DockerCommand, DockerDownloadArgs, DockerUploadArgs};
use crate::config::{Config, OnError};
use crate::docker::{Docker, DockerError, LoadStream};
use crate::image_archive::{
    MapMismatch, MemberTap, ThinPlan, member_map, parts_of_entries, parts_to_entries,
};
use crate::key::full_key;
use crate::store::ObjectInfo;
use crate::ui;

pub async fn run(config: &Config, cmd: &DockerCommand) -> anyhow::Result<Outcome> {
    match cmd {
        DockerCommand::Upload(args) => upload(config, args).await,
        DockerCommand::Download(args) => download(config, args).await,
        DockerCommand::Exists(args) => super::exists::run(config, &args.key).await,
    }
}

/// Runs a blocking docker call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

async fn upload(config: &Config, args: &DockerUploadArgs) -> anyhow::Result<Outcome> {
    let key = full_key(config, &args.key)?;
    let Some((chunks, mode, index)) =
        super::dir::chunk_store_for_upload(config, &key, args.force, "docker upload").await?
    else {
        return Ok(Outcome::Success);
    };
    let docker = Docker::new(&config.docker_bin.value);
    match seed(&chunks, index, &docker, &key, &args.image, mode).await? {
        Some(stats) => report("docker upload", &key, "uploaded", None, Some(&stats)),
        None => super::say_concurrent(&key, "docker upload"),
    }
    Ok(Outcome::Success)
}

/// Streams `docker save IMAGE` into the chunk store under `key`, with a member map
/// of the archive so a restore can leave out the layers a daemon already has, deduped
/// against the prefix's `index`; `None` when `mode` creates the key and another job
/// created it first.
async fn seed(
    chunks: &ChunkStore,
    index: IndexReading,
    docker: &Docker,
    key: &str,
    image: &str,
    mode: WriteMode,
) -> anyhow::Result<Option<Stats>> {
    let started = Instant::now();
    let (d, img) = (docker.clone(), image.to_string());
    let (image_id, diff_ids) = blocking(move || Ok(d.image_layers(&img)?))
        .await
        .with_context(|| format!("cannot find the image {image}"))?;
    let (d, img) = (docker.clone(), image.to_string());
    let save = blocking(move || Ok(d.save(&img)?)).await?;
    let waited = save.waited();
    let (save, scan) = MemberTap::new(save);
    let known = chunks.known(&[], index).await?;
    let progress = Arc::new(ui::Progress::new(format!("uploading {key}"), 0));
    let sent = chunks.send(progress.counted(save), Arc::new(known)).await;
    progress.clear();
    let failed = || format!("upload of image {image} to {key} failed");
    let sent = sent.with_context(failed)?;
    // The map must describe exactly the stream sent, or readers would refuse it.
    let parts = member_map(&scan.finish(), &image_id, &diff_ids)
        .filter(|parts| parts.iter().map(|p| p.len).sum::<u64>() == sent.stats.stream_bytes);
    let manifest = Manifest {
        kind: ManifestKind::Docker,
        created: now_secs(),
        label: image.to_string(),
        stream_len: 0,
        table: Default::default(),
        entries: parts.as_deref().map(parts_to_entries).unwrap_or_default(),
    };
    let published = chunks
        .publish(manifest, sent, key, mode == WriteMode::Create)
        .await
        .with_context(failed)?;
    let Some((mut stats, _)) = published else {
        return Ok(None);
    };
    let waited = waited.get();
    stats.docker_save_seconds = Some(waited.as_secs_f64());
    ui::status(format!(
        "{}; waited {:.2}s for docker save",
        upload_stats_line(key, None, &stats, started.elapsed()),
        waited.as_secs_f64()
    ));
    Ok(Some(stats))
}

async fn download(config: &Config, args: &DockerDownloadArgs) -> anyhow::Result<Outcome> {
    let key = full_key(config, &args.key)?;
    let docker = Docker::new(&config.docker_bin.value);
    let started = Instant::now();
    let (chunks, seed_mode) = match from_cache(config, &docker, &key, args, started).await {
        Ok(Cached::Loaded(outcome)) => return Ok(outcome),
        Ok(Cached::Miss(chunks, seed_mode)) => (Some(chunks), seed_mode),
        // The image can still come from its registry; only the cache is left out.
        Err(e) if args.pull && config.on_error.value == OnError::Warn => {
            super::warn_soft(&e, "miss");
            (None, WriteMode::Skip)
        }
        Err(e) => return Err(e),
    };
    if !args.pull {
        ui::status(format!("{key} is not cached"));
        report("docker download", &key, "miss", None, None);
        return Ok(Outcome::Miss);
    }
    let (d, img) = (docker.clone(), args.image.clone());
    blocking(move || Ok(d.pull(&img)?))
        .await
        .with_context(|| format!("{key} is not cached and the pull of {} failed", args.image))?;
    ui::status(format!("{key} was not cached; pulled {}", args.image));
    // The image is here, which is what the job needs; seeding is a bonus.
    let chunks = chunks.filter(|_| super::may_seed(seed_mode, &key));
    let seeded = match &chunks {
        Some(chunks) => {
            let index = chunks.start_reading_index();
            seed(chunks, index, &docker, &key, &args.image, seed_mode).await
        }
        None => Err(anyhow::anyhow!("the cache cannot be used")),
    };
    if let (Err(e), Some(_)) = (&seeded, &chunks) {
        ui::warn(format!("could not seed the cache: {e:#}"));
    }
    report(
        "docker download",
        &key,
        "pulled",
        None,
        seeded.ok().flatten().as_ref(),
    );
    Ok(Outcome::Success)
}

/// What the cache had for a `docker download`.
enum Cached {
    /// The image was loaded from it.
    Loaded(Outcome),
    /// It lacks the image (or holds an entry it could not use): the store to seed,
    /// and how the seed may write the key.
    Miss(ChunkStore, WriteMode),
}

/// Loads `key` into docker if the cache holds it; a broken entry is a miss (nothing
/// was loaded, and `--pull` replaces it).
async fn from_cache(
    config: &Config,
    docker: &Docker,
    key: &str,
    args: &DockerDownloadArgs,
    started: Instant,
) -> anyhow::Result<Cached> {
    let chunks = super::dir::chunk_store(config).await?;
    let fetched = chunks.fetch_with_info(key).await;
    let seed_mode = match &fetched {
        Ok(None) => WriteMode::Create,
        _ => super::replace_mode(chunks.transfer().trust()),
    };
    if let Some((info, stored)) = heal(key, fetched)?.flatten()
        && let Some(outcome) = heal(key, load(&chunks, docker, key, stored, args, started).await)?
    {
        crate::chunk::gc::mark_used(chunks.transfer(), chunks.layout(), &info).await;
        return Ok(Cached::Loaded(outcome));
    }
    Ok(Cached::Miss(chunks, seed_mode))
}

/// Streams the entry `stored` into `docker load` and names the image `args.image`.
async fn load(
    chunks: &ChunkStore,
    docker: &Docker,
    key: &str,
    stored: Stored,
    args: &DockerDownloadArgs,
    started: Instant,
) -> anyhow::Result<Outcome> {
    let (loaded, line, restored) = match stored {
        Stored::Manifest(manifest) if manifest.kind == ManifestKind::Docker => {
            let (loaded, stats) = load_entry(chunks, docker, key, &manifest).await?;
            let mut line = download_stats_line(key, None, &stats, started.elapsed());
            if let Some(layers) = stats.layers.as_ref().filter(|l| l.present > 0) {
                line.push_str(&format!(
                    "; the daemon had {} of {} layers ({}), not fetched",
                    layers.present,
                    layers.total,
                    ui::human_bytes(layers.present_bytes)
                ));
            }
            (loaded, line, Some(stats))
        }
        Stored::Manifest(_) => bail!("{key} holds a directory tree, not a docker image"),
        Stored::Legacy(info) => (
            feed_object(chunks, docker, info, true).await?,
            format!("restored {key} (legacy tar.zst)"),
            None,
        ),
        Stored::Plain(info) => (
            feed_object(chunks, docker, info, false).await?,
            format!("restored {key} (plain docker archive)"),
            None,
        ),
    };
    ensure_tagged(docker, &loaded, &args.image).await?;
    ui::status(format!("{line}; loaded as {}", args.image));
    report(
        "docker download",
        key,
        "hit",
        Some(&args.image),
        restored.as_ref(),
    );
    Ok(Outcome::Success)
}

/// Loads a chunked docker entry; returns what docker reports it loaded. When the
/// manifest maps its archive and the daemon has some of its layers, those are left
/// out; if docker refuses that archive, the full one is loaded instead.
async fn load_entry(
    chunks: &ChunkStore,
    docker: &Docker,
    key: &str,
    manifest: &Manifest,
) -> anyhow::Result<(Vec<String>, Stats)> {
    let parts = parts_of_entries(&manifest.entries);
    if let Some(parts) = &parts {
        let d = docker.clone();
        // Without the daemon's layers (a daemon that would store empty members, another
        // CLI, a listing that failed), the full archive loads.
        let present = blocking(move || match d.skips_known_layers() {
            true => Ok(d.layer_chains()?),
            false => Ok(Default::default()),
        })
        .await
        .unwrap_or_default();
        if let Some(plan) = ThinPlan::new(parts, manifest.stream_len, &present) {
            match feed_entry(chunks, docker, key, manifest, Some(&plan)).await {
                Ok(loaded) => return Ok(loaded),
                Err(e) if refused_by_docker(&e) => ui::warn(format!(
                    "docker did not load {key} without the {} layers it has ({e:#}); \
                     loading the full image",
                    plan.stats.present
                )),
                Err(e) => return Err(e),
            }
        }
    }
    let (loaded, mut stats) = feed_entry(chunks, docker, key, manifest, None).await?;
    stats.layers = parts.map(|parts| LayerStats {
        total: parts.iter().filter(|p| p.chain_id.is_some()).count() as u64,
        ..LayerStats::default()
    });
    Ok((loaded, stats))
}

/// Streams a chunked docker entry into a new `docker load`, leaving out what `thin`
/// says when given, and waits for docker.
async fn feed_entry(
    chunks: &ChunkStore,
    docker: &Docker,
    key: &str,
    manifest: &Manifest,
    thin: Option<&ThinPlan>,
) -> anyhow::Result<(Vec<String>, Stats)> {
    let load = start_load(docker).await?;
    let left_out = thin.map_or(0, |plan| plan.stats.present_bytes);
    let progress = Arc::new(ui::Progress::new(
        format!("restoring {key}"),
        manifest.stream_len - left_out,
    ));
    let restored = match thin {
        None => chunks
            .restore_in_order(&manifest.table, progress.counted(load))
            .await
            .map(|(load, stats)| (load.into_inner(), stats)),
        Some(plan) => {
            let (table, spans) = plan.needed(&manifest.table);
            let thin_archive = plan.writer(spans, progress.counted(load));
            chunks
                .restore_in_order(&table, thin_archive)
                .await
                .and_then(|(archive, stats)| Ok((archive.into_inner()?.into_inner(), stats)))
        }
    };
    progress.clear();
    // On failure the dropped `docker load` was killed before the archive's end.
    let (load, mut stats) =
        restored.with_context(|| format!("cannot restore {key}; nothing was loaded"))?;
    let load = blocking(move || Ok(load.finish()?))
        .await
        .with_context(|| format!("docker load of {key} failed"))?;
    stats.stream_bytes = manifest.stream_len;
    stats.chunks = manifest.table.chunks.len() as u64;
    stats.layers = thin.map(|plan| plan.stats.clone());
    Ok((load, stats))
}

/// Whether `e` says docker refused an archive (or the archive did not match its
/// member map), rather than that the entry could not be read.
fn refused_by_docker(e: &anyhow::Error) -> bool {
    let refusal = |cause: &(dyn std::error::Error + 'static)| {
        matches!(
            cause.downcast_ref::<DockerError>(),
            Some(DockerError::Failed { .. })
        ) || cause.is::<MapMismatch>()
    };
    e.chain().any(|cause| {
        refusal(cause)
            || cause
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| refusal(inner))
    })
}

async fn start_load(docker: &Docker) -> anyhow::Result<LoadStream> {
    let d = docker.clone();
    blocking(move || Ok(d.load()?)).await
}

/// Streams a plain object (a `docker save` archive, zstd-compressed when `zstd`) into
/// `docker load`.
async fn feed_object(
    chunks: &ChunkStore,
    docker: &Docker,
    info: ObjectInfo,
    zstd: bool,
) -> anyhow::Result<Vec<String>> {
    let mut load = start_load(docker).await?;
    let reader = chunks.transfer().stream_object(info);
    let (load, copied) = tokio::task::spawn_blocking(move || {
        let copied = if zstd {
            zstd::stream::read::Decoder::new(reader)
                .and_then(|mut d| std::io::copy(&mut d, &mut load))
        } else {
            let mut reader = reader;
            std::io::copy(&mut reader, &mut load)
        };
        (load, copied)
    })
    .await?;
    // On failure, dropping `load` kills docker before the archive's end: nothing loads.
    copied.context("cannot stream the archive into docker load")?;
    blocking(move || Ok(load.finish()?))
        .await
        .context("docker load failed")
}

/// Makes sure `image` names the image just loaded, tagging it when the archive carried
/// another name (or none) and when `image` named another image before.
async fn ensure_tagged(docker: &Docker, loaded: &[String], image: &str) -> anyhow::Result<()> {
    let Some(source) = loaded.first().cloned() else {
        bail!("docker load reported no image, so {image} cannot be tagged");
    };
    let (d, src) = (docker.clone(), source.clone());
    let loaded_id = blocking(move || Ok(d.image_id(&src)?))
        .await
        .with_context(|| format!("cannot inspect the loaded image {source}"))?;
    let (d, img) = (docker.clone(), image.to_string());
    if blocking(move || Ok(d.image_id(&img)?)).await.ok() == Some(loaded_id) {
        return Ok(());
    }
    let (d, img) = (docker.clone(), image.to_string());
    blocking(move || Ok(d.tag(&source, &img)?))
        .await
        .with_context(|| format!("cannot tag the loaded image as {image}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_archive::MapMismatch;

    /// An error as `restore_in_order` returns a writer's failure, with the context
    /// `feed_entry` adds.
    fn as_restore_fails(inner: impl std::error::Error + Send + Sync + 'static) -> anyhow::Error {
        anyhow::Error::new(std::io::Error::other(inner))
            .context("cannot restore k; nothing was loaded")
    }

    #[test]
    fn refusals_are_told_apart_from_broken_entries() {
        let failed = || DockerError::Failed {
            command: "docker load".into(),
            status: "exit status: 1".into(),
            stderr: "invalid diffID for layer 0".into(),
        };
        assert!(refused_by_docker(&as_restore_fails(failed())));
        assert!(refused_by_docker(
            &anyhow::Error::new(failed()).context("docker load of k failed")
        ));
        let mismatch = std::io::Error::other(MapMismatch("a header".into()));
        assert!(refused_by_docker(
            &anyhow::Error::new(mismatch).context("cannot restore k")
        ));
        let broken = crate::chunk::store::broken("pack p is missing".into());
        assert!(!refused_by_docker(&broken.context("cannot restore k")));
        assert!(!refused_by_docker(&as_restore_fails(
            std::io::Error::other("disk full")
        )));
    }
}
