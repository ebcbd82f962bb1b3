//! Flow hash: spreads flows over a ring for hash-based schedulers.
//!
//! A murmur3-style finaliser over the 5-tuple: a handful of multiplies and
//! shifts, good avalanche, no tables — cheap enough for the packet path.

use crate::{FlowKey, FlowKey6, ipv6::Addr6};

/// Spreads a word (murmur3's 32-bit finaliser); full NAT's allocation
/// hash uses it too.
#[inline(always)]
pub(crate) const fn mix(mut h: u32) -> u32 {
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

/// The flow tables' keyed hash of a client — address, port and protocol,
/// what both directions of a flow carry — that places its bucket
/// ([`crate::flow::bucket_hash`]). The three fields are one 64-bit word,
/// masked with a key spread from the tables' secret `seed` (a multiply
/// that does not wait on the packet), then murmur3's 64-bit finaliser: two
/// dependent multiplies, where four 32-bit [`seeded_flow_hash`] rounds
/// over a key with two zero fields took eight (20 % of an established
/// packet in the profile). The high half is the hash: the finaliser mixes
/// every input and key bit into it. Without the seed a flooder cannot aim
/// at a bucket, as before (a 32-bit seed either way).
#[inline(always)]
pub const fn client_hash(client: u32, port: u16, protocol: u8, seed: u32) -> u32 {
    let key = (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut x = ((client as u64) << 32 | (port as u64) << 8 | protocol as u64) ^ key;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    (x >> 32) as u32
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

    /// How evenly `n` clients land in `buckets` buckets (the tables' own
    /// scaling, `first_way`): the largest and smallest count.
    fn spread(buckets: u32, clients: impl Iterator<Item = (u32, u16, u8)>) -> (u32, u32) {
        let mut hits = vec![0u32; buckets as usize];
        for (addr, port, proto) in clients {
            let h = client_hash(addr, port, proto, 0x5eed_cafe);
            hits[(crate::flow_table::first_way(h, buckets, 1)) as usize] += 1;
        }
        (*hits.iter().min().unwrap(), *hits.iter().max().unwrap())
    }

    #[test]
    fn the_client_hash_spreads_ports_addresses_and_both_evenly() {
        // 200 a bucket on average (binomial σ ≈ 14): a fair hash keeps all
        // 1000 buckets within ±35 % of it, for one client's ports, for one
        // port's clients (consecutive, as a subnet), and for a flood's mix.
        let one_client = (0..200_000u32).map(|n| (0xc612_0064, (n % 65_536) as u16, 6u8));
        let one_port = (0..200_000u32).map(|n| ((0x0a00_0000 + n).to_be(), 443u16.to_be(), 6u8));
        let mixed =
            (0..200_000u32).map(|n| (0xc612_8001 + (n >> 10), (1024 + n % 1024) as u16, 17u8));
        for (name, (min, max)) in [
            (
                "ports",
                spread(
                    1000,
                    one_client
                        .take(65_536)
                        .chain((0..134_464u32).map(|n| (0xc612_0065, n as u16, 6u8))),
                ),
            ),
            ("addresses", spread(1000, one_port)),
            ("mixed", spread(1000, mixed)),
        ] {
            assert!(
                (130..=270).contains(&min) && (130..=270).contains(&max),
                "{name}: {min}..{max}"
            );
        }
    }

    #[test]
    fn every_input_and_seed_bit_flips_about_half_the_client_hash() {
        // Avalanche: flipping one bit of the address, port, protocol or
        // seed flips each output bit about half the time.
        let base = |n: u32| {
            (
                n.wrapping_mul(0x9e37_79b9),
                (n >> 7) as u16,
                (n % 3) as u8 * 11 + 6,
                n ^ 0xabcd,
            )
        };
        type Input = (u32, u16, u8, u32);
        let flip = |field: usize, (a, p, r, s): Input, b: u32| -> Input {
            match field {
                0 => (a ^ (1 << b), p, r, s),
                1 => (a, p ^ (1 << (b % 16)), r, s),
                2 => (a, p, r ^ (1 << (b % 8)), s),
                _ => (a, p, r, s ^ (1 << b)),
            }
        };
        for field in 0..4 {
            for bit in 0..32 {
                let mut changed = 0u32;
                let trials = 2000u32;
                for n in 0..trials {
                    let (a, p, r, s) = base(n);
                    let (a2, p2, r2, s2) = flip(field, base(n), bit);
                    changed += (client_hash(a, p, r, s) ^ client_hash(a2, p2, r2, s2)).count_ones();
                }
                let share = f64::from(changed) / f64::from(trials * 32);
                assert!(
                    (0.45..=0.55).contains(&share),
                    "field {field} bit {bit}: {share}"
                );
            }
        }
    }

    #[test]
    fn the_client_hash_is_keyed_flows_that_share_a_bucket_under_one_seed_do_not_under_another() {
        // An attacker who found clients sharing a bucket (as with a known
        // seed) has, under the tables' own seed, clients at random.
        let bucket = |seed, n: u32| {
            crate::flow_table::first_way(client_hash(0xc612_0001 + n, 80, 6, seed), 1 << 16, 1)
        };
        let target = bucket(1, 0);
        let aimed: Vec<u32> = (0..5_000_000u32)
            .filter(|&n| bucket(1, n) == target)
            .collect();
        assert!(aimed.len() >= 40, "{}", aimed.len());
        let still = aimed
            .iter()
            .filter(|&&n| bucket(2, n) == bucket(2, aimed[0]))
            .count();
        // By chance: one in 65 536 (aimed[0] itself is the one).
        assert!(still <= 2, "{still} of {}", aimed.len());
    }
}
