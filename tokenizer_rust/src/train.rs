//! Byte-level BPE training.
//!
//! 1. `feed`: each batch of documents is split into chunks (split.rs) and the chunks are counted, on all
//!    cores. Counts live in hash maps keyed by the chunk, so memory grows with the number of *distinct*
//!    chunks, never with the amount of text.
//! 2. `train`: every distinct chunk becomes a "word" (its byte ids, weighted by its count). Pair counts and,
//!    per pair, the list of words that contain it are built in parallel. Then each merge takes the most
//!    frequent pair from a max-heap (stale counts are refreshed lazily on pop), rewrites only the words in
//!    that pair's list, and applies exact count deltas for the neighbouring pairs.
//!
//! Ties: the highest count wins, then the smallest (left id, right id) pair, where a byte's id is its
//! value. Counts are exact and this order is total, so the merges do not depend on the number of threads
//! or on the order in which words are stored.

use std::collections::BinaryHeap;
use std::time::Instant;

use crate::chunk_table::{ChunkTable, Entry};
use crate::fxhash::{hash_bytes, FxHashMap};
use crate::split::for_each_chunk;

/// Chunk counts are partitioned by hash into this many maps so that merging the per-thread counts of a
/// batch runs on all threads, each owning a disjoint set of partitions.
const PARTITIONS: usize = 64;

pub struct Trainer {
    num_threads: usize,
    chunks: Vec<ChunkTable>,
    pub total_chunks: u64,
    pub merges: Vec<(u32, u32)>,
    pub merge_counts: Vec<u64>,
}

