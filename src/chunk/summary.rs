//! The index summary gc writes: which index segments (sorted by chunk id, with
//! disjoint ranges) cover which ids, and a 32-bit fingerprint of every chunk in each.
//! An upload reads the summary instead of every segment, and fetches a segment only
//! for a chunk whose fingerprint it holds: a few segments for a small upload, almost
//! none for new data, whatever the prefix holds (docs/format.md, "Index summary").
//!
//! Also the filter an upload writes before each segment: the 40-bit fingerprints of
//! its chunks, which later uploads read instead of the segments no summary describes
//! yet (docs/format.md, "Index segments").

use super::Id;
use super::format::{FormatError, Reader, bad, put_varint, unwrap, wrap};
use super::store::MAX_SEGMENT_CHUNKS;

/// First bytes of a summary object.
pub const SUMMARY_MAGIC: &[u8; 8] = b"CACHERSM";
/// First bytes of an index segment's filter.
pub const FILTER_MAGIC: &[u8; 8] = b"CACHERFL";
/// Bytes of a fingerprint in a segment filter.
const FILTER_FINGERPRINT: usize = 5;
/// Bits of a [`filter_fingerprint`].
pub const FINGERPRINT_BITS: u32 = 8 * FILTER_FINGERPRINT as u32;
/// Largest body of a filter: a segment holds at most [`MAX_SEGMENT_CHUNKS`] chunks.
const MAX_FILTER_BODY: u64 = 10 + (FILTER_FINGERPRINT * MAX_SEGMENT_CHUNKS) as u64;
/// Largest filter object read (its fingerprints are random: zstd cannot shrink them).
pub const MAX_FILTER_OBJECT: u64 = MAX_FILTER_BODY + 1024;

/// Bytes of one segment's description before its fingerprints: segment id, first and
/// last chunk id, and a count of at least one byte.
const SEGMENT_RECORD: usize = 3 * 32 + 1;

/// One segment a summary describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummarySegment {
    /// The segment object's id (the blake3 of its bytes, so its name).
    pub id: Id,
    /// Smallest chunk id in it.
    pub first: Id,
    /// Largest chunk id in it.
    pub last: Id,
    /// Chunks in it.
    pub count: usize,
}

/// A decoded summary: segments in increasing id order and their fingerprints, kept as
/// the body's bytes so a 10^7-chunk summary costs its 40 MB once.
#[derive(Debug)]
pub struct Summary {
    segments: Vec<SummarySegment>,
    /// Where each segment's fingerprints start in `body`.
    starts: Vec<usize>,
    body: Vec<u8>,
}

/// The fingerprint of a chunk id: four of its bytes that sorting by id leaves random.
pub fn fingerprint(id: &Id) -> u32 {
    u32::from_le_bytes(id.0[28..32].try_into().expect("4 bytes"))
}

/// The 40-bit fingerprint a segment filter keeps of a chunk id: bytes 27..32. Filters
/// are searched all at once, not one id range at a time as the summary is, so they
/// need more bits to keep chance matches rare: 1 in 110,000 lookups at 10^7 chunks.
pub fn filter_fingerprint(id: &Id) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..FILTER_FINGERPRINT].copy_from_slice(&id.0[32 - FILTER_FINGERPRINT..]);
    u64::from_le_bytes(bytes)
}

/// Encodes the filter of an index segment holding the chunks `ids`: their
/// [`filter_fingerprint`]s, sorted. An upload reads the filters of the segments no
/// summary describes instead of the segments, and fetches a segment only for a chunk
/// whose fingerprint its filter holds.
pub fn encode_filter<'a>(ids: impl Iterator<Item = &'a Id>) -> Vec<u8> {
    let mut fingerprints: Vec<u64> = ids.map(filter_fingerprint).collect();
    fingerprints.sort_unstable();
    let mut body = Vec::with_capacity(10 + FILTER_FINGERPRINT * fingerprints.len());
    put_varint(&mut body, fingerprints.len() as u64);
    for f in fingerprints {
        body.extend_from_slice(&f.to_le_bytes()[..FILTER_FINGERPRINT]);
    }
    wrap(FILTER_MAGIC, 0, &body)
}

