//! The index segments one upload fetched, for lookups by chunk id, in bounded memory.
//!
//! An upload of known data without a tree state may fetch every segment of the index:
//! at 10^7 chunks, 100 segments of 4.8 MB each once decoded. The first
//! [`HELD_BUDGET`] bytes of them stay in memory; the rest go to an unnamed temp file,
//! with every [`BLOCK`]th id kept in memory, so a lookup there costs one read of a
//! few KiB.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::Id;
use super::format::{ChunkRef, ChunkTable};
use super::store::{Location, location};
use crate::ui;

/// Bytes of fetched segments held in memory before the next ones are written out:
/// about 13 segments of 10^5 chunks.
pub const HELD_BUDGET: usize = 64 << 20;
/// Chunks per block of a written-out segment: one read per lookup, of 3 KiB.
const BLOCK: usize = 64;
/// Bytes of one chunk written out: id, pack number, offset, stored length, length.
const RECORD: usize = 48;

/// Segments fetched on demand, each once, by their number.
pub struct FetchedSegments {
    slots: Vec<OnceLock<Option<Fetched>>>,
    budget: usize,
    /// Bytes of the tables held in memory.
    held: AtomicUsize,
    /// Created by the first segment past the budget; `None` if it could not be.
    spill: OnceLock<Option<Spill>>,
}

/// One fetched segment, its chunks sorted by id.
enum Fetched {
    Held(ChunkTable),
    Written(WrittenSegment),
}

/// A segment written out to the spill file.
struct WrittenSegment {
    packs: Vec<Id>,
    /// Where its first record is in the file.
    start: u64,
    chunks: usize,
    /// The id of the first chunk of each block.
    block_firsts: Vec<Id>,
}

struct Spill {
    file: File,
    /// Where the next segment goes: segments are written concurrently, each to the
    /// range it reserved.
    end: AtomicU64,
}

impl FetchedSegments {
    /// Room for `segments` segments, holding up to [`HELD_BUDGET`] bytes in memory.
    pub fn new(segments: usize) -> FetchedSegments {
        FetchedSegments::with_budget(segments, HELD_BUDGET)
    }

    /// The same with another budget (tests write everything out with 0).
    pub fn with_budget(segments: usize, budget: usize) -> FetchedSegments {
        FetchedSegments {
            slots: (0..segments).map(|_| OnceLock::new()).collect(),
            budget,
            held: AtomicUsize::new(0),
            spill: OnceLock::new(),
        }
    }

    /// Where segment `i` says `id` is stored. The first lookup in it calls `fetch` for
    /// its table, chunks sorted by id (`None`: unreadable, its chunks are unknown);
    /// other lookups in that segment wait for it meanwhile.
    pub fn lookup(
        &self,
        i: usize,
        id: &Id,
        fetch: impl FnOnce() -> Option<ChunkTable>,
    ) -> Option<Location> {
        let fetched = self.slots[i]
            .get_or_init(|| fetch().map(|table| self.keep(table)))
            .as_ref()?;
        match fetched {
            Fetched::Held(table) => find(table, id),
            Fetched::Written(written) => self.find_written(written, id),
        }
    }

    /// Holds `table` in memory while the budget allows, else writes it out (or holds
    /// it anyway when that fails: dedup matters more than the bound).
    fn keep(&self, table: ChunkTable) -> Fetched {
        let bytes = table.chunks.len() * size_of::<ChunkRef>() + table.packs.len() * 32;
        let held = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if held <= self.budget {
            return Fetched::Held(table);
        }
        self.held.fetch_sub(bytes, Ordering::Relaxed);
        match self.write_out(&table) {
            Ok(written) => Fetched::Written(written),
            Err(e) => {
                ui::verbose(format!("keeping an index segment in memory: {e}"));
                self.held.fetch_add(bytes, Ordering::Relaxed);
                Fetched::Held(table)
            }
        }
    }

    fn write_out(&self, table: &ChunkTable) -> std::io::Result<WrittenSegment> {
        let spill = self
            .spill
            .get_or_init(|| match tempfile::tempfile() {
                Ok(file) => Some(Spill {
                    file,
                    end: AtomicU64::new(0),
                }),
                Err(e) => {
                    ui::verbose(format!("cannot create a temp file for the index: {e}"));
                    None
                }
            })
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no temp file"))?;
        let mut records = Vec::with_capacity(table.chunks.len() * RECORD);
        for c in &table.chunks {
            records.extend_from_slice(&c.id.0);
            for n in [c.pack, c.offset, c.stored_len, c.len] {
                records.extend_from_slice(&n.to_le_bytes());
            }
        }
        let start = spill.end.fetch_add(records.len() as u64, Ordering::Relaxed);
        spill.file.write_all_at(&records, start)?;
        Ok(WrittenSegment {
            packs: table.packs.clone(),
            start,
            chunks: table.chunks.len(),
            block_firsts: table.chunks.iter().step_by(BLOCK).map(|c| c.id).collect(),
        })
    }

