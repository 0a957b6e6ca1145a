//! A tree's content stream, cut into chunks, reading only what its tree state cannot
//! vouch for: the warm path of `dir upload`.
//!
//! A file whose stamp matches the [`TreeState`] holds the bytes the recorded entry
//! says, so the new stream is made of *spans* already known (runs of unchanged files
//! that were also consecutive in the recorded stream) and bytes that must be read.
//! FastCDC decides a cut from the bytes since the previous cut, the one byte after it,
//! and how much stream is left (at most [`CHUNK_MAX`] counts). So when a cut lands on a
//! recorded cut point inside a span, and the recorded chunk, with the byte after it, lies
//! in the span (and as much stream is left), the chunk that follows is the recorded one:
//! its id is taken without reading. Everywhere else bytes are read and cut as a full
//! read cuts them. The chunks are therefore exactly those of a full read.
//!
//! A file whose stamp changed but not its size (rewritten with the same bytes, as
//! `cargo fetch` does to its index cache and `npm ci` to a whole tree) stays in its
//! span, *unchecked*: a recorded chunk over it, and the byte after, count only once
//! read and found equal to the record by their blake3 ids, which costs a read and a
//! hash instead of FastCDC, a lookup and maybe compression. Where they differ, the
//! chunk is cut from the bytes as anywhere else. Those reads and hashes need no cut
//! before them, so they are made first, on every core ([`Cutter::precheck`]), and the
//! cut finds their answers.

use std::cmp::Ordering;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::archive::Tree;
use crate::chunk::format::tree_order;
use crate::chunk::store::{Known, Location, Piece, location};
use crate::chunk::{CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, Id};
use crate::state::{Stamp, TreeState};
use crate::ui::{self, Progress};

/// Stream bytes covered before a batch of pieces is handed on.
const BATCH_BYTES: u64 = 4 * 1024 * 1024;

/// What cutting a tree read and what it could skip.
#[derive(Debug, Default, Clone)]
pub struct ReadReport {
    /// Bytes read from the tree's files.
    pub bytes_read: u64,
    /// Files whose stamp matched the tree state, and their bytes.
    pub unchanged_files: u64,
    pub unchanged_bytes: u64,
    /// Bytes read only to find them as recorded (files rewritten with the same
    /// content), not cut.
    pub checked_bytes: u64,
    /// Per file (stream order): whether its stamp from the scan still described it when
    /// it was last touched here, so a new tree state may vouch for it.
    pub trusted: Vec<bool>,
}

/// The recorded stream was not what the tree state said (a file changed without its
/// stamp changing): the upload must start again without the state.
#[derive(Debug, thiserror::Error)]
#[error("the tree state of {0} does not match the files; reading everything")]
pub struct StaleState(String);

/// The FastCDC cut of the chunk starting at `buf[0]`, given the next
/// `min(CHUNK_MAX, bytes left)` bytes of the stream, as `StreamCDC` would make it.
pub fn cut_len(buf: &[u8]) -> usize {
    let cdc = fastcdc::v2020::FastCDC::new(
        buf,
        CHUNK_MIN as usize,
        CHUNK_AVG as usize,
        CHUNK_MAX as usize,
    );
    cdc.cut(0, buf.len()).1
}

/// A run of the new stream known byte for byte from the recorded one.
#[derive(Debug, Clone, Copy)]
struct Span {
    new_start: u64,
    old_start: u64,
    len: u64,
}

/// A recorded chunk a cut may reproduce: the `k`th of the record, in the span that
/// ends at `span_end` in the new stream.
#[derive(Clone, Copy)]
struct RecordedChunk {
    k: usize,
    id: Id,
    loc: Location,
    span_end: u64,
}

/// The recorded stream: its chunk ids and where they were stored, with their offsets.
struct Recorded {
    starts: Vec<u64>,
    chunks: Vec<(Id, Location)>,
    len: u64,
}

/// Starts cutting the files of `tree` on a thread of its own. Files whose stamp
/// matches `state` are read only where a cut must be found near them; chunks are
/// handed on in batches, with a [`Piece::Reused`] for each recorded chunk `known`
/// holds. The report is complete, and the thread done with `tree`, once the batches
/// end.
pub fn cut_tree(
    tree: Arc<Tree>,
    state: Option<&TreeState>,
    known: Arc<Known>,
    progress: Arc<Progress>,
) -> (Batches, Arc<Mutex<ReadReport>>) {
    let mut report = ReadReport {
        trusted: vec![true; tree.files.len()],
        ..ReadReport::default()
    };
    let (spans, recorded, vouched, unchecked) = match state {
        Some(state) => plan(&tree, state, &mut report),
        None => (Vec::new(), None, vec![false; tree.files.len()], Vec::new()),
    };
    let report = Arc::new(Mutex::new(report));
    let (tx, rx) = std::sync::mpsc::sync_channel(2);
    let mut cutter = Cutter {
        window: Window::new(StreamFiles::new(tree, vouched)),
        spans,
        span: 0,
        recorded,
        known,
        progress,
        unchecked,
        next_unchecked: 0,
        checked: 0..0,
        checked_bytes: 0,
        prechecked: Prechecked::default(),
    };
    let shared = report.clone();
    let thread = std::thread::spawn(move || {
        cutter.prechecked = cutter.precheck();
        let seen = std::mem::take(&mut cutter.prechecked.seen);
        cutter.window.files.read_before = seen.into();
        let result = cutter.run(&tx);
        let mut report = shared.lock().expect("report lock");
        report.bytes_read = cutter.window.files.bytes_read + cutter.prechecked.bytes_read;
        report.checked_bytes = cutter.checked_bytes;
        let untrusted = std::mem::take(&mut cutter.prechecked.untrusted);
        for (i, trusted) in untrusted
            .into_iter()
            .chain(cutter.window.files.untrusted.drain(..))
        {
            report.trusted[i] = trusted;
        }
        drop(report);
        if let Err(e) = result {
            let _ = tx.send(Err(e));
        }
    });
    let batches = Batches {
        rx,
        thread: Some(thread),
    };
    (batches, report)
}