/// Decodes a segment's filter: its fingerprints, refused unless sorted and as many as a
/// segment may hold (a body declared larger is refused before it is inflated).
pub fn decode_filter(what: &str, data: &[u8]) -> Result<Vec<u64>, FormatError> {
    let declared = data
        .get(12..20)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8")));
    if declared.is_some_and(|len| len > MAX_FILTER_BODY) {
        return Err(bad(what, "a filter larger than a segment's"));
    }
    let (_, body) = unwrap(what, FILTER_MAGIC, data)?;
    let mut r = Reader::new(what, &body);
    let count = r.varint_count(FILTER_FINGERPRINT)?;
    let raw = r.take(FILTER_FINGERPRINT * count)?;
    r.finish()?;
    let fingerprints: Vec<u64> = raw
        .chunks_exact(FILTER_FINGERPRINT)
        .map(|f| {
            let mut bytes = [0u8; 8];
            bytes[..FILTER_FINGERPRINT].copy_from_slice(f);
            u64::from_le_bytes(bytes)
        })
        .collect();
    if !fingerprints.is_sorted() {
        return Err(bad(what, "fingerprints out of order"));
    }
    Ok(fingerprints)
}

/// Encodes a summary of `segments` (in increasing, disjoint id order) with the
/// fingerprints of each segment's chunks, sorted.
pub fn encode(segments: &[(SummarySegment, Vec<u32>)]) -> Vec<u8> {
    let mut body = Vec::new();
    put_varint(&mut body, segments.len() as u64);
    for (s, _) in segments {
        body.extend_from_slice(&s.id.0);
    }
    for (s, _) in segments {
        body.extend_from_slice(&s.first.0);
    }
    for (s, _) in segments {
        body.extend_from_slice(&s.last.0);
    }
    for (s, _) in segments {
        put_varint(&mut body, s.count as u64);
    }
    for (_, fingerprints) in segments {
        for f in fingerprints {
            body.extend_from_slice(&f.to_le_bytes());
        }
    }
    wrap(SUMMARY_MAGIC, 0, &body)
}

