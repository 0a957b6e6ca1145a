//! What lies where in a `docker save` archive, and the thin archive a restore feeds to
//! `docker load` when the daemon already has some of the image's layers.
//!
//! At upload, [`MemberTap`] reads the tar headers as the archive streams past and
//! [`member_map`] turns them, with the image's layer diff IDs, into [`Part`]s: the body
//! of each layer, and the bytes between. A docker manifest records the parts as its
//! entries (docs/format.md). At restore, a [`ThinPlan`] leaves out the bodies of the
//! layers whose chain ID the daemon holds: each becomes an empty member, which `docker
//! load` accepts for a layer it has and refuses, loading nothing, for one it lacks.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::chunk::format::{ChunkRef, ChunkTable, Entry, EntryKind};
use crate::chunk::store::LayerStats;

/// Tar's block: headers take one, bodies are padded to a multiple.
const BLOCK: u64 = 512;
/// Largest `manifest.json` or PAX header kept while scanning; docker's take a few KiB.
const MAX_KEPT: u64 = 1024 * 1024;
/// Digits of a part's position in its entry name.
const POSITION_DIGITS: usize = 6;

/// A stretch of an archive's bytes, as a docker manifest records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Bytes in the stretch.
    pub len: u64,
    /// For the body of a layer's member, the chain ID (`sha256:…`) a daemon must hold
    /// for `docker load` to accept that member empty; `None` for the bytes between.
    pub chain_id: Option<String>,
}

/// The chain IDs of an image's layers, bottom first, from their diff IDs, as the OCI
/// image spec defines them: the first layer's is its diff ID, each next one is the
/// sha256 of "<previous chain ID> <diff ID>".
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chains: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let chain = match chains.last() {
            None => diff_id.clone(),
            Some(below) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{below} {diff_id}")))
            ),
        };
        chains.push(chain);
    }
    chains
}

/// The manifest entries recording `parts`: regular files named by their position
/// (`000000`), a layer's body with its chain ID after a dot (`000001.sha256:…`).
pub fn parts_to_entries(parts: &[Part]) -> Vec<Entry> {
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let mut name = format!("{i:0POSITION_DIGITS$}");
            if let Some(chain) = &part.chain_id {
                name.push('.');
                name.push_str(chain);
            }
            Entry {
                path: name.into_bytes(),
                kind: EntryKind::File { size: part.len },
                mode: 0o644,
                mtime: 0,
                mtime_nsec: 0,
            }
        })
        .collect()
}

/// The parts a docker manifest's entries record; `None` when it records none (entries
/// written before member maps) or something else, which a restore treats the same way:
/// it feeds the whole archive.
pub fn parts_of_entries(entries: &[Entry]) -> Option<Vec<Part>> {
    if entries.is_empty() {
        return None;
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let EntryKind::File { size } = entry.kind else {
                return None;
            };
            let name = std::str::from_utf8(&entry.path).ok()?;
            let (position, chain_id) = match name.split_once('.') {
                Some((position, chain)) if is_chain_id(chain) => {
                    (position, Some(chain.to_string()))
                }
                Some(_) => return None,
                None => (name, None),
            };
            (position == format!("{i:0POSITION_DIGITS$}")).then_some(Part {
                len: size,
                chain_id,
            })
        })
        .collect()
}

fn is_chain_id(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// A reader that passes a tar archive through unchanged and notes where its members
/// lie; [`ScanHandle::finish`] returns what it saw once the archive was read.
pub struct MemberTap<R> {
    inner: R,
    scan: Arc<Mutex<Scan>>,
}

/// Where to collect what a [`MemberTap`] saw.
pub struct ScanHandle(Arc<Mutex<Scan>>);

impl<R: Read> MemberTap<R> {
    /// Taps `inner`.
    pub fn new(inner: R) -> (MemberTap<R>, ScanHandle) {
        let scan = Arc::new(Mutex::new(Scan::default()));
        (
            MemberTap {
                inner,
                scan: scan.clone(),
            },
            ScanHandle(scan),
        )
    }
}

impl<R: Read> Read for MemberTap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scan.lock().expect("scan lock").feed(&buf[..n]);
        Ok(n)
    }
}

impl ScanHandle {
    /// What the tap saw.
    pub fn finish(self) -> Scan {
        std::mem::take(&mut *self.0.lock().expect("scan lock"))
    }
}

