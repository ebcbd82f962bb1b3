//! The kernel tier's network: one throwaway namespace whose routes and
//! (static) neighbour entries give `bpf_fib_lookup` a real next hop, and the
//! addresses the kernel tests build frames with. Built through the
//! harness's netns helper, like the lab and the benchmark's topology.
//!
//! ```text
//!   f0 198.18.0.1/24 (FRONT_MAC) ── f1     neighbours: client, hairpin backend
//!   b0 198.19.0.1/24 (BACK_MAC)  ── b1     neighbours: web1..3 (web4 has none)
//! ```

use std::{
    net::SocketAddrV4,
    sync::atomic::{AtomicU32, Ordering},
};

use etherparse::PacketBuilder;
use lb_common::Verdict;
use lb_userspace::{
    config::{
        Backend, Config, Dataplane as DataplaneConfig, Forwarding, Protocol, Scheduler, Service,
        XdpMode,
    },
    dataplane::Dataplane,
    harness::{
        netns::{self, Netns, VethEnd},
        xdp,
    },
};

pub const CLIENT: [u8; 4] = [198, 18, 0, 2];
pub const LB_FRONT: [u8; 4] = [198, 18, 0, 1];
pub const VIP: [u8; 4] = [198, 18, 0, 10];
pub const VIP_DSR: [u8; 4] = [198, 18, 0, 20];
pub const VIP_UNRESOLVED: [u8; 4] = [198, 18, 0, 30];
pub const VIP_UNRESOLVED_DSR: [u8; 4] = [198, 18, 0, 31];
pub const WEBS: [[u8; 4]; 3] = [[198, 19, 0, 11], [198, 19, 0, 12], [198, 19, 0, 13]];
/// A service whose backend sits on the front network (next hop = ingress).
pub const VIP_HAIRPIN: [u8; 4] = [198, 18, 0, 40];
pub const HAIRPIN_BACKEND: [u8; 4] = [198, 18, 0, 50];
pub const HAIRPIN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x50];
/// A backend with a route but no neighbour entry.
pub const WEB_UNRESOLVED: [u8; 4] = [198, 19, 0, 14];

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const FRONT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
pub const BACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xbb, 0x01];
pub const WEB_MACS: [[u8; 6]; 3] = [
    [0x02, 0, 0, 0, 1, 0x11],
    [0x02, 0, 0, 0, 1, 0x12],
    [0x02, 0, 0, 0, 1, 0x13],
];

/// A namespace with a front (f0) and back (b0) interface, routes, static
/// neighbours for the client and web1..3, and forwarding on. Deleted on drop.
pub struct TestNet {
    ns: Netns,
}

impl TestNet {
    pub fn new() -> Self {
        assert!(
            rustix::process::geteuid().is_root(),
            "the kernel tier needs root (BPF_PROG_TEST_RUN, network namespaces): run `cargo xtask test` as root"
        );
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "lbk{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        Self::build(&name).unwrap_or_else(|e| panic!("building the test namespace: {e:#}"))
    }

    fn build(name: &str) -> anyhow::Result<Self> {
        let ns = Netns::create(name)?;
        let n = ns.name();
        for (dev, peer, mac, addr) in [
            ("f0", "f1", FRONT_MAC, "198.18.0.1/24"),
            ("b0", "b1", BACK_MAC, "198.19.0.1/24"),
        ] {
            netns::add_veth(&VethEnd::new(n, dev).mac(mac), &VethEnd::new(n, peer))?;
            netns::add_addr(n, dev, addr)?;
        }
        let ip = |a: [u8; 4]| std::net::Ipv4Addr::from(a);
        netns::add_neighbours(
            n,
            "f0",
            &[(ip(CLIENT), CLIENT_MAC), (ip(HAIRPIN_BACKEND), HAIRPIN_MAC)],
        )?;
        let webs: Vec<_> = WEBS.iter().map(|a| ip(*a)).zip(WEB_MACS).collect();
        netns::add_neighbours(n, "b0", &webs)?;
        netns::sysctl(n, "net/ipv4/ip_forward", "1")?;
        Ok(TestNet { ns })
    }

    /// `ip ARGS` in this namespace (e.g. a lower MTU on one link).
    pub fn ip(&self, args: &[&str]) {
        netns::ip(self.ns.name(), args)
            .unwrap_or_else(|e| panic!("ip {args:?} in the test namespace: {e:#}"));
    }

    /// Runs `f` on a thread that has joined this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns.run(f).expect("joining the test namespace")
    }
}

impl Default for TestNet {
    fn default() -> Self {
        Self::new()
    }
}

