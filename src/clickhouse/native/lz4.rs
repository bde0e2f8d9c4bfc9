//! The start of an LZ4 block, decompressed without the rest: a reader that needs only a
//! block's first bytes (its row count, see `server::ServerPackets`) need not pay for
//! decompressing a megabyte. lz4_flex decompresses a block whole or not at all.
//!
//! Every read is checked: a malformed block gives `None`, never a panic or a read outside
//! the input (the caller then walks the block the slow way, which says what is wrong).

/// Decompresses the start of the LZ4 block `src` into `out`: until `out` is full or the
/// block ends. The number of bytes written, or `None` if the block is malformed before
/// that point.
pub fn decompress_prefix(src: &[u8], out: &mut [u8]) -> Option<usize> {
    let (mut i, mut o) = (0usize, 0usize);
    while o < out.len() {
        let token = *src.get(i)?;
        i += 1;
        let literals = length(src, &mut i, usize::from(token >> 4))?;
        let run = src.get(i..i.checked_add(literals)?)?;
        i += literals;
        let take = run.len().min(out.len() - o);
        out[o..o + take].copy_from_slice(&run[..take]);
        o += take;
        // The last sequence has literals only.
        if o == out.len() || i == src.len() {
            break;
        }
        let offset = usize::from(u16::from_le_bytes([*src.get(i)?, *src.get(i + 1)?]));
        i += 2;
        if offset == 0 || offset > o {
            return None;
        }
        let matched = length(src, &mut i, usize::from(token & 15))?.checked_add(4)?;
        let end = o.saturating_add(matched).min(out.len());
        // Byte by byte: a match may overlap the bytes it copies (offset < length).
        while o < end {
            out[o] = out[o - offset];
            o += 1;
        }
    }
    Some(o)
}

/// A sequence's literal or match length: the token's 4 bits, and when they are 15, the
/// bytes after that add to it until one is not 255.
fn length(src: &[u8], i: &mut usize, nibble: usize) -> Option<usize> {
    let mut len = nibble;
    if nibble == 15 {
        loop {
            let b = *src.get(*i)?;
            *i += 1;
            len = len.checked_add(usize::from(b))?;
            if b != 255 {
                break;
            }
        }
    }
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Vec<Vec<u8>> {
        let mut numbers = Vec::new();
        for i in 0u64..20_000 {
            numbers.extend_from_slice(&i.to_le_bytes());
            numbers.extend_from_slice(&(i * 2).to_le_bytes());
        }
        let mut next = crate::clickhouse::native::test_random(0x2545_f491_4f6c_dd1d);
        let noise: Vec<u8> = (0..5_000).map(|_| next() as u8).collect();
        vec![
            numbers,
            noise,
            vec![7u8; 100_000],
            b"\x01\x00\x02\xff\xff\xff\xff\x00\x02\x80\x80\x04".repeat(3),
            b"abc".to_vec(),
            Vec::new(),
        ]
    }

    #[test]
    fn the_start_of_a_block_is_its_data_start() {
        for data in inputs() {
            let block = lz4_flex::block::compress(&data);
            for want in [0, 1, 5, 16, 32, 100, 4096, data.len(), data.len() + 10] {
                let mut out = vec![0u8; want];
                let n = decompress_prefix(&block, &mut out).expect("decompresses");
                assert_eq!(n, want.min(data.len()), "{want} of {}", data.len());
                assert_eq!(&out[..n], &data[..n]);
            }
        }
    }

    #[test]
    fn damaged_blocks_are_refused_or_read_within_bounds() {
        let data = &inputs()[0];
        let block = lz4_flex::block::compress(data);
        let mut out = [0u8; 64];
        // Cut anywhere, or with a byte changed anywhere near the start: an answer or
        // `None`, never a panic.
        for cut in 0..block.len().min(300) {
            let _ = decompress_prefix(&block[..cut], &mut out);
        }
        for at in 0..block.len().min(300) {
            for b in [0u8, 1, 15, 0xf0, 0xff] {
                let mut bad = block.clone();
                bad[at] = b;
                let _ = decompress_prefix(&bad, &mut out);
            }
        }
        // A match before the start of the output.
        assert_eq!(decompress_prefix(&[0x10, b'a', 0x05, 0x00], &mut out), None);
        assert_eq!(decompress_prefix(&[0x10, b'a', 0x00, 0x00], &mut out), None);
        // A literal run longer than the block.
        assert_eq!(decompress_prefix(&[0xf0, 0xff, 0xff], &mut out), None);
    }
}