/// The members of a tar archive and where their bodies lie, as read by a [`MemberTap`].
#[derive(Default)]
pub struct Scan {
    /// Bytes seen so far.
    len: u64,
    members: Vec<Member>,
    /// The body of the top-level `manifest.json`, which names the config and layers.
    manifest_json: Option<Vec<u8>>,
    state: ScanState,
    /// What PAX or GNU headers said about the next member.
    pending: Pending,
    /// Something a map cannot describe was seen (a bad header, a global PAX header).
    unusable: bool,
}

struct Member {
    name: String,
    body_at: u64,
    size: u64,
    kind: MemberKind,
}

enum MemberKind {
    /// A regular file; `size_in_header` is false when a PAX header gave its size, so
    /// an empty member would need that header changed too.
    File {
        size_in_header: bool,
    },
    Symlink {
        target: String,
    },
    Other,
}

#[derive(Default)]
struct Pending {
    path: Option<String>,
    link: Option<String>,
    size: Option<u64>,
}

enum ScanState {
    Header(Vec<u8>),
    Body {
        left: u64,
        padding: u64,
        keep: Option<(Kept, Vec<u8>)>,
    },
    Padding(u64),
    End,
}

impl Default for ScanState {
    fn default() -> ScanState {
        ScanState::Header(Vec::with_capacity(BLOCK as usize))
    }
}

/// A body the scan keeps, and why.
#[derive(Clone, Copy)]
enum Kept {
    Pax,
    LongName,
    LongLink,
    Manifest,
}

impl Scan {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let taken = match &mut self.state {
                ScanState::End => data.len(),
                ScanState::Header(block) => {
                    let n = (BLOCK as usize - block.len()).min(data.len());
                    block.extend_from_slice(&data[..n]);
                    if block.len() == BLOCK as usize {
                        let block = std::mem::take(block);
                        self.len += n as u64;
                        self.header(&block);
                        data = &data[n..];
                        continue;
                    }
                    n
                }
                ScanState::Body {
                    left,
                    padding,
                    keep,
                } => {
                    let n = (*left).min(data.len() as u64) as usize;
                    if let Some((_, body)) = keep {
                        body.extend_from_slice(&data[..n]);
                    }
                    *left -= n as u64;
                    if *left == 0 {
                        let padding = *padding;
                        if let Some((kept, body)) = keep.take() {
                            self.kept(kept, body);
                        }
                        if !matches!(self.state, ScanState::End) {
                            self.state = match padding {
                                0 => ScanState::default(),
                                n => ScanState::Padding(n),
                            };
                        }
                    }
                    n
                }
                ScanState::Padding(left) => {
                    let n = (*left).min(data.len() as u64) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = ScanState::default();
                    }
                    n
                }
            };
            self.len += taken as u64;
            data = &data[taken..];
        }
    }

    /// Reads one header block; the scan's length already counts it.
    fn header(&mut self, block: &[u8]) {
        if block.iter().all(|&b| b == 0) {
            self.state = ScanState::End;
            return;
        }
        let header = tar::Header::from_byte_slice(block);
        let Ok(header_size) = header.entry_size() else {
            return self.give_up();
        };
        if header_checksum(block) != header.cksum().ok() {
            return self.give_up();
        }
        let entry_type = header.entry_type();
        let size = match entry_type {
            tar::EntryType::XHeader | tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {
                header_size
            }
            _ => self.pending.size.unwrap_or(header_size),
        };
        let kept = match entry_type {
            tar::EntryType::XHeader => Some(Kept::Pax),
            tar::EntryType::GNULongName => Some(Kept::LongName),
            tar::EntryType::GNULongLink => Some(Kept::LongLink),
            tar::EntryType::XGlobalHeader => return self.give_up(),
            _ => {
                let pending = std::mem::take(&mut self.pending);
                let name = pending
                    .path
                    .unwrap_or_else(|| String::from_utf8_lossy(&header.path_bytes()).into_owned());
                let name = name.trim_start_matches("./").to_string();
                let kind = match entry_type {
                    tar::EntryType::Regular | tar::EntryType::Continuous => MemberKind::File {
                        size_in_header: pending.size.is_none(),
                    },
                    tar::EntryType::Symlink => MemberKind::Symlink {
                        target: pending.link.unwrap_or_else(|| {
                            header
                                .link_name_bytes()
                                .map(|l| String::from_utf8_lossy(&l).into_owned())
                                .unwrap_or_default()
                        }),
                    },
                    _ => MemberKind::Other,
                };
                let manifest = name == "manifest.json" && matches!(kind, MemberKind::File { .. });
                self.members.push(Member {
                    name,
                    body_at: self.len,
                    size,
                    kind,
                });
                manifest.then_some(Kept::Manifest)
            }
        };
        if kept.is_some() && size > MAX_KEPT {
            return self.give_up();
        }
        let Some(padding) = size.checked_next_multiple_of(BLOCK).map(|end| end - size) else {
            return self.give_up();
        };
        self.state = if size == 0 {
            ScanState::default()
        } else {
            ScanState::Body {
                left: size,
                padding,
                keep: kept.map(|k| (k, Vec::new())),
            }
        };
    }

    fn kept(&mut self, kept: Kept, body: Vec<u8>) {
        let text = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .trim_end_matches('\0')
                .to_string()
        };
        match kept {
            Kept::Manifest => self.manifest_json = Some(body),
            Kept::LongName => self.pending.path = Some(text(&body)),
            Kept::LongLink => self.pending.link = Some(text(&body)),
            Kept::Pax => {
                for ext in tar::PaxExtensions::new(&body) {
                    let Ok(ext) = ext else {
                        return self.give_up();
                    };
                    let value = String::from_utf8_lossy(ext.value_bytes()).into_owned();
                    match ext.key() {
                        Ok("path") => self.pending.path = Some(value),
                        Ok("linkpath") => self.pending.link = Some(value),
                        Ok("size") => match value.parse() {
                            Ok(size) => self.pending.size = Some(size),
                            Err(_) => return self.give_up(),
                        },
                        _ => {}
                    }
                }
            }
        }
    }

    fn give_up(&mut self) {
        self.unusable = true;
        self.state = ScanState::End;
    }
}

