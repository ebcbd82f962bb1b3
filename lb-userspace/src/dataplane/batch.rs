//! Whole-table reads with `BPF_MAP_LOOKUP_BATCH`: one syscall per few
//! thousand entries instead of two per entry (`get_next_key` + lookup),
//! which is what a walk of a 262k-entry flow table costs otherwise. aya 0.14
//! has no batch operations, so this is the one raw `bpf(2)` call of the
//! agent; it reads into typed buffers and nothing else.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::MapData;

/// `BPF_MAP_LOOKUP_BATCH`, from the kernel's `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries per call. A hash map's batch stops at a bucket boundary and
/// fails with ENOSPC if one bucket holds more than this: no bucket does.
const CHUNK: usize = 4096;

/// `union bpf_attr`'s batch member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of a hash or LRU hash map (a consistent-enough snapshot:
/// entries added or removed meanwhile may or may not appear).
pub fn entries<K: aya::Pod, V: aya::Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    // The batch token of a hash map is a bucket index (u32).
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut keys: Vec<K> = Vec::with_capacity(CHUNK);
        let mut values: Vec<V> = Vec::with_capacity(CHUNK);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw mut token_in as u64 },
            out_batch: &raw mut token_out as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of CHUNK keys and values of the
        // map's types (the caller's K and V are the map's Pod layouts) and
        // at two u32 tokens; the kernel writes at most `count` of each.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        let n = (attr.count as usize).min(CHUNK);
        // SAFETY: the kernel filled the first `count` keys and values.
        unsafe {
            keys.set_len(n);
            values.set_len(n);
        }
        out.extend(keys.into_iter().zip(values));
        match err {
            None => {}
            // ENOENT: the last chunk (possibly empty).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}
