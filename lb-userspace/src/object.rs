//! The eBPF object compiled into the binary by build.rs.

/// The ELF object with the `lb` XDP program and its maps; empty when the
/// binary was built without the BPF toolchain. 8-byte aligned, as aya's ELF
/// parser needs (`include_bytes!` only guarantees byte alignment).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

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

#[cfg(test)]
mod tests {
    #[test]
    fn the_embedded_object_is_8_byte_aligned() {
        assert_eq!(super::EBPF_OBJECT.as_ptr() as usize % 8, 0);
    }
}