/// The checksum a tar header should carry: the sum of its bytes with the checksum
/// field taken as spaces.
fn header_checksum(block: &[u8]) -> Option<u32> {
    (block.len() == BLOCK as usize).then(|| {
        block
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum()
    })
}

/// One image in a `docker save` archive's `manifest.json`.
#[derive(serde::Deserialize)]
struct ArchivedImage {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The parts of the archive `scan` read: the body of each layer member that exactly one
/// layer of the image uses (with that layer's chain ID), and the bytes between.
/// `image_id` and `diff_ids` are what the daemon says of the image saved; `None` when
/// the archive is not that image's (the tag moved meanwhile), is not complete, or is
/// laid out in a way the map cannot describe. A restore then feeds the whole archive.
pub fn member_map(scan: &Scan, image_id: &str, diff_ids: &[String]) -> Option<Vec<Part>> {
    if scan.unusable || !matches!(scan.state, ScanState::End) {
        return None;
    }
    let images: Vec<ArchivedImage> = serde_json::from_slice(scan.manifest_json.as_ref()?).ok()?;
    let [image] = images.as_slice() else {
        return None;
    };
    let id_hex = image_id.strip_prefix("sha256:")?;
    if !image.config.contains(id_hex) || image.layers.len() != diff_ids.len() {
        return None;
    }
    let by_name: HashMap<&str, usize> = scan
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_str(), i))
        .collect();
    let chains = chain_ids(diff_ids);
    // A member two layers use (through a symlink) could be left out only if the
    // daemon had both; rare enough to always send.
    let mut users: HashMap<usize, Vec<usize>> = HashMap::new();
    for (position, path) in image.layers.iter().enumerate() {
        let member = resolve(scan, &by_name, path)?;
        users.entry(member).or_default().push(position);
    }
    let mut bodies: Vec<(u64, u64, String)> = users
        .into_iter()
        .filter_map(|(member, positions)| {
            let m = &scan.members[member];
            let single = positions.len() == 1 && m.size > 0;
            (single
                && matches!(
                    m.kind,
                    MemberKind::File {
                        size_in_header: true
                    }
                ))
            .then(|| (m.body_at, m.size, chains[positions[0]].clone()))
        })
        .collect();
    bodies.sort();
    let mut parts = Vec::with_capacity(2 * bodies.len() + 1);
    let mut at = 0;
    for (body_at, size, chain_id) in bodies {
        parts.push(Part {
            len: body_at - at,
            chain_id: None,
        });
        parts.push(Part {
            len: size,
            chain_id: Some(chain_id),
        });
        at = body_at + size;
    }
    parts.push(Part {
        len: scan.len - at,
        chain_id: None,
    });
    Some(parts)
}

