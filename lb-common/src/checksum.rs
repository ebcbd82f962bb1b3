//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! All values are "raw": 16/32-bit words exactly as they sit in packet memory,
//! read with native endianness. One's-complement sums are byte-order
//! independent as long as every word is treated the same way, so the packet
//! path never has to byte-swap to update a checksum.

/// Folds a 32-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` for one 16-bit word.
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + (new as u32);
    !fold(sum)
}

/// [`replace16`] for a 32-bit field (an IPv4 address): both halves at once.
#[inline(always)]
pub const fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check as u32)
        + (!(old as u16) as u32)
        + (!((old >> 16) as u16) as u32)
        + (new as u16 as u32)
        + ((new >> 16) as u16 as u32);
    !fold(sum)
}

/// Full checksum of a byte slice (RFC 1071), returned as a raw word ready to
/// store in packet memory. Used by tests and by userspace frame builders.
pub fn compute(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_ne_bytes([c[0], c[1]]) as u32;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_ne_bytes([*last, 0]) as u32;
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 0x0000 and 0xffff are the same value in one's complement.
    fn same(a: u16, b: u16) -> bool {
        a == b || (a, b) == (0, 0xffff) || (a, b) == (0xffff, 0)
    }

    proptest! {
        #[test]
        fn replace16_matches_recompute(mut words in proptest::collection::vec(any::<u16>(), 1..40), idx in any::<prop::sample::Index>(), new in any::<u16>()) {
            let bytes = |w: &[u16]| w.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
            let check = compute(&bytes(&words), 0);
            let i = idx.index(words.len());
            let old = words[i];
            words[i] = new;
            let full = compute(&bytes(&words), 0);
            let inc = replace16(check, old, new);
            prop_assert!(same(inc, full), "inc {inc:#x} full {full:#x}");
        }

        #[test]
        fn replace32_matches_two_replace16(check in any::<u16>(), old in any::<u32>(), new in any::<u32>()) {
            let a = replace16(check, old as u16, new as u16);
            let b = replace16(a, (old >> 16) as u16, (new >> 16) as u16);
            let c = replace32(check, old, new);
            prop_assert!(same(c, b), "{c:#x} vs {b:#x}");
        }
    }

    #[test]
    fn known_ipv4_header_checksum() {
        // Example header from RFC 1071 discussions (checksum field zeroed).
        let hdr = [
            0x45u8, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(compute(&hdr, 0).to_ne_bytes(), [0xb8, 0x61]);
    }
}
