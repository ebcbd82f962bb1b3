//! Full NAT's maps from userspace (docs/architecture.md, "Full NAT"):
//! `FNAT_CONF` (the source addresses and port range, written at every
//! apply), `FNAT_CLAIMS` mapped into memory and read back (the claims:
//! ports in use per source address), freed into quarantine and swept
//! (claims whose flow is gone, [`stale_claims`]) by compare-and-swaps of a
//! claim's state, as the data plane takes and releases them.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicU32, Ordering},
};

use lb_common::{
    Backend, CLAIM_FREE, CLAIM_FREED, CLAIM_HELD, FLOW_F_FULL_NAT, FNAT_MAX_SOURCES, Flow, FlowKey,
    FnatClaim, FnatConf,
    flow::{REPLY, duration_ticks},
    fullnat::{claim_bucket, claim_state, out_of_quarantine, reply_tuple, ticks_since},
};

use super::{
    Dataplane, DataplaneError, LockedSlot, MapName, Result, SlotTable,
    handles::{map_err, set},
};

/// `FNAT_CLAIMS` mapped into this process (for readers and the sweep,
/// apart from the agent's loop).
pub type ClaimTable = SlotTable<FnatClaim>;

impl LockedSlot for FnatClaim {
    const MAP: &'static str = "FNAT_CLAIMS";
    /// The state word: odd only while a CPU writes the claim (busy), so
    /// the generic reader copies a claim between two equal reads of it.
    fn seq(slot: *mut Self) -> *mut u32 {
        slot.cast::<u8>()
            .wrapping_add(std::mem::offset_of!(Self, state))
            .cast()
    }
    /// The reply tuple (all zero in a slot never used).
    fn key(slot: *mut Self) -> *mut FlowKey {
        slot.cast::<u8>()
            .wrapping_add(std::mem::offset_of!(Self, reply))
            .cast()
    }
}

/// Ticks (~1.07 s each) a claim must have been held before the sweep may
/// remove it: the data plane makes a claim just before it writes its
/// flow's half-open slot, so a younger claim may not have its flow yet.
pub const CLAIM_GRACE: u32 = 2;

/// The source addresses `conf` holds, in its order.
pub fn addresses(conf: &FnatConf) -> Vec<Ipv4Addr> {
    conf.addrs
        .iter()
        .take((conf.count as usize).min(FNAT_MAX_SOURCES))
        .map(|a| Ipv4Addr::from(u32::from_be(*a)))
        .collect()
}

/// Does `flow` (a forward entry, from either flow table) hold the claim
/// of `tuple` (backend → source address:port)? Only a full-NAT flow
/// whose source address and port are the tuple's, toward the tuple's
/// backend: a flow of the same client tuple opened again toward another
/// backend may draw the same source, and does not keep the old claim.
fn holds(flow: &Flow, tuple: &FlowKey, backend: Option<Backend>) -> bool {
    flow.direction != REPLY
        && flow.flags & FLOW_F_FULL_NAT != 0
        && (flow.vip, flow.vport) == (tuple.daddr, tuple.dport)
        && backend.is_some_and(|b| (b.addr, b.port) == (tuple.saddr, tuple.sport))
}

/// The claims of `claims` to remove at `now`: held ones whose flow (its
/// forward key's entry in `flows`, the forward entries of both tables)
/// is gone or no longer holds them — an expired or replaced half-open
/// slot, a flow the data plane dropped from the overflow — and that were
/// made at least [`CLAIM_GRACE`] ticks ago; freed ones (their established
/// flow ended) once out of their quarantine of `quarantine` ticks
/// ([`FnatConf::quarantine`]). Their ports return to the pool.
pub fn stale_claims(
    claims: &[FnatClaim],
    flows: &StdHashMap<FlowKey, Flow>,
    backend: impl Fn(u32) -> Option<Backend>,
    now: u32,
    quarantine: u16,
) -> Vec<FnatClaim> {
    claims
        .iter()
        .filter(|claim| match claim.kind() {
            CLAIM_FREED => out_of_quarantine(claim.tick(), now, quarantine),
            CLAIM_HELD => {
                ticks_since(claim.tick(), now) >= CLAIM_GRACE
                    && !flows
                        .get(&claim.forward())
                        .is_some_and(|f| holds(f, &claim.reply, backend(f.backend_id)))
            }
            _ => false,
        })
        .copied()
        .collect()
}