/// The names pinned in `dir`, sorted: what an adoption test compares
/// before and after a refused load.
pub fn pinned_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("pin dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Re-pins the map `name` under `pins` as an empty map of an older layout
/// (`map_type`, key and value sizes; its `max_entries` kept), as a version
/// before a layout change left it.
pub fn pin_old_layout(
    pins: &std::path::Path,
    name: &'static str,
    map_type: aya_obj::generated::bpf_map_type,
    key_size: u32,
    value_size: u32,
) {
    use aya::maps::MapData;
    use aya_obj::{
        EbpfSectionKind,
        maps::{LegacyMap, Map, PinningType, bpf_map_def},
    };
    let path = pins.join(name);
    let max_entries = aya::maps::MapInfo::from_pin(&path)
        .unwrap_or_else(|e| panic!("pinned {name}: {e}"))
        .max_entries();
    std::fs::remove_file(&path).unwrap_or_else(|e| panic!("unpin {name}: {e}"));
    let old = Map::Legacy(LegacyMap {
        def: bpf_map_def {
            map_type: map_type as u32,
            key_size,
            value_size,
            max_entries,
            map_flags: 0,
            id: 0,
            pinning: PinningType::None,
        },
        inner_def: None,
        section_index: 0,
        section_kind: EbpfSectionKind::Maps,
        symbol_index: None,
        data: Vec::new(),
    });
    MapData::create(old, name, None)
        .unwrap_or_else(|e| panic!("create an old-layout {name}: {e}"))
        .pin(&path)
        .unwrap_or_else(|e| panic!("pin the old {name}: {e}"));
}

/// Adopting the data plane pinned under `pins` must be refused as an older
/// version's (`map` named), with a message that contains each of `parts`
/// and says to run `lb teardown --pin-dir`, and leave the pins as they
/// were. Tears them down afterwards.
pub fn expect_old_version_refused(
    dataplane: &DataplaneConfig,
    pins: &std::path::Path,
    map: &str,
    parts: &[&str],
) {
    use lb_userspace::dataplane::DataplaneError;
    let before = pinned_files(pins);
    let err = match Dataplane::load_pinned(dataplane, pins) {
        Ok(_) => panic!("adopted a {map} of another layout"),
        Err(e) => e,
    };
    assert!(
        matches!(&err, DataplaneError::OldVersion { map: m, .. } if *m == map),
        "{err:?}"
    );
    let message = err.to_string();
    let teardown = format!("`lb teardown --pin-dir {}`", pins.display());
    for part in parts.iter().copied().chain([teardown.as_str()]) {
        assert!(message.contains(part), "{part:?} not in: {message}");
    }
    assert_eq!(pinned_files(pins), before, "the refusal changed the pins");
    Dataplane::teardown(pins).expect("teardown");
}

/// A bpffs mounted on a temporary directory, unmounted on drop.
pub struct Bpffs {
    pub dir: std::path::PathBuf,
}

impl Bpffs {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lbk-bpffs-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        netns::run("mount", &["-t", "bpf", "bpf", dir.to_str().expect("utf8")])
            .unwrap_or_else(|e| panic!("{e:#}"));
        Bpffs { dir }
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = netns::run("umount", &[self.dir.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Default for Bpffs {
    fn default() -> Self {
        Self::new()
    }
}

// ---- the data plane under test, as every kernel-tier file loads it ----

/// Ports the NAT services' backends listen on (the VIP's are 80 and 5353).
pub const WEB_PORT: u16 = 8080;
pub const WEB_UDP_PORT: u16 = 5300;

pub fn backend(name: &str, ip: [u8; 4], port: u16) -> Backend {
    Backend {
        name: name.into(),
        address: SocketAddrV4::new(ip.into(), port).into(),
        weight: 1,
        backup: false,
        health: None,
        max_connections: None,
    }
}

pub fn service(
    name: &str,
    vip: [u8; 4],
    port: u16,
    protocol: Protocol,
    forwarding: Forwarding,
    backends: Vec<Backend>,
) -> Service {
    Service {
        firewall: Default::default(),
        name: name.into(),
        vip: SocketAddrV4::new(vip.into(), port).into(),
        protocol,
        forwarding,
        scheduler: Scheduler::RoundRobin,
        health: None,
        on_backend_down: lb_userspace::config::OnBackendDown::KeepFlows,
        maglev_table_size: lb_common::maglev::MAGLEV_DEFAULT_SIZE,
        source_ip_prefix: lb_common::maps6::SOURCE_PREFIX_WHOLE,
        backends,
        limits: Default::default(),
        proxy_protocol: None,
    }
}

pub fn webs(port: u16) -> Vec<Backend> {
    WEBS.iter()
        .enumerate()
        .map(|(i, ip)| backend(&format!("web{}", i + 1), *ip, port))
        .collect()
}

pub fn lab_config() -> Config {
    Config {
        firewall: Default::default(),
        dataplane: DataplaneConfig {
            interfaces: vec!["f0".into(), "b0".into()],
            forwarding: Forwarding::Nat,
            xdp_mode: XdpMode::Native,
            conntrack_size: 65536,
            half_open_size: lb_common::DEFAULT_HALF_OPEN_SIZE,
            new_flow_budget: 125_000,
            timeouts: Default::default(),
            tunnel_source: None,
            tunnel_source6: None,
            gue_port: lb_common::tunnel::GUE_DEFAULT_PORT,
            full_nat: Default::default(),
        },
        monitoring: None,
        pools: Vec::new(),
        announce: None,
        coordination: None,
        sync: None,
        services: vec![
            // NAT backends listen on other ports than the VIP's, so every NAT
            // frame assertion also covers port translation and its checksum.
            service(
                "www",
                VIP,
                80,
                Protocol::Tcp,
                Forwarding::Nat,
                webs(WEB_PORT),
            ),
            service(
                "www-udp",
                VIP,
                5353,
                Protocol::Udp,
                Forwarding::Nat,
                webs(WEB_UDP_PORT),
            ),
            service(
                "www-dsr",
                VIP_DSR,
                80,
                Protocol::Tcp,
                Forwarding::Dsr,
                webs(80),
            ),
            service(
                "unresolved",
                VIP_UNRESOLVED,
                80,
                Protocol::Tcp,
                Forwarding::Nat,
                vec![backend("web4", WEB_UNRESOLVED, 8080)],
            ),
            service(
                "hairpin",
                VIP_HAIRPIN,
                80,
                Protocol::Tcp,
                Forwarding::Nat,
                vec![backend("near", HAIRPIN_BACKEND, 80)],
            ),
            service(
                "unresolved-dsr",
                VIP_UNRESOLVED_DSR,
                80,
                Protocol::Tcp,
                Forwarding::Dsr,
                vec![backend("web4", WEB_UNRESOLVED, 80)],
            ),
        ],
    }
}

/// BPF_PROG_TEST_RUN of `lb` on `frame` as received on `ifindex`:
/// the action and the frame as the program left it.
pub fn test_run(dp: &mut Dataplane, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
    let prog = dp.program().expect("program");
    let result = xdp::test_run(prog, ifindex, frame, 0, true).expect("BPF_PROG_TEST_RUN");
    (result.action, result.frame.unwrap_or_default())
}

/// A loaded, configured data plane plus the interface indexes of the netns.
pub struct Harness {
    pub dp: Dataplane,
    pub front: u32,
    pub back: u32,
}

impl Harness {
    pub fn new(cfg: &Config) -> Self {
        let mut dp = Dataplane::load(&cfg.dataplane)
            .expect("load the lb object (built by cargo xtask build)");
        dp.apply(cfg).expect("apply config");
        let index = |name: &str| {
            xdp::ifindex(name)
                .unwrap_or_else(|e| panic!("no interface {name} in the test namespace: {e:#}"))
        };
        Harness {
            dp,
            front: index("f0"),
            back: index("b0"),
        }
    }

    /// Runs the program on `frame` as received on `ifindex`.
    pub fn run(&mut self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        test_run(&mut self.dp, ifindex, frame)
    }

    pub fn verdicts(&self) -> Vec<(Verdict, u64)> {
        self.dp.verdicts().expect("verdicts")
    }

    /// Runs `frame` and asserts the action and that exactly `reason` counted it.
    pub fn expect(&mut self, ifindex: u32, frame: &[u8], action: u32, reason: Verdict) -> Vec<u8> {
        self.expect_case(&format!("{reason:?}"), ifindex, frame, action, reason)
    }

    /// [`Harness::expect`] with a label for the case in failure messages.
    pub fn expect_case(
        &mut self,
        what: &str,
        ifindex: u32,
        frame: &[u8],
        action: u32,
        reason: Verdict,
    ) -> Vec<u8> {
        let before = self.verdicts();
        let (got, out) = self.run(ifindex, frame);
        let after = self.verdicts();
        assert_eq!(got, action, "action: {what}");
        let changed: Vec<Verdict> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| a.1 != b.1)
            .map(|(_, a)| a.0)
            .collect();
        assert_eq!(changed, vec![reason], "verdict counters: {what}");
        out
    }

    /// Loads each of `programs` (if not loaded yet) and prints its verified
    /// (processed) instruction count (run with `--nocapture` to see them),
    /// asserting it is within the verifier's 1 000 000.
    pub fn print_verified_counts(&mut self, programs: &[&str]) {
        for &name in programs {
            let prog = xdp::xdp_program(self.dp.ebpf(), name)
                .unwrap_or_else(|e| panic!("load {name}: {e:#}"));
            let count = prog
                .info()
                .expect("info")
                .verified_instruction_count()
                .expect("the kernel reports a verified instruction count");
            assert!(count > 0 && count < 1_000_000, "{name}: {count}");
            println!("{name}: verified_instruction_count = {count}");
        }
    }
}

/// How much `verdict`'s counter grew from `before` to `after` (two
/// [`Harness::verdicts`] readings).
pub fn verdict_delta(before: &[(Verdict, u64)], after: &[(Verdict, u64)], verdict: Verdict) -> u64 {
    let n = |vs: &[(Verdict, u64)]| {
        vs.iter()
            .find(|(v, _)| *v == verdict)
            .map_or(0, |(_, n)| *n)
    };
    n(after) - n(before)
}

#[allow(clippy::too_many_arguments)] // one argument per header field under test
pub fn udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, ttl)
        .udp(sport, dport)
        .write(&mut out, payload)
        .expect("build udp frame");
    out
}

/// Rewrites the IPv4 header checksum after a test edited the header.
pub fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = lb_common::checksum::compute(&frame[14..14 + ihl], 0);
    frame[24..26].copy_from_slice(&c.to_ne_bytes());
}

