//! Insert bodies in ClickHouse's own compressed format (`decompress=1` on the HTTP
//! interface): one LZ4 block behind its header and CityHash128 checksum.
//!
//! One block per insert, however big, is the point: ClickHouse reads the block's declared
//! size before anything in it, so a body cut short anywhere (a crash, a broken connection)
//! is refused whole ("Cannot read all data"), where a plain RowBinary body cut at a row
//! boundary would be inserted as a smaller block that the rebuilt batch could then not be
//! deduplicated against. The checksum also catches a body damaged on the way. LZ4 costs a
//! fraction of gzip on both ends (measured: gzip was ~5% of the sidecar's CPU).

use bytes::Bytes;

/// Checksum, then method, compressed size (header included) and original size.
const CHECKSUM: usize = 16;
const HEADER: usize = 9;
/// ClickHouse's method byte for LZ4.
const LZ4: u8 = 0x82;
/// ClickHouse refuses a compressed block over 1 GiB (`DBMS_MAX_COMPRESSED_SIZE`).
pub const MAX_BLOCK: usize = 1 << 30;

/// `data` as one compressed block.
pub fn lz4_block(data: &[u8]) -> Result<Bytes, String> {
    let bound = lz4_flex::block::get_maximum_output_size(data.len());
    if CHECKSUM + HEADER + bound > MAX_BLOCK {
        return Err(format!(
            "a batch of {} bytes is over ClickHouse's compressed block limit ({MAX_BLOCK} bytes): \
             lower batch_bytes",
            data.len()
        ));
    }
    let mut out = vec![0u8; CHECKSUM + HEADER + bound];
    let n = lz4_flex::block::compress_into(data, &mut out[CHECKSUM + HEADER..])
        .map_err(|e| format!("compressing the batch: {e}"))?;
    out.truncate(CHECKSUM + HEADER + n);
    let (sum, block) = out.split_at_mut(CHECKSUM);
    block[0] = LZ4;
    // Both sizes fit: the block is under 1 GiB.
    block[1..5].copy_from_slice(&((HEADER + n) as u32).to_le_bytes());
    block[5..9].copy_from_slice(&(data.len() as u32).to_le_bytes());
    sum.copy_from_slice(&checksum(block).to_le_bytes());
    Ok(Bytes::from(out))
}

/// CityHash128 (v1.0.2) as ClickHouse stores it: its low half first.
fn checksum(block: &[u8]) -> u128 {
    cityhash_rs::cityhash_102_128(block).rotate_right(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a block back the way ClickHouse does.
    fn read(block: &[u8]) -> Result<Vec<u8>, String> {
        if block.len() < CHECKSUM + HEADER {
            return Err("short".into());
        }
        let (sum, rest) = block.split_at(CHECKSUM);
        let size = u32::from_le_bytes(rest[1..5].try_into().unwrap()) as usize;
        let original = u32::from_le_bytes(rest[5..9].try_into().unwrap()) as usize;
        if rest[0] != LZ4 || size != rest.len() {
            return Err("bad header".into());
        }
        if checksum(rest).to_le_bytes() != sum {
            return Err("checksum".into());
        }
        lz4_flex::block::decompress(&rest[HEADER..], original).map_err(|e| e.to_string())
    }

    #[test]
    fn round_trips_and_detects_damage() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 977).to_le_bytes())
            .collect();
        let block = lz4_block(&data).unwrap();
        assert!(block.len() < data.len() / 2, "{} bytes", block.len());
        assert_eq!(read(&block).unwrap(), data);
        let mut damaged = block.to_vec();
        damaged[100] ^= 1;
        assert_eq!(read(&damaged).unwrap_err(), "checksum");
        assert!(read(&block[..block.len() - 1]).is_err());
        assert_eq!(read(&lz4_block(b"").unwrap()).unwrap(), b"");
    }
}
