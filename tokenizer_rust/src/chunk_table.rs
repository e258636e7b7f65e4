//! Counting distinct chunks: an open-addressing hash table (linear probing) whose keys are byte ranges of a
//! buffer, with the full 64-bit hash kept in each slot.
//!
//! Compared with a `HashMap<Box<[u8]>, u64>` this avoids one allocation per distinct chunk (the keys of a
//! table that owns them are appended to one arena), never rehashes a key when growing, and compares key
//! bytes only after the full hashes matched.

#[derive(Clone, Copy, Default)]
struct Slot {
    hash: u64,
    start: u32,
    len: u32,
    /// 0 = empty slot
    count: u64,
}

/// One distinct chunk: its hash, where its bytes are, and how often it was seen.
#[derive(Clone, Copy)]
pub struct Entry {
    pub hash: u64,
    pub start: u32,
    pub len: u32,
    pub count: u64,
}

pub struct ChunkTable {
    slots: Vec<Slot>,
    len: usize,
    /// key bytes, for tables that own their keys (`add_owned`); unused by tables over a batch
    arena: Vec<u8>,
}

impl Default for ChunkTable {
    fn default() -> Self {
        ChunkTable { slots: vec![Slot::default(); 64], len: 0, arena: Vec::new() }
    }
}

impl ChunkTable {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Index of the slot holding `key` (with `hash`), or of the empty slot where it belongs; key bytes are
    /// read from `base`.
    #[inline(always)]
    fn find(&self, base: &[u8], hash: u64, key: &[u8]) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            let s = &self.slots[i];
            if s.count == 0
                || (s.hash == hash
                    && s.len as usize == key.len()
                    && &base[s.start as usize..s.start as usize + s.len as usize] == key)
            {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    fn grow_if_needed(&mut self) {
        if 2 * (self.len + 1) <= self.slots.len() {
            return;
        }
        let new_cap = self.slots.len() * 2;
        let mask = new_cap - 1;
        let mut slots = vec![Slot::default(); new_cap];
        for s in self.slots.iter().filter(|s| s.count != 0) {
            let mut i = s.hash as usize & mask;
            while slots[i].count != 0 {
                i = (i + 1) & mask;
            }
            slots[i] = *s;
        }
        self.slots = slots;
    }

    /// Count one occurrence of `data[start..start + len]`, a key that lives in the caller's buffer `data`.
    #[inline]
    pub fn add_borrowed(&mut self, data: &[u8], hash: u64, start: usize, len: usize) {
        self.grow_if_needed();
        let i = self.find(data, hash, &data[start..start + len]);
        let s = &mut self.slots[i];
        if s.count == 0 {
            *s = Slot { hash, start: start as u32, len: len as u32, count: 0 };
            self.len += 1;
        }
        s.count += 1;
    }

    /// Add `count` occurrences of `key`, copying the key into this table's arena when it is new.
    #[inline]
    pub fn add_owned(&mut self, hash: u64, key: &[u8], count: u64) -> Result<(), String> {
        self.grow_if_needed();
        let i = self.find(&self.arena, hash, key);
        let s = &mut self.slots[i];
        if s.count == 0 {
            if self.arena.len() + key.len() > u32::MAX as usize {
                return Err("too much distinct text for one training run (over 4 GB of distinct chunks per partition)".into());
            }
            *s = Slot { hash, start: self.arena.len() as u32, len: key.len() as u32, count: 0 };
            self.arena.extend_from_slice(key);
            self.len += 1;
        }
        s.count += count;
        Ok(())
    }

    /// Every entry (in slot order, which depends only on the keys inserted and their order).
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.slots
            .iter()
            .filter(|s| s.count != 0)
            .map(|s| Entry { hash: s.hash, start: s.start, len: s.len, count: s.count })
    }

    /// The bytes of an entry of a table that owns its keys.
    #[inline]
    pub fn key(&self, e: &Entry) -> &[u8] {
        &self.arena[e.start as usize..e.start as usize + e.len as usize]
    }
}