/// The batches of pieces a cut hands on; once they end, the cutting thread has ended.
pub struct Batches {
    rx: std::sync::mpsc::Receiver<anyhow::Result<Vec<Piece>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Iterator for Batches {
    type Item = anyhow::Result<Vec<Piece>>;

    fn next(&mut self) -> Option<Self::Item> {
        let next = self.rx.recv().ok();
        if next.is_none()
            && let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            return Some(Err(anyhow::anyhow!("the tree cutter panicked")));
        }
        next
    }
}

/// The spans of the new stream that `state` vouches for or may (see the module doc),
/// the recorded chunks, per file whether its stamp vouches for it, and the stream
/// ranges of files whose bytes must be checked against the record.
#[allow(clippy::type_complexity)]
fn plan(
    tree: &Tree,
    state: &TreeState,
    report: &mut ReadReport,
) -> (Vec<Span>, Option<Recorded>, Vec<bool>, Vec<Range<u64>>) {
    let files = &tree.files;
    let mut vouched = Vec::with_capacity(files.len());
    // Both lists are in tree order (the scan walks it; a record that is not is refused
    // when decoded), so one pass pairs them, with no map of a million paths.
    let old = &state.files;
    let mut k = 0;
    let mut spans: Vec<Span> = Vec::new();
    let mut unchecked: Vec<Range<u64>> = Vec::new();
    let mut new_start = 0u64;
    let (mut new, mut changed) = (0usize, 0usize);
    for (i, f) in files.iter().enumerate() {
        let rel = tree.rel(i);
        while k < old.len() && tree_order(old.path(k), rel) == Ordering::Less {
            k += 1;
        }
        let recorded = match k < old.len() && old.path(k) == rel {
            true => {
                k += 1;
                old.stamp(k - 1).map(|stamp| (old.start(k - 1), stamp))
            }
            false => None,
        };
        let recorded = recorded.as_ref();
        match recorded {
            None => new += 1,
            Some((_, stamp)) if *stamp != f.stamp => changed += 1,
            Some(_) => {}
        }
        let unchanged = recorded.filter(|(_, stamp)| *stamp == f.stamp);
        vouched.push(unchanged.is_some());
        if unchanged.is_some() {
            report.unchanged_files += 1;
            report.unchanged_bytes += f.size();
        }
        let same_size = recorded.filter(|(_, stamp)| stamp.size == f.size());
        if let Some((old_start, _)) = same_size {
            if unchanged.is_none() && f.size() > 0 {
                unchecked.push(new_start..new_start + f.size());
            }
            match spans.last_mut() {
                Some(s)
                    if s.new_start + s.len == new_start && s.old_start + s.len == *old_start =>
                {
                    s.len += f.size()
                }
                _ if f.size() == 0 => {}
                _ => spans.push(Span {
                    new_start,
                    old_start: *old_start,
                    len: f.size(),
                }),
            }
        }
        new_start += f.size();
    }
    ui::verbose(format!(
        "tree state of {}: {} of {} files unchanged; {new} new or not vouched for, {changed} changed",
        state.dir.display(),
        report.unchanged_files,
        files.len()
    ));
    let mut starts = Vec::with_capacity(state.table.chunks.len());
    let mut at = 0u64;
    let chunks = state
        .table
        .chunks
        .iter()
        .map(|c| {
            starts.push(at);
            at += u64::from(c.len);
            let pack = state.table.packs[c.pack as usize];
            (c.id, location(pack, c))
        })
        .collect();
    let recorded = Recorded {
        starts,
        chunks,
        len: at,
    };
    (spans, Some(recorded), vouched, unchecked)
}

struct Cutter {
    window: Window,
    spans: Vec<Span>,
    /// The first span that does not end before the current position.
    span: usize,
    recorded: Option<Recorded>,
    known: Arc<Known>,
    progress: Arc<Progress>,
    /// Stream ranges of the files to check against the record (see the module doc).
    unchecked: Vec<Range<u64>>,
    /// The first of `unchecked` that does not end before the current position.
    next_unchecked: usize,
    /// Stream bytes found equal to the record, each under its span.
    checked: Range<u64>,
    checked_bytes: u64,
    prechecked: Prechecked,
}

/// Recorded chunks over files to check, read and hashed before the cut on every core
/// (see [`Cutter::precheck`]).
#[derive(Default)]
struct Prechecked {
    /// The recorded chunks read, in order: each with the new stream offset it was read
    /// at, and whether the bytes there are that chunk.
    found: Vec<Found>,
    bytes_read: u64,
    /// As [`StreamFiles::untrusted`], for the files read here.
    untrusted: Vec<(usize, bool)>,
    /// Per file, the [`stamp_digest`] of its stamp when read here (0: not read), for
    /// the cut's reader to compare; empty when nothing was read.
    seen: Vec<u64>,
}

