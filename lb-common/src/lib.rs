//! What the XDP data plane and the agent agree on: map layouts, limits, and
//! the pure packet logic (checksums, header rewrite, flow hash, rings).
//!
//! Everything here is `no_std` so the kernel side can use it; the `user`
//! feature adds the `aya::Pod` impls and the allocating ring builders. The
//! tools' layouts (`tools`: the generator's, and with `bench` the benchmark
//! baselines') are behind the `pktgen` and `bench` features.
#![cfg_attr(not(any(feature = "user", test)), no_std)]

pub mod capture;
pub mod checksum;
pub mod decap;
pub mod family;
pub mod flow;
pub mod flow_table;
pub mod fullnat;
pub mod hash;
pub mod headers;
pub mod icmp;
pub mod ipv6;
#[cfg(feature = "user")]
pub mod maglev;
pub mod map_names;
pub mod maps;
pub mod maps6;
pub mod probe;
pub mod proxy;
pub mod rewrite;
#[cfg(feature = "user")]
pub mod ring;
pub mod sync;
#[cfg(feature = "pktgen")]
pub mod tools;
pub mod tunnel;
pub mod verdict;

pub use maps::*;
pub use maps6::*;
#[cfg(feature = "pktgen")]
pub use tools::*;
pub use verdict::*;