/// Splits an Ethernet/IPv4 frame (no options) into IPv4 fragments as a
/// host does: `chunk` payload bytes each (a multiple of 8) but the last,
/// all with IP id `id`, DF clear, MF on all but the last.
pub fn fragments(frame: &[u8], id: u16, chunk: usize) -> Vec<Vec<u8>> {
    assert!(
        chunk.is_multiple_of(8) && chunk > 0,
        "fragment payloads are 8-byte units"
    );
    let (head, payload) = frame.split_at(14 + 20);
    let pieces: Vec<&[u8]> = payload.chunks(chunk).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut f = head.to_vec();
            f.extend_from_slice(piece);
            let more = if i + 1 < pieces.len() { 0x2000 } else { 0 };
            let frag_off = more | ((i * chunk / 8) as u16);
            f[16..18].copy_from_slice(&((20 + piece.len()) as u16).to_be_bytes());
            f[18..20].copy_from_slice(&id.to_be_bytes());
            f[20..22].copy_from_slice(&frag_off.to_be_bytes());
            fix_ip_checksum(&mut f);
            f
        })
        .collect()
}

/// Clears DF in an Ethernet/IPv4 frame (etherparse sets it) and fixes the
/// header checksum.
pub fn without_df(mut frame: Vec<u8>) -> Vec<u8> {
    frame[20] &= !0x40;
    fix_ip_checksum(&mut frame);
    frame
}

