//! The `lb-pktgen` object: the generator alone, embedded in the product's
//! `lb` for `lb pktgen` (the data plane's object, lb-ebpf, has no tool).
#![no_std]
#![no_main]

// The data plane's frame helpers, one copy for both crates (separate
// crates cannot share lb-ebpf's private functions otherwise); the tools
// use some of them.
#[allow(dead_code)]
#[path = "../../lb-ebpf/src/mem.rs"]
mod mem;
mod pktgen;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
