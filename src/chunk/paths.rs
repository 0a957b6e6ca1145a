//! Entries made of several paths (`cacher dir upload KEY A B FILE`), as actions/cache's
//! `path:` lines and GitLab's `cache:paths` are: one manifest of kind
//! [`ManifestKind::Paths`] whose top-level entries `000`, `001`, … are the paths in the
//! order given (a directory with its tree below it, or a single file), whose label
//! holds their source labels one per line, and whose content stream is theirs one after
//! another. Each path is cut on its own, so each starts a chunk: its part of the entry
//! is then an ordinary directory manifest, and restores, tree states and dedup work per
//! path exactly as for an entry of one directory. docs/format.md has the layout.

use super::format::{Entry, EntryKind, FormatError, Manifest, ManifestKind, bad};
use super::store::{location, table_of};

/// Most paths one entry holds (the names `000` to `999`).
pub const MAX_PATHS: usize = 1000;

/// One path of an entry: where it came from, its own entry (its mode and mtime; for a
/// file, its size too), and its tree as an ordinary directory manifest (for a file,
/// one file entry named as the file).
#[derive(Debug, Clone)]
pub struct Part {
    /// The path's source label (`archive::source_label`).
    pub label: String,
    /// The path itself as a directory or file entry (its name is not used).
    pub root: Entry,
    /// What is below it, with the chunks of its content stream.
    pub manifest: Manifest,
}

impl Part {
    /// Whether the path is a single file.
    pub fn is_file(&self) -> bool {
        matches!(self.root.kind, EntryKind::File { .. })
    }
}

/// The name of path `i` in an entry.
fn root_name(i: usize) -> Vec<u8> {
    format!("{i:03}").into_bytes()
}

