//! The `lb-bench` object: the generator and the benchmark's programs (sink,
//! baselines), embedded only in a harness build of `lb` (`lb bench`, the
//! tests); the installed `lb` carries none of them.
#![no_std]
#![no_main]

mod bench;
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