/// The claim an established full-NAT flow (`forward`, its forward key;
/// `flow`, its forward entry) held toward `backend` (address, port), as it
/// is once the agent's sweep removed the flow: freed at `now`, so the port
/// serves its quarantine as when the data plane removes a flow
/// (`fullnat::release`). `None`: not a full-NAT flow, or no quarantine
/// (the claim sweep then removes the claim once stale).
pub fn freed_claim(
    forward: &FlowKey,
    flow: &Flow,
    backend: (u32, u16),
    now: u32,
    quarantine: u16,
) -> Option<FnatClaim> {
    (flow.flags & FLOW_F_FULL_NAT != 0 && flow.direction != REPLY && quarantine != 0).then(|| {
        FnatClaim {
            state: claim_state(CLAIM_FREED, now),
            reply: reply_tuple(backend, (flow.vip, flow.vport), forward.protocol),
            client: forward.saddr,
            vip: forward.daddr,
            client_port: forward.sport,
            vport: forward.dport,
        }
    })
}
use crate::config::{Config, Forwarding};

/// The addresses full NAT translates with: `[dataplane] source-addresses`,
/// or else the address this host reaches each full-NAT backend from
/// (`route`: the route's preferred source), each once, at most
/// [`FNAT_MAX_SOURCES`]. Empty while no full-NAT service has a route.
pub fn sources(cfg: &Config, route: impl Fn(Ipv4Addr) -> Option<Ipv4Addr>) -> Vec<Ipv4Addr> {
    if !cfg.dataplane.full_nat.addresses.is_empty() {
        return cfg.dataplane.full_nat.addresses.clone();
    }
    let mut found = Vec::new();
    let backends = cfg
        .services
        .iter()
        .filter(|s| s.forwarding == Forwarding::FullNat)
        .flat_map(|s| &s.backends);
    for backend in backends {
        // IPv4 only: the config's gate refuses an IPv6 service (and so an
        // IPv6 backend) until the data plane balances IPv6.
        let IpAddr::V4(address) = backend.address.ip() else {
            continue;
        };
        if let Some(source) = route(address)
            && !found.contains(&source)
            && found.len() < FNAT_MAX_SOURCES
        {
            found.push(source);
        }
    }
    found
}

/// `FNAT_CONF` for `sources` and the config's port range.
pub fn fnat_conf(cfg: &Config, sources: &[Ipv4Addr]) -> FnatConf {
    let quarantine = cfg.dataplane.full_nat.quarantine;
    let mut conf = FnatConf {
        count: 0,
        // Whole ticks, rounded up (at most an hour: 3353 ticks).
        quarantine: if quarantine.is_zero() {
            0
        } else {
            u16::try_from(duration_ticks(quarantine.as_nanos() as u64)).unwrap_or(u16::MAX)
        },
        port_lo: cfg.dataplane.full_nat.port_lo,
        port_hi: cfg.dataplane.full_nat.port_hi,
        addrs: [0; FNAT_MAX_SOURCES],
    };
    for (slot, addr) in conf.addrs.iter_mut().zip(sources) {
        *slot = u32::from(*addr).to_be();
        conf.count += 1;
    }
    conf
}

/// A source address's claims: all of them (live flows' and quarantined
/// ones', each a port out of its backend's pool), and the quarantined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceClaims {
    pub in_use: u64,
    pub quarantined: u64,
}

/// Claims per source address (a reply tuple's destination is the source
/// address), from the held and freed claims of `FNAT_CLAIMS`.
pub fn ports_in_use(
    claims: impl IntoIterator<Item = FnatClaim>,
) -> BTreeMap<Ipv4Addr, SourceClaims> {
    let mut by_source = BTreeMap::<_, SourceClaims>::new();
    for claim in claims {
        let counts = by_source
            .entry(Ipv4Addr::from(u32::from_be(claim.reply.daddr)))
            .or_default();
        counts.in_use += 1;
        counts.quarantined += u64::from(claim.kind() == CLAIM_FREED);
    }
    by_source
}

impl Dataplane {
    /// Writes `FNAT_CONF` for `cfg` (one store: a packet sees the old
    /// settings or the new).
    pub(super) fn set_fnat_conf(&mut self, cfg: &Config) -> Result<()> {
        let sources = sources(cfg, super::tunnel::route_source);
        let conf = fnat_conf(cfg, &sources);
        set(
            &mut self.array::<FnatConf>(MapName::FNAT_CONF)?,
            MapName::FNAT_CONF,
            0,
            conf,
        )
    }