/// The regular-file member `path` names, following one symlink as `docker load` would.
fn resolve(scan: &Scan, by_name: &HashMap<&str, usize>, path: &str) -> Option<usize> {
    let index = *by_name.get(path.trim_start_matches("./"))?;
    match &scan.members[index].kind {
        MemberKind::File { .. } => Some(index),
        MemberKind::Symlink { target } if !target.starts_with('/') => {
            let mut parts: Vec<&str> = path.split('/').collect();
            parts.pop();
            for segment in target.split('/') {
                match segment {
                    "" | "." => {}
                    ".." => {
                        parts.pop()?;
                    }
                    s => parts.push(s),
                }
            }
            let index = *by_name.get(parts.join("/").as_str())?;
            matches!(scan.members[index].kind, MemberKind::File { .. }).then_some(index)
        }
        _ => None,
    }
}

/// The archive `docker load` gets when the daemon already has some layers: the bodies
/// of those layers are left out and their headers say size 0.
pub struct ThinPlan {
    skips: Vec<Skip>,
    /// What it leaves out.
    pub stats: LayerStats,
}

/// One layer body left out of the archive, with its padding.
#[derive(Clone, Copy, Debug)]
struct Skip {
    /// Where the member's header starts (its body's start less one block).
    header_at: u64,
    body_at: u64,
    body_len: u64,
    /// End of the body's padding, where the next header starts.
    end: u64,
}

impl ThinPlan {
    /// The plan for an archive of `stream_len` bytes cut into `parts` when the daemon
    /// holds the chain IDs in `present`; `None` when it holds none of the parts' layers
    /// or the parts do not describe such an archive.
    pub fn new(parts: &[Part], stream_len: u64, present: &HashSet<String>) -> Option<ThinPlan> {
        let mut skips: Vec<Skip> = Vec::new();
        let mut stats = LayerStats::default();
        let mut at = 0u64;
        for part in parts {
            let start = at;
            at = at.checked_add(part.len)?;
            let Some(chain) = &part.chain_id else {
                continue;
            };
            stats.total += 1;
            if !present.contains(chain) {
                continue;
            }
            let skip = Skip {
                header_at: start.checked_sub(BLOCK)?,
                body_at: start,
                body_len: part.len,
                end: start
                    .checked_add(part.len)?
                    .checked_next_multiple_of(BLOCK)?,
            };
            let after_previous = skips.last().is_none_or(|s| s.end <= skip.header_at);
            if !start.is_multiple_of(BLOCK) || !after_previous || skip.end > stream_len {
                return None;
            }
            stats.present += 1;
            stats.present_bytes += part.len;
            skips.push(skip);
        }
        (at == stream_len && !skips.is_empty()).then_some(ThinPlan { skips, stats })
    }

    /// The chunks of `table` (a stream's, in order) holding bytes the thin archive
    /// keeps, as a table of their own, and where each starts in the stream.
    pub fn needed(&self, table: &ChunkTable) -> (ChunkTable, Vec<(u64, u32)>) {
        let mut needed = ChunkTable::default();
        let mut packs: HashMap<u32, u32> = HashMap::new();
        let mut spans = Vec::new();
        let mut skips = self.skips.iter().peekable();
        let mut at = 0u64;
        for c in &table.chunks {
            let (start, end) = (at, at + u64::from(c.len));
            at = end;
            while skips.next_if(|s| s.end <= start).is_some() {}
            if skips
                .peek()
                .is_some_and(|s| s.body_at <= start && end <= s.end)
            {
                continue;
            }
            let pack = *packs.entry(c.pack).or_insert_with(|| {
                needed.packs.push(table.packs[c.pack as usize]);
                needed.packs.len() as u32 - 1
            });
            needed.chunks.push(ChunkRef { pack, ..*c });
            spans.push((start, c.len));
        }
        (needed, spans)
    }

    /// A writer that takes the bytes of the chunks [`ThinPlan::needed`] chose, in order,
    /// and writes the thin archive to `out`.
    pub fn writer<W: Write>(&self, spans: Vec<(u64, u32)>, out: W) -> ThinWriter<W> {
        ThinWriter {
            out,
            skips: self.skips.clone(),
            next_skip: 0,
            spans,
            span: 0,
            within: 0,
            header: Vec::with_capacity(BLOCK as usize),
        }
    }
}

