//! `cacher list [PREFIX] [--recursive] [--root] [--all]`: keys in `aws s3 ls` format.
//!
//! One level at a time (`PRE dir/` lines, then objects) unless `--recursive`, which
//! prints whole keys relative to the configured prefix (or the bucket with `--root`).
//! cacher's own objects (`.cacher/`, a segment no user key may have) are left out
//! unless `--all` is given or PREFIX is inside them.
//! Times are local (`TZ` respected), as `aws s3 ls` prints them; `--json` gives UTC.

use std::io::Write;
use std::time::SystemTime;

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

use serde_json::json;

use super::Outcome;
use crate::chunk::format::{HEADER_LEN, ManifestKind, peek_manifest};
use crate::cli::ListArgs;
use crate::config::Config;
use crate::store::{Listing, ObjectInfo};
use crate::transfer::Transfer;
use crate::ui;
use futures::StreamExt;

pub async fn run(config: &Config, args: &ListArgs) -> anyhow::Result<Outcome> {
    let base = if args.root || config.prefix.value.is_empty() {
        String::new()
    } else {
        format!("{}/", config.prefix.value)
    };
    let wanted = args.prefix.as_deref().unwrap_or("").trim_start_matches('/');
    let full = format!("{base}{wanted}");
    let chunks = super::dir::chunk_store(config).await?;
    let store = chunks.transfer().store().clone();
    let delimiter = (!args.recursive).then_some('/');

    // Names are shown relative to the last `/` of the listed prefix, as `aws s3 ls` does.
    let level = &full[..full.rfind('/').map_or(0, |i| i + 1)];
    let shown_from = if args.recursive {
        base.len()
    } else {
        level.len()
    };
    // Page by page, as `aws s3 ls` prints: a listing of millions of keys starts at once
    // and holds one page at a time.
    let hidden = |key: &str| !args.all && !is_internal(wanted) && is_internal(&key[base.len()..]);
    let mut token = None;
    loop {
        let (mut page, next) = store.list_page(&full, delimiter, token).await?;
        page.prefixes.retain(|p| !hidden(p));
        page.objects.retain(|o| !hidden(&o.key));
        let kinds = peek_entries(chunks.transfer(), &page.objects).await;
        print_page(&page, &kinds, shown_from)?;
        match next {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    Ok(Outcome::Success)
}

/// Whether a key (or part of one) is cacher's own: it has a reserved segment
/// (`.cacher`, or `.cacher-*` as a doctor check interrupted may leave).
fn is_internal(key: &str) -> bool {
    key.split('/')
        .any(crate::chunk::layout::is_reserved_segment)
}

/// For each object, whether it is a directory or docker entry, and what its content
/// holds: a manifest's size says nothing of the tree or image it describes. One
/// ranged read of its first bytes each, several at once; an object that cannot be
/// read is shown as it is listed.
async fn peek_entries(
    transfer: &Transfer,
    objects: &[ObjectInfo],
) -> Vec<Option<(ManifestKind, u64)>> {
    futures::stream::iter(objects)
        .map(|o| async move {
            if is_internal(&o.key) || o.size < HEADER_LEN as u64 {
                return None;
            }
            let mut head = Vec::new();
            let range = 0..o.size.min(PEEK_BYTES);
            transfer
                .read_range(&o.key, o.etag.as_deref(), range, &mut head)
                .await
                .ok()?;
            peek_manifest(&head)
        })
        .buffered(transfer.jobs())
        .collect()
        .await
}

/// Bytes read from each listed object to tell a manifest and its content length.
const PEEK_BYTES: u64 = 4096;

/// Prints one page of a listing: its common prefixes, then its objects (with what
/// `kinds` says of each).
fn print_page(
    listing: &Listing,
    kinds: &[Option<(ManifestKind, u64)>],
    shown_from: usize,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for prefix in &listing.prefixes {
        if ui::json_enabled() {
            writeln!(
                out,
                "{}",
                json!({ "prefix": prefix, "name": &prefix[shown_from..] })
            )?;
        } else {
            writeln!(out, "{:>30} {}", "PRE", &prefix[shown_from..])?;
        }
    }
    for (object, kind) in listing.objects.iter().zip(kinds) {
        let name = &object.key[shown_from..];
        let (entry, bytes) = match kind {
            Some((ManifestKind::Dir, len)) => ("tree", *len),
            Some((ManifestKind::Paths, len)) => ("paths", *len),
            Some((ManifestKind::Docker, len)) => ("image", *len),
            None => ("file", object.size),
        };
        if ui::json_enabled() {
            let modified = object
                .modified
                .map(OffsetDateTime::from)
                .and_then(|t| t.format(&Rfc3339).ok());
            let record = json!({
                "key": object.key, "name": name, "size": object.size, "modified": modified,
                "entry": entry, "bytes": bytes,
            });
            writeln!(out, "{record}")?;
        } else {
            let modified = format_time(object.modified);
            let tag = match kind {
                Some(_) => format!(" ({entry})"),
                None => String::new(),
            };
            writeln!(out, "{modified} {bytes:>10} {name}{tag}")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// A modification time in local time (`TZ` respected), as `aws s3 ls` prints it.
pub(super) fn format_time(t: Option<SystemTime>) -> String {
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    t.map(OffsetDateTime::from)
        .map(|t| t.to_offset(local_offset(t.unix_timestamp())))
        .and_then(|t| t.format(format).ok())
        .unwrap_or_else(|| "????-??-?? ??:??:??".to_string())
}

/// The local UTC offset at `unix` seconds, from the C library (which reads `TZ` and
/// /etc/localtime); UTC when it cannot tell.
// `time_t` is i64 on every target cacher ships for; the libc crate marks the alias
// deprecated on musl only because its width there changed once (musl 1.2).
#[allow(clippy::unnecessary_cast, deprecated)]
fn local_offset(unix: i64) -> UtcOffset {
    let secs = unix as libc::time_t;
    // SAFETY: localtime_r only writes the `tm` it is given; a zeroed `tm` is valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return UtcOffset::UTC;
    }
    i32::try_from(tm.tm_gmtoff)
        .ok()
        .and_then(|s| UtcOffset::from_whole_seconds(s).ok())
        .unwrap_or(UtcOffset::UTC)
}
