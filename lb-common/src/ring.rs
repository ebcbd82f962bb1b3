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

/// Slots the largest least-connections share gets (fewer when many
/// backends would overflow a ring): shares are quantised to 1/100 of it.
pub const LEAST_CONNECTIONS_SCALE: u64 = 100;

/// Least connections as a ring the counter walks, rebuilt by the agent from
/// each backend's active flows: `(id, weight, active)` gets slots in
/// proportion to `weight / (active + 1)`, at least one for a weight > 0, in
/// the smooth weighted order. The largest share gets
/// [`LEAST_CONNECTIONS_SCALE`] slots (fewer if the ring would overflow).
pub fn least_connections(backends: &[(u32, u32, u64)]) -> Vec<u32> {
    let live: Vec<(u32, u32, u64)> = backends.iter().copied().filter(|b| b.1 > 0).collect();
    if live.is_empty() {
        return Vec::new();
    }
    let scale = LEAST_CONNECTIONS_SCALE
        .min((MAX_RING / live.len()) as u64)
        .max(1);
    // share_i / max share, compared as fractions w / (a + 1) in u128.
    let best = live
        .iter()
        .map(|&(_, w, a)| (u128::from(w), u128::from(a) + 1))
        .fold((0u128, 1u128), |(bw, ba), (w, a)| {
            if w * ba > bw * a { (w, a) } else { (bw, ba) }
        });
    let slots: Vec<(u32, u32)> = live
        .iter()
        .map(|&(id, w, a)| {
            // round(scale * (w / (a+1)) / (bw / ba))
            let num = u128::from(scale) * u128::from(w) * best.1;
            let den = (u128::from(a) + 1) * best.0;
            let n = ((2 * num + den) / (2 * den)).max(1);
            (id, n as u32)
        })
        .collect();
    weighted(&slots)
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

    fn share(ring: &[u32], id: u32) -> f64 {
        ring.iter().filter(|&&x| x == id).count() as f64 / ring.len() as f64
    }

    #[test]
    fn least_connections_without_load_follows_weights() {
        let ring = least_connections(&[(0, 1, 0), (1, 1, 0), (2, 2, 0)]);
        assert_eq!(ring.len(), 4, "{ring:?}");
        assert_eq!(share(&ring, 2), 0.5);
        assert!(least_connections(&[(0, 0, 3)]).is_empty());
    }

    #[test]
    fn least_connections_gives_the_loaded_backend_proportionally_less() {
        // One backend holds 9 flows, two hold none: it gets 1/10 of the
        // others' share (1/21 of new flows), within the quantisation.
        let ring = least_connections(&[(0, 1, 9), (1, 1, 0), (2, 1, 0)]);
        let expected = [0.1 / 2.1, 1.0 / 2.1, 1.0 / 2.1];
        for (id, want) in expected.iter().enumerate() {
            let got = share(&ring, id as u32);
            println!("least-connections share of backend {id}: {got:.4} (exact {want:.4})");
            assert!((got - want).abs() < 0.01, "{ring:?}");
        }
        // Weighted: weight 3 with 2 flows (3/3 = 1) ties weight 1 with none.
        let ring = least_connections(&[(0, 3, 2), (1, 1, 0)]);
        assert_eq!(share(&ring, 0), 0.5);
        // Even a heavily loaded backend keeps one slot: it is not starved.
        let ring = least_connections(&[(0, 1, 100_000), (1, 1, 0)]);
        assert_eq!(ring.iter().filter(|&&x| x == 0).count(), 1);
    }

    #[test]
    fn least_connections_fits_a_ring_for_many_backends() {
        let many: Vec<(u32, u32, u64)> = (0..4096)
            .map(|i| (i, 1 + i % 7, u64::from(i % 13)))
            .collect();
        let ring = least_connections(&many);
        assert!(ring.len() <= MAX_RING, "{}", ring.len());
        let few: Vec<(u32, u32, u64)> = (0..50).map(|i| (i, 1000, u64::from(i))).collect();
        assert!(least_connections(&few).len() <= MAX_RING);
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
