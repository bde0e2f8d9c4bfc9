//! Which shard a key's rows go to with `sharding = "key"`: **stored-data policy**.
//!
//! Rows with one key land on one shard, and stay there only while this mapping stays the
//! same: changing it (the hash, or how its value picks from the shard list) would send new
//! rows of every key to other shards than its stored rows, and would make a batch rebuilt
//! after a crash go to another shard than its first attempt, where deduplication cannot
//! drop it. So it is its own function, pinned by a test, and not shared with anything that
//! may change freely (the picker's session hash, say).
//!
//! The mapping: FNV-1a 64 of the key's bytes (the column's value as text), modulo the
//! number of shards, indexes the cluster's shard list in order. Adding or removing a shard
//! moves keys: re-shard deliberately.

/// FNV-1a, 64 bits.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The 1-based shard of `key` among `shards` (the cluster's shard numbers, in order); 1
/// if there are none.
pub fn shard_for(key: &[u8], shards: &[u32]) -> u32 {
    let n = shards.len().max(1) as u64;
    shards
        .get((fnv1a_64(key) % n) as usize)
        .copied()
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These values are where keys' rows are stored: a change here moves data.
    #[test]
    fn keys_land_where_they_always_did() {
        // The FNV-1a 64 reference vectors.
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
        // Shards as the sidecar assigned them before this module existed.
        for (key, two, three, four) in [
            (&b""[..], 2, 3, 2),
            (b"a", 1, 2, 1),
            (b"foobar", 1, 1, 1),
            (b"7", 1, 3, 3),
            (b"42", 2, 2, 4),
            (b"user-1001", 2, 3, 4),
            (b"k1", 2, 3, 2),
        ] {
            assert_eq!(shard_for(key, &[1, 2]), two, "{key:?}");
            assert_eq!(shard_for(key, &[1, 2, 3]), three, "{key:?}");
            assert_eq!(shard_for(key, &[1, 2, 3, 4]), four, "{key:?}");
        }
        assert_eq!(shard_for(b"x", &[]), 1);
        assert_eq!(shard_for(b"42", &[5, 9]), 9, "indexes the shard list");
    }
}
