//! The `lb-pktgen` object: the generator alone, embedded in the product's
//! `lb` for `lb pktgen` (the data plane's object, lb-ebpf, has no tool).
#![no_std]
#![no_main]

mod mem;
mod pktgen;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
