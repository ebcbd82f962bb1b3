//! `[announce]` over IPv6 with real BIRD 2 daemons: two LBs' BIRDs each
//! include the file the agent's `announce::render` writes (an IPv6 VIP as a
//! /128 in the `lb_vips6` static protocol) and export it over a BGP session
//! with an ipv6 channel to a router's BIRD, which merges the equal routes
//! into one ECMP route in its kernel. Withdrawing the VIP on one LB (the
//! include file rewritten, BIRD `configure`d through its control socket, as
//! the agent does) leaves the router one next hop.
//!
//! Every process and namespace is the test's own (prefix from
//! `unique_prefix`), removed on drop. Needs root and BIRD 2 (`cargo xtask
//! setup` installs it); without them the test fails loudly.

use std::{
    fs,
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use lb_tests::unique_prefix;
use lb_userspace::{
    announce::{self, Bird, Withdrawn},
    harness::netns::{self, Netns, VethEnd},
};

const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x10);
const ROUTER_AS: u32 = 64512;
const LB_AS: u32 = 64513;
const TIMERS: &str =
    "hold time 3;\n  keepalive time 1;\n  connect retry time 1;\n  error wait time 1, 5;";
const CONVERGE: Duration = Duration::from_secs(30);

/// The router's and LB `n`'s addresses on their link 2001:db8:2:n::/64.
fn link(n: usize) -> (Ipv6Addr, Ipv6Addr) {
    let net = 0x2000 + n as u16;
    (
        Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, 2),
    )
}

/// The namespaces and the BIRDs; the BIRDs are killed before the
/// namespaces go.
struct Site {
    dir: PathBuf,
    birds: Vec<Child>,
    _namespaces: Vec<Netns>,
}