#[inline(always)]
fn pack(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// Heap order in one integer: the highest count first, then the smallest pair.
#[inline(always)]
fn heap_key(count: i64, pair: u64) -> u128 {
    ((count as u128) << 64) | (u64::MAX - pair) as u128
}

#[inline(always)]
fn partition_of(hash: u64) -> usize {
    (hash >> 58) as usize % PARTITIONS
}

/// Split `0..n` into `parts` contiguous ranges of roughly equal weight (`cumulative[i]` = weight before i).
fn balanced_ranges(cumulative: &[u64], parts: usize) -> Vec<(usize, usize)> {
    let n = cumulative.len() - 1;
    let total = cumulative[n] - cumulative[0];
    let mut ranges = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 1..=parts {
        let target = cumulative[0] + total * p as u64 / parts as u64;
        let mut end = if p == parts { n } else { cumulative.partition_point(|&c| c < target).min(n) };
        end = end.max(start);
        ranges.push((start, end));
        start = end;
    }
    ranges
}

/// The pair-count state of one training run.
struct PairInfo {
    count: i64,
    /// words that contained this pair when it appeared (possibly stale: merging checks again)
    words: Vec<u32>,
}

impl Trainer {
    pub fn new(num_threads: usize) -> Self {
        let num_threads = if num_threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            num_threads
        };
        Trainer {
            num_threads,
            chunks: (0..PARTITIONS).map(|_| ChunkTable::default()).collect(),
            total_chunks: 0,
            merges: Vec::new(),
            merge_counts: Vec::new(),
        }
    }

    pub fn num_distinct_chunks(&self) -> u64 {
        self.chunks.iter().map(|t| t.len() as u64).sum()
    }

    /// Count the chunks of a batch of documents: `data[offsets[i]..offsets[i+1]]` is document i (UTF-8).
    pub fn feed(&mut self, data: &[u8], offsets: &[u64]) -> Result<(), String> {
        if offsets.is_empty() {
            return Ok(());
        }
        if offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err("document offsets must not decrease".into());
        }
        if *offsets.last().unwrap() as usize > data.len() {
            return Err("document offsets point past the end of the buffer".into());
        }
        if data.len() > u32::MAX as usize {
            return Err("a batch of documents must be smaller than 4 GB".into());
        }
        let threads = self.num_threads.min(offsets.len() - 1).max(1);
        let ranges = balanced_ranges(offsets, threads);

        // 1. per thread: split and count its documents (keys stay in the batch), then bucket the distinct
        //    chunks by partition
        let locals: Vec<Result<Vec<Vec<Entry>>, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ranges
                .iter()
                .map(|&(lo, hi)| {
                    scope.spawn(move || {
                        let mut table = ChunkTable::default();
                        for d in lo..hi {
                            let doc_start = offsets[d] as usize;
                            let doc = &data[doc_start..offsets[d + 1] as usize];
                            if std::str::from_utf8(doc).is_err() {
                                return Err(format!("document {d} of the batch is not valid UTF-8"));
                            }
                            let mut pos = doc_start;
                            for_each_chunk(doc, |chunk| {
                                table.add_borrowed(data, hash_bytes(chunk), pos, chunk.len());
                                pos += chunk.len();
                            });
                        }
                        let mut buckets: Vec<Vec<Entry>> = vec![Vec::new(); PARTITIONS];
                        for e in table.entries() {
                            buckets[partition_of(e.hash)].push(e);
                        }
                        Ok(buckets)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("chunk counting thread panicked")).collect()
        });
        let mut batch = Vec::with_capacity(locals.len());
        for local in locals {
            batch.push(local?);
        }

        // 2. fold the batch into the owned counts; each thread owns a disjoint slice of partitions
        let per_thread = PARTITIONS.div_ceil(self.num_threads);
        let batch = &batch;
        let added: Result<Vec<u64>, String> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .chunks
                .chunks_mut(per_thread)
                .enumerate()
                .map(|(t, owned)| {
                    scope.spawn(move || {
                        let mut added = 0u64;
                        for (k, table) in owned.iter_mut().enumerate() {
                            for local in batch.iter() {
                                for e in &local[t * per_thread + k] {
                                    added += e.count;
                                    let key = &data[e.start as usize..e.start as usize + e.len as usize];
                                    table.add_owned(e.hash, key, e.count)?;
                                }
                            }
                        }
                        Ok(added)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("chunk merging thread panicked")).collect()
        });
        self.total_chunks += added?.iter().sum::<u64>();
        Ok(())
    }

    /// Learn up to `num_merges` merges from the chunks counted so far. Returns the number learned (fewer
    /// when the text runs out of pairs).
    pub fn train(&mut self, num_merges: usize, verbose: bool) -> Result<usize, String> {
        let start = Instant::now();
        // words: all distinct chunks of two or more bytes, stored back to back in one array, each as
        // [len, count low, count high, ids...]; a word is named by its offset. Keeping the header next to
        // the ids makes a rewrite touch one cache line instead of two (the merge loop is bound by memory
        // latency). A merge shrinks a word in place.
        let mut ids: Vec<u32> = Vec::new();
        let mut words: Vec<u32> = Vec::new();
        for table in &self.chunks {
            for e in table.entries() {
                let (chunk, n) = (table.key(&e), e.count);
                if chunk.len() >= 2 {
                    if ids.len() + chunk.len() + HEADER >= u32::MAX as usize {
                        return Err("too many distinct chunks for one training run (over 4 G bytes)".into());
                    }
                    words.push(ids.len() as u32);
                    ids.extend_from_slice(&[chunk.len() as u32, n as u32, (n >> 32) as u32]);
                    ids.extend(chunk.iter().map(|&b| b as u32));
                }
            }
        }
        let mut pairs = self.count_pairs(&ids, &words);
        if verbose {
            eprintln!(
                "[raychat_bpe] {} distinct chunks ({} words of 2+ bytes), {} distinct pairs, {:.2}s",
                self.num_distinct_chunks(),
                words.len(),
                pairs.len(),
                start.elapsed().as_secs_f64()
            );
        }

        let mut heap: BinaryHeap<u128> =
            pairs.iter().filter(|(_, p)| p.count > 0).map(|(&k, p)| heap_key(p.count, k)).collect();
        self.merges.clear();
        self.merge_counts.clear();
        let mut step = StepDeltas::default();
        let merge_start = Instant::now();
        let mut last_report = Instant::now();
        let (mut stale_pops, mut words_visited, mut stale_words) = (0u64, 0u64, 0u64);
        while self.merges.len() < num_merges {
            let Some(top) = heap.pop() else { break };
            let (count, key) = ((top >> 64) as i64, u64::MAX - top as u64);
            let info = pairs.get_mut(&key).expect("every pair in the heap has an entry");
            if info.count != count {
                // stale entry: counts of old pairs only ever go down, so re-queue with the true count
                if info.count > 0 {
                    heap.push(heap_key(info.count, key));
                }
                stale_pops += 1;
                continue;
            }
            let merge = Merge { a: (key >> 32) as u32, b: key as u32, new_id: 256 + self.merges.len() as u32 };
            let word_list = std::mem::take(&mut info.words);
            pairs.remove(&key);
            words_visited += word_list.len() as u64;
            for (i, &w) in word_list.iter().enumerate() {
                if let Some(&ahead) = word_list.get(i + PREFETCH_AHEAD) {
                    prefetch(&ids[ahead as usize]);
                }
                if !merge_word(&mut ids, w, merge, &mut step) {
                    stale_words += 1;
                }
            }
            // the step's changes, aggregated: one lookup in the big map per distinct pair
            for (k, info) in step.created.drain() {
                if info.count > 0 {
                    heap.push(heap_key(info.count, k));
                }
                pairs.insert(k, info);
            }
            for (k, delta) in step.removed.drain() {
                if let Some(info) = pairs.get_mut(&k) {
                    info.count -= delta;
                }
            }
            self.merges.push((merge.a, merge.b));
            self.merge_counts.push(count as u64);
            if verbose && (last_report.elapsed().as_secs_f64() >= 1.0 || self.merges.len() == num_merges) {
                last_report = Instant::now();
                let done = self.merges.len();
                let secs = merge_start.elapsed().as_secs_f64();
                eprintln!(
                    "[raychat_bpe] merges {done}/{num_merges} ({:.0}%), {:.0} merges/s, elapsed {:.1}s",
                    100.0 * done as f64 / num_merges as f64,
                    done as f64 / secs.max(1e-9),
                    start.elapsed().as_secs_f64()
                );
            }
        }
        if verbose {
            eprintln!("[raychat_bpe] {stale_pops} stale heap entries refreshed, {words_visited} words visited, {stale_words} no longer had the pair");
        }
        Ok(self.merges.len())
    }

    /// Initial pair counts and word lists, on all threads.
    fn count_pairs(&self, ids: &[u32], words: &[u32]) -> FxHashMap<u64, PairInfo> {
        let n = words.len();
        let threads = self.num_threads.min(n.max(1));
        let mut cumulative = Vec::with_capacity(n + 1);
        let mut acc = 0u64;
        cumulative.push(0);
        for &w in words {
            acc += ids[w as usize] as u64;
            cumulative.push(acc);
        }
        let ranges = balanced_ranges(&cumulative, threads);
        let mut locals: Vec<FxHashMap<u64, PairInfo>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ranges
                .iter()
                .map(|&(lo, hi)| {
                    scope.spawn(move || {
                        let mut local: FxHashMap<u64, PairInfo> = FxHashMap::default();
                        for &w in &words[lo..hi] {
                            let (start, len, count) = (w as usize + HEADER, ids[w as usize] as usize, word_count(ids, w));
                            for pair in ids[start..start + len].windows(2) {
                                let info = local
                                    .entry(pack(pair[0], pair[1]))
                                    .or_insert_with(|| PairInfo { count: 0, words: Vec::new() });
                                info.count += count;
                                if info.words.last() != Some(&w) {
                                    info.words.push(w);
                                }
                            }
                        }
                        local
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("pair counting thread panicked")).collect()
        });
        let mut pairs = locals.pop().unwrap_or_default();
        for local in locals {
            for (k, mut info) in local {
                let into = pairs.entry(k).or_insert_with(|| PairInfo { count: 0, words: Vec::new() });
                into.count += info.count;
                into.words.append(&mut info.words);
            }
        }
        pairs
    }
}

/// Words are stored as [len, count low, count high, ids...] (see `Trainer::train`).
const HEADER: usize = 3;
/// How many words ahead of the one being rewritten to prefetch.
const PREFETCH_AHEAD: usize = 8;

#[inline(always)]
fn word_count(ids: &[u32], w: u32) -> i64 {
    (ids[w as usize + 1] as u64 | (ids[w as usize + 2] as u64) << 32) as i64
}

#[inline(always)]
fn prefetch(p: &u32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is only a hint; the address is a valid reference
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const u32 as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[derive(Clone, Copy)]
struct Merge {
    a: u32,
    b: u32,
    new_id: u32,
}

/// The pair-count changes of one merge step, aggregated in small (cache-resident) maps before they are
/// applied to the big pair map: a frequent merge touches thousands of words but few distinct neighbours.
#[derive(Default)]
struct StepDeltas {
    /// pairs that lost occurrences, with the weighted number lost
    removed: FxHashMap<u64, i64>,
    /// pairs that contain the new token (they cannot exist before this step), with their words
    created: FxHashMap<u64, PairInfo>,
}

impl StepDeltas {
    #[inline(always)]
    fn create(&mut self, key: u64, w: u32, count: i64) {
        let info = self.created.entry(key).or_insert_with(|| PairInfo { count: 0, words: Vec::new() });
        info.count += count;
        if info.words.last() != Some(&w) {
            info.words.push(w);
        }
    }

    #[inline(always)]
    fn remove(&mut self, key: u64, count: i64) {
        if let Some(info) = self.created.get_mut(&key) {
            info.count -= count; // a pair created earlier in this same word (overlapping merges)
        } else {
            *self.removed.entry(key).or_insert(0) += count;
        }
    }
}

/// Replace every non-overlapping (a, b), left to right, in word `w` by the new token and record the exact
/// changes of the neighbouring pair counts (weighted by the word's count).
#[inline]
fn merge_word(ids: &mut [u32], w: u32, m: Merge, step: &mut StepDeltas) -> bool {
    let count = word_count(ids, w);
    let start = w as usize + HEADER;
    let n = ids[w as usize] as usize;
    let word = &mut ids[start..start + n];
    let mut read = 0;
    let mut write = 0;
    while read < n {
        if read + 1 < n && word[read] == m.a && word[read + 1] == m.b {
            if write > 0 {
                let prev = word[write - 1];
                step.remove(pack(prev, m.a), count);
                step.create(pack(prev, m.new_id), w, count);
            }
            if read + 2 < n {
                let next = word[read + 2];
                step.remove(pack(m.b, next), count);
                step.create(pack(m.new_id, next), w, count);
            }
            word[write] = m.new_id;
            write += 1;
            read += 2;
        } else {
            word[write] = word[read];
            write += 1;
            read += 1;
        }
    }
    ids[w as usize] = write as u32;
    write < n
}
