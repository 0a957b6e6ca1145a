//! `cacher upload KEY PATH [--force]`: store a file byte-for-byte under a key.

use super::{Outcome, WriteMode};
use crate::cli::{UploadArgs, input_error};
use crate::config::Config;
use crate::key::full_key;
use crate::transfer::Transfer;
use crate::ui;

pub async fn run(config: &Config, args: &UploadArgs) -> anyhow::Result<Outcome> {
    let key = full_key(config, &args.key)?;
    match std::fs::metadata(&args.path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return Err(input_error(format!(
                "{} is not a regular file",
                args.path.display()
            )));
        }
        Err(e) => {
            return Err(input_error(format!(
                "cannot read {}: {e}",
                args.path.display()
            )));
        }
    }
    let transfer = Transfer::open(config).await?;
    let write = super::write_mode(&transfer, &key, args.force, "upload").await?;
    if write == WriteMode::Skip {
        return Ok(Outcome::Success);
    }
    // Racing writers never corrupt a key: when creating it, the first to finish keeps it
    // where the server honours If-None-Match (elsewhere the last complete write wins);
    // a multipart upload the server cancelled because another finished is skipped too.
    let written = transfer
        .upload_file(&key, &args.path, None, write == WriteMode::Create)
        .await?;
    if written.is_none() {
        ui::status(format!("{key} was written by a concurrent upload; skipped"));
    }
    let result = if written.is_some() {
        "uploaded"
    } else {
        "skipped"
    };
    report(&key, result, written.as_ref());
    Ok(Outcome::Success)
}

fn report(key: &str, result: &str, transfer: Option<&crate::transfer::Report>) {
    if ui::json_enabled() {
        ui::json(
            serde_json::json!({ "command": "upload", "key": key, "result": result, "transfer": transfer }),
        );
    }
}
