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

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use crate::fxhash::{hash_bytes, FxHashMap};
use crate::split::for_each_chunk;

/// Chunk counts are partitioned by hash into this many maps so that merging the per-thread counts of a
/// batch runs on all threads, each owning a disjoint set of partitions.
const PARTITIONS: usize = 64;

pub struct Trainer {
    num_threads: usize,
    chunks: Vec<FxHashMap<Box<[u8]>, u64>>,
    pub total_chunks: u64,
    pub merges: Vec<(u32, u32)>,
    pub merge_counts: Vec<u64>,
}

#[inline(always)]
fn pack(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
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
            chunks: (0..PARTITIONS).map(|_| FxHashMap::default()).collect(),
            total_chunks: 0,
            merges: Vec::new(),
            merge_counts: Vec::new(),
        }
    }

    pub fn num_distinct_chunks(&self) -> u64 {
        self.chunks.iter().map(|m| m.len() as u64).sum()
    }

    /// Count the chunks of a batch of documents: `data[offsets[i]..offsets[i+1]]` is document i (UTF-8).
    pub fn feed(&mut self, data: &[u8], offsets: &[u64]) -> Result<(), String> {
        if offsets.is_empty() {
            return Ok(());
        }
        for w in offsets.windows(2) {
            if w[0] > w[1] {
                return Err("document offsets must not decrease".into());
            }
        }
        if *offsets.last().unwrap() as usize > data.len() || offsets[0] as usize > data.len() {
            return Err("document offsets point past the end of the buffer".into());
        }
        let threads = self.num_threads.min(offsets.len() - 1).max(1);
        let ranges = balanced_ranges(offsets, threads);

        // 1. split + count per thread, chunks borrowed from the batch, already partitioned by hash
        let locals: Vec<Result<Vec<FxHashMap<&[u8], u64>>, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ranges
                .iter()
                .map(|&(lo, hi)| {
                    scope.spawn(move || {
                        let mut parts: Vec<FxHashMap<&[u8], u64>> =
                            (0..PARTITIONS).map(|_| FxHashMap::default()).collect();
                        for d in lo..hi {
                            let doc = &data[offsets[d] as usize..offsets[d + 1] as usize];
                            if std::str::from_utf8(doc).is_err() {
                                return Err(format!("document {d} is not valid UTF-8"));
                            }
                            for_each_chunk(doc, |chunk| {
                                let part = &mut parts[partition_of(hash_bytes(chunk))];
                                *part.entry(chunk).or_insert(0) += 1;
                            });
                        }
                        Ok(parts)
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
        let added: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .chunks
                .chunks_mut(per_thread)
                .enumerate()
                .map(|(t, owned)| {
                    scope.spawn(move || {
                        let mut added = 0u64;
                        for (k, map) in owned.iter_mut().enumerate() {
                            let part = t * per_thread + k;
                            for local in batch.iter() {
                                for (&chunk, &n) in local[part].iter() {
                                    added += n;
                                    if let Some(c) = map.get_mut(chunk) {
                                        *c += n;
                                    } else {
                                        map.insert(chunk.into(), n);
                                    }
                                }
                            }
                        }
                        added
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("chunk merging thread panicked")).sum()
        });
        self.total_chunks += added;
        Ok(())
    }

    /// Learn up to `num_merges` merges from the chunks counted so far. Returns the number learned (fewer
    /// when the text runs out of pairs).
    pub fn train(&mut self, num_merges: usize, verbose: bool) -> usize {
        let start = Instant::now();
        // words: all distinct chunks of two or more bytes, stored back to back; a merge shrinks a word
        // in place, so `lens` changes and `starts` does not
        let mut ids: Vec<u32> = Vec::new();
        let mut starts: Vec<usize> = Vec::new();
        let mut lens: Vec<u32> = Vec::new();
        let mut counts: Vec<i64> = Vec::new();
        for map in &self.chunks {
            for (chunk, &n) in map.iter() {
                if chunk.len() >= 2 {
                    starts.push(ids.len());
                    lens.push(chunk.len() as u32);
                    counts.push(n as i64);
                    ids.extend(chunk.iter().map(|&b| b as u32));
                }
            }
        }
        let mut pairs = self.count_pairs(&ids, &starts, &lens, &counts);
        if verbose {
            eprintln!(
                "[raychat_bpe] {} distinct chunks ({} words of 2+ bytes), {} distinct pairs, {:.2}s",
                self.num_distinct_chunks(),
                starts.len(),
                pairs.len(),
                start.elapsed().as_secs_f64()
            );
        }

        let mut heap: BinaryHeap<(i64, Reverse<u64>)> =
            pairs.iter().filter(|(_, p)| p.count > 0).map(|(&k, p)| (p.count, Reverse(k))).collect();
        self.merges.clear();
        self.merge_counts.clear();
        let mut new_pairs: Vec<u64> = Vec::new();
        let merge_start = Instant::now();
        let mut last_report = Instant::now();
        while self.merges.len() < num_merges {
            let Some((count, Reverse(key))) = heap.pop() else { break };
            let info = pairs.get_mut(&key).expect("every pair in the heap has an entry");
            if info.count != count {
                // stale entry: counts of old pairs only ever go down, so re-queue with the true count
                if info.count > 0 {
                    heap.push((info.count, Reverse(key)));
                }
                continue;
            }
            let (a, b) = ((key >> 32) as u32, key as u32);
            let new_id = 256 + self.merges.len() as u32;
            let words = std::mem::take(&mut info.words);
            new_pairs.clear();
            for &w in &words {
                let w = w as usize;
                merge_word(
                    &mut ids[starts[w]..starts[w] + lens[w] as usize],
                    &mut lens[w],
                    w as u32,
                    counts[w],
                    a,
                    b,
                    new_id,
                    &mut pairs,
                    &mut new_pairs,
                );
            }
            for &k in &new_pairs {
                let c = pairs[&k].count;
                if c > 0 {
                    heap.push((c, Reverse(k)));
                }
            }
            pairs.remove(&key);
            self.merges.push((a, b));
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
        self.merges.len()
    }

    /// Initial pair counts and word lists, on all threads.
    fn count_pairs(&self, ids: &[u32], starts: &[usize], lens: &[u32], counts: &[i64]) -> FxHashMap<u64, PairInfo> {
        let n = starts.len();
        let threads = self.num_threads.min(n.max(1));
        let mut cumulative = Vec::with_capacity(n + 1);
        let mut acc = 0u64;
        cumulative.push(0);
        for &l in lens {
            acc += l as u64;
            cumulative.push(acc);
        }
        let ranges = balanced_ranges(&cumulative, threads);
        let mut locals: Vec<FxHashMap<u64, PairInfo>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ranges
                .iter()
                .map(|&(lo, hi)| {
                    scope.spawn(move || {
                        let mut local: FxHashMap<u64, PairInfo> = FxHashMap::default();
                        for w in lo..hi {
                            let word = &ids[starts[w]..starts[w] + lens[w] as usize];
                            for pair in word.windows(2) {
                                let info = local
                                    .entry(pack(pair[0], pair[1]))
                                    .or_insert_with(|| PairInfo { count: 0, words: Vec::new() });
                                info.count += counts[w];
                                if info.words.last() != Some(&(w as u32)) {
                                    info.words.push(w as u32);
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

/// Replace every non-overlapping (a, b), left to right, in one word by `new_id`, and apply the exact
/// changes of the pair counts (weighted by the word's count). Pairs containing `new_id` are recorded in
/// `new_pairs` the first time they appear, and this word is added to their word lists.
#[allow(clippy::too_many_arguments)]
#[inline]
fn merge_word(
    word: &mut [u32],
    len: &mut u32,
    w: u32,
    count: i64,
    a: u32,
    b: u32,
    new_id: u32,
    pairs: &mut FxHashMap<u64, PairInfo>,
    new_pairs: &mut Vec<u64>,
) {
    let n = word.len();
    let mut add_new = |key: u64, pairs: &mut FxHashMap<u64, PairInfo>| {
        let info = pairs.entry(key).or_insert_with(|| {
            new_pairs.push(key);
            PairInfo { count: 0, words: Vec::new() }
        });
        info.count += count;
        if info.words.last() != Some(&w) {
            info.words.push(w);
        }
    };
    let mut read = 0;
    let mut write = 0;
    let mut merged = 0i64;
    while read < n {
        if read + 1 < n && word[read] == a && word[read + 1] == b {
            if write > 0 {
                let prev = word[write - 1];
                if let Some(info) = pairs.get_mut(&pack(prev, a)) {
                    info.count -= count;
                }
                add_new(pack(prev, new_id), pairs);
            }
            if read + 2 < n {
                let next = word[read + 2];
                if let Some(info) = pairs.get_mut(&pack(b, next)) {
                    info.count -= count;
                }
                add_new(pack(new_id, next), pairs);
            }
            merged += 1;
            word[write] = new_id;
            write += 1;
            read += 2;
        } else {
            word[write] = word[read];
            write += 1;
            read += 1;
        }
    }
    if merged > 0 {
        if let Some(info) = pairs.get_mut(&pack(a, b)) {
            info.count -= merged * count;
        }
    }
    *len = write as u32;
}