    /// Looks `id` up in the one block of `written` that may hold it. A read that fails
    /// makes the chunk unknown (sent again), as an unreadable segment does.
    fn find_written(&self, written: &WrittenSegment, id: &Id) -> Option<Location> {
        let spill = self.spill.get()?.as_ref()?;
        let block = written.block_firsts.partition_point(|first| first <= id);
        let block = block.checked_sub(1)?;
        let count = BLOCK.min(written.chunks - block * BLOCK);
        let mut buf = [0u8; BLOCK * RECORD];
        let buf = &mut buf[..count * RECORD];
        let at = written.start + (block * BLOCK * RECORD) as u64;
        if let Err(e) = spill.file.read_exact_at(buf, at) {
            ui::verbose(format!("cannot read back an index segment: {e}"));
            return None;
        }
        let records: Vec<&[u8]> = buf.chunks_exact(RECORD).collect();
        let at = records.binary_search_by(|r| r[..32].cmp(&id.0[..])).ok()?;
        let field = |n: usize| {
            let bytes = &records[at][32 + 4 * n..36 + 4 * n];
            u32::from_le_bytes(bytes.try_into().expect("4 bytes"))
        };
        let chunk = ChunkRef {
            id: *id,
            pack: field(0),
            offset: field(1),
            stored_len: field(2),
            len: field(3),
        };
        let pack = *written.packs.get(chunk.pack as usize)?;
        Some(location(pack, &chunk))
    }
}

/// Looks `id` up in a table sorted by id.
fn find(table: &ChunkTable, id: &Id) -> Option<Location> {
    let at = table.chunks.binary_search_by(|c| c.id.cmp(id)).ok()?;
    let c = &table.chunks[at];
    Some(location(*table.packs.get(c.pack as usize)?, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_table(rng: &mut fastrand::Rng, chunks: usize, packs: usize) -> ChunkTable {
        let id = |rng: &mut fastrand::Rng| Id(std::array::from_fn(|_| rng.u8(..)));
        let mut table = ChunkTable {
            packs: (0..packs).map(|_| id(rng)).collect(),
            chunks: (0..chunks)
                .map(|_| ChunkRef {
                    id: id(rng),
                    pack: rng.u32(..packs as u32),
                    offset: rng.u32(..),
                    stored_len: rng.u32(..),
                    len: rng.u32(..),
                })
                .collect(),
        };
        table.chunks.sort_unstable_by_key(|c| c.id);
        table
    }

    #[test]
    fn segments_written_out_answer_as_held_ones() {
        let mut rng = fastrand::Rng::with_seed(15);
        // Sizes around the block size: a last block full, short, or of one chunk.
        let tables: Vec<ChunkTable> = [1, 63, 64, 65, 128, 1000, 4097]
            .iter()
            .map(|&n| random_table(&mut rng, n, 1 + n / 100))
            .collect();
        let held = FetchedSegments::with_budget(tables.len(), usize::MAX);
        let written = FetchedSegments::with_budget(tables.len(), 0);
        for (i, table) in tables.iter().enumerate() {
            let mut probes: Vec<Id> = table.chunks.iter().map(|c| c.id).collect();
            // Ids that are not there: before the first, after the last, in between.
            probes.push(Id([0; 32]));
            probes.push(Id([0xff; 32]));
            probes.extend((0..50).map(|_| Id(std::array::from_fn(|_| rng.u8(..)))));
            for id in &probes {
                let want = find(table, id);
                assert_eq!(held.lookup(i, id, || Some(table.clone())), want);
                assert_eq!(written.lookup(i, id, || Some(table.clone())), want);
            }
            let found = probes.iter().filter(|id| find(table, id).is_some()).count();
            assert_eq!(found, table.chunks.len());
        }
        assert!(matches!(held.slots[0].get(), Some(Some(Fetched::Held(_)))));
        assert!(matches!(
            written.slots[0].get(),
            Some(Some(Fetched::Written(_)))
        ));
    }

    #[test]
    fn the_budget_holds_the_first_segments_and_writes_out_the_rest() {
        let mut rng = fastrand::Rng::with_seed(16);
        let tables: Vec<ChunkTable> = (0..4).map(|_| random_table(&mut rng, 1000, 5)).collect();
        let one = 1000 * size_of::<ChunkRef>() + 5 * 32;
        let fetched = FetchedSegments::with_budget(tables.len(), 2 * one);
        for (i, table) in tables.iter().enumerate() {
            let id = table.chunks[500].id;
            assert_eq!(
                fetched.lookup(i, &id, || Some(table.clone())),
                find(table, &id)
            );
            // A segment is fetched once.
            assert_eq!(
                fetched.lookup(i, &id, || panic!("fetched twice")),
                find(table, &id)
            );
        }
        let held = |i: usize| matches!(fetched.slots[i].get(), Some(Some(Fetched::Held(_))));
        assert_eq!(
            (0..4).map(held).collect::<Vec<_>>(),
            [true, true, false, false]
        );
        assert_eq!(fetched.held.load(Ordering::Relaxed), 2 * one);
    }
}
