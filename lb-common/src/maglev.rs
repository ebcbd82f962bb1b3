//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, §3.4): the lookup
//! table the `maglev` and `source-ip` schedulers index with a hash.
//!
//! Each backend walks its own permutation of the table's slots, given by an
//! `offset` and a `skip` hashed from its address and port; backends take
//! turns claiming their next preferred free slot until the table is full.
//! A prime table size makes every permutation visit every slot.
//!
//! What makes it usable for two load balancers side by side:
//! - the table depends only on the backends' addresses, ports and weights,
//!   never on internal ids, config order or the process: backends take their
//!   turns in address order, and the hashes have fixed seeds;
//! - weights: a backend of weight `w` claims `w / max weight` slots per round
//!   (credits carried over), so its share of slots is proportional to `w`.
//!
//! Disruption: rebuilding the table without one of N backends moves about
//! 1/N of the slots (its own) plus a little churn among the others (the
//! paper's "not perfectly minimal"). [`with_standby`] avoids that churn when a
//! backend only leaves rotation (down, drained, disabled): the table is built
//! over every configured backend, and only the slots of those out of rotation
//! are refilled, from a table built over those in rotation. Survivors keep
//! every slot.

use alloc_crate::{vec, vec::Vec};

extern crate alloc as alloc_crate;

/// Largest table: the default size, 65,537 (prime), as Katran and the
/// paper's example use. 4 bytes per slot: 256 KiB per table.
pub const MAGLEV_MAX_SIZE: u32 = crate::MAGLEV_MAX as u32;
/// Default table size (`maglev-table-size`).
pub const MAGLEV_DEFAULT_SIZE: u32 = MAGLEV_MAX_SIZE;

/// One backend as the table sees it: its identity (address and port, host
/// order), the id written into the table, and its weight (0: no slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub addr: u32,
    pub port: u16,
    pub id: u32,
    pub weight: u32,
}

/// splitmix64's finaliser: fixed constants, so every process agrees.
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A backend's (offset, skip) in a table of `size` slots.
fn permutation(m: &Member, size: u32) -> (u64, u64) {
    let identity = (u64::from(m.addr) << 16) | u64::from(m.port);
    let size = u64::from(size);
    let offset = mix64(identity ^ 0x6d61_676c_6576_0001) % size;
    let skip = if size > 1 {
        mix64(identity ^ 0x6d61_676c_6576_0002) % (size - 1) + 1
    } else {
        1
    };
    (offset, skip)
}

/// Is `n` prime? (Table sizes are at most [`MAGLEV_MAX_SIZE`]: trial division.)
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d as u64 * d as u64 <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The Maglev table of `size` slots (prime) over `members`; empty when no
/// member has a weight. Members with the same address and port are one
/// backend to the config validator, so they never occur together.
pub fn table(members: &[Member], size: u32) -> Vec<u32> {
    let mut live: Vec<Member> = members.iter().copied().filter(|m| m.weight > 0).collect();
    if live.is_empty() || size == 0 {
        return Vec::new();
    }
    // Turns in address order: independent of the config's order and ids.
    live.sort_by_key(|m| (m.addr, m.port));
    let perms: Vec<(u64, u64)> = live.iter().map(|m| permutation(m, size)).collect();
    let max_weight = live.iter().map(|m| u64::from(m.weight)).max().unwrap_or(1);
    let mut next = vec![0u64; live.len()];
    let mut credit = vec![0u64; live.len()];
    let mut slots: Vec<Option<u32>> = vec![None; size as usize];
    let mut filled = 0u32;
    let size64 = u64::from(size);
    while filled < size {
        for (i, m) in live.iter().enumerate() {
            credit[i] += u64::from(m.weight);
            while credit[i] >= max_weight && filled < size {
                credit[i] -= max_weight;
                let (offset, skip) = perms[i];
                // A prime size makes the walk visit every slot within `size`
                // steps, so a free one is always found.
                loop {
                    let c = ((offset + next[i] % size64 * skip) % size64) as usize;
                    next[i] += 1;
                    if slots[c].is_none() {
                        slots[c] = Some(m.id);
                        filled += 1;
                        break;
                    }
                }
            }
        }
    }
    slots.into_iter().flatten().collect()
}

