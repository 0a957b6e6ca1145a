//! `cacher docker upload|download|exists`: docker images on the chunk store.
//!
//! `docker save` streams straight into the chunker (no temp file, no zstd binary); a
//! restore streams the reassembled archive straight into `docker load`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};

use super::dir::report;
use super::{Outcome, heal};
use crate::chunk::format::{Manifest, ManifestKind};
use crate::chunk::store::{
    ChunkStore, Stats, Stored, download_stats_line, now_secs, upload_stats_line,
};
use crate::cli::{DockerCommand, DockerDownloadArgs, DockerUploadArgs};
use crate::config::Config;
use crate::docker::{Docker, LoadStream};
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
    let Some(chunks) =
        super::dir::chunk_store_for_upload(config, &key, args.force, "docker upload").await?
    else {
        return Ok(Outcome::Success);
    };
    let docker = Docker::new(&config.docker_bin.value);
    let stats = seed(&chunks, &docker, &key, &args.image).await?;
    report("docker upload", &key, "uploaded", None, Some(&stats));
    Ok(Outcome::Success)
}

/// Streams `docker save IMAGE` into the chunk store under `key`.
async fn seed(
    chunks: &ChunkStore,
    docker: &Docker,
    key: &str,
    image: &str,
) -> anyhow::Result<Stats> {
    let started = Instant::now();
    let (d, img) = (docker.clone(), image.to_string());
    blocking(move || Ok(d.image_id(&img)?))
        .await
        .with_context(|| format!("cannot find the image {image}"))?;
    let (d, img) = (docker.clone(), image.to_string());
    let save = blocking(move || Ok(d.save(&img)?)).await?;
    let manifest = Manifest {
        kind: ManifestKind::Docker,
        created: now_secs(),
        label: image.to_string(),
        stream_len: 0,
        table: Default::default(),
        entries: Vec::new(),
    };
    let known = chunks.known().await?;
    let progress = Arc::new(ui::Progress::new(format!("uploading {key}"), 0));
    let stats = chunks
        .upload(progress.counted(save), Arc::new(known), manifest, key)
        .await;
    progress.clear();
    let (stats, _) = stats.with_context(|| format!("upload of image {image} to {key} failed"))?;
    ui::status(upload_stats_line(key, None, &stats, started.elapsed()));
    Ok(stats)
}

async fn download(config: &Config, args: &DockerDownloadArgs) -> anyhow::Result<Outcome> {
    let key = full_key(config, &args.key)?;
    let chunks = super::dir::chunk_store(config).await?;
    let docker = Docker::new(&config.docker_bin.value);
    let started = Instant::now();
    // A broken entry is a miss: nothing was loaded, and `--pull` replaces it.
    if let Some((info, stored)) = heal(&key, chunks.fetch_with_info(&key).await)?.flatten()
        && let Some(outcome) = heal(
            &key,
            load(&chunks, &docker, &key, stored, args, started).await,
        )?
    {
        crate::chunk::gc::mark_used(chunks.transfer(), chunks.layout(), &info).await;
        return Ok(outcome);
    }
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
    let seeded = seed(&chunks, &docker, &key, &args.image).await;
    if let Err(e) = &seeded {
        ui::warn(format!("could not seed the cache: {e:#}"));
    }
    report(
        "docker download",
        &key,
        "pulled",
        None,
        seeded.ok().as_ref(),
    );
    Ok(Outcome::Success)
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
    let load = {
        let d = docker.clone();
        blocking(move || Ok(d.load()?)).await?
    };
    let mut restored = None;
    let (load, line) = match stored {
        Stored::Manifest(manifest) if manifest.kind == ManifestKind::Docker => {
            let progress = Arc::new(ui::Progress::new(
                format!("restoring {key}"),
                manifest.stream_len,
            ));
            let restored_stream = chunks
                .restore_in_order(&manifest.table, progress.counted(load))
                .await;
            progress.clear();
            // On failure the dropped `docker load` was killed before the archive's end.
            let (load, stats) = restored_stream
                .with_context(|| format!("cannot restore {key}; nothing was loaded"))?;
            let line = download_stats_line(key, None, &stats, started.elapsed());
            restored = Some(stats);
            (load.into_inner(), line)
        }
        Stored::Manifest(_) => bail!("{key} holds a directory tree, not a docker image"),
        Stored::Legacy(info) => (
            feed_object(chunks, info, load, true).await?,
            format!("restored {key} (legacy tar.zst)"),
        ),
        Stored::Plain(info) => (
            feed_object(chunks, info, load, false).await?,
            format!("restored {key} (plain docker archive)"),
        ),
    };
    let loaded = blocking(move || Ok(load.finish()?))
        .await
        .with_context(|| format!("docker load of {key} failed"))?;
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

/// Streams a plain object (a `docker save` archive, zstd-compressed when `zstd`) into
/// `docker load`.
async fn feed_object(
    chunks: &ChunkStore,
    info: ObjectInfo,
    mut load: LoadStream,
    zstd: bool,
) -> anyhow::Result<LoadStream> {
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
    Ok(load)
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
