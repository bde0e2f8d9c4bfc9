//! Choosing a node: weighted power-of-two-choices over an immutable snapshot of weights.
//!
//! The prober publishes effective weights (health ramp x score, 0 = excluded for this
//! purpose) as a [`Snapshot`]; a pick reads the current snapshot through an `ArcSwap` and
//! the nodes' in-flight counters, and takes no lock and allocates nothing:
//!
//! 1. draw two nodes at random in proportion to their weights (Vose's alias table, O(1));
//! 2. keep the one with less work per unit of weight (`in_flight / weight`); a tie keeps
//!    the first draw, so with equal load picks follow the weights exactly.
//!
//! Sessions use weighted rendezvous hashing instead: every eligible node scores the session
//! key, the best score wins, so a session stays on its node for as long as that node stays
//! eligible and moves only when it must. The hash is stable across processes, so several
//! chgate instances agree on a session's node.

/// Effective weights of the nodes for one purpose, with the alias table to sample them.
#[derive(Debug, Clone)]
pub struct Snapshot {
    weights: Box<[u32]>,
    /// Alias method: keep column `i` when a 32-bit coin is below `keep[i]`, else `alias[i]`.
    keep: Box<[u32]>,
    alias: Box<[u32]>,
    /// Stable per-node seeds for rendezvous hashing.
    seeds: Box<[u64]>,
    eligible: usize,
}

impl Snapshot {
    /// Builds a snapshot from weights (index = node) and stable node identities (e.g. their
    /// labels), which seed the session hash.
    pub fn new(weights: &[u32], identities: &[&str]) -> Self {
        assert_eq!(weights.len(), identities.len());
        let n = weights.len();
        let total: f64 = weights.iter().map(|&w| w as f64).sum();
        let mut keep = vec![u32::MAX; n];
        let mut alias: Vec<u32> = (0..n as u32).collect();
        if total > 0.0 {
            let mut scaled: Vec<f64> = weights
                .iter()
                .map(|&w| w as f64 * n as f64 / total)
                .collect();
            let (mut small, mut large): (Vec<usize>, Vec<usize>) =
                (0..n).partition(|&i| scaled[i] < 1.0);
            while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
                keep[s] = (scaled[s] * u32::MAX as f64) as u32;
                alias[s] = l as u32;
                scaled[l] -= 1.0 - scaled[s];
                if scaled[l] < 1.0 {
                    large.pop();
                    small.push(l);
                }
            }
            // Leftovers (rounding) keep their own column.
            for i in small.into_iter().chain(large) {
                keep[i] = u32::MAX;
                alias[i] = i as u32;
            }
            // Invariant: a zero-weight node is never returned: its column always yields
            // to its alias, which has weight.
            for i in 0..n {
                if weights[i] == 0 {
                    keep[i] = 0;
                    if weights[alias[i] as usize] == 0 {
                        alias[i] = weights.iter().position(|&w| w > 0).unwrap_or(i) as u32;
                    }
                }
            }
        }
        Self {
            weights: weights.into(),
            keep: keep.into(),
            alias: alias.into(),
            seeds: identities.iter().map(|id| fnv1a(id.as_bytes())).collect(),
            eligible: weights.iter().filter(|&&w| w > 0).count(),
        }
    }

    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Nodes with a weight above zero.
    pub fn eligible(&self) -> usize {
        self.eligible
    }

    pub fn weight(&self, node: usize) -> u32 {
        self.weights[node]
    }

    /// One weighted draw from 64 random bits.
    fn draw(&self, random: u64) -> usize {
        let n = self.weights.len() as u64;
        let column = (((random >> 32) * n) >> 32) as usize;
        if (random as u32) < self.keep[column] {
            column
        } else {
            self.alias[column] as usize
        }
    }

    /// Weighted power-of-two-choices. `load(i)` is node `i`'s current load (requests in
    /// flight); `random` supplies two independent 64-bit draws.
    pub fn pick(&self, load: impl Fn(usize) -> u64, random: [u64; 2]) -> Option<usize> {
        if self.eligible == 0 {
            return None;
        }
        let a = self.draw(random[0]);
        let b = self.draw(random[1]);
        if a == b {
            return Some(a);
        }
        // a's load per weight <= b's, without division.
        if load(a) * self.weights[b] as u64 <= load(b) * self.weights[a] as u64 {
            Some(a)
        } else {
            Some(b)
        }
    }

    /// The session's node: weighted rendezvous over eligible nodes. O(nodes).
    pub fn pick_sticky(&self, session: &[u8]) -> Option<usize> {
        let key = fnv1a(session);
        let mut best: Option<(f64, usize)> = None;
        for (i, &w) in self.weights.iter().enumerate() {
            if w == 0 {
                continue;
            }
            // A uniform (0, 1) from the pair's hash; the weighted score -w / ln(u) makes each
            // node win in proportion to its weight.
            let h = splitmix64(key ^ self.seeds[i]);
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = -(w as f64) / u.ln();
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, i));
            }
        }
        best.map(|(_, i)| i)
    }
}

