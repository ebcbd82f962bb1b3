//! The harness: everything that builds networks, generates traffic and
//! measures the load balancer, as opposed to the product (`agent`, `config`,
//! `control`, `dataplane`, `health`, `host`, `server`, `object`) that runs it.
//!
//! It owns the lab (`lb lab`, the demo, the end-to-end tests' topology), the
//! XDP packet generator (`lb pktgen`), the benchmarks (`lb bench`), and the
//! two helpers they and the kernel tests share: `netns` (namespaces, veths,
//! `ip` and commands run inside a namespace) and `xdp` (interface indexes
//! and MACs, BPF_PROG_TEST_RUN contexts, loading the object).
//!
//! The dependency points one way: harness → product, never product →
//! harness. No module outside `harness/` names `crate::harness` (check:
//! `grep -rn harness lb-userspace/src --include=*.rs | grep -v '^lb-userspace/src/harness/'`
//! lists only `lib.rs` and `main.rs`'s harness verbs).

pub mod bench;
pub mod etcd;
pub mod lab;
pub mod netns;
pub mod pktgen;
pub mod xdp;
