//! The agent's view of `HALF_OPEN`, the half-open table (slots in buckets
//! of two, `lb_common::HalfOpenSlot`): the
//! array is created mappable (`BPF_F_MMAPABLE`), so the agent maps it and
//! reads and writes slots as memory, under the same per-slot sequence lock
//! as the data plane (`lb_common::HalfOpenSlot`). A whole-table read is a
//! memory scan instead of a syscall per entry, and a slot the agent clears
//! (a removed backend's flows, the sweep) can never be torn by a packet
//! writing it at the same moment.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering, fence},
};

use aya::maps::MapData;
use lb_common::{
    Flow, FlowConf, FlowKey, HalfOpenSlot,
    flow::{HALF_OPEN_WAYS, slot_index},
};

/// Attempts at a slot's lock before giving up on it.
const LOCK_TRIES: u32 = 10_000;

/// `HALF_OPEN` mapped into this process.
pub struct HalfOpenTable {
    slots: NonNull<HalfOpenSlot>,
    count: usize,
    bytes: usize,
}

// SAFETY: the mapping is shared memory that every access goes through the
// slots' atomic sequence locks or volatile copies; nothing is cached here.
unsafe impl Send for HalfOpenTable {}
// SAFETY: as above.
unsafe impl Sync for HalfOpenTable {}

impl HalfOpenTable {
    /// Maps the table behind `map` (an array of `HalfOpenSlot`, mappable).
    pub fn map(map: &MapData) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        let count = info.max_entries() as usize;
        if info.value_size() as usize != size_of::<HalfOpenSlot>() || count == 0 {
            return Err(io::Error::other(format!(
                "HALF_OPEN holds {} entries of {} bytes, not slots of {}",
                count,
                info.value_size(),
                size_of::<HalfOpenSlot>()
            )));
        }
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (count * size_of::<HalfOpenSlot>()).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a shared read-write mapping of the map's value area, which
        // is `bytes` long (the kernel rounds an mmapable array to pages); the
        // mapping keeps the map alive after the fd closes.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let slots = NonNull::new(ptr.cast::<HalfOpenSlot>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            slots,
            count,
            bytes,
        })
    }

    /// Slots in the table.
    pub fn slots(&self) -> u32 {
        u32::try_from(self.count).unwrap_or(u32::MAX)
    }

    fn slot(&self, i: usize) -> *mut HalfOpenSlot {
        debug_assert!(i < self.count);
        // SAFETY: in bounds of the mapping.
        unsafe { self.slots.as_ptr().add(i) }
    }

    fn seq(&self, i: usize) -> &AtomicU32 {
        // SAFETY: `seq` is the slot's first field, 4-byte aligned, and only
        // ever accessed atomically (here and by the data plane).
        unsafe { AtomicU32::from_ptr(&raw mut (*self.slot(i)).seq) }
    }

    /// Slot `i`'s key and entry, copied under its sequence lock; `None` if
    /// it is empty or a writer holds it.
    pub fn read(&self, i: usize) -> Option<(FlowKey, Flow)> {
        if i >= self.count {
            return None;
        }
        let seq = self.seq(i).load(Ordering::Acquire);
        if seq & 1 != 0 {
            return None;
        }
        // SAFETY: in bounds; volatile, as the data plane may write it.
        let (key, flow) = unsafe {
            let slot = self.slot(i);
            (
                std::ptr::read_volatile(&raw const (*slot).key),
                Flow::from(&std::ptr::read_volatile(&raw const (*slot).flow)),
            )
        };
        fence(Ordering::Acquire);
        if self.seq(i).load(Ordering::Relaxed) != seq || key == FlowKey::EMPTY {
            return None;
        }
        Some((key, flow))
    }

    /// Every occupied slot's key and entry (expired ones included).
    pub fn entries(&self) -> Vec<(FlowKey, Flow)> {
        (0..self.count).filter_map(|i| self.read(i)).collect()
    }

    /// The slots of the bucket of the flow whose forward (client → VIP)
    /// key is `key` (`conf`: the data plane's `FLOW_CONF`, for the seed).
    fn bucket(&self, key: &FlowKey, conf: &FlowConf) -> std::ops::Range<usize> {
        let first = slot_index(
            key.saddr,
            key.sport,
            key.protocol,
            conf.half_open_seed,
            self.slots(),
        ) as usize;
        first..first + HALF_OPEN_WAYS as usize
    }

    /// The flow whose forward (client → VIP) key is `key`, if its slot
    /// holds it. (Its replies have no entry of their own: they find the
    /// flow by the client's address and port.)
    pub fn get(&self, key: &FlowKey, conf: &FlowConf) -> Option<Flow> {
        self.bucket(key, conf)
            .filter_map(|i| self.read(i))
            .find(|(k, _)| k == key)
            .map(|(_, f)| f)
    }

    /// Empties slot `i` if `gone` says so of what it holds, under the lock.
    /// False if it was kept or empty (or the lock stayed held, which a
    /// packet never does for long).
    pub fn clear_if(&self, i: usize, gone: impl Fn(&FlowKey, &Flow) -> bool) -> bool {
        if i >= self.count {
            return false;
        }
        let seq = self.seq(i);
        // A packet holds a slot for a few hundred nanoseconds at most.
        let mut tries = 0;
        loop {
            let before = seq.load(Ordering::Acquire);
            if before & 1 == 0
                && seq
                    .compare_exchange(before, before + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break;
            }
            tries += 1;
            if tries == LOCK_TRIES {
                return false;
            }
            std::hint::spin_loop();
        }
        // SAFETY: locked: the slot is ours until the release below.
        let cleared = unsafe {
            let slot = self.slot(i);
            let key = std::ptr::read_volatile(&raw const (*slot).key);
            let flow = Flow::from(&std::ptr::read_volatile(&raw const (*slot).flow));
            let clear = key != FlowKey::EMPTY && gone(&key, &flow);
            if clear {
                std::ptr::write_volatile(&raw mut (*slot).key, FlowKey::EMPTY);
            }
            clear
        };
        seq.fetch_add(1, Ordering::Release);
        cleared
    }

    /// Empties `key`'s slot if it holds `key`.
    pub fn remove(&self, key: &FlowKey, conf: &FlowConf) -> bool {
        let mut removed = false;
        for i in self.bucket(key, conf) {
            removed |= self.clear_if(i, |k, _| k == key);
        }
        removed
    }

    /// Empties every slot whose entry `gone` picks; how many.
    pub fn clear_all(&self, gone: impl Fn(&FlowKey, &Flow) -> bool) -> u64 {
        (0..self.count).filter(|&i| self.clear_if(i, &gone)).count() as u64
    }
}

impl Drop for HalfOpenTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.slots.as_ptr().cast(), self.bytes) };
    }
}
