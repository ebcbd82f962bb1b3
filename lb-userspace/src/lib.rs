//! The agent and CLI of the XDP load balancer, as a library so the
//! integration tests drive exactly the code the `lb` binary runs.
//!
//! Module ownership:
//! - `object`: the embedded eBPF object.
//! - `config`: the TOML schema, validation and errors naming file/key/reason.
//! - `dataplane`: loading, attaching, and every map write (rings, backends).
//! - `explain`: `lb explain`'s flow parsing and decision text (pure).
//! - `announce`: `[announce]`, the VIPs' BGP announcement through BIRD
//!   (what may be announced, the include file, BIRD's control socket).
//! - `agent`: `lb run` — config → data plane, health, control socket, signals.
//! - `wire`: the control protocol's messages and the status they carry (a
//!   leaf: imports only config's names).
//! - `control`: the CLI's client side of the control socket, `lb status`'s
//!   text.
//! - `health`: TCP/HTTP health checks with rise/fall.
//! - `doctor`: `lb doctor` and `lb run`'s host checks: facts read from the
//!   host (netlink, ethtool, /proc), findings computed from them (pure).
//! - `host`: the agent's namespace, bpffs, pin-dir lock and socket file.
//! - `server`: the control socket server (concurrent, bounded clients).
//! - `logging`: human or JSON log lines (`--log-format`).
//! - `metrics`: the monitoring listener: `/metrics`, the status page,
//!   `/status.json`.
//! - `trace`: `lb trace`, live drop tracing from the pinned ring buffer.
//! - `capture`: `lb capture`, frames as the data plane leaves them, as pcap.
//! - `pktgen`: `lb pktgen`, the XDP live-frames load generator, with its own
//!   object; `xdp`: its XDP helpers (interfaces, BPF_PROG_RUN, loading the
//!   tools' objects).
//! - `harness` (feature `harness`): what builds networks and measures, not
//!   part of the product: the lab (`lb lab`), `lb bench` and its object, the
//!   tests' kit. It depends on the product, never the reverse; the
//!   installed `lb` is built without it.

pub mod agent;
pub mod announce;
pub mod capture;
pub mod config;
pub mod control;
pub mod coord;
pub mod dataplane;
pub mod db;
pub mod doctor;
pub mod explain;
#[cfg(feature = "harness")]
pub mod harness;
pub mod health;
pub mod host;
pub mod logging;
pub mod metrics;
pub mod neighbours;
pub mod object;
pub mod pktgen;
pub mod server;
pub mod sync;
pub mod trace;
pub mod wire;
pub mod xdp;
