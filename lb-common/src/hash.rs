//! Flow hash: spreads flows over a ring for hash-based schedulers.
//!
//! A murmur3-style finaliser over the 5-tuple: a handful of multiplies and
//! shifts, good avalanche, no tables — cheap enough for the packet path.

use crate::FlowKey;

#[inline(always)]
const fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of a flow's 5-tuple (raw network-order fields).
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    seeded_flow_hash(key, 0x9e37_79b9)
}

/// [`flow_hash`] with another seed (the half-open table's is random).
#[inline(always)]
pub const fn seeded_flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let mut h = mix(key.saddr ^ seed);
    h = mix(h ^ key.daddr);
    h = mix(h ^ ((key.sport as u32) << 16 | key.dport as u32));
    mix(h ^ key.protocol as u32)
}

/// Hash of the client address alone (`source-ip`): every connection from
/// one client gets the same hash, so the same Maglev slot.
#[inline(always)]
pub const fn source_hash(saddr: u32) -> u32 {
    mix(mix(saddr ^ 0x9e37_79b9) ^ 0x85eb_ca6b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(saddr: u32, sport: u16) -> FlowKey {
        FlowKey {
            saddr,
            daddr: 0x0a00_00c6,
            sport,
            dport: 80u16.to_be(),
            protocol: 6,
            _pad0: 0,
            _pad1: 0,
        }
    }

    #[test]
    fn same_flow_same_hash_and_fields_matter() {
        let a = key(1, 1000);
        assert_eq!(flow_hash(&a), flow_hash(&a));
        assert_ne!(flow_hash(&a), flow_hash(&key(2, 1000)));
        assert_ne!(flow_hash(&a), flow_hash(&key(1, 1001)));
        let mut udp = a;
        udp.protocol = 17;
        assert_ne!(flow_hash(&a), flow_hash(&udp));
    }

    #[test]
    fn source_hash_ignores_everything_but_the_client() {
        assert_eq!(source_hash(1), source_hash(1));
        assert_ne!(source_hash(1), source_hash(2));
        let mut buckets = [0u32; 3];
        for host in 0..60_000u32 {
            buckets[(source_hash((0xc612_0000 + host).to_be()) % 3) as usize] += 1;
        }
        for b in buckets {
            assert!((19_400..=20_600).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn spreads_evenly_over_buckets() {
        // 60 000 client ports over 3 buckets: each within 3% of a third.
        let mut buckets = [0u32; 3];
        for port in 1024..61024u16 {
            buckets[(flow_hash(&key(0xc612_0002, port.to_be())) % 3) as usize] += 1;
        }
        for b in buckets {
            assert!((19_400..=20_600).contains(&b), "{buckets:?}");
        }
    }
}