    /// What `FNAT_CONF` holds now.
    pub fn fnat_conf(&self) -> Result<FnatConf> {
        let map: aya::maps::Array<&aya::maps::MapData, FnatConf> =
            aya::maps::Array::try_from(self.map_ref(MapName::FNAT_CONF)?)
                .map_err(map_err(MapName::FNAT_CONF))?;
        map.get(&0, 0).map_err(map_err(MapName::FNAT_CONF))
    }

    /// `FNAT_CLAIMS`, mapped into memory.
    pub(super) fn claim_table(&self) -> Result<ClaimTable> {
        ClaimTable::map(&self.map_data(MapName::FNAT_CLAIMS)?).map_err(DataplaneError::FnatClaims)
    }

    /// Every full-NAT claim, held or in quarantine.
    pub fn fnat_claims(&self) -> Result<Vec<FnatClaim>> {
        Ok(claims(&self.claim_table()?))
    }
}

/// Every claim of `FNAT_CLAIMS` held or in quarantine (a scan of the
/// mapped table; claims being written are skipped).
pub fn claims(table: &ClaimTable) -> Vec<FnatClaim> {
    table
        .occupied_slots()
        .into_iter()
        .filter(|c| c.kind() != CLAIM_FREE)
        .collect()
}

/// The slot of `table` that holds `claim`'s reply tuple (in its bucket
/// under the tables' `seed`) and what it holds, if `same` accepts that.
fn slot_of(
    table: &ClaimTable,
    seed: u32,
    claim: &FnatClaim,
    same: impl Fn(&FnatClaim) -> bool,
) -> Option<(usize, FnatClaim)> {
    let first = claim_bucket(&claim.reply, seed, table.slots()) as usize;
    (first..first + 2).find_map(|i| {
        table
            .read_slot(i)
            .filter(|c| c.kind() != CLAIM_FREE && c.reply == claim.reply && same(c))
            .map(|c| (i, c))
    })
}

