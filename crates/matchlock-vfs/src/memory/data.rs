//! Sparse in-memory file contents.
//!
//! # Design
//! A file is a logical size plus a map from chunk index to a buffer of at most [`CHUNK`] bytes.
//! A chunk's buffer only grows as far as the last byte written into it, so a 10-byte file costs
//! 10 bytes, and a write at offset 5 GiB allocates one chunk, not the gap. Bytes that no chunk
//! covers (holes, and the tail of a chunk past its buffer) read as zeros. `stored` is the number
//! of bytes held, which is what the quota charges.
//!
//! # Limitations
//! Holes are never re-created: writing zeros keeps the chunk. Truncation frees whole chunks past
//! the new size and trims the one it cuts.

use std::collections::BTreeMap;

/// Chunk size: large enough that big sequential files are few map entries, small enough that a
/// write far into a file does not allocate much.
pub const CHUNK: u64 = 64 * 1024;

/// Contents of one regular file.
#[derive(Debug, Default)]
pub struct SparseData {
    chunks: BTreeMap<u64, Vec<u8>>,
    stored: u64,
}

/// Converts a byte count that is known to be at most [`CHUNK`] into `usize`.
fn small(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl SparseData {
    /// Bytes held in memory (what the quota charges).
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// Bytes a write of `len` bytes at `offset` would add to [`Self::stored`].
    pub fn growth_for_write(&self, offset: u64, len: u64) -> u64 {
        let mut growth = 0;
        for (idx, _start, end) in pieces(offset, len) {
            // The buffer grows to `end`, zero-filling from its current end: all of it is stored.
            let have = self.chunks.get(&idx).map_or(0, |c| c.len() as u64);
            growth += end.saturating_sub(have);
        }
        growth
    }

    /// Copies `data` to `offset`. The caller checked the quota with [`Self::growth_for_write`].
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut consumed = 0usize;
        for (idx, start, end) in pieces(offset, data.len() as u64) {
            let chunk = self.chunks.entry(idx).or_default();
            let end_us = small(end);
            if chunk.len() < end_us {
                self.stored += (end_us - chunk.len()) as u64;
                chunk.resize(end_us, 0);
            }
            let n = small(end - start);
            chunk[small(start)..end_us].copy_from_slice(&data[consumed..consumed + n]);
            consumed += n;
        }
    }

    /// Reads up to `len` bytes at `offset` from a file of logical size `size`.
    pub fn read(&self, size: u64, offset: u64, len: u64) -> Vec<u8> {
        if offset >= size {
            return Vec::new();
        }
        let len = len.min(size - offset);
        let mut out = Vec::with_capacity(small(len));
        for (idx, start, end) in pieces(offset, len) {
            let piece_len = small(end - start);
            let at = out.len();
            out.resize(at + piece_len, 0);
            if let Some(chunk) = self.chunks.get(&idx) {
                let from = small(start).min(chunk.len());
                let to = small(end).min(chunk.len());
                out[at..at + (to - from)].copy_from_slice(&chunk[from..to]);
            }
        }
        out
    }

    /// Drops everything at or past `new_size`; returns the bytes freed.
    pub fn truncate(&mut self, new_size: u64) -> u64 {
        let before = self.stored;
        let first_dropped = new_size.div_ceil(CHUNK);
        let dropped = self.chunks.split_off(&first_dropped);
        let dropped_bytes: u64 = dropped.values().map(|c| c.len() as u64).sum();
        self.stored = self.stored.saturating_sub(dropped_bytes);
        if !new_size.is_multiple_of(CHUNK) {
            if let Some(chunk) = self.chunks.get_mut(&(new_size / CHUNK)) {
                let keep = small(new_size % CHUNK);
                if chunk.len() > keep {
                    self.stored = self.stored.saturating_sub((chunk.len() - keep) as u64);
                    chunk.truncate(keep);
                }
            }
        }
        before.saturating_sub(self.stored)
    }
}

/// Splits `[offset, offset + len)` into `(chunk index, start in chunk, end in chunk)` pieces.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let idx = pos / CHUNK;
        let start = pos % CHUNK;
        let stop = (end - idx * CHUNK).min(CHUNK);
        pos = idx * CHUNK + stop;
        Some((idx, start, stop))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_write_far_away_allocates_one_chunk() {
        let mut d = SparseData::default();
        let off = 5 * 1024 * 1024 * 1024;
        assert_eq!(d.growth_for_write(off, 3), 3);
        d.write(off, b"abc");
        assert_eq!(d.stored(), 3);
        assert_eq!(d.read(off + 3, off - 1, 10), b"\0abc");
    }

    #[test]
    fn write_across_chunks_and_truncate() {
        let mut d = SparseData::default();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        d.write(10, &data);
        assert_eq!(d.stored(), 200_010);
        assert_eq!(d.read(200_010, 10, 200_000), data);
        assert_eq!(d.truncate(70_000), 130_010);
        assert_eq!(d.read(200_010, 69_990, 100)[..10], data[69_980..69_990]);
        assert!(d.read(200_010, 69_990, 100)[10..].iter().all(|b| *b == 0));
    }

    #[test]
    fn growth_counts_zero_fill_inside_a_chunk() {
        let mut d = SparseData::default();
        d.write(0, b"ab");
        assert_eq!(d.growth_for_write(10, 2), 10);
        assert_eq!(d.growth_for_write(1, 2), 1);
        d.write(10, b"cd");
        assert_eq!(d.stored(), 12);
    }
}