/// Ethernet/IPv4 ICMP error `kind` from `src` to `dst` quoting `quoted` (an
/// IPv4 packet without Ethernet).
pub fn icmp_error(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    kind: etherparse::Icmpv4Type,
    quoted: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src, dst, ttl)
        .icmpv4(kind)
        .write(&mut out, quoted)
        .expect("build icmp error");
    out
}

/// ns/packet of one BPF_PROG_TEST_RUN call of `repeat` runs of `frame`.
pub fn ns_per_packet(dp: &mut Dataplane, ifindex: u32, frame: &[u8], repeat: u32) -> f64 {
    let prog = dp.program().expect("program");
    xdp::test_run(prog, ifindex, frame, repeat, false)
        .expect("BPF_PROG_TEST_RUN")
        .duration
        .as_nanos() as f64
}

pub fn prefix(text: &str) -> lb_userspace::config::Prefix {
    lb_userspace::config::Prefix::parse(text).expect("prefix")
}

/// Each rule's counter, by its text ("deny 10.77.0.0/16") and scope.
pub fn rule_counts(dp: &Dataplane) -> std::collections::BTreeMap<(u32, String), u64> {
    dp.firewall_rules()
        .expect("firewall rules")
        .into_iter()
        .map(|r| ((r.rule.scope, r.rule.to_string()), r.new_flows))
        .collect()
}

/// [`Harness::expect_case`], and asserts that exactly the rule `rule`
/// (scope, "deny 1.2.3.0/24") counted the packet, or none.
pub fn expect_rule(
    h: &mut Harness,
    what: &str,
    frame: &[u8],
    action: u32,
    reason: Verdict,
    rule: Option<(u32, &str)>,
) {
    let before = rule_counts(&h.dp);
    let front = h.front;
    h.expect_case(what, front, frame, action, reason);
    let after = rule_counts(&h.dp);
    let moved: Vec<(u32, String)> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    let expected: Vec<(u32, String)> = rule.map(|(s, r)| (s, r.to_owned())).into_iter().collect();
    assert_eq!(moved, expected, "rule counters: {what}");
    if let Some(k) = expected.first() {
        assert_eq!(after[k], before[k] + 1, "{what}: one new flow");
    }
}
