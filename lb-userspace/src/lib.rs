//! The agent and CLI of the XDP load balancer, as a library so the
//! integration tests drive exactly the code the `lb` binary runs.
//!
//! Module ownership:
//! - `object`: the embedded eBPF object.
//! - `config`: the TOML schema, validation and errors naming file/key/reason.
//! - `dataplane`: loading, attaching, and every map write (rings, backends).
//! - `agent`: `lb run` — config → data plane, signals.
//! - `lab`: the seed's infrastructure in network namespaces (`lb lab`).

pub mod agent;
pub mod config;
pub mod dataplane;
pub mod lab;
pub mod object;
