//! The eBPF object compiled into the binary by build.rs, and the layout of
//! each map it declares.

use std::collections::BTreeMap;

use aya::maps::{MapInfo, MapType};
use aya_obj::{EbpfSectionKind, generated::bpf_map_type};

/// The ELF object with the `lb` XDP program and its maps; empty when the
/// binary was built without the BPF toolchain. 8-byte aligned, as aya's ELF
/// parser needs (`include_bytes!` only guarantees byte alignment).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// The backends' decapsulator (`lb decap`): the `lb_decap` XDP program and
/// its maps (lb-ebpf's `lb-decap` object); empty like [`EBPF_OBJECT`].
pub static DECAP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap.o"));

#[derive(Debug, thiserror::Error)]
#[error(
    "this lb binary was built without its eBPF object (the BPF toolchain was missing); \
     build it with `cargo xtask build`, which installs the toolchain"
)]
pub struct MissingObject;

/// The object, or a clear error when this build has none.
pub fn ebpf_object() -> Result<&'static [u8], MissingObject> {
    if EBPF_OBJECT.is_empty() {
        Err(MissingObject)
    } else {
        Ok(EBPF_OBJECT)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("reading the eBPF object's maps: {0}")]
pub struct BadObject(#[from] aya_obj::ParseError);

/// What fixes a map when it is created: a pinned map keeps it for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLayout {
    /// `bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapLayout {
    /// A map the kernel holds (a pinned one's, `MapInfo::from_pin`).
    pub fn of(info: &MapInfo) -> Self {
        MapLayout {
            // A type this aya does not know can match nothing of ours.
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }
    }

    /// The layout as aya's loader creates it from this definition: a ring
    /// buffer's size rounded up to a power-of-two number of pages and its
    /// value size 0 (as `EbpfLoader::load` does).
    pub fn as_loaded(self) -> Self {
        if self.map_type != bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32 {
            return self;
        }
        MapLayout {
            value_size: 0,
            max_entries: ring_buffer_bytes(self.max_entries, page_size()),
            ..self
        }
    }
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = bpf_map_type::try_from(self.map_type)
            .ok()
            .and_then(|t| MapType::try_from(t).ok());
        match kind {
            Some(kind) => write!(f, "a {kind:?}")?,
            None => write!(f, "a map of type {}", self.map_type)?,
        }
        write!(
            f,
            " of {}-byte entries ({}-byte keys, {} entries, flags {:#x})",
            self.value_size, self.key_size, self.max_entries, self.flags
        )
    }
}

/// Every map the object declares (not its data sections), by name, as its
/// definition says (before the loader's adjustments: [`MapLayout::as_loaded`]).
pub fn map_layouts(object: &[u8]) -> Result<BTreeMap<String, MapLayout>, BadObject> {
    let object = aya_obj::Object::parse(object)?;
    Ok(object
        .maps
        .iter()
        .filter(|(_, m)| {
            matches!(
                m.section_kind(),
                EbpfSectionKind::Maps | EbpfSectionKind::BtfMaps
            )
        })
        .map(|(name, m)| {
            let layout = MapLayout {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
                flags: m.map_flags(),
            };
            (name.clone(), layout)
        })
        .collect())
}

/// A ring buffer of `bytes` as the kernel takes it: a power-of-two number
/// of pages.
fn ring_buffer_bytes(bytes: u32, page: u32) -> u32 {
    if bytes == 0 {
        return 0;
    }
    bytes
        .div_ceil(page)
        .next_power_of_two()
        .saturating_mul(page)
}

fn page_size() -> u32 {
    // SAFETY: sysconf reads a constant of the system.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(n).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_ring_buffer_is_a_power_of_two_number_of_pages() {
        for (bytes, pages) in [(4096, 1), (4097, 2), (3 * 4096, 4), (256 * 1024, 64)] {
            assert_eq!(
                super::ring_buffer_bytes(bytes, 4096),
                pages * 4096,
                "{bytes}"
            );
        }
    }

    #[test]
    fn the_embedded_object_is_8_byte_aligned() {
        assert_eq!(super::EBPF_OBJECT.as_ptr() as usize % 8, 0);
    }
}
