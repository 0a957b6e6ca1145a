//! `cacher download KEY DEST [--url URL] [--sha256 HEX]`: restore a cached file, or on a
//! miss fetch it from the URL, verify it, write it and seed the cache.

use anyhow::bail;

use super::{Outcome, WriteMode};
use crate::chunk::gc;
use crate::chunk::layout::Layout;
use crate::cli::{DownloadArgs, InputError};
use crate::config::{Config, OnError};
use crate::key::full_key;
use crate::store::{StoreError, is_changed, is_not_found};
use crate::temp::persist;
use crate::transfer::{IntegrityError, Transfer};
use crate::ui;

pub async fn run(config: &Config, args: &DownloadArgs) -> anyhow::Result<Outcome> {
    let key = full_key(config, &args.key)?;
    let expected = args.sha256.as_deref().map(parse_sha256).transpose()?;
    crate::temp::check_file_destination(&args.dest)?;
    let (transfer, seed) = match from_cache(config, args, &key, expected.as_deref()).await {
        Ok(Cached::Hit) => return Ok(Outcome::Success),
        Ok(Cached::Miss(transfer, seed)) => (Some(transfer), seed),
        // The file can still come from the URL; only the cache is left out.
        Err(e) if args.url.is_some() && config.on_error.value == OnError::Warn => {
            super::warn_soft(&e, "miss");
            (None, WriteMode::Skip)
        }
        Err(e) => return Err(e),
    };
    let Some(url) = &args.url else {
        ui::status(format!("{key} is not cached and no --url was given"));
        report(&key, "miss", None);
        return Ok(Outcome::DownloadMiss);
    };
    let fetched = crate::http::fetch(
        url,
        &args.dest,
        config.ca_certificates()?.as_deref(),
        std::time::Duration::from_secs(config.timeout.value),
    )
    .await?;
    if let Some(expected) = &expected
        && *expected != fetched.sha256
    {
        bail!(
            "sha256 mismatch for {url}: expected {expected}, got {}; nothing written or uploaded",
            fetched.sha256
        );
    }
    // Seeding the cache is a bonus: the file the job needs is already here.
    let mut seeded = false;
    if let Some(transfer) = transfer.filter(|_| super::may_seed(seed, &key)) {
        match transfer
            .upload_file(
                &key,
                fetched.file.path(),
                Some(fetched.sha256.clone()),
                seed == WriteMode::Create,
            )
            .await
        {
            Ok(written) => seeded = written.is_some(),
            Err(e) => ui::warn(format!("could not seed the cache: {e:#}")),
        }
    }
    persist(fetched.file, &args.dest)?;
    ui::status(format!(
        "wrote {} ({} bytes, sha256 {})",
        args.dest.display(),
        fetched.size,
        fetched.sha256
    ));
    if ui::json_enabled() {
        ui::json(serde_json::json!({
            "command": "download", "key": key, "result": "fetched", "url": url,
            "bytes": fetched.size, "sha256": fetched.sha256, "seeded": seeded,
        }));
    }
    Ok(Outcome::Success)
}

/// What the cache had for a download.
enum Cached {
    /// The file was restored from it.
    Hit,
    /// It lacks the file (or holds one it could not use): the transfer to seed it
    /// with, and how the seed may write the key.
    Miss(Box<Transfer>, WriteMode),
}

/// Restores `key` to the destination if the cache holds it (a version matching
/// `expected` when given and a `--url` can replace it).
async fn from_cache(
    config: &Config,
    args: &DownloadArgs,
    key: &str,
    expected: Option<&str>,
) -> anyhow::Result<Cached> {
    let transfer = Transfer::open(config).await?;
    let replace = super::replace_mode(transfer.trust());
    let mut attempts = 0;
    loop {
        let (info, first) = match transfer.open_file(key).await {
            Ok(Some(opened)) => opened,
            Ok(None) => break,
            // Replaced between the request that opened it and the one that completes
            // what it said (see `Store::open`): take the new version.
            Err(StoreError::Changed(_)) if attempts < 3 => {
                attempts += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let downloaded = transfer
            .download_file(&info, first, &args.dest, expected)
            .await;
        match downloaded {
            Ok(done) => {
                report(key, "hit", Some(&done));
                gc::mark_used(&transfer, &Layout::new(&config.prefix.value), &info).await;
                return Ok(Cached::Hit);
            }
            // Overwritten or deleted by another job while we read it: take the new
            // version, or miss.
            Err(e) if (is_changed(&e) || is_not_found(&e)) && attempts < 3 => {
                attempts += 1;
                continue;
            }
            // A cached object that no longer matches the pinned hash is stale: refetch.
            Err(e)
                if args.url.is_some()
                    && matches!(
                        e.downcast_ref::<IntegrityError>(),
                        Some(IntegrityError::NotExpected { .. })
                    ) =>
            {
                ui::warn(format!("{e:#}; fetching from --url instead"));
                return Ok(Cached::Miss(Box::new(transfer), replace));
            }
            Err(e) if crate::sign::is_untrusted(&e) => {
                ui::warn(format!("{e}; treating it as a miss"));
                return Ok(Cached::Miss(Box::new(transfer), replace));
            }
            // Bytes that do not hash to what was recorded (and maybe signed) with them
            // help no one: a miss, as for a broken chunked entry, and that version is
            // deleted, so the next upload writes the key again instead of skipping it.
            Err(e)
                if matches!(
                    e.downcast_ref::<IntegrityError>(),
                    Some(IntegrityError::Corrupt { .. })
                ) =>
            {
                let now = transfer.store().head(key).await?;
                if info.etag.is_none() || now.as_ref().map(|n| &n.etag) != Some(&info.etag) {
                    // Replaced meanwhile (or versions cannot be told apart): read again.
                    if attempts < 3 {
                        attempts += 1;
                        continue;
                    }
                    ui::warn(format!("{e:#}; treating it as a miss"));
                    return Ok(Cached::Miss(Box::new(transfer), replace));
                }
                let deleted = transfer.store().delete(key).await.is_ok();
                let note = if deleted {
                    "deleted it"
                } else {
                    "could not delete it"
                };
                ui::warn(format!("{e:#}; {note}, treating it as a miss"));
                let seed = if deleted { WriteMode::Create } else { replace };
                return Ok(Cached::Miss(Box::new(transfer), seed));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Cached::Miss(Box::new(transfer), WriteMode::Create))
}

fn report(key: &str, result: &str, transfer: Option<&crate::transfer::Report>) {
    if ui::json_enabled() {
        ui::json(
            serde_json::json!({ "command": "download", "key": key, "result": result, "transfer": transfer }),
        );
    }
}

fn parse_sha256(hex: &str) -> anyhow::Result<String> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(InputError(format!("--sha256 must be 64 hex characters, got {hex:?}")).into());
    }
    Ok(hex.to_ascii_lowercase())
}