/// Slot `i`'s state from `from` to `to`, if it still is `from` (the data
/// plane's compare-and-swaps on the same word).
fn swap_state(table: &ClaimTable, i: usize, from: u32, to: u32) -> bool {
    table
        .at(i, |slot| {
            // SAFETY: a mapped slot; its state word is 4-byte aligned and
            // only ever changed atomically (here and by the data plane).
            let state = unsafe { AtomicU32::from_ptr(FnatClaim::seq(slot)) };
            state
                .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Marks the claim of `freed` (from [`freed_claim`]) freed if it is still
/// held by the same flow: its port starts its quarantine. A take-over by
/// the data plane meanwhile changed the state, and the swap leaves it.
pub(super) fn free(table: &ClaimTable, seed: u32, freed: &FnatClaim) {
    let same = |c: &FnatClaim| c.kind() == CLAIM_HELD && c.forward() == freed.forward();
    if let Some((i, held)) = slot_of(table, seed, freed, same) {
        swap_state(table, i, held.state, freed.state);
    }
}

/// Frees the slots of `stale` (chosen from a snapshot), each only if its
/// state is still what the snapshot saw: a claim the data plane took over
/// since (busy, then held at another tick) stays. Returns how many went.
pub(super) fn remove_stale(table: &ClaimTable, seed: u32, stale: &[FnatClaim]) -> u64 {
    let mut removed = 0;
    for claim in stale {
        let same = |c: &FnatClaim| c.state == claim.state;
        if let Some((i, _)) = slot_of(table, seed, claim, same)
            && swap_state(table, i, claim.state, CLAIM_FREE)
        {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, FullNatSources, Protocol, Scheduler, Service};
    use std::net::SocketAddrV4;

    fn config(forwarding: Forwarding, sources: &[Ipv4Addr]) -> Config {
        let mut cfg = Config {
            firewall: Default::default(),
            dataplane: crate::config::Dataplane {
                interfaces: vec!["lo".to_owned()],
                forwarding: Forwarding::Nat,
                xdp_mode: crate::config::XdpMode::Generic,
                conntrack_size: 65536,
                half_open_size: lb_common::DEFAULT_HALF_OPEN_SIZE,
                new_flow_budget: 125_000,
                timeouts: Default::default(),
                tunnel_source: None,
                tunnel_source6: None,
                gue_port: lb_common::tunnel::GUE_DEFAULT_PORT,
                full_nat: FullNatSources {
                    addresses: sources.to_vec(),
                    ..FullNatSources::default()
                },
            },
            monitoring: None,
            announce: None,
            coordination: None,
            sync: None,
            services: Vec::new(),
            pools: Vec::new(),
        };
        let backend = |ip: [u8; 4]| Backend {
            name: format!("{ip:?}"),
            address: SocketAddrV4::new(ip.into(), 8080).into(),
            weight: 1,
            backup: false,
            health: None,
            max_connections: None,
        };
        cfg.services = vec![Service {
            firewall: Default::default(),
            name: "www".into(),
            vip: SocketAddrV4::new([198, 18, 0, 10].into(), 80).into(),
            protocol: Protocol::Tcp,
            forwarding,
            scheduler: Scheduler::RoundRobin,
            health: None,
            on_backend_down: crate::config::OnBackendDown::KeepFlows,
            maglev_table_size: lb_common::maglev::MAGLEV_DEFAULT_SIZE,
            source_ip_prefix: lb_common::maps6::SOURCE_PREFIX_WHOLE,
            backends: vec![
                backend([198, 19, 0, 11]),
                backend([198, 19, 0, 12]),
                backend([198, 20, 0, 11]),
            ],
            limits: Default::default(),
            proxy_protocol: None,
        }];
        cfg
    }

    /// The route's source: 198.19/16 from .1 of it, 198.20/16 from .1.
    fn route(ip: Ipv4Addr) -> Option<Ipv4Addr> {
        let [a, b, ..] = ip.octets();
        Some(Ipv4Addr::new(a, b, 0, 1))
    }

    #[test]
    fn configured_sources_win_else_each_backends_route_source_once() {
        let listed = [Ipv4Addr::new(198, 19, 0, 99)];
        assert_eq!(
            sources(&config(Forwarding::FullNat, &listed), route),
            listed
        );
        assert_eq!(
            sources(&config(Forwarding::FullNat, &[]), route),
            [Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 20, 0, 1)]
        );
        assert!(
            sources(&config(Forwarding::Nat, &[]), route).is_empty(),
            "no full-NAT service: no sources"
        );
    }

    #[test]
    fn the_conf_holds_the_sources_in_network_order_and_the_range() {
        let cfg = config(Forwarding::FullNat, &[]);
        let conf = fnat_conf(&cfg, &[Ipv4Addr::new(198, 19, 0, 1)]);
        assert_eq!(conf.count, 1);
        assert_eq!(conf.addrs[0].to_ne_bytes(), [198, 19, 0, 1]);
        assert_eq!((conf.port_lo, conf.port_hi), (1024, 32767));
    }

    #[test]
    fn ports_in_use_are_counted_per_source_address() {
        let claim = |source: [u8; 4], port: u16| FlowKey {
            saddr: u32::from_ne_bytes([198, 19, 0, 11]),
            daddr: u32::from_ne_bytes(source),
            sport: 8080u16.to_be(),
            dport: port.to_be(),
            protocol: 6,
            _pad0: 0,
            _pad1: 0,
        };
        let with = |reply: FlowKey, kind: u32| FnatClaim {
            state: claim_state(kind, 9),
            reply,
            ..FnatClaim::default()
        };
        let counts = ports_in_use([
            with(claim([10, 0, 0, 1], 1), CLAIM_HELD),
            with(claim([10, 0, 0, 1], 2), CLAIM_FREED),
            with(claim([10, 0, 0, 2], 1), CLAIM_HELD),
        ]);
        assert_eq!(
            counts[&Ipv4Addr::new(10, 0, 0, 1)],
            SourceClaims {
                in_use: 2,
                quarantined: 1
            }
        );
        assert_eq!(
            counts[&Ipv4Addr::new(10, 0, 0, 2)],
            SourceClaims {
                in_use: 1,
                quarantined: 0
            }
        );
    }

    #[test]
    fn a_claim_without_its_flow_is_stale_once_past_its_grace() {
        let backend_of = |id: u32| {
            Some(lb_common::Backend {
                addr: u32::from_ne_bytes([198, 19, 0, 11 + id as u8]),
                port: 8080u16.to_be(),
                ..lb_common::Backend::default()
            })
        };
        let client = |port: u16| FlowKey {
            saddr: u32::from_ne_bytes([198, 18, 0, 2]),
            daddr: u32::from_ne_bytes([198, 18, 0, 10]),
            sport: port.to_be(),
            dport: 80u16.to_be(),
            protocol: 6,
            _pad0: 0,
            _pad1: 0,
        };
        let source = (u32::from_ne_bytes([198, 19, 0, 1]), 0u16);
        // The claim of `forward` toward backend `id` on source port `port`.
        let claim = |forward: FlowKey, id: u32, port: u16, claimed: u32| {
            let b = backend_of(id).expect("backend");
            FnatClaim {
                state: claim_state(CLAIM_HELD, claimed),
                reply: reply_tuple((b.addr, b.port), (source.0, port.to_be()), 6),
                client: forward.saddr,
                vip: forward.daddr,
                client_port: forward.sport,
                vport: forward.dport,
            }
        };
        let flow = |id: u32, port: u16| Flow {
            backend_id: id,
            vip: source.0,
            vport: port.to_be(),
            flags: FLOW_F_FULL_NAT,
            ..Flow::default()
        };
        let now = 100;
        let live = claim(client(1), 0, 2000, 10);
        let gone = claim(client(2), 0, 2001, 10);
        let young = claim(client(3), 0, 2002, now - CLAIM_GRACE + 1);
        // Client 4's flow was opened again toward backend 1 and drew the
        // same source port: its old claim toward backend 0 is stale.
        let moved = claim(client(4), 0, 2003, 10);
        let reopened = claim(client(4), 1, 2003, 90);
        // Client 5's flow holds another port than this claim names.
        let other_port = claim(client(5), 0, 2004, 10);
        let flows = StdHashMap::from([
            (client(1), flow(0, 2000)),
            (client(4), flow(1, 2003)),
            (client(5), flow(0, 2999)),
        ]);
        let claims = [live, gone, young, moved, reopened, other_port];
        let mut stale = stale_claims(&claims, &flows, backend_of, now, 56);
        stale.sort_by_key(|c| u16::from_be(c.reply.dport));
        assert_eq!(stale, vec![gone, moved, other_port]);
        // The young claim goes once past its grace (its flow never came).
        let later = stale_claims(&[young], &flows, backend_of, now + 1, 56);
        assert_eq!(later, vec![young]);
        // A NAT flow's entry (no full-NAT flag) holds no claim.
        let mut nat = flows.clone();
        nat.insert(
            client(1),
            Flow {
                flags: 0,
                ..flow(0, 2000)
            },
        );
        assert_eq!(stale_claims(&[live], &nat, backend_of, now, 56), vec![live]);
        // A freed claim (its established flow ended at tick 60) stays out
        // of the pool for its quarantine, whatever the tables hold, and goes
        // after it.
        let freed = FnatClaim {
            state: claim_state(CLAIM_FREED, 60),
            ..gone
        };
        for now in [61, 100, 116] {
            assert!(stale_claims(&[freed], &flows, backend_of, now, 56).is_empty());
        }
        assert_eq!(
            stale_claims(&[freed], &flows, backend_of, 117, 56),
            vec![freed]
        );
        // Busy and free slots are nobody's to sweep.
        for kind in [CLAIM_FREE, lb_common::CLAIM_BUSY] {
            let other = FnatClaim {
                state: claim_state(kind, 10),
                ..gone
            };
            assert!(stale_claims(&[other], &flows, backend_of, now, 56).is_empty());
        }
    }

    #[test]
    fn a_swept_full_nat_flow_frees_its_claim_into_quarantine() {
        let forward = FlowKey {
            saddr: u32::from_ne_bytes([198, 18, 0, 2]),
            daddr: u32::from_ne_bytes([198, 18, 0, 10]),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            protocol: 6,
            _pad0: 0,
            _pad1: 0,
        };
        let backend = (u32::from_ne_bytes([198, 19, 0, 11]), 8080u16.to_be());
        let flow = Flow {
            vip: u32::from_ne_bytes([198, 19, 0, 1]),
            vport: 2000u16.to_be(),
            flags: FLOW_F_FULL_NAT,
            ..Flow::default()
        };
        let claim = freed_claim(&forward, &flow, backend, 70, 56).expect("freed");
        let tuple = claim.reply;
        assert_eq!(
            (tuple.saddr, tuple.sport, tuple.daddr, tuple.dport),
            (backend.0, backend.1, flow.vip, flow.vport)
        );
        assert_eq!(
            (claim.forward(), claim.tick(), claim.kind()),
            (forward, 70, CLAIM_FREED)
        );
        assert_eq!(
            freed_claim(&forward, &flow, backend, 70, 0),
            None,
            "no quarantine"
        );
        let nat = Flow { flags: 0, ..flow };
        assert_eq!(freed_claim(&forward, &nat, backend, 70, 56), None);
    }
}
