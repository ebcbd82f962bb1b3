//! Ring construction: the agent turns a service's backends into the table
//! the data plane indexes. Round robin is the plain order; weighted round
//! robin is the smooth sequence (nginx's algorithm), so no backend gets a
//! burst of consecutive flows.

use alloc_crate::{vec, vec::Vec};

use crate::{MAX_RING, Ring};

extern crate alloc as alloc_crate;

#[derive(Debug, PartialEq, Eq)]
pub enum RingError {
    /// More slots than a ring holds.
    TooLong { len: usize },
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RingError::TooLong { len } => {
                write!(f, "the ring needs {len} slots but holds at most {MAX_RING}")
            }
        }
    }
}

impl std::error::Error for RingError {}

/// One slot per backend, in order: the counter walks them in turn.
pub fn round_robin(ids: &[u32]) -> Vec<u32> {
    ids.to_vec()
}

const fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The length of the [`weighted`] sequence for these weights:
/// `sum(weights) / gcd(weights)`, zero weights left out. The config
/// validator checks it against `MAX_RING` before any ring is built.
pub fn weighted_len(weights: &[u32]) -> u64 {
    let g = weights.iter().fold(0u32, |g, &w| gcd(g, w)).max(1);
    weights.iter().map(|&w| u64::from(w / g)).sum()
}

/// Smooth weighted round robin over `(id, weight)`; weight 0 never appears.
/// The sequence has length [`weighted_len`].
pub fn weighted(backends: &[(u32, u32)]) -> Vec<u32> {
    let live: Vec<(u32, i64)> = backends
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|&(id, w)| (id, i64::from(w)))
        .collect();
    let g = live.iter().fold(0u32, |g, &(_, w)| gcd(g, w as u32)).max(1);
    let weights: Vec<i64> = live.iter().map(|&(_, w)| w / i64::from(g)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; live.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..live.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(live[best].0);
    }
    out
}

/// Packs a slot sequence into the map value.
pub fn to_ring(slots: &[u32]) -> Result<Ring, RingError> {
    if slots.len() > MAX_RING {
        return Err(RingError::TooLong { len: slots.len() });
    }
    let mut ring = Ring::EMPTY;
    ring.len = slots.len() as u32;
    ring.ids[..slots.len()].copy_from_slice(slots);
    Ok(ring)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_robin_keeps_order() {
        assert_eq!(round_robin(&[7, 3, 9]), vec![7, 3, 9]);
    }

    #[test]
    fn weighted_is_smooth_and_proportional() {
        let seq = weighted(&[(1, 1), (2, 2), (3, 3)]);
        assert_eq!(seq.len(), 6);
        assert_eq!(seq.iter().filter(|&&x| x == 3).count(), 3);
        // Smooth: the heaviest backend never gets two slots in a row here.
        assert!(seq.windows(2).all(|w| w[0] != w[1]), "{seq:?}");
        // nginx's sequence for 5:1:1 is a a b a c a a — never three in a row.
        let seq = weighted(&[(0, 5), (1, 1), (2, 1)]);
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weight_zero_is_drained_and_gcd_shortens() {
        assert_eq!(weighted(&[(1, 0), (2, 4), (3, 4)]), vec![2, 3]);
        assert!(weighted(&[(1, 0)]).is_empty());
    }

    #[test]
    fn weighted_len_is_the_built_length() {
        for weights in [
            &[1u32, 2, 3][..],
            &[1000, 2000, 0, 500],
            &[7],
            &[0, 0],
            &[4, 6],
        ] {
            let backends: Vec<(u32, u32)> = weights
                .iter()
                .copied()
                .enumerate()
                .map(|(i, w)| (i as u32, w))
                .collect();
            assert_eq!(
                weighted_len(weights),
                weighted(&backends).len() as u64,
                "{weights:?}"
            );
        }
    }

    #[test]
    fn ring_too_long_is_rejected() {
        assert_eq!(
            to_ring(&vec![1; MAX_RING + 1]).err(),
            Some(RingError::TooLong { len: MAX_RING + 1 })
        );
        let r = to_ring(&[4, 5]).expect("fits");
        assert_eq!((r.len, &r.ids[..3]), (2, &[4, 5, 0][..]));
    }

    proptest! {
        #[test]
        fn weighted_counts_match_weights(ws in proptest::collection::vec(0u32..20, 1..12)) {
            let backends: Vec<(u32, u32)> = ws.iter().enumerate().map(|(i, &w)| (i as u32, w)).collect();
            let seq = weighted(&backends);
            let g = ws.iter().fold(0, |g, &w| gcd(g, w)).max(1);
            for (id, w) in backends {
                prop_assert_eq!(seq.iter().filter(|&&x| x == id).count() as u32, w / g);
            }
        }
    }
}
