//! The agent's view of the mappable slot tables: `HALF_OPEN`, the
//! half-open table (one-line slots in buckets of two,
//! `lb_common::HalfOpenSlot`), and `ESTABLISHED`, the established table
//! (two-line slots, `lb_common::EstablishedSlot`, `super::established`).
//! Both arrays are created mappable (`BPF_F_MMAPABLE`), so the agent maps
//! them and reads and writes slots as memory, under the same per-slot
//! sequence lock as the data plane ([`LockedSlot`]). A whole-table read is
//! a memory scan instead of a syscall per entry, and a slot the agent
//! clears (a removed backend's flows, the sweep) can never be torn by a
//! packet writing it at the same moment.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering, fence},
};

use aya::maps::MapData;
use lb_common::{
    EstablishedSlot, Flow, FlowConf, FlowKey, HalfOpenSlot,
    flow::{HALF_OPEN_WAYS, slot_index},
};

/// A slot of a mappable flow table: a sequence lock (`seq`, odd while a
/// writer holds it) and a forward key (all zero: empty), which is all the
/// generic reader needs.
pub trait LockedSlot: Copy {
    /// The map's name, for errors.
    const MAP: &'static str;
    /// The slot's sequence lock.
    fn seq(slot: *mut Self) -> *mut u32;
    /// The slot's forward key.
    fn key(slot: *mut Self) -> *mut FlowKey;
}

/// The address of the field at `offset` in `*slot` (no access).
fn field<S, F>(slot: *mut S, offset: usize) -> *mut F {
    slot.cast::<u8>().wrapping_add(offset).cast()
}

impl LockedSlot for HalfOpenSlot {
    const MAP: &'static str = "HALF_OPEN";
    fn seq(slot: *mut Self) -> *mut u32 {
        field(slot, std::mem::offset_of!(Self, seq))
    }
    fn key(slot: *mut Self) -> *mut FlowKey {
        field(slot, std::mem::offset_of!(Self, key))
    }
}

impl LockedSlot for EstablishedSlot {
    const MAP: &'static str = "ESTABLISHED";
    fn seq(slot: *mut Self) -> *mut u32 {
        field(slot, std::mem::offset_of!(Self, seq))
    }
    fn key(slot: *mut Self) -> *mut FlowKey {
        field(slot, std::mem::offset_of!(Self, key))
    }
}

/// Attempts at a slot's lock before giving up on it.
const LOCK_TRIES: u32 = 10_000;

/// Bytes of a table mapped at a time. The kernel maps an mmapable array's
/// pages eagerly, so a whole mapping of `ESTABLISHED` (64 MiB at the
/// default size) would count in the agent's resident memory for as long as
/// it is held, once per handle: a window keeps that at 1 MiB per handle,
/// and a scan moves it along (64 remaps for 64 MiB).
const WINDOW_BYTES: usize = 1 << 20;

/// A slot table, mapped into this process a window at a time.
pub struct SlotTable<S: LockedSlot> {
    fd: std::os::fd::OwnedFd,
    count: usize,
    /// The table's mappable length (slots rounded up to pages).
    bytes: usize,
    page: usize,
    window: std::sync::Mutex<Option<Window>>,
    _slot: std::marker::PhantomData<S>,
}

/// One mapped range of a table: `len` bytes from byte `start`.
struct Window {
    ptr: NonNull<u8>,
    start: usize,
    len: usize,
}

// SAFETY: a shared mapping's address; every access to it goes through the
// slots' atomic sequence locks or volatile copies.
unsafe impl Send for Window {}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `SlotTable::at`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A copy of the slot at `slot` made between two equal, even reads of its
/// sequence (`None`: empty, or a writer held or took it).
///
/// # Safety
/// `slot` is a mapped slot of a table.
unsafe fn copy_of<S: LockedSlot>(slot: *mut S) -> Option<S> {
    // SAFETY: `seq` is 4-byte aligned in the slot and only ever accessed
    // atomically (here and by the data plane); the copy is volatile, as
    // the data plane may write it.
    unsafe {
        let seq = AtomicU32::from_ptr(S::seq(slot));
        let before = seq.load(Ordering::Acquire);
        if before & 1 != 0 {
            return None;
        }
        let key = std::ptr::read_volatile(S::key(slot));
        let copy = std::ptr::read_volatile(slot);
        fence(Ordering::Acquire);
        if seq.load(Ordering::Relaxed) != before || key == FlowKey::EMPTY {
            return None;
        }
        Some(copy)
    }
}

/// `HALF_OPEN` mapped into this process.
pub type HalfOpenTable = SlotTable<HalfOpenSlot>;

