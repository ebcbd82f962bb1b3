//! The BGP announcement's part of the status (`[announce]`): each VIP's
//! plan and what BIRD reports. Built by `announce`.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

/// The BGP announcement of this LB's VIPs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    /// BIRD's control socket.
    pub bird_socket: String,
    /// The include file the agent writes.
    pub include: String,
    pub med: u32,
    /// Every VIP: announced or not, and why.
    pub vips: Vec<VipPlan>,
    /// BIRD's protocols and what each BGP session exports, as of the last
    /// look (every second); `None` until BIRD answered once.
    pub bird: Option<BirdView>,
    /// The last failure to write the include file or reach BIRD, if the
    /// last attempt failed (it is retried every second).
    pub error: Option<String>,
}

/// Whether a VIP is announced, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipPlan {
    pub vip: IpAddr,
    pub announced: bool,
    pub reason: String,
}

/// A BGP (or BFD, …) protocol as `show protocols` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BirdProtocol {
    pub name: String,
    pub proto: String,
    /// up, down, start, …
    pub state: String,
    /// BGP's session state (Established, Active, …), and the like.
    pub info: String,
}

/// What BIRD says: its protocols, and the VIP routes each BGP session
/// exports to its router.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BirdView {
    pub protocols: Vec<BirdProtocol>,
    /// BGP protocol name → prefixes exported to that peer.
    pub exported: BTreeMap<String, Vec<String>>,
}