/// A recorded chunk, where the precheck read it, and whether it was there.
type Found = (usize, u64, bool);

/// Bytes of recorded chunks one precheck job reads: enough jobs to keep every core
/// busy, few enough that each opens a file shared with its neighbour only at its ends.
const PRECHECK_JOB_BYTES: u64 = 4 * 1024 * 1024;

/// Recorded chunks after a change (a span's start, a chunk found changed) that the
/// precheck leaves to the cut.
const RESYNC_CHUNKS: usize = 2;

impl Cutter {
    /// Cuts the whole stream, handing on batches. A file the state vouched for that
    /// turns out changed (its stamp moved while it was read) makes the state stale.
    fn run(
        &mut self,
        tx: &std::sync::mpsc::SyncSender<anyhow::Result<Vec<Piece>>>,
    ) -> anyhow::Result<()> {
        let result = self.cut_all(tx);
        match &self.window.files.stale {
            Some(path) if result.is_err() => Err(StaleState(path.display().to_string()).into()),
            _ => result,
        }
    }

    fn cut_all(
        &mut self,
        tx: &std::sync::mpsc::SyncSender<anyhow::Result<Vec<Piece>>>,
    ) -> anyhow::Result<()> {
        let len = self.window.files.len;
        let (mut at, mut batch, mut batch_bytes) = (0u64, Vec::new(), 0u64);
        while at < len {
            let recorded = match self.recorded_chunk_at(at) {
                Some(chunk) if self.matches_record(at, chunk)? => Some((chunk.id, chunk.loc)),
                _ => None,
            };
            let piece = match recorded {
                Some((id, recorded)) => {
                    match self.known.reusable_at(&id, recorded.len as usize, recorded) {
                        Some(loc) => Piece::Reused { id, loc },
                        None => {
                            // The bucket lacks it (another prefix, or gc): read it to send it.
                            let data = self.window.get(at, recorded.len as usize)?.to_vec();
                            if Id::of(&data) != id {
                                return Err(StaleState(
                                    self.window.files.path_at(at).display().to_string(),
                                )
                                .into());
                            }
                            Piece::Cut(data)
                        }
                    }
                }
                None => {
                    let left = usize::try_from(len - at).unwrap_or(usize::MAX);
                    Piece::Cut(self.cut_at(at, left.min(CHUNK_MAX as usize))?)
                }
            };
            let piece_len = piece.len();
            at += piece_len;
            batch_bytes += piece_len;
            self.progress.add(piece_len);
            batch.push(piece);
            if batch_bytes >= BATCH_BYTES {
                batch_bytes = 0;
                if tx.send(Ok(std::mem::take(&mut batch))).is_err() {
                    return Ok(()); // the upload stopped; its error is the one reported
                }
            }
        }
        self.window.files.close()?;
        if !batch.is_empty() {
            let _ = tx.send(Ok(batch));
        }
        Ok(())
    }

    /// Reads and cuts the chunk at `at`, given the `ahead` bytes FastCDC may look at.
    /// Most cuts come within twice the average size, so that much is tried first:
    /// FastCDC scans forward and stops at the first cut, so a cut found before the end
    /// of a shorter window is the one the whole window gives (its normalization
    /// switches at the average size either way). Reading less past a change is what
    /// keeps a warm upload's reads small.
    fn cut_at(&mut self, at: u64, ahead: usize) -> io::Result<Vec<u8>> {
        let first = 2 * CHUNK_AVG as usize;
        if ahead > first {
            let buf = self.window.get(at, first)?;
            let n = cut_len(buf);
            if n < first {
                return Ok(buf[..n].to_vec());
            }
        }
        let buf = self.window.get(at, ahead)?;
        Ok(buf[..cut_len(buf)].to_vec())
    }

    /// The recorded chunk that a cut at `at` reproduces if the bytes are as recorded
    /// (see the module doc).
    fn recorded_chunk_at(&mut self, at: u64) -> Option<RecordedChunk> {
        let recorded = self.recorded.as_ref()?;
        while self
            .spans
            .get(self.span)
            .is_some_and(|s| s.new_start + s.len <= at)
        {
            self.span += 1;
        }
        let span = self.spans.get(self.span).filter(|s| s.new_start <= at)?;
        let from = span.old_start + (at - span.new_start);
        let k = recorded.starts.binary_search(&from).ok()?;
        let (id, loc) = recorded.chunks[k];
        let end = from + u64::from(loc.len);
        let span_end = span.old_start + span.len;
        let left_old = (recorded.len - from).min(u64::from(CHUNK_MAX));
        let left_new = (self.window.files.len - at).min(u64::from(CHUNK_MAX));
        let decided_alike =
            left_old == left_new && end <= span_end && (end == recorded.len || end < span_end);
        decided_alike.then_some(RecordedChunk {
            k,
            id,
            loc,
            span_end: span.new_start + span.len,
        })
    }