/// The session and identity hash: soft, free to change (nothing stored depends on it).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:8123")).collect()
    }

    fn snapshot(weights: &[u32]) -> Snapshot {
        let ids = ids(weights.len());
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        Snapshot::new(weights, &refs)
    }

    use std::sync::atomic::{AtomicU32, Ordering};

    fn counters(n: usize) -> Vec<AtomicU32> {
        (0..n).map(|_| AtomicU32::new(0)).collect()
    }

    fn of(c: &[AtomicU32]) -> impl Fn(usize) -> u64 + '_ {
        |i| c[i].load(Ordering::Relaxed) as u64
    }

    #[test]
    fn picks_follow_weights_within_five_percent() {
        for weights in [
            vec![1, 2, 3, 4],
            vec![100, 0, 100, 50, 1000, 7],
            vec![5; 64],
        ] {
            let s = snapshot(&weights);
            let load = counters(weights.len());
            let mut counts = vec![0u64; weights.len()];
            let picks = 1_000_000;
            for _ in 0..picks {
                counts[s.pick(of(&load), [rand::random(), rand::random()]).unwrap()] += 1;
            }
            let total: u64 = weights.iter().map(|&w| w as u64).sum();
            for (i, &w) in weights.iter().enumerate() {
                let expected = picks as f64 * w as f64 / total as f64;
                if w == 0 {
                    assert_eq!(counts[i], 0, "node {i} has weight 0");
                } else {
                    let off = (counts[i] as f64 - expected).abs() / expected;
                    assert!(
                        off < 0.05,
                        "node {i}: {} picks, expected {expected:.0} ({weights:?})",
                        counts[i]
                    );
                }
            }
        }
    }

    #[test]
    fn nothing_eligible_means_no_pick() {
        let s = snapshot(&[0, 0, 0]);
        assert_eq!(s.pick(of(&counters(3)), [1, 2]), None);
        assert_eq!(s.pick_sticky(b"x"), None);
        assert_eq!(snapshot(&[]).pick(|_| 0, [1, 2]), None);
    }

    #[test]
    fn the_less_loaded_of_two_wins() {
        let s = snapshot(&[1, 1]);
        let load = counters(2);
        load[0].store(10, Ordering::Relaxed);
        let picks: usize = (0..10_000)
            .filter(|_| s.pick(of(&load), [rand::random(), rand::random()]) == Some(1))
            .count();
        // Node 1 wins every time both are drawn (half the pairs), and when drawn twice.
        assert!(picks > 7_000, "{picks}");
        // Load is per unit of weight: 10 in flight on a node 20x as heavy is lighter.
        let s = snapshot(&[20, 1]);
        load[1].store(1, Ordering::Relaxed);
        assert_eq!(
            s.pick(of(&load), [0, u64::MAX]).map(|i| s.weight(i)),
            Some(20)
        );
    }

    #[test]
    fn sessions_stick_and_move_only_when_they_must() {
        let weights = vec![1u32; 8];
        let s = snapshot(&weights);
        let home = s.pick_sticky(b"session-42").unwrap();
        for _ in 0..10 {
            assert_eq!(s.pick_sticky(b"session-42"), Some(home));
        }
        // Exclude another node: the session does not move. Exclude its own: it moves.
        let mut w = weights.clone();
        w[(home + 1) % 8] = 0;
        assert_eq!(snapshot(&w).pick_sticky(b"session-42"), Some(home));
        w[home] = 0;
        let moved = snapshot(&w).pick_sticky(b"session-42").unwrap();
        assert_ne!(moved, home);
        // Only sessions of the excluded node move.
        let mut moved_count = 0;
        let mut w = weights.clone();
        w[3] = 0;
        let without = snapshot(&w);
        for k in 0..2000 {
            let key = format!("s{k}");
            let before = s.pick_sticky(key.as_bytes()).unwrap();
            let after = without.pick_sticky(key.as_bytes()).unwrap();
            if before != after {
                assert_eq!(before, 3);
                moved_count += 1;
            }
        }
        assert!(
            (150..350).contains(&moved_count),
            "about 1/8 of sessions move: {moved_count}"
        );
    }

    #[test]
    fn session_homes_follow_weights() {
        let s = snapshot(&[1, 3]);
        let heavy = (0..20_000)
            .filter(|k| s.pick_sticky(format!("k{k}").as_bytes()) == Some(1))
            .count();
        let share = heavy as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.05 * 0.75, "{share}");
    }
}
