//! raychat_bpe: a byte-level BPE trainer with a C ABI (loaded from Python through cffi, packaged by
//! maturin). Text crosses the boundary as one UTF-8 buffer plus document offsets, so a batch costs one
//! call and no per-string conversions.
//!
//! Every function returns a status (0 = ok, < 0 = error) where it can fail; the message of the last
//! error is available from `rbpe_last_error`. Panics never cross the boundary.

mod chunk_table;
mod fxhash;
pub mod split;
pub mod train;
mod unicode_tables;

use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use train::Trainer;

thread_local! {
    static LAST_ERROR: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn set_error(message: &str) {
    LAST_ERROR.with(|e| {
        let mut e = e.borrow_mut();
        e.clear();
        e.extend_from_slice(message.as_bytes());
    });
}

/// Run `f`, turning an `Err` or a panic into status -1 with the message saved.
fn guarded<F: FnOnce() -> Result<i64, String>>(f: F) -> i64 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(message)) => {
            set_error(&message);
            -1
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            set_error(&format!("internal error: {message}"));
            -1
        }
    }
}

unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if len == 0 || ptr.is_null() {
        &[]
    } else {
        std::slice::from_raw_parts(ptr, len)
    }
}

/// Copy the last error message of this thread into `out` (at most `cap` bytes); returns its full length.
#[no_mangle]
pub unsafe extern "C" fn rbpe_last_error(out: *mut u8, cap: usize) -> usize {
    LAST_ERROR.with(|e| {
        let e = e.borrow();
        let n = e.len().min(cap);
        if n > 0 && !out.is_null() {
            std::ptr::copy_nonoverlapping(e.as_ptr(), out, n);
        }
        e.len()
    })
}

/// A new trainer using `num_threads` threads (0 = all cores).
#[no_mangle]
pub extern "C" fn rbpe_trainer_new(num_threads: u32) -> *mut c_void {
    Box::into_raw(Box::new(Trainer::new(num_threads as usize))) as *mut c_void
}

#[no_mangle]
pub unsafe extern "C" fn rbpe_trainer_free(trainer: *mut c_void) {
    if !trainer.is_null() {
        drop(Box::from_raw(trainer as *mut Trainer));
    }
}

/// Count the chunks of `num_docs` documents: document i is `data[offsets[i]..offsets[i + 1]]`
/// (`offsets` has `num_docs + 1` entries). Returns 0, or -1 on bad input.
#[no_mangle]
pub unsafe extern "C" fn rbpe_trainer_feed(
    trainer: *mut c_void,
    data: *const u8,
    len: usize,
    offsets: *const u64,
    num_docs: usize,
) -> i64 {
    let trainer = &mut *(trainer as *mut Trainer);
    let data = slice(data, len);
    let offsets = slice(offsets, if num_docs == 0 { 0 } else { num_docs + 1 });
    guarded(|| trainer.feed(data, offsets).map(|_| 0))
}

/// Number of distinct chunks counted so far.
#[no_mangle]
pub unsafe extern "C" fn rbpe_trainer_num_distinct_chunks(trainer: *const c_void) -> u64 {
    (*(trainer as *const Trainer)).num_distinct_chunks()
}

/// Number of chunks counted so far (with repetitions).
#[no_mangle]
pub unsafe extern "C" fn rbpe_trainer_num_chunks(trainer: *const c_void) -> u64 {
    (*(trainer as *const Trainer)).total_chunks
}

/// Learn up to `num_merges` merges; returns how many were learned, or -1 on error. With `verbose`,
/// progress goes to stderr about once a second.
#[no_mangle]
pub unsafe extern "C" fn rbpe_trainer_train(trainer: *mut c_void, num_merges: u64, verbose: i32) -> i64 {
    let trainer = &mut *(trainer as *mut Trainer);
    guarded(|| trainer.train(num_merges as usize, verbose != 0).map(|n| n as i64))
}

/// Copy the learned merges into `out`: 2 ids (left, right) per merge; merge i creates token 256 + i.
/// `counts`, when not null, receives the pair count of each merge at the time it was made.
#[no_mangle]
pub unsafe extern "C" fn rbpe_trainer_merges(trainer: *const c_void, out: *mut u32, counts: *mut u64) {
    let trainer = &*(trainer as *const Trainer);
    for (i, &(a, b)) in trainer.merges.iter().enumerate() {
        *out.add(2 * i) = a;
        *out.add(2 * i + 1) = b;
        if !counts.is_null() {
            *counts.add(i) = trainer.merge_counts[i];
        }
    }
}

/// Split UTF-8 `data` with the GPT-4 pattern, writing the end offset of each chunk into `ends` (room for
/// `cap`). Returns the number of chunks, which may exceed `cap` (then call again with more room), or -1
/// when `data` is not UTF-8.
#[no_mangle]
pub unsafe extern "C" fn rbpe_split(data: *const u8, len: usize, ends: *mut u64, cap: usize) -> i64 {
    let data = slice(data, len);
    guarded(|| {
        if std::str::from_utf8(data).is_err() {
            return Err("text is not valid UTF-8".into());
        }
        let mut n = 0usize;
        split::for_each_chunk(data, |chunk| {
            if n < cap {
                let end = chunk.as_ptr() as usize - data.as_ptr() as usize + chunk.len();
                *ends.add(n) = end as u64;
            }
            n += 1;
        });
        Ok(n as i64)
    })
}