impl Drop for Site {
    fn drop(&mut self) {
        for child in &mut self.birds {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Site {
    fn start_bird(&mut self, ns: &str, name: &str, conf: &str) -> Result<Bird> {
        let conf_path = self.dir.join(format!("{name}.conf"));
        fs::write(&conf_path, conf)?;
        let socket = self.dir.join(format!("{name}.ctl"));
        let log = fs::File::create(self.dir.join(format!("{name}.out")))?;
        let (conf_arg, socket_arg) = (
            conf_path.display().to_string(),
            socket.display().to_string(),
        );
        let pid = self.dir.join(format!("{name}.pid")).display().to_string();
        let child = netns::ns_command(
            ns,
            &["bird", "-f", "-c", &conf_arg, "-s", &socket_arg, "-P", &pid],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("starting BIRD in {ns}"))?;
        self.birds.push(child);
        let bird = Bird::new(&socket);
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = bird.view() {
            ensure!(
                Instant::now() < deadline,
                "BIRD {name} never answered: {e}; its output: {}",
                fs::read_to_string(self.dir.join(format!("{name}.out"))).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(bird)
    }
}

/// The next hops of the router's kernel route to the VIP6 (none if absent).
fn next_hops(router: &str) -> Result<Vec<String>> {
    let vip = format!("{VIP6}/128");
    let out = netns::ns_run(router, &["ip", "-6", "route", "show", &vip])?;
    let mut hops = Vec::new();
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "via" {
            hops.extend(words.next().map(str::to_owned));
        }
    }
    hops.sort();
    Ok(hops)
}

fn wait_for_hops(router: &str, want: &[Ipv6Addr], what: &str) -> Result<()> {
    let mut want: Vec<String> = want.iter().map(ToString::to_string).collect();
    want.sort();
    let deadline = Instant::now() + CONVERGE;
    loop {
        let got = next_hops(router)?;
        if got == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: the router's route to {VIP6} goes via {got:?}, not {want:?} after {CONVERGE:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ipv6_vips_are_announced_as_128s_over_bgp_and_merged_by_ecmp() -> Result<()> {
    assert!(
        rustix::process::geteuid().is_root(),
        "the IPv6 announce test needs root (network namespaces, BIRD): run `cargo xtask test` as root"
    );
    netns::require_tool(
        "bird",
        "apt-get install bird2 (cargo xtask setup installs it)",
    )?;
    let prefix = unique_prefix("lba6");
    let dir = std::env::temp_dir().join(&prefix);
    fs::create_dir_all(&dir)?;
    let router = format!("{prefix}-r");
    let lbs = [format!("{prefix}-lb1"), format!("{prefix}-lb2")];
    let mut namespaces = vec![Netns::create(&router)?];
    for ns in &lbs {
        namespaces.push(Netns::create(ns)?);
    }
    let mut site = Site {
        dir: dir.clone(),
        birds: Vec::new(),
        _namespaces: namespaces,
    };
    for (i, ns) in lbs.iter().enumerate() {
        let n = i + 1;
        let (r_addr, lb_addr) = link(n);
        let r_dev = format!("r{n}");
        netns::add_veth(
            &VethEnd::new(&router, &r_dev),
            &VethEnd::new(ns, "lb-front"),
        )?;
        for (ns, dev, addr) in [
            (router.as_str(), r_dev.as_str(), r_addr),
            (ns, "lb-front", lb_addr),
        ] {
            let cidr = format!("{addr}/64");
            netns::ns_run(ns, &["ip", "-6", "addr", "add", &cidr, "dev", dev, "nodad"])?;
        }
    }
    netns::sysctl(&router, "net/ipv6/conf/all/forwarding", "1")?;

    // The router: a BGP session with an ipv6 channel per LB, the learnt
    // routes into its kernel, equal ones merged (ECMP).
    let mut peers = String::new();
    for n in 1..=lbs.len() {
        peers.push_str(&format!(
            "protocol bgp lb{n} from lbs {{ neighbor {} as {LB_AS}; }}\n",
            link(n).1
        ));
    }
    let router_conf = format!(
        "router id 10.255.0.1;\n\
         protocol device {{ scan time 10; }}\n\
         protocol kernel {{\n  ipv6 {{ import none; export where source = RTS_BGP; }};\n  merge paths on;\n}}\n\
         template bgp lbs {{\n  local as {ROUTER_AS};\n  ipv6 {{ import all; export none; }};\n  {TIMERS}\n}}\n\
         {peers}"
    );
    site.start_bird(&router, "router", &router_conf)?;

    // Each LB: the agent's include file, exported over the ipv6 channel.
    let mut birds = Vec::new();
    for (i, ns) in lbs.iter().enumerate() {
        let n = i + 1;
        let include = dir.join(format!("lb{n}-vips.conf"));
        let vips = [IpAddr::V6(VIP6), "198.18.0.10".parse()?];
        fs::write(
            &include,
            announce::render(&vips, &Withdrawn::default(), 100),
        )?;
        let conf = format!(
            "router id 10.255.0.{};\n\
             include \"{}\";\n\
             protocol device {{ scan time 10; }}\n\
             protocol bgp to_router {{\n  local as {LB_AS};\n  neighbor {} as {ROUTER_AS};\n  \
             ipv6 {{ import none; export where proto = \"{}\"; }};\n  {TIMERS}\n}}\n",
            10 + n,
            include.display(),
            link(n).0,
            announce::STATIC_PROTOCOL6,
        );
        birds.push((site.start_bird(ns, &format!("lb{n}"), &conf)?, include));
    }
    let lb_addrs: Vec<Ipv6Addr> = (1..=lbs.len()).map(|n| link(n).1).collect();
    wait_for_hops(&router, &lb_addrs, "both LBs announcing")?;

    // lb1 withdraws the VIP6 as its agent would (`lb vip withdraw`):
    // the include file rewritten, BIRD reconfigured.
    let (bird1, include1) = &birds[0];
    let mut withdrawn = Withdrawn::default();
    withdrawn.withdraw(Some(IpAddr::V6(VIP6)));
    fs::write(
        include1,
        announce::render(&["198.18.0.10".parse()?], &withdrawn, 100),
    )?;
    bird1.configure()?;
    wait_for_hops(&router, &lb_addrs[1..], "lb1 withdrew")?;
    // And announces it again.
    fs::write(
        include1,
        announce::render(&[IpAddr::V6(VIP6)], &Withdrawn::default(), 100),
    )?;
    bird1.configure()?;
    wait_for_hops(&router, &lb_addrs, "lb1 announced again")?;
    // BIRD's own view, as `lb status` shows it: the /128 exported.
    let view = bird1.view()?;
    let exported = view.exported.get("to_router").cloned().unwrap_or_default();
    ensure!(
        exported.iter().any(|p| p == &format!("{VIP6}/128")),
        "lb1's BIRD exports {exported:?}"
    );
    drop(site);
    Ok(())
}