    /// Checks, on every core, each recorded chunk that starts in a span and lies at
    /// least in part in a file to check, where the span puts it in the new stream.
    /// Whether its bytes are there needs no cut before it, only a read and a hash, so
    /// the cut (one thread) then finds the answers instead of reading: on a tree whose
    /// files were rewritten with the same bytes (`cargo fetch`'s index cache, `npm ci`)
    /// that read was most of its work. A job whose files changed under it (its reader
    /// fails) leaves its chunks for the cut to read, which then fails as it would have.
    fn precheck(&self) -> Prechecked {
        use rayon::prelude::*;
        let Some(recorded) = &self.recorded else {
            return Prechecked::default();
        };
        let files = &self.window.files;
        let work = self.precheck_work(recorded);
        let mut jobs: Vec<&[(usize, u64)]> = Vec::new();
        let (mut from, mut bytes) = (0, 0u64);
        for (i, &(k, _)) in work.iter().enumerate() {
            bytes += u64::from(recorded.chunks[k].1.len);
            if bytes >= PRECHECK_JOB_BYTES || i + 1 == work.len() {
                jobs.push(&work[from..=i]);
                (from, bytes) = (i + 1, 0);
            }
        }
        let done: Vec<(Option<Vec<Found>>, StreamFiles)> = jobs
            .par_iter()
            .map(|job| {
                let mut reader = files.another();
                let found = precheck_job(job, recorded, &mut reader).ok();
                (found, reader)
            })
            .collect();
        let mut prechecked = Prechecked::default();
        if !done.is_empty() {
            prechecked.seen = vec![0; files.starts.len()];
        }
        let mut torn = false;
        for (found, reader) in done {
            prechecked.bytes_read += reader.bytes_read;
            prechecked.untrusted.extend(reader.untrusted);
            for (i, digest) in reader.seen.into_iter().flatten() {
                // Two jobs that share a file at their ends must have read one version.
                let before = std::mem::replace(&mut prechecked.seen[i], digest);
                torn |= before != 0 && before != digest;
            }
            prechecked.found.extend(found.into_iter().flatten());
        }
        if torn {
            prechecked.found.clear();
        }
        prechecked.found.sort_unstable_by_key(|f| f.0);
        prechecked
    }

    /// Whether the recorded chunk `k` is at `at`, if [`Cutter::precheck`] read it there.
    fn prechecked(&self, k: usize, at: u64) -> Option<bool> {
        let found = &self.prechecked.found;
        let i = found.binary_search_by_key(&k, |f| f.0).ok()?;
        (found[i].1 == at).then_some(found[i].2)
    }

    /// The recorded chunks [`Cutter::precheck`] reads, with where: those over files to
    /// check that the cut will ask about, less the ones it reads anyway.
    fn precheck_work(&self, recorded: &Recorded) -> Vec<(usize, u64)> {
        let files = &self.window.files;
        let mut work: Vec<(usize, u64)> = Vec::new();
        // Nothing to check, as on most warm uploads: no walk over every recorded chunk.
        if self.unchecked.is_empty() {
            return work;
        }
        let mut u = 0;
        for span in &self.spans {
            let first = recorded.starts.partition_point(|&s| s < span.old_start);
            let in_span = recorded.starts[first..]
                .iter()
                .take_while(|&&s| s < span.old_start + span.len);
            // Past a change the cut reads its way back into step with the record, most
            // often within a chunk or two, so those are left to it (read here too,
            // they would be read twice).
            let after_change = match (span.new_start, span.old_start) {
                (0, 0) => 0,
                _ => RESYNC_CHUNKS,
            };
            let span_end = span.new_start + span.len;
            // Ending where the span does is no end of the span only at the end of both
            // streams.
            let fits = |end: u64, old_end: u64| {
                end < span_end || end == files.len && old_end == recorded.len
            };
            for (k, &start) in (first..).zip(in_span).skip(after_change) {
                let at = span.new_start + (start - span.old_start);
                let len = u64::from(recorded.chunks[k].1.len);
                let end = at + len;
                let next_len = recorded.chunks.get(k + 1).map(|c| u64::from(c.1.len));
                while self.unchecked.get(u).is_some_and(|r| r.end <= at) {
                    u += 1;
                }
                let overlaps = self.unchecked.get(u).is_some_and(|r| r.start < end);
                // One that runs out of the span is cut there, from the bytes the cut
                // reads to check it as the one after its predecessor: a read that takes
                // in the predecessor too, so that one is left to the cut as well.
                let next_fits = next_len.is_some_and(|n| fits(end + n, start + len + n));
                let last = end == files.len && start + len == recorded.len;
                if overlaps && (next_fits || last) {
                    work.push((k, at));
                }
            }
        }
        work
    }