/// One manifest holding `parts`, in order.
pub fn combine(parts: &[Part], created: u64) -> Manifest {
    let mut entries = Vec::new();
    let mut chunks = Vec::new();
    let mut stream_len = 0;
    for (i, part) in parts.iter().enumerate() {
        let name = root_name(i);
        entries.push(Entry {
            path: name.clone(),
            ..part.root.clone()
        });
        if !part.is_file() {
            entries.extend(part.manifest.entries.iter().map(|e| {
                let mut path = name.clone();
                path.push(b'/');
                path.extend_from_slice(&e.path);
                Entry { path, ..e.clone() }
            }));
        }
        let table = &part.manifest.table;
        chunks.extend(
            table
                .chunks
                .iter()
                .map(|c| (c.id, location(table.packs[c.pack as usize], c))),
        );
        stream_len += part.manifest.stream_len;
    }
    Manifest {
        kind: ManifestKind::Paths,
        created,
        label: parts
            .iter()
            .map(|p| p.label.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        stream_len,
        table: table_of(chunks.into_iter()),
        entries,
    }
}

/// The parts of a [`ManifestKind::Paths`] manifest (already decoded, so in tree
/// order), each with the chunks of its own bytes. Refused when the top-level names are
/// not `000`, `001`, … in order, when the label does not name each path, or when a
/// path's bytes do not start a chunk (cacher never writes such an entry).
pub fn split(what: &str, m: &Manifest) -> Result<Vec<Part>, FormatError> {
    let bad = |why: String| bad(what, why);
    let labels: Vec<&str> = m.sources().split('\n').collect();
    let mut parts: Vec<Part> = Vec::new();
    for e in &m.entries {
        let (top, below) = match e.path.iter().position(|&b| b == b'/') {
            Some(at) => (&e.path[..at], Some(&e.path[at + 1..])),
            None => (&e.path[..], None),
        };
        match below {
            None => {
                if top != root_name(parts.len()).as_slice() || parts.len() >= MAX_PATHS {
                    return Err(bad(format!(
                        "path {} of the entry is named {}",
                        parts.len(),
                        String::from_utf8_lossy(top)
                    )));
                }
                let label = labels.get(parts.len()).copied().unwrap_or_default();
                let mut manifest = Manifest {
                    kind: ManifestKind::Dir,
                    created: m.created,
                    label: label.to_string(),
                    stream_len: 0,
                    table: Default::default(),
                    entries: Vec::new(),
                };
                match e.kind {
                    EntryKind::Dir => {}
                    EntryKind::File { size } => {
                        let name = label.rsplit('/').next().unwrap_or(label);
                        manifest.entries.push(Entry {
                            path: name.as_bytes().to_vec(),
                            ..e.clone()
                        });
                        manifest.stream_len = size;
                    }
                    EntryKind::Symlink { .. } => {
                        return Err(bad("a path of the entry is a symlink".into()));
                    }
                }
                parts.push(Part {
                    label: label.to_string(),
                    root: e.clone(),
                    manifest,
                });
            }
            Some(rest) => {
                // Decoding checked the order: a path below `top` follows it.
                let part = parts.last_mut().expect("a parent comes first");
                if let EntryKind::File { size } = e.kind {
                    part.manifest.stream_len += size;
                }
                part.manifest.entries.push(Entry {
                    path: rest.to_vec(),
                    ..e.clone()
                });
            }
        }
    }
    if parts.len() != labels.len() {
        return Err(bad(format!(
            "{} paths but {} labels",
            parts.len(),
            labels.len()
        )));
    }
    // Each path's chunks: the next ones, up to exactly its length.
    let mut chunks = m.table.chunks.iter().peekable();
    for part in &mut parts {
        let mut left = part.manifest.stream_len;
        let mut own = Vec::new();
        while left > 0 {
            let c = chunks
                .next()
                .ok_or_else(|| bad("the chunks end before the paths do".into()))?;
            left = left
                .checked_sub(u64::from(c.len))
                .ok_or_else(|| bad(format!("{} does not start a chunk", part.label)))?;
            own.push((c.id, location(m.table.packs[c.pack as usize], c)));
        }
        part.manifest.table = table_of(own.into_iter());
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Id;
    use crate::chunk::store::Location;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            mtime: 1_700_000_000,
            mtime_nsec: 5,
        }
    }

    fn part(label: &str, root: EntryKind, entries: Vec<Entry>, chunk_lens: &[u32]) -> Part {
        let pack = Id::of(label.as_bytes());
        let chunks = chunk_lens.iter().enumerate().map(|(i, &len)| {
            let id = Id::of(format!("{label}{i}").as_bytes());
            let loc = Location {
                pack,
                offset: i as u32 * 100,
                stored_len: 50,
                len,
            };
            (id, loc)
        });
        Part {
            label: label.into(),
            root: entry("", root),
            manifest: Manifest {
                kind: ManifestKind::Dir,
                created: 7,
                label: label.into(),
                stream_len: chunk_lens.iter().map(|&l| u64::from(l)).sum(),
                table: table_of(chunks),
                entries,
            },
        }
    }

    #[test]
    fn parts_survive_combine_encode_decode_and_split() {
        let dir = part(
            "~/.cargo/registry/index",
            EntryKind::Dir,
            vec![
                entry("a", EntryKind::Dir),
                entry("a/f", EntryKind::File { size: 30 }),
                entry("g", EntryKind::File { size: 10 }),
            ],
            &[25, 15],
        );
        let empty = part("empty", EntryKind::Dir, vec![], &[]);
        let file = part(
            "Cargo.lock",
            EntryKind::File { size: 12 },
            vec![entry("Cargo.lock", EntryKind::File { size: 12 })],
            &[12],
        );
        let parts = vec![dir, empty, file];
        let combined = combine(&parts, 7);
        let decoded = Manifest::decode("t", &combined.encode()).unwrap();
        assert_eq!(decoded, combined);
        let split = split("t", &decoded).unwrap();
        assert_eq!(split.len(), 3);
        for (got, want) in split.iter().zip(&parts) {
            assert_eq!(got.label, want.label);
            assert_eq!(got.manifest.entries, want.manifest.entries);
            assert_eq!(got.manifest.table, want.manifest.table);
            assert_eq!(got.manifest.stream_len, want.manifest.stream_len);
            assert_eq!(got.is_file(), want.is_file());
        }
    }

    #[test]
    fn a_path_that_does_not_start_a_chunk_is_refused() {
        let a = part(
            "a",
            EntryKind::Dir,
            vec![entry("f", EntryKind::File { size: 10 })],
            &[10],
        );
        let b = part(
            "b",
            EntryKind::Dir,
            vec![entry("f", EntryKind::File { size: 10 })],
            &[10],
        );
        let mut combined = combine(&[a, b], 0);
        // One chunk spanning both paths.
        combined.table.chunks.truncate(1);
        combined.table.chunks[0].len = 20;
        let err = split("t", &combined).unwrap_err().to_string();
        assert!(err.contains("does not start a chunk"), "{err}");
    }
}