/// The table over `configured` backends, with the slots of those not in
/// `serving` (by id) refilled from the table over `serving`: a backend that
/// leaves rotation hands over exactly its own slots, and one that comes back
/// gets exactly those again. Empty when nothing serves.
pub fn with_standby(configured: &[Member], serving: &[Member], size: u32) -> Vec<u32> {
    let fallback = table(serving, size);
    if fallback.is_empty() {
        return fallback;
    }
    let base = table(configured, size);
    if base.is_empty() {
        return fallback;
    }
    let serving_ids: Vec<u32> = serving
        .iter()
        .filter(|m| m.weight > 0)
        .map(|m| m.id)
        .collect();
    base.iter()
        .zip(&fallback)
        .map(|(&owner, &spare)| {
            if serving_ids.contains(&owner) {
                owner
            } else {
                spare
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn member(n: u32, weight: u32) -> Member {
        Member {
            addr: 0xc612_0100 + n,
            port: 80,
            id: n,
            weight,
        }
    }

    fn members(n: u32) -> Vec<Member> {
        (0..n).map(|i| member(i, 1)).collect()
    }

    fn counts(t: &[u32]) -> BTreeMap<u32, u32> {
        let mut c = BTreeMap::new();
        for &id in t {
            *c.entry(id).or_insert(0) += 1;
        }
        c
    }

    /// Slots whose owner differs, and those among them whose old owner is
    /// still in `kept` (a flow that moved between two survivors).
    fn moved(a: &[u32], b: &[u32], kept: &[u32]) -> (usize, usize) {
        let diff: Vec<(u32, u32)> = a
            .iter()
            .zip(b)
            .filter(|(x, y)| x != y)
            .map(|(x, y)| (*x, *y))
            .collect();
        let among = diff.iter().filter(|(x, _)| kept.contains(x)).count();
        (diff.len(), among)
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(MAGLEV_MAX_SIZE));
        assert!(!is_prime(65_536));
        assert!(is_prime(251) && is_prime(4093) && !is_prime(4095));
    }

    #[test]
    fn every_slot_is_filled_and_balanced() {
        for n in [1u32, 2, 3, 7, 10, 33, 100] {
            let t = table(&members(n), MAGLEV_DEFAULT_SIZE);
            assert_eq!(t.len(), MAGLEV_DEFAULT_SIZE as usize);
            let c = counts(&t);
            assert_eq!(c.len(), n as usize, "every backend has slots");
            let (min, max) = (c.values().min().unwrap(), c.values().max().unwrap());
            let imbalance = f64::from(*max) / f64::from(*min);
            println!(
                "maglev balance: {n} backends, 65537 slots: min {min} max {max} max/min {imbalance:.4}"
            );
            assert!(imbalance <= 1.01, "{n} backends: {c:?}");
        }
    }

    #[test]
    fn weights_give_proportional_slots() {
        let ms = [member(0, 1), member(1, 2), member(2, 3), member(3, 0)];
        let t = table(&ms, MAGLEV_DEFAULT_SIZE);
        let c = counts(&t);
        assert_eq!(c.get(&3), None, "weight 0: no slot");
        let unit = f64::from(MAGLEV_DEFAULT_SIZE) / 6.0;
        for (id, w) in [(0u32, 1.0), (1, 2.0), (2, 3.0)] {
            let share = f64::from(c[&id]) / (unit * w);
            println!("maglev weight {w}: {} slots, {share:.4} of its due", c[&id]);
            assert!((0.99..=1.01).contains(&share), "{c:?}");
        }
        assert!(table(&[member(0, 0)], 251).is_empty());
        assert!(table(&[], 251).is_empty());
    }

    #[test]
    fn same_table_whatever_the_order() {
        let ms = members(10);
        let t = table(&ms, 4093);
        let mut rev = ms.clone();
        rev.reverse();
        assert_eq!(table(&rev, 4093), t);
        let mut rotated = ms.clone();
        rotated.rotate_left(3);
        assert_eq!(table(&rotated, 4093), t);
        // Fixed seeds: the same table in every process and on every host.
        // These slots were recorded by a first run; a change here means two
        // load balancers of different versions would disagree.
        assert_eq!(&t[..8], &GOLDEN_4093_FIRST_8);
    }

    const GOLDEN_4093_FIRST_8: [u32; 8] = [0, 2, 5, 0, 7, 4, 0, 8];

    #[test]
    fn removing_one_of_n_moves_about_a_nth() {
        for n in [3u32, 5, 10, 50] {
            let all = members(n);
            let before = table(&all, MAGLEV_DEFAULT_SIZE);
            let gone = n / 2;
            let rest: Vec<Member> = all.iter().copied().filter(|m| m.id != gone).collect();
            let kept: Vec<u32> = rest.iter().map(|m| m.id).collect();
            let size = f64::from(MAGLEV_DEFAULT_SIZE);

            // Rebuilt without it (the backend left the config).
            let after = table(&rest, MAGLEV_DEFAULT_SIZE);
            let (total, among) = moved(&before, &after, &kept);
            println!(
                "maglev disruption, rebuilt: {n} backends, one removed: {:.4} of slots moved \
                 (1/N = {:.4}), {:.4} moved between survivors",
                total as f64 / size,
                1.0 / f64::from(n),
                among as f64 / size
            );
            assert!(total as f64 / size <= 1.0 / f64::from(n) * 1.25 + 0.01);
            assert!(among as f64 / size <= 0.25 / f64::from(n) + 0.01);

            // Out of rotation (down, drained, disabled): only its slots move.
            let standby = with_standby(&all, &rest, MAGLEV_DEFAULT_SIZE);
            let (total, among) = moved(&before, &standby, &kept);
            println!(
                "maglev disruption, out of rotation: {n} backends, one out: {:.4} of slots moved, \
                 {among} between survivors",
                total as f64 / size
            );
            assert_eq!(among, 0);
            assert_eq!(total as u32, counts(&before)[&gone]);
            let c = counts(&standby);
            assert_eq!(c.get(&gone), None);
            let (min, max) = (c.values().min().unwrap(), c.values().max().unwrap());
            assert!(f64::from(*max) / f64::from(*min) <= 1.03, "{c:?}");
            // Back in rotation: the very same table as before.
            assert_eq!(with_standby(&all, &all, MAGLEV_DEFAULT_SIZE), before);
        }
    }

    #[test]
    fn adding_one_moves_only_what_it_takes_and_a_little() {
        let all = members(9);
        let before = table(&all, MAGLEV_DEFAULT_SIZE);
        let mut more = all.clone();
        more.push(member(9, 1));
        let after = table(&more, MAGLEV_DEFAULT_SIZE);
        let to_new = after.iter().filter(|&&id| id == 9).count();
        let (total, _) = moved(&before, &after, &[]);
        assert!((total - to_new) as f64 / f64::from(MAGLEV_DEFAULT_SIZE) < 0.03);
    }

    #[test]
    fn nothing_serving_is_an_empty_table() {
        assert!(with_standby(&members(3), &[], 251).is_empty());
        assert_eq!(with_standby(&[], &members(2), 251), table(&members(2), 251));
    }
}