    /// Whether the bytes of `chunk` at `at`, and the byte after, which decide its cut,
    /// are as recorded: always where stamps vouch for them; where they lie in a file
    /// to check, once read and hashed (the byte after, with the recorded chunk it
    /// starts).
    fn matches_record(&mut self, at: u64, chunk: RecordedChunk) -> io::Result<bool> {
        while self
            .unchecked
            .get(self.next_unchecked)
            .is_some_and(|r| r.end <= at)
        {
            self.next_unchecked += 1;
        }
        let len = u64::from(chunk.loc.len);
        let end = at + len;
        let decides = (end + 1).min(self.window.files.len);
        if self.needs_check(at, end) {
            let same = match self.prechecked(chunk.k, at) {
                Some(same) => same,
                None => Id::of(self.window.get(at, len as usize)?) == chunk.id,
            };
            if !same {
                return Ok(false);
            }
            self.mark_checked(at..end);
        }
        if !self.needs_check(end, decides) {
            return Ok(true);
        }
        let recorded = self
            .recorded
            .as_ref()
            .expect("a recorded chunk has a record");
        let Some(&(next_id, next)) = recorded.chunks.get(chunk.k + 1) else {
            return Ok(false);
        };
        let next_len = u64::from(next.len);
        if end + next_len > self.window.files.len {
            return Ok(false);
        }
        let same = match self.prechecked(chunk.k + 1, end) {
            Some(same) => same,
            None => {
                let both = self.window.get(at, (len + next_len) as usize)?;
                Id::of(&both[len as usize..]) == next_id
            }
        };
        if !same {
            return Ok(false);
        }
        self.mark_checked(end..(end + next_len).min(chunk.span_end));
        Ok(true)
    }

    /// Whether some of the stream bytes `range` lie in a file to check and were not
    /// found as recorded yet.
    fn needs_check(&self, from: u64, to: u64) -> bool {
        if self.checked.start <= from && to <= self.checked.end {
            return false;
        }
        self.unchecked[self.next_unchecked..]
            .iter()
            .take_while(|r| r.start < to)
            .any(|r| r.end > from)
    }

    fn mark_checked(&mut self, range: Range<u64>) {
        self.checked_bytes += range.end - range.start.max(self.checked.end).min(range.end);
        if self.checked.start <= range.start && range.start <= self.checked.end {
            self.checked.end = self.checked.end.max(range.end);
        } else {
            self.checked = range;
        }
    }
}

/// A file's stamp folded into 64 bits, never 0, to tell whether two readers saw the
/// same file in the same state.
fn stamp_digest(stamp: &Stamp) -> u64 {
    let words = [
        stamp.dev,
        stamp.ino,
        stamp.size,
        stamp.mtime as u64,
        stamp.ctime as u64,
    ];
    let mixed = words.iter().fold(0u64, |h, &w| {
        (h.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95)
    });
    mixed | 1
}

/// Reads and checks the recorded chunks of one precheck `job` (see
/// [`Cutter::precheck`]) through `reader`.
fn precheck_job(
    job: &[(usize, u64)],
    recorded: &Recorded,
    reader: &mut StreamFiles,
) -> io::Result<Vec<Found>> {
    let mut buf = Vec::new();
    let mut found = Vec::with_capacity(job.len());
    // After a chunk found changed the cut is out of step too, for a while.
    let (mut resyncing, mut end) = (0, 0);
    for &(k, at) in job {
        let (id, loc) = recorded.chunks[k];
        let follows = at == end;
        end = at + u64::from(loc.len);
        if follows && resyncing > 0 {
            resyncing -= 1;
            continue;
        }
        buf.resize(loc.len as usize, 0);
        reader.read_exact_at(at, &mut buf)?;
        let same = Id::of(&buf) == id;
        found.push((k, at, same));
        resyncing = if same { 0 } else { RESYNC_CHUNKS };
    }
    reader.close()?;
    Ok(found)
}

/// The bytes of the stream from some position on, read as cuts need them.
struct Window {
    files: StreamFiles,
    buf: Vec<u8>,
    /// Where the live bytes start in `buf`, and their stream offset.
    head: usize,
    at: u64,
}

impl Window {
    fn new(files: StreamFiles) -> Window {
        Window {
            files,
            buf: Vec::new(),
            head: 0,
            at: 0,
        }
    }

    /// The `n` stream bytes from `at` on; `at` never goes back.
    fn get(&mut self, at: u64, n: usize) -> io::Result<&[u8]> {
        let live = (self.buf.len() - self.head) as u64;
        if at >= self.at + live {
            self.buf.clear();
            self.head = 0;
        } else {
            self.head += (at - self.at) as usize;
        }
        self.at = at;
        let have = self.buf.len() - self.head;
        if have < n {
            if self.head > 0 && self.head >= self.buf.len() / 2 {
                self.buf.drain(..self.head);
                self.head = 0;
            }
            let old_len = self.buf.len();
            self.buf.resize(old_len + n - have, 0);
            let from = at + have as u64;
            self.files.read_exact_at(from, &mut self.buf[old_len..])?;
        }
        Ok(&self.buf[self.head..self.head + n])
    }
}

/// The regular files of a scan, read as one stream at increasing offsets. Fails if a
/// file turns out shorter or longer than scanned, or modified, so an upload never
/// records a tree that did not exist.
struct StreamFiles {
    tree: Arc<Tree>,
    starts: Arc<[u64]>,
    len: u64,
    open: Option<(usize, File)>,
    bytes_read: u64,
    /// Files whose stamp changed in a way that leaves their content as scanned (a
    /// chmod, a new link): the content is fine, the stamp cannot vouch for it.
    untrusted: Vec<(usize, bool)>,
    /// Per file: the tree state vouched for it, so it may have been read only in part.
    vouched: Arc<[bool]>,
    /// A vouched-for file found changed: the state cannot be trusted.
    stale: Option<PathBuf>,
    /// Each file closed, with the [`stamp_digest`] of its stamp then; kept by the
    /// precheck's readers only.
    seen: Option<Vec<(usize, u64)>>,
    /// Per file, the digest of the stamp another reader saw (the precheck's), or 0: a
    /// file found otherwise here was replaced or rewritten between the reads, which
    /// would mix two versions of it. Empty when there was no other reader.
    read_before: Arc<[u64]>,
}

