//! Flow hash: spreads flows over a ring for hash-based schedulers.
//!
//! A murmur3-style finaliser over the 5-tuple: a handful of multiplies and
//! shifts, good avalanche, no tables — cheap enough for the packet path.

use crate::{FlowKey, FlowKey6, ipv6::Addr6};

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

/// [`flow_hash`] of an IPv6 flow.
#[inline(always)]
pub const fn flow_hash6(key: &FlowKey6) -> u32 {
    seeded_flow_hash6(key, 0x9e37_79b9)
}

/// [`seeded_flow_hash`] of an IPv6 flow: the eight address words, then
/// the ports and the protocol, as IPv4's two.
#[inline(always)]
pub const fn seeded_flow_hash6(key: &FlowKey6, seed: u32) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < 4 {
        h = mix(h ^ key.saddr[i]);
        h = mix(h ^ key.daddr[i]);
        i += 1;
    }
    h = mix(h ^ ((key.sport as u32) << 16 | key.dport as u32));
    mix(h ^ key.protocol as u32)
}

/// [`source_hash`] of an IPv6 client's first `prefix` bits (`source-ip`
/// on a /128, or on a /64 since IPv6 clients rotate their interface
/// identifiers, RFC 8981): every address of the prefix hashes alike.
#[inline(always)]
pub const fn source_hash6(saddr: &Addr6, prefix: u8) -> u32 {
    let masked = mask6(saddr, prefix);
    let mut h = 0x9e37_79b9;
    let mut i = 0;
    while i < 4 {
        h = mix(h ^ masked[i]);
        i += 1;
    }
    mix(h ^ 0x85eb_ca6b)
}

/// `addr` with all but its first `prefix` bits (0..=128) cleared, words
/// raw network order.
#[inline(always)]
pub const fn mask6(addr: &Addr6, prefix: u8) -> Addr6 {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let start = (i * 32) as u32;
        let keep = if prefix as u32 >= start + 32 {
            u32::MAX
        } else if (prefix as u32) <= start {
            0
        } else {
            // The first (prefix - start) bits of the word, in network order.
            (u32::MAX << (32 - (prefix as u32 - start))).to_be()
        };
        out[i] = addr[i] & keep;
        i += 1;
    }
    out
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

    fn key6(last: u32, sport: u16) -> FlowKey6 {
        FlowKey6 {
            saddr: [0x0db8_0120u32.to_be(), 0, 0, last.to_be()],
            daddr: [0x0db8_0120u32.to_be(), 0, 0, 0x10u32.to_be()],
            sport,
            dport: 80u16.to_be(),
            protocol: 6,
            ..FlowKey6::EMPTY
        }
    }

    #[test]
    fn v6_flow_hash_spreads_and_every_word_matters() {
        let a = key6(2, 1000);
        assert_eq!(flow_hash6(&a), flow_hash6(&a));
        for word in 0..4 {
            let mut b = a;
            b.saddr[word] ^= 1u32.to_be();
            assert_ne!(flow_hash6(&a), flow_hash6(&b), "saddr word {word}");
            let mut c = a;
            c.daddr[word] ^= 1u32.to_be();
            assert_ne!(flow_hash6(&a), flow_hash6(&c), "daddr word {word}");
        }
        let mut buckets = [0u32; 3];
        for port in 1024..61024u16 {
            buckets[(flow_hash6(&key6(2, port.to_be())) % 3) as usize] += 1;
        }
        for b in buckets {
            assert!((19_400..=20_600).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn v6_source_hash_keys_on_the_prefix() {
        let addr =
            |s: &str| crate::ipv6::addr_of(s.parse::<std::net::Ipv6Addr>().unwrap().octets());
        let a = addr("2001:db8:1:2:aaaa:bbbb:cccc:dddd");
        let same64 = addr("2001:db8:1:2::1");
        let other64 = addr("2001:db8:1:3:aaaa:bbbb:cccc:dddd");
        assert_eq!(source_hash6(&a, 64), source_hash6(&same64, 64));
        assert_ne!(source_hash6(&a, 64), source_hash6(&other64, 64));
        assert_ne!(source_hash6(&a, 128), source_hash6(&same64, 128));
        assert_eq!(source_hash6(&a, 48), source_hash6(&other64, 48));
        assert_eq!(source_hash6(&a, 0), source_hash6(&other64, 0));
        // A prefix that ends inside a word: 2 and 3 differ in bit 63 only.
        assert_eq!(source_hash6(&a, 63), source_hash6(&other64, 63));
        assert_ne!(source_hash6(&a, 64), source_hash6(&other64, 64));
        assert_eq!(mask6(&a, 128), a);
        assert_eq!(mask6(&a, 36), addr("2001:db8::"));
        assert_eq!(mask6(&a, 40), addr("2001:db8::"));
        assert_eq!(mask6(&addr("2001:db8:ff00::"), 40), addr("2001:db8:ff00::"));
        assert_eq!(mask6(&addr("2001:db8:ff00::"), 36), addr("2001:db8:f000::"));
    }
}
