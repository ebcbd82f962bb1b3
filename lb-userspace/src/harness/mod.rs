//! The harness: everything that builds networks and measures the load
//! balancer, as opposed to the product (`agent`, `config`, `control`,
//! `dataplane`, `health`, `host`, `server`, `object`, `pktgen`) that runs
//! it. Compiled only with the crate's `harness` feature: the developer's
//! `lb` (`cargo xtask build`) and the tests have it, the installed `lb`
//! (`cargo xtask package`) does not — nor the lab's TLS stack (rcgen, the
//! HTTPS servers) or the bench object.
//!
//! It owns the lab (`lb lab`, the demo, the end-to-end tests' topology), the
//! benchmarks (`lb bench`) with their own eBPF object (the generator, the
//! sink and the baselines: [`load_bench_object`]), the etcd cluster of the
//! coordination tests, and `netns` (namespaces, veths, `ip` and commands run
//! inside a namespace), which the kernel tests share.
//!
//! The generator (`pktgen`) and its XDP helpers (`xdp`: interface indexes
//! and MACs, BPF_PROG_TEST_RUN contexts) ship in the product for `lb
//! pktgen`; they are re-exported here as part of the test kit, so the
//! harness and the tests name the whole kit under one path.
//!
//! The dependency points one way: harness → product, never product →
//! harness; the package's build, without the feature, fails on any
//! product → harness import. No module outside `harness/` names
//! `crate::harness` (check:
//! `grep -rn harness lb-userspace/src --include=*.rs | grep -v '^lb-userspace/src/harness/'`
//! lists only `lib.rs` and `main.rs`'s harness verbs).

pub mod bench;
pub mod etcd;
pub mod lab;
pub mod netns;

pub use crate::{pktgen, xdp};

/// The `lb-bench` object (lb-ebpf-tools): the generator, `sink`,
/// `bare_fwd`, `hash_fwd`, the encapsulation floor (`ipip_fwd`, `gue_fwd`)
/// and `xdp_pass`. Empty in a build without the BPF
/// toolchain ([`load_bench_object`] then says so).
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench.o"));

/// Loads the bench object (no program in the kernel yet), its generator's
/// `PKTGEN_FLOWS` sized for a drawn flow mix.
pub fn load_bench_object() -> anyhow::Result<aya::Ebpf> {
    xdp::load_tool(BENCH_OBJECT)
}