impl StreamFiles {
    fn new(tree: Arc<Tree>, vouched: Vec<bool>) -> StreamFiles {
        let mut starts = Vec::with_capacity(tree.files.len());
        let mut len = 0u64;
        for f in &tree.files {
            starts.push(len);
            len += f.size();
        }
        StreamFiles {
            tree,
            starts: starts.into(),
            len,
            open: None,
            bytes_read: 0,
            untrusted: Vec::new(),
            vouched: vouched.into(),
            stale: None,
            seen: None,
            read_before: Arc::new([]),
        }
    }

    /// Another reader of the same files, with nothing open or read yet, that keeps
    /// what it saw of each file it closes.
    fn another(&self) -> StreamFiles {
        StreamFiles {
            tree: self.tree.clone(),
            starts: self.starts.clone(),
            len: self.len,
            open: None,
            bytes_read: 0,
            untrusted: Vec::new(),
            vouched: self.vouched.clone(),
            stale: None,
            seen: Some(Vec::new()),
            read_before: Arc::new([]),
        }
    }

    /// The file holding stream offset `at` (< len): the last one starting at or
    /// before it, which is never an empty one.
    fn file_at(&self, at: u64) -> usize {
        self.starts.partition_point(|&s| s <= at) - 1
    }

    fn path_at(&self, at: u64) -> PathBuf {
        self.path(self.file_at(at))
    }

    fn path(&self, i: usize) -> PathBuf {
        self.tree.path(i)
    }

    fn read_exact_at(&mut self, mut at: u64, mut out: &mut [u8]) -> io::Result<()> {
        while !out.is_empty() {
            let i = self.file_at(at);
            self.open_file(i)?;
            let file = &self.open.as_ref().expect("opened above").1;
            let scanned = &self.tree.files[i];
            let within = at - self.starts[i];
            let n = out.len().min((scanned.size() - within) as usize);
            let mut done = 0;
            while done < n {
                let got = file.read_at(&mut out[done..n], within + done as u64)?;
                if got == 0 {
                    return Err(changed(&self.path(i), "shrank"));
                }
                done += got;
            }
            if within + n as u64 == scanned.size() && file.read_at(&mut [0u8], scanned.size())? != 0
            {
                return Err(changed(&self.path(i), "grew"));
            }
            self.bytes_read += n as u64;
            at += n as u64;
            out = &mut out[n..];
        }
        Ok(())
    }