/// The archive did not hold what its member map says, so the thin archive cannot be
/// made; the full one can.
#[derive(Debug, thiserror::Error)]
#[error("the archive does not match its member map: {0}")]
pub struct MapMismatch(pub(crate) String);

fn mismatch(why: impl Into<String>) -> io::Error {
    io::Error::other(MapMismatch(why.into()))
}

/// Writes the thin archive of a [`ThinPlan`]; see [`ThinPlan::writer`].
pub struct ThinWriter<W> {
    out: W,
    skips: Vec<Skip>,
    next_skip: usize,
    /// Stream offset and length of each chunk that arrives.
    spans: Vec<(u64, u32)>,
    span: usize,
    /// Bytes of the current chunk already taken.
    within: u64,
    /// The header of the next layer left out, as it arrives.
    header: Vec<u8>,
}

impl<W: Write> ThinWriter<W> {
    /// The writer the archive went to, once every chunk arrived.
    pub fn into_inner(self) -> io::Result<W> {
        if self.span != self.spans.len() {
            return Err(mismatch("the archive ended early"));
        }
        Ok(self.out)
    }

    /// Takes bytes at stream offset `at`; returns how many it took.
    fn take(&mut self, at: u64, data: &[u8]) -> io::Result<usize> {
        while self.skips.get(self.next_skip).is_some_and(|s| s.end <= at) {
            self.next_skip += 1;
        }
        let Some(skip) = self.skips.get(self.next_skip).copied() else {
            self.out.write_all(data)?;
            return Ok(data.len());
        };
        let upto = |limit: u64| data.len().min((limit - at) as usize);
        if at < skip.header_at {
            let n = upto(skip.header_at);
            self.out.write_all(&data[..n])?;
            Ok(n)
        } else if at < skip.body_at {
            let n = upto(skip.body_at);
            self.header.extend_from_slice(&data[..n]);
            if self.header.len() == BLOCK as usize {
                let header = empty_member_header(&self.header, skip.body_len)?;
                self.out.write_all(&header)?;
                self.header.clear();
            }
            Ok(n)
        } else {
            Ok(upto(skip.end))
        }
    }
}

