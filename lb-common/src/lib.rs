//! What the XDP data plane and the agent agree on: map layouts, limits, and
//! the pure packet logic (checksums, header rewrite, flow hash, rings).
//!
//! Everything here is `no_std` so the kernel side can use it; the `user`
//! feature adds the `aya::Pod` impls and the allocating ring builders.
#![cfg_attr(not(any(feature = "user", test)), no_std)]

pub mod capture;
pub mod checksum;
pub mod family;
pub mod flow;
pub mod hash;
pub mod headers;
pub mod icmp;
#[cfg(feature = "user")]
pub mod maglev;
pub mod maps;
pub mod rewrite;
#[cfg(feature = "user")]
pub mod ring;

pub use maps::*;