    /// Makes file `i` the open one (closing the one open before).
    fn open_file(&mut self, i: usize) -> io::Result<()> {
        if self.open.as_ref().is_none_or(|(open, _)| *open != i) {
            self.close()?;
            let path = self.path(i);
            let file = open_regular(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            self.open = Some((i, file));
        }
        Ok(())
    }

    /// Closes the open file, checking it is the file scanned.
    fn close(&mut self) -> io::Result<()> {
        let Some((i, file)) = self.open.take() else {
            return Ok(());
        };
        let now = Stamp::of(&file.metadata()?);
        let scanned = &self.tree.files[i];
        if now != scanned.stamp && self.vouched[i] {
            // Part of it may come from the record: with a rewrite that kept the old
            // mtime, the stream would mix two versions.
            self.stale = Some(self.path(i));
            return Err(changed(&self.path(i), "changed"));
        }
        if (now.size, now.mtime) != (scanned.stamp.size, scanned.stamp.mtime) {
            return Err(changed(&self.path(i), "was modified"));
        }
        let digest = stamp_digest(&now);
        if self
            .read_before
            .get(i)
            .is_some_and(|&d| d != 0 && d != digest)
        {
            return Err(changed(&self.path(i), "was replaced"));
        }
        if let Some(seen) = &mut self.seen {
            seen.push((i, digest));
        }
        if now != scanned.stamp {
            self.untrusted.push((i, false));
        }
        Ok(())
    }
}

/// Opens a file the scan saw as regular for reading, never a symlink put in its
/// place, and without blocking on a fifo put there (its read then fails).
pub fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

fn changed(path: &Path, how: &str) -> io::Error {
    io::Error::other(format!(
        "{} {how} while it was being read; not uploading a tree that never existed",
        path.display()
    ))
}

/// The whole content stream of `files`, read as an upload reads it (for tests).
#[cfg(test)]
pub fn content(tree: Tree) -> io::Result<Vec<u8>> {
    let vouched = vec![false; tree.files.len()];
    let mut stream = StreamFiles::new(Arc::new(tree), vouched);
    let mut out = vec![0u8; stream.len as usize];
    stream.read_exact_at(0, &mut out)?;
    stream.close()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Read;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::archive::scan;
    use crate::chunk::format::{Manifest, ManifestKind};
    use crate::chunk::store::{Location, table_of};

    fn fake_location(len: u32) -> Location {
        Location {
            pack: Id::of(b"pack"),
            offset: 0,
            stored_len: 1,
            len,
        }
    }

    /// Cuts a tree as an upload would into a bucket holding the chunks of `state`;
    /// every chunk id and length, and what was read.
    fn cut(root: &Path, state: Option<&TreeState>) -> (Vec<(Id, u32)>, ReadReport) {
        let tree = scan(root, &Default::default()).unwrap();
        let progress = Arc::new(Progress::new("test", 0));
        let stored = state.iter().flat_map(|s| &s.table.chunks);
        let pack = crate::chunk::store::PackInfo {
            modified: SystemTime::now(),
            size: 1 << 40,
        };
        let known = Known::new(
            stored.map(|c| (c.id, fake_location(c.len))),
            [(Id::of(b"pack"), pack)].into(),
        );
        let (batches, report) = cut_tree(Arc::new(tree), state, Arc::new(known), progress);
        let mut chunks = Vec::new();
        for batch in batches {
            for piece in batch.unwrap() {
                match piece {
                    Piece::Cut(data) => chunks.push((Id::of(&data), data.len() as u32)),
                    Piece::Reused { id, loc } => chunks.push((id, loc.len)),
                }
            }
        }
        let report = report.lock().unwrap().clone();
        (chunks, report)
    }

    /// The tree state an upload of `root` would record now, with `taken` an hour
    /// after the files were written (so no stamp is racy).
    fn state_of(root: &Path, chunks: &[(Id, u32)]) -> TreeState {
        let tree = scan(root, &Default::default()).unwrap();
        let stamps = tree.files.iter().map(|f| Some(f.stamp)).collect();
        let table = table_of(chunks.iter().map(|(id, len)| (*id, fake_location(*len))));
        let manifest = Manifest {
            kind: ManifestKind::Dir,
            created: 0,
            label: String::new(),
            stream_len: chunks.iter().map(|c| u64::from(c.1)).sum(),
            table,
            entries: tree.entries,
        };
        let later = SystemTime::now() + Duration::from_secs(3600);
        TreeState::new(root.to_path_buf(), &manifest, stamps, later)
    }

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..len).map(|_| rng.u8(..)).collect()
    }

    #[test]
    fn a_full_read_cuts_exactly_as_stream_cdc() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..40u64 {
            fs::write(
                dir.path().join(format!("f{i:02}")),
                noise(i, (i as usize * 37_111) % 300_000),
            )
            .unwrap();
        }
        let (chunks, report) = cut(dir.path(), None);
        let stream = content(scan(dir.path(), &Default::default()).unwrap()).unwrap();
        assert_eq!(report.bytes_read, stream.len() as u64);
        let want: Vec<(Id, u32)> = fastcdc::v2020::StreamCDC::new(
            &stream[..],
            CHUNK_MIN as usize,
            CHUNK_AVG as usize,
            CHUNK_MAX as usize,
        )
        .map(|c| {
            let c = c.unwrap();
            (Id::of(&c.data), c.length as u32)
        })
        .collect();
        assert_eq!(chunks, want);
    }

    #[test]
    fn with_a_state_the_same_chunks_come_from_reading_only_the_changes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for i in 0..200u64 {
            fs::write(
                root.join(format!("f{i:03}")),
                noise(i, 20_000 + (i as usize * 7_919) % 90_000),
            )
            .unwrap();
        }
        let (before, _) = cut(root, None);
        let state = state_of(root, &before);
        let total: u64 = before.iter().map(|c| u64::from(c.1)).sum();

        // Unchanged: nothing read.
        let (again, report) = cut(root, Some(&state));
        assert_eq!(again, before);
        assert_eq!((report.bytes_read, report.unchanged_files), (0, 200));

        // Add, delete, edit in place, rewrite with the same size and mtime.
        fs::write(root.join("f010a"), noise(1000, 50_000)).unwrap();
        fs::remove_file(root.join("f030")).unwrap();
        let mut edited = fs::read(root.join("f045")).unwrap();
        edited[100] ^= 1;
        fs::write(root.join("f045"), &edited).unwrap();
        let f50 = root.join("f150");
        let mtime = filetime::FileTime::from_last_modification_time(&fs::metadata(&f50).unwrap());
        let mut same_size = fs::read(&f50).unwrap();
        same_size[0] ^= 1;
        fs::write(&f50, &same_size).unwrap();
        filetime::set_file_mtime(&f50, mtime).unwrap();

        let (warm, report) = cut(root, Some(&state));
        let (cold, _) = cut(root, None);
        assert_eq!(warm, cold, "the warm cut equals a full read");
        assert_eq!(report.unchanged_files, 197);
        assert!(
            report.bytes_read < total / 8,
            "read {} of {total} bytes",
            report.bytes_read
        );
        let mut all = Vec::new();
        let tree = scan(root, &Default::default()).unwrap();
        for i in 0..tree.files.len() {
            fs::File::open(tree.path(i))
                .unwrap()
                .read_to_end(&mut all)
                .unwrap();
        }
        assert_eq!(all, content(tree).unwrap());
    }

    #[test]
    fn files_rewritten_with_their_size_are_checked_against_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let names: Vec<String> = (0..120).map(|i| format!("f{i:03}")).collect();
        for (i, name) in names.iter().enumerate() {
            let len = [0, 1, 700, 5_000, 40_000, 180_000][i % 6] + i * 13;
            fs::write(root.join(name), noise(i as u64, len)).unwrap();
        }
        let (before, _) = cut(root, None);
        let state = state_of(root, &before);
        let tree = scan(root, &Default::default()).unwrap();
        let starts: Vec<u64> = tree
            .files
            .iter()
            .scan(0u64, |at, f| {
                let start = *at;
                *at += f.size();
                Some(start)
            })
            .collect();
        let total: u64 = before.iter().map(|c| u64::from(c.1)).sum();

        // Every file rewritten with its own bytes: all stamps change, no chunk is cut.
        for name in &names {
            let path = root.join(name);
            fs::write(&path, fs::read(&path).unwrap()).unwrap();
        }
        let (warm, report) = cut(root, Some(&state));
        assert_eq!(warm, before);
        assert_eq!(report.unchanged_files, 0);
        assert_eq!((report.bytes_read, report.checked_bytes), (total, total));

        // Same sizes, one byte changed: at recorded cut points (the byte after a
        // chunk, which decides its cut), just before them, at file starts and ends.
        let mut cuts: Vec<u64> = before
            .iter()
            .scan(0u64, |at, c| {
                *at += u64::from(c.1);
                Some(*at)
            })
            .collect();
        cuts.pop();
        let mut spots: Vec<u64> = cuts.iter().step_by(3).copied().collect();
        spots.extend(cuts.iter().skip(1).step_by(5).map(|c| c - 1));
        spots.extend(starts.iter().step_by(7));
        for spot in spots {
            let i = starts.partition_point(|&s| s <= spot) - 1;
            let path = tree.path(i);
            let mut bytes = fs::read(&path).unwrap();
            let Some(byte) = bytes.get_mut((spot - starts[i]) as usize) else {
                continue;
            };
            *byte ^= 0x55;
            fs::write(&path, &bytes).unwrap();
        }
        let (warm, report) = cut(root, Some(&state));
        let (cold, _) = cut(root, None);
        assert_eq!(warm, cold, "the warm cut equals a full read");
        assert!(report.checked_bytes > 0 && report.checked_bytes < total);
    }

    #[test]
    fn recorded_files_pair_with_scanned_ones_in_tree_order() {
        // `/` sorts after `-` and `.` as a byte but a directory's contents come right
        // after it: a pairing by plain byte order would lose files here.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (i, path) in ["a/b", "a/b.c/d", "a-z/x", "a.b", "a.c/d", "ab", "a/b-c"]
            .iter()
            .enumerate()
        {
            let path = root.join(path);
            if !path.parent().unwrap().exists() {
                fs::create_dir_all(path.parent().unwrap()).unwrap();
            }
            if !path.exists() {
                fs::write(&path, noise(i as u64, 70_000)).unwrap();
            }
        }
        let (before, _) = cut(root, None);
        let state = state_of(root, &before);
        let (again, report) = cut(root, Some(&state));
        assert_eq!(again, before);
        assert_eq!((report.unchanged_files, report.bytes_read), (7, 0));
        assert_eq!(tree_order(b"a/b", b"a.b"), Ordering::Less);
        assert_eq!(tree_order(b"a-z/x", b"a/b"), Ordering::Greater);
    }

    #[test]
    fn a_file_replaced_between_two_readers_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, "first").unwrap();
        fs::write(&b, "second").unwrap();
        let mtime = filetime::FileTime::from_unix_time(1_000_000_000, 0);
        filetime::set_file_mtime(&b, mtime).unwrap();
        let tree = Arc::new(scan(dir.path(), &Default::default()).unwrap());
        let mut first = StreamFiles::new(tree.clone(), vec![false; 2]).another();
        let mut head = [0u8; 8];
        first.read_exact_at(3, &mut head).unwrap();
        first.close().unwrap();

        // Replaced by one of the same size and modification time, as `cp -p` or an
        // unpacker leaves it: only its inode and change time tell.
        let new = dir.path().join("b.new");
        fs::write(&new, "SECOND").unwrap();
        filetime::set_file_mtime(&new, mtime).unwrap();
        fs::rename(&new, &b).unwrap();
        let mut second = first.another();
        let mut before = vec![0; 2];
        for &(i, digest) in first.seen.iter().flatten() {
            before[i] = digest;
        }
        second.read_before = before.into();
        let mut tail = [0u8; 3];
        second.read_exact_at(8, &mut tail).unwrap();
        let err = second.close().unwrap_err().to_string();
        assert!(err.contains("replaced"), "{err}");

        // A reader on its own takes the file as it finds it.
        let mut alone = first.another();
        alone.read_exact_at(5, &mut [0u8; 6]).unwrap();
        alone.close().unwrap();
    }

    #[test]
    fn a_file_changed_after_the_scan_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), "first").unwrap();
        fs::write(dir.path().join("b"), "second").unwrap();
        let tree = scan(dir.path(), &Default::default()).unwrap();
        assert_eq!(content(tree.clone()).unwrap(), b"firstsecond");

        fs::write(dir.path().join("b"), "second and more").unwrap();
        let err = content(tree.clone()).unwrap_err().to_string();
        assert!(err.contains("grew"), "{err}");

        fs::write(dir.path().join("b"), "sec").unwrap();
        let err = content(tree.clone()).unwrap_err().to_string();
        assert!(err.contains("shrank"), "{err}");

        // Same size, new content: caught by the modification time.
        fs::write(dir.path().join("a"), "FIRST").unwrap();
        let old = filetime::FileTime::from_unix_time(1_000_000_000, 0);
        filetime::set_file_mtime(dir.path().join("a"), old).unwrap();
        let err = content(tree).unwrap_err().to_string();
        assert!(err.contains("modified"), "{err}");
    }
}