impl Summary {
    /// Decodes and checks a summary; `what` names it in errors.
    pub fn decode(what: &str, data: &[u8]) -> Result<Summary, FormatError> {
        let (_, body) = unwrap(what, SUMMARY_MAGIC, data)?;
        let mut r = Reader::new(what, &body);
        let n = r.varint_count(SEGMENT_RECORD)?;
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(r.id()?);
        }
        let mut firsts = Vec::with_capacity(n);
        for _ in 0..n {
            firsts.push(r.id()?);
        }
        let mut segments = Vec::with_capacity(n);
        for (id, first) in ids.into_iter().zip(firsts) {
            let last = r.id()?;
            segments.push(SummarySegment {
                id,
                first,
                last,
                count: 0,
            });
        }
        for s in &mut segments {
            s.count = usize::try_from(r.varint()?).map_err(|_| bad(what, "count out of range"))?;
        }
        let mut starts = Vec::with_capacity(n);
        let mut at = body.len() - r.remaining();
        for (i, s) in segments.iter().enumerate() {
            let len = s
                .count
                .checked_mul(4)
                .ok_or_else(|| bad(what, "count out of range"))?;
            r.take(len)?;
            let fingerprints = &body[at..at + len];
            let sorted = fingerprints
                .chunks_exact(4)
                .map(|f| u32::from_le_bytes(f.try_into().expect("4 bytes")))
                .is_sorted();
            let ordered = s.first <= s.last && (i == 0 || segments[i - 1].last < s.first);
            if s.count == 0 || !sorted || !ordered {
                return Err(bad(what, "segments out of order or fingerprints unsorted"));
            }
            starts.push(at);
            at += len;
        }
        r.finish()?;
        Ok(Summary {
            segments,
            starts,
            body,
        })
    }

    /// The segments described, in increasing id order.
    pub fn segments(&self) -> &[SummarySegment] {
        &self.segments
    }

    /// The segment that may hold `id`: the one whose range covers it, when it holds
    /// its fingerprint. A `None` means no segment of the summary holds `id`.
    pub fn candidate(&self, id: &Id) -> Option<usize> {
        let i = self.segments.partition_point(|s| s.last < *id);
        let s = self.segments.get(i)?;
        if s.first > *id {
            return None;
        }
        let start = self.starts[i];
        let fingerprints = &self.body[start..start + 4 * s.count];
        let want = fingerprint(id);
        let (mut lo, mut hi) = (0, s.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let at = 4 * mid;
            let f = u32::from_le_bytes(fingerprints[at..at + 4].try_into().expect("4 bytes"));
            match f.cmp(&want) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(i),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random-looking id whose first byte is `first`, so tests choose its range.
    fn id(first: u8, n: u64) -> Id {
        let mut id = Id::of(&n.to_le_bytes());
        id.0[0] = first;
        id
    }

    fn segment(ids: &[Id], n: u8) -> (SummarySegment, Vec<u32>) {
        let mut fingerprints: Vec<u32> = ids.iter().map(fingerprint).collect();
        fingerprints.sort();
        (
            SummarySegment {
                id: Id([n; 32]),
                first: *ids.iter().min().unwrap(),
                last: *ids.iter().max().unwrap(),
                count: ids.len(),
            },
            fingerprints,
        )
    }

    #[test]
    fn a_summary_finds_the_segment_of_every_chunk_it_lists_and_rarely_another() {
        let low: Vec<Id> = (0..1000).map(|i| id(1, i)).collect();
        let high: Vec<Id> = (1000..1500).map(|i| id(9, i)).collect();
        let data = encode(&[segment(&low, 1), segment(&high, 2)]);
        let summary = Summary::decode("s", &data).unwrap();
        assert_eq!(summary.segments().len(), 2);
        assert!(low.iter().all(|i| summary.candidate(i) == Some(0)));
        assert!(high.iter().all(|i| summary.candidate(i) == Some(1)));
        let absent = (2000..12_000u64).filter(|&i| {
            summary.candidate(&id(1, i)).is_some() || summary.candidate(&id(5, i)).is_some()
        });
        assert_eq!(absent.count(), 0, "ids among or between the listed ones");
    }

    #[test]
    fn summaries_that_break_a_rule_are_refused() {
        let a: Vec<Id> = (0..10).map(|i| id(1, i)).collect();
        let b: Vec<Id> = (10..20).map(|i| id(2, i)).collect();
        let (sa, fa) = segment(&a, 1);
        let (sb, fb) = segment(&b, 2);
        assert!(
            Summary::decode(
                "s",
                &encode(&[(sa.clone(), fa.clone()), (sb.clone(), fb.clone())])
            )
            .is_ok()
        );
        let overlapping = SummarySegment {
            first: sa.last,
            ..sb.clone()
        };
        let backwards = SummarySegment {
            first: sa.last,
            last: sa.first,
            ..sa.clone()
        };
        let empty = SummarySegment {
            count: 0,
            ..sa.clone()
        };
        let mut unsorted = fa.clone();
        unsorted.reverse();
        let cases = [
            (
                "overlapping ranges",
                vec![(sa.clone(), fa.clone()), (overlapping, fb.clone())],
            ),
            ("first after last", vec![(backwards, fa.clone())]),
            ("no chunks", vec![(empty, Vec::new())]),
            ("unsorted fingerprints", vec![(sa.clone(), unsorted)]),
        ];
        for (why, segments) in cases {
            assert!(Summary::decode("s", &encode(&segments)).is_err(), "{why}");
        }
        // An id inside no range is absent even when its fingerprint is listed.
        let summary = Summary::decode("s", &encode(&[(sb, fb)])).unwrap();
        for first_byte in [1, 3] {
            let mut outside = b[0];
            outside.0[0] = first_byte;
            assert_eq!(
                summary.candidate(&outside),
                None,
                "below and above the range"
            );
        }
        assert_eq!(summary.candidate(&b[0]), Some(0));
    }

    #[test]
    fn damaged_or_disordered_summaries_are_errors() {
        let a: Vec<Id> = (0..10).map(|i| id(1, i)).collect();
        let b: Vec<Id> = (10..20).map(|i| id(2, i)).collect();
        assert!(Summary::decode("s", &encode(&[segment(&b, 1), segment(&a, 2)])).is_err());
        let mut data = encode(&[segment(&a, 1)]);
        let end = data.len() - 1;
        data[end] ^= 1;
        assert!(Summary::decode("s", &data).is_err());
        assert!(Summary::decode("s", b"CACHERSM").is_err());
    }

    #[test]
    fn filters_round_trip_and_refuse_unsorted_or_oversized_ones() {
        let ids: Vec<Id> = (0..1000).map(|n| id((n % 256) as u8, n)).collect();
        let data = encode_filter(ids.iter());
        let mut want: Vec<u64> = ids.iter().map(filter_fingerprint).collect();
        want.sort_unstable();
        assert_eq!(decode_filter("f", &data).unwrap(), want);
        assert!(want.iter().all(|&f| f < 1 << 40));
        let unsorted = {
            let mut body = Vec::new();
            put_varint(&mut body, 2);
            body.extend_from_slice(&[2, 0, 0, 0, 0]);
            body.extend_from_slice(&[1, 0, 0, 0, 0]);
            wrap(FILTER_MAGIC, 0, &body)
        };
        assert!(decode_filter("f", &unsorted).is_err());
        // A body declared past a segment's worth is refused before it is inflated.
        let mut bomb = data.clone();
        bomb[12..20].copy_from_slice(&(MAX_FILTER_BODY + 1).to_le_bytes());
        assert!(decode_filter("f", &bomb).is_err());
        let mut trailing = data[..12].to_vec();
        trailing.extend_from_slice(&0u64.to_le_bytes());
        assert!(decode_filter("f", &trailing).is_err());
    }
}