impl<S: LockedSlot> SlotTable<S> {
    /// A handle on the table behind `map` (an array of `S`, mappable).
    pub fn map(map: &MapData) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        let count = info.max_entries() as usize;
        if info.value_size() as usize != size_of::<S>() || count == 0 {
            return Err(io::Error::other(format!(
                "{} holds {} entries of {} bytes, not slots of {}",
                S::MAP,
                count,
                info.value_size(),
                size_of::<S>()
            )));
        }
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        if !page.is_multiple_of(size_of::<S>()) {
            return Err(io::Error::other(format!(
                "{}: {}-byte slots do not tile {page}-byte pages",
                S::MAP,
                size_of::<S>()
            )));
        }
        let bytes = (count * size_of::<S>()).div_ceil(page) * page;
        let fd = map.fd().as_fd().try_clone_to_owned()?;
        Ok(Self {
            fd,
            count,
            bytes,
            page,
            window: std::sync::Mutex::new(None),
            _slot: std::marker::PhantomData,
        })
    }

    /// Slots in the table.
    pub fn slots(&self) -> u32 {
        u32::try_from(self.count).unwrap_or(u32::MAX)
    }

    /// `f` of slot `i`'s address, mapped for the call (the window holding
    /// it, mapped anew if the last one did not). `None` if `i` is out of
    /// range or the mapping failed.
    pub(super) fn at<T>(&self, i: usize, f: impl FnOnce(*mut S) -> T) -> Option<T> {
        if i >= self.count {
            return None;
        }
        let offset = i * size_of::<S>();
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let covered = window
            .as_ref()
            .is_some_and(|w| (w.start..w.start + w.len).contains(&offset));
        if !covered {
            *window = None;
            let start = offset / WINDOW_BYTES * WINDOW_BYTES;
            let len = WINDOW_BYTES.min(self.bytes - start);
            debug_assert!(start.is_multiple_of(self.page));
            // SAFETY: a shared read-write mapping of `len` bytes of the
            // map's value area from `start` (page-aligned, within its
            // page-rounded length, as the kernel requires).
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    self.fd.as_raw_fd(),
                    libc::off_t::try_from(start).ok()?,
                )
            };
            if ptr == libc::MAP_FAILED {
                return None;
            }
            *window = Some(Window {
                ptr: NonNull::new(ptr.cast::<u8>())?,
                start,
                len,
            });
        }
        let w = window.as_ref()?;
        // SAFETY: `offset` is in the window, and a slot never straddles its
        // end (slots tile pages, windows are whole pages).
        let slot = unsafe { w.ptr.as_ptr().add(offset - w.start).cast::<S>() };
        Some(f(slot))
    }

    /// Slot `i`, copied under its sequence lock; `None` if it is empty or a
    /// writer holds it.
    pub fn read_slot(&self, i: usize) -> Option<S> {
        // SAFETY: a mapped slot.
        self.at(i, |slot| unsafe { copy_of(slot) }).flatten()
    }

    /// Every occupied slot, copied under its lock (one lock of the window
    /// per window, empty slots skipped on their key): the whole-table read
    /// of status, the sweep and the purge.
    pub fn occupied_slots(&self) -> Vec<S> {
        let per_window = WINDOW_BYTES / size_of::<S>();
        let mut out = Vec::new();
        for first in (0..self.count).step_by(per_window) {
            let n = per_window.min(self.count - first);
            self.at(first, |base| {
                for j in 0..n {
                    // SAFETY: slots `first..first + n` are in this window
                    // (the window starts at `first`'s slot and is `n` slots
                    // long or longer); a copy as in `read_slot`.
                    unsafe {
                        let slot = base.add(j);
                        if std::ptr::read_volatile(S::key(slot)) == FlowKey::EMPTY {
                            continue;
                        }
                        if let Some(copy) = copy_of(slot) {
                            out.push(copy);
                        }
                    }
                }
            });
        }
        out
    }

    /// Slot `i` under its lock: `write` gets the slot's address to read
    /// and write (volatile: the data plane's lone stores of a flow's `seen`
    /// and its atomic flag bits go on outside the lock, so a writer stores
    /// only the fields it means to change). `None` if the lock stayed held
    /// (which a packet never does for long).
    pub fn with_lock<T>(&self, i: usize, write: impl FnOnce(*mut S) -> T) -> Option<T> {
        self.at(i, |slot| {
            // SAFETY: as in `read_slot`.
            let seq = unsafe { AtomicU32::from_ptr(S::seq(slot)) };
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
                    return None;
                }
                std::hint::spin_loop();
            }
            let out = write(slot);
            seq.fetch_add(1, Ordering::Release);
            Some(out)
        })
        .flatten()
    }

    /// Empties slot `i` if `gone` says so of what it holds, under the lock;
    /// the slot as it was if it was emptied.
    pub fn take_if(&self, i: usize, gone: impl FnOnce(&S) -> bool) -> Option<S> {
        self.with_lock(i, |slot| {
            // SAFETY: locked: ours to read and write; volatile, as the data
            // plane may store a lone word meanwhile.
            unsafe {
                let was = std::ptr::read_volatile(slot);
                let key = S::key(slot);
                if std::ptr::read_volatile(key) == FlowKey::EMPTY || !gone(&was) {
                    return None;
                }
                std::ptr::write_volatile(key, FlowKey::EMPTY);
                Some(was)
            }
        })
        .flatten()
    }
}

impl HalfOpenTable {
    /// Slot `i`'s key and entry, copied under its sequence lock; `None` if
    /// it is empty or a writer holds it.
    pub fn read(&self, i: usize) -> Option<(FlowKey, Flow)> {
        self.read_slot(i).map(|s| (s.key, Flow::from(&s.flow)))
    }

    /// Every occupied slot's key and entry (expired ones included).
    pub fn entries(&self) -> Vec<(FlowKey, Flow)> {
        self.occupied_slots()
            .into_iter()
            .map(|s| (s.key, Flow::from(&s.flow)))
            .collect()
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
    /// False if it was kept or empty (or the lock stayed held).
    pub fn clear_if(&self, i: usize, gone: impl Fn(&FlowKey, &Flow) -> bool) -> bool {
        self.take_if(i, |s| gone(&s.key, &Flow::from(&s.flow)))
            .is_some()
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