impl<W: Write> Write for ThinWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            let Some(&(start, len)) = self.spans.get(self.span) else {
                return Err(mismatch("more bytes than its chunks hold"));
            };
            let in_chunk = rest.len().min((u64::from(len) - self.within) as usize);
            let n = self.take(start + self.within, &rest[..in_chunk])?;
            rest = &rest[n..];
            self.within += n as u64;
            if self.within == u64::from(len) {
                self.span += 1;
                self.within = 0;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// `block`, the header of a regular file of `size` bytes, rewritten to say size 0.
fn empty_member_header(block: &[u8], size: u64) -> io::Result<Vec<u8>> {
    let header = tar::Header::from_byte_slice(block);
    let regular = matches!(
        header.entry_type(),
        tar::EntryType::Regular | tar::EntryType::Continuous
    );
    if header_checksum(block) != header.cksum().ok()
        || !regular
        || header.entry_size().ok() != Some(size)
    {
        return Err(mismatch("a layer's tar header is not where the map says"));
    }
    let mut header = header.clone();
    header.set_size(0);
    header.set_cksum();
    Ok(header.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Id;

    const CONFIG_HEX: &str = "5c229c1859ea92987213f8bfe7259373592e7ddc7c18aea759e9b37e0a610491";
    const LONG_DIR: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddeeeeeeeeeeeeeeeeeeeeeeeeeeee";

    fn diff_id(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    /// The diff IDs of the image [`archive`] holds: the first and third layers are
    /// the same, as docker saves them (once, and a symlink).
    fn diff_ids() -> Vec<String> {
        vec![diff_id(1), diff_id(2), diff_id(1), diff_id(3), diff_id(4)]
    }

    fn image_id() -> String {
        format!("sha256:{CONFIG_HEX}")
    }

    /// An archive laid out as `docker save` lays one out, built with the tar crate:
    /// five layers (one with a name long enough to need a GNU header, one a symlink to
    /// another, as docker writes a repeated layer, one preceded by a PAX header giving
    /// its size), a config and manifest.json last. Returns it and its regular files.
    fn archive() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
        let members: Vec<(String, Vec<u8>)> = vec![
            ("aaaa/VERSION".into(), b"1.0".to_vec()),
            (
                "aaaa/layer.tar".into(),
                (0..5000u32).map(|i| i as u8).collect(),
            ),
            ("bbbb/layer.tar".into(), vec![9u8; 700]),
            ("cccc/layer.tar".into(), vec![8u8; 1200]),
            (format!("{LONG_DIR}/layer.tar"), vec![7u8; 3 * 512]),
            (format!("{CONFIG_HEX}.json"), b"{}".to_vec()),
        ];
        let manifest = format!(
            r#"[{{"Config":"{CONFIG_HEX}.json","RepoTags":["x:1"],"Layers":["aaaa/layer.tar","{LONG_DIR}/layer.tar","zzzz/layer.tar","bbbb/layer.tar","cccc/layer.tar"]}}]"#
        );
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in &members {
            if name == "cccc/layer.tar" {
                let size = data.len().to_string();
                builder
                    .append_pax_extensions([("size", size.as_bytes())])
                    .unwrap();
            }
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, name, &data[..]).unwrap();
        }
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        builder
            .append_link(&mut link, "zzzz/layer.tar", "../aaaa/layer.tar")
            .unwrap();
        let mut header = tar::Header::new_ustar();
        header.set_size(manifest.len() as u64);
        builder
            .append_data(&mut header, "manifest.json", manifest.as_bytes())
            .unwrap();
        let mut members = members;
        members.push(("manifest.json".into(), manifest.into_bytes()));
        (builder.into_inner().unwrap(), members)
    }

    fn scan_of(data: &[u8], piece: usize) -> Scan {
        let (mut tap, handle) = MemberTap::new(data);
        let mut sink = Vec::new();
        let mut buf = vec![0u8; piece];
        loop {
            let n = tap.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            sink.extend_from_slice(&buf[..n]);
        }
        assert_eq!(sink, data, "the tap passes bytes through");
        handle.finish()
    }

    #[test]
    fn the_map_covers_the_archive_and_leaves_shared_members_in() {
        let (data, _) = archive();
        let chains = chain_ids(&diff_ids());
        for piece in [1, 511, 512, 4096, 1 << 20] {
            let scan = scan_of(&data, piece);
            let parts = member_map(&scan, &image_id(), &diff_ids()).expect("a map");
            assert_eq!(parts.iter().map(|p| p.len).sum::<u64>(), data.len() as u64);
            let layers: Vec<_> = parts.iter().filter_map(|p| p.chain_id.clone()).collect();
            // aaaa/layer.tar serves layers 0 and 2 (through the symlink), and cccc's
            // size is in a PAX header: both stay in the parts between.
            assert_eq!(
                layers,
                vec![chains[3].clone(), chains[1].clone()],
                "read {piece} bytes at a time"
            );
            assert_eq!(parts_of_entries(&parts_to_entries(&parts)), Some(parts));
        }
        let scan = scan_of(&data, 4096);
        assert!(
            member_map(&scan, "sha256:0000", &diff_ids()).is_none(),
            "another image"
        );
        assert!(member_map(&scan, &image_id(), &diff_ids()[..4]).is_none());
        let cut = scan_of(&data[..data.len() - 1024], 4096);
        assert!(member_map(&cut, &image_id(), &diff_ids()).is_none());
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let chains = chain_ids(&[diff_id(1), diff_id(2)]);
        assert_eq!(chains[0], diff_id(1));
        let expected = Sha256::digest(format!("{} {}", diff_id(1), diff_id(2)));
        assert_eq!(chains[1], format!("sha256:{}", hex::encode(expected)));
    }

    /// `data` cut into chunks of `chunk_len` bytes, as a manifest's table.
    fn table(data: &[u8], chunk_len: usize) -> ChunkTable {
        ChunkTable {
            packs: vec![Id([0; 32])],
            chunks: data
                .chunks(chunk_len)
                .map(|c| ChunkRef {
                    id: Id::of(c),
                    pack: 0,
                    offset: 0,
                    stored_len: 0,
                    len: c.len() as u32,
                })
                .collect(),
        }
    }

    /// The thin archive from chunks of `chunk_len` bytes, as a restore writes it, and
    /// the bytes of the chunks it needed.
    fn thin_archive(data: &[u8], plan: &ThinPlan, chunk_len: usize) -> (Vec<u8>, u64) {
        let (needed, spans) = plan.needed(&table(data, chunk_len));
        for (start, len) in &spans {
            let end = start + u64::from(*len);
            assert!(
                !plan
                    .skips
                    .iter()
                    .any(|s| s.body_at <= *start && end <= s.end),
                "chunk {start}..{end} lies inside a body left out"
            );
        }
        let mut writer = plan.writer(spans.clone(), Vec::new());
        for (c, (start, len)) in needed.chunks.iter().zip(&spans) {
            let bytes = &data[*start as usize..(*start + u64::from(*len)) as usize];
            assert_eq!(Id::of(bytes), c.id);
            // Written in two uneven pieces, as a pipe might take them.
            let cut = bytes.len() / 3;
            writer.write_all(&bytes[..cut]).unwrap();
            writer.write_all(&bytes[cut..]).unwrap();
        }
        let fetched = spans.iter().map(|(_, len)| u64::from(*len)).sum();
        (writer.into_inner().unwrap(), fetched)
    }

    #[test]
    fn the_thin_archive_has_the_layers_the_daemon_holds_empty() {
        let (data, members) = archive();
        let scan = scan_of(&data, 4096);
        let parts = member_map(&scan, &image_id(), &diff_ids()).unwrap();
        let chains = chain_ids(&diff_ids());
        assert!(ThinPlan::new(&parts, data.len() as u64, &HashSet::new()).is_none());
        let cases = [
            (vec![chains[1].clone()], vec![LONG_DIR]),
            (chains.clone(), vec![LONG_DIR, "bbbb"]),
        ];
        for (present, left_out) in cases {
            let present: HashSet<String> = present.into_iter().collect();
            let plan = ThinPlan::new(&parts, data.len() as u64, &present).unwrap();
            let left_out_bytes: u64 = members
                .iter()
                .filter(|(name, _)| left_out.iter().any(|d| *name == format!("{d}/layer.tar")))
                .map(|(_, body)| body.len() as u64)
                .sum();
            assert_eq!(plan.stats.total, 2);
            assert_eq!(plan.stats.present, left_out.len() as u64);
            assert_eq!(plan.stats.present_bytes, left_out_bytes);
            for chunk_len in [100, 512, 700, 4096, data.len()] {
                let (thin, fetched) = thin_archive(&data, &plan, chunk_len);
                if chunk_len <= 512 {
                    assert!(fetched < data.len() as u64 - left_out_bytes + 2 * 512);
                }
                let mut read = tar::Archive::new(&thin[..]);
                let mut seen = Vec::new();
                for entry in read.entries().unwrap() {
                    let mut entry = entry.unwrap();
                    let name = String::from_utf8(entry.path_bytes().to_vec()).unwrap();
                    let mut body = Vec::new();
                    entry.read_to_end(&mut body).unwrap();
                    if name != "zzzz/layer.tar" {
                        seen.push((name, body));
                    }
                }
                let want: Vec<(String, Vec<u8>)> = members
                    .iter()
                    .map(|(name, body)| {
                        let gone = left_out.iter().any(|d| *name == format!("{d}/layer.tar"));
                        (name.clone(), if gone { Vec::new() } else { body.clone() })
                    })
                    .collect();
                assert_eq!(
                    seen, want,
                    "chunks of {chunk_len} bytes, {left_out:?} left out"
                );
            }
        }
    }

    #[test]
    fn a_map_that_does_not_match_the_archive_fails_the_thin_archive() {
        let (data, _) = archive();
        let scan = scan_of(&data, 4096);
        let mut parts = member_map(&scan, &image_id(), &diff_ids()).unwrap();
        // Move the first layer body one block later: its "header" is now body bytes.
        parts[0].len += 512;
        parts[2].len -= 512;
        let present: HashSet<String> = chain_ids(&diff_ids()).into_iter().collect();
        let plan = ThinPlan::new(&parts, data.len() as u64, &present).unwrap();
        let (_, spans) = plan.needed(&table(&data, data.len()));
        let mut writer = plan.writer(spans, Vec::new());
        let err = writer.write_all(&data).unwrap_err();
        assert!(err.get_ref().unwrap().is::<MapMismatch>(), "{err}");
    }
}
