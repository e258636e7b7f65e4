//! Hand-written pre-tokenizer for GPT-4's split pattern (digits grouped 1-2):
//!
//! ```text
//! '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+
//! ```
//!
//! A regex engine tries the seven alternatives in order at every position, backtracking; here each
//! alternative is a few comparisons on precomputed character classes, with the backtracking of `\s*`
//! and `\s+(?!\S)` resolved by one scan of the whitespace run. The classes come from the Python `regex`
//! module (gen_unicode_tables.py), so the chunks are exactly the ones `regex.findall(pattern, text)`
//! returns (tests/test_tokenizer_split.py checks every code point).

use crate::unicode_tables::{BLOCKS, BLOCK_INDEX, BLOCK_SHIFT};

const OTHER: u8 = 0;
const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 3;

#[inline(always)]
fn class_of(cp: u32) -> u8 {
    let block = BLOCK_INDEX[(cp >> BLOCK_SHIFT) as usize] as usize;
    BLOCKS[(block << BLOCK_SHIFT) | (cp as usize & ((1 << BLOCK_SHIFT) - 1))]
}

/// Decode the UTF-8 character at `i` (the input is valid UTF-8): (code point, byte length).
#[inline(always)]
fn decode(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F), 3)
    } else {
        let cp = ((b0 & 0x07) << 18)
            | ((s[i + 1] as u32 & 0x3F) << 12)
            | ((s[i + 2] as u32 & 0x3F) << 6)
            | (s[i + 3] as u32 & 0x3F);
        (cp, 4)
    }
}

/// (class, byte length) of the character at `i`.
#[inline(always)]
fn class_at(s: &[u8], i: usize) -> (u8, usize) {
    let b = s[i];
    if b < 0x80 {
        // the first block (code points 0-255) is block 0 of the table
        return (BLOCKS[b as usize], 1);
    }
    let (cp, len) = decode(s, i);
    (class_of(cp), len)
}

/// End of the run of characters of class `class` starting at `i`.
#[inline(always)]
fn run_end(s: &[u8], mut i: usize, class: u8) -> usize {
    while i < s.len() {
        let (c, len) = class_at(s, i);
        if c != class {
            break;
        }
        i += len;
    }
    i
}

/// `(?i:[sdmt]|ll|ve|re)` right after an apostrophe at `i - 1`: the end of the contraction, if any.
/// Case-insensitive matching in `regex` also lets U+017F (long s) stand for `s`.
#[inline]
fn contraction_end(s: &[u8], i: usize) -> Option<usize> {
    let lower = |j: usize| -> u8 { if j < s.len() { s[j].to_ascii_lowercase() } else { 0 } };
    match lower(i) {
        b's' | b'd' | b'm' | b't' => Some(i + 1),
        b'l' if lower(i + 1) == b'l' => Some(i + 2),
        b'v' | b'r' if lower(i + 1) == b'e' => Some(i + 2),
        0xc5 if i + 1 < s.len() && s[i + 1] == 0xbf => Some(i + 2),
        _ => None,
    }
}

/// End of the chunk that starts at byte `i` (`i < s.len()`).
#[inline]
pub fn next_chunk_end(s: &[u8], i: usize) -> usize {
    let n = s.len();
    let b = s[i];
    // 1. '(?i:[sdmt]|ll|ve|re)
    if b == b'\'' {
        if let Some(end) = contraction_end(s, i + 1) {
            return end;
        }
    }
    let (class, len) = class_at(s, i);
    // 2. [^\r\n\p{L}\p{N}]?+\p{L}+
    if class == LETTER {
        return run_end(s, i + len, LETTER);
    }
    if class != NUMBER && b != b'\r' && b != b'\n' && i + len < n {
        let (next, next_len) = class_at(s, i + len);
        if next == LETTER {
            return run_end(s, i + len + next_len, LETTER);
        }
    }
    // 3. \p{N}{1,2}
    if class == NUMBER {
        let j = i + len;
        if j < n {
            let (next, next_len) = class_at(s, j);
            if next == NUMBER {
                return j + next_len;
            }
        }
        return j;
    }
    // 4. ` ?[^\s\p{L}\p{N}]++[\r\n]*`
    let punct_start = if class == OTHER {
        Some(i)
    } else if b == b' ' && i + 1 < n && class_at(s, i + 1).0 == OTHER {
        Some(i + 1)
    } else {
        None
    };
    if let Some(start) = punct_start {
        let mut j = run_end(s, start, OTHER);
        while j < n && (s[j] == b'\r' || s[j] == b'\n') {
            j += 1;
        }
        return j;
    }
    // Whitespace: scan the run once, remembering where the last \r or \n ends and where the last
    // character starts.
    let mut j = i;
    let mut last_newline_end = 0;
    let mut last_char_start = i;
    while j < n {
        let (c, l) = class_at(s, j);
        if c != SPACE {
            break;
        }
        if s[j] == b'\r' || s[j] == b'\n' {
            last_newline_end = j + 1;
        }
        last_char_start = j;
        j += l;
    }
    // 5. \s*[\r\n]: greedy, so it backs off to the last newline of the run
    if last_newline_end > 0 {
        return last_newline_end;
    }
    // 6. \s+(?!\S): the whole run at the end of the text, else all but its last character
    if j == n {
        return j;
    }
    if last_char_start > i {
        return last_char_start;
    }
    // 7. \s+ (a single whitespace character before a non-space)
    j
}

/// Call `f` on every chunk of `s`, in order.
#[inline]
pub fn for_each_chunk<'a, F: FnMut(&'a [u8])>(s: &'a [u8], mut f: F) {
    let mut i = 0;
    while i < s.len() {
        let end = next_chunk_end(s, i);
        f(&s[i..end]);
        i = end;
    }
}
