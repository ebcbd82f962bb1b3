//! The lab's DNS servers: Debian's NSD (an authoritative-only server, one
//! process per web namespace, no root-owned files: every path is under the
//! lab's run dir) serving the zone `foobar.com`, in which `www.foobar.com`
//! reads the web's own address, so a client can tell which web answered.
//!
//! NSD rather than a resolver (unbound) because the lab needs a server that
//! answers from its own data; and it gives a deterministic SERVFAIL: a zone
//! that is configured but whose zone file is missing is answered SERVFAIL
//! ([`DnsZone::Missing`]), the state of a broken zone deployment.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RData, RecordType},
};

use super::{Lab, VIP, WEB_NAMES, web_addr};
use rustix::process::Signal;

use crate::harness::netns::{self, SpawnGated, in_netns};

/// The DNS service's port, on the VIP and on each web.
pub const DNS_PORT: u16 = 53;
/// The zone the lab's DNS servers serve.
pub const DNS_ZONE: &str = "foobar.com";
/// The name the lab's DNS check and clients ask for (type A).
pub const DNS_NAME: &str = "www.foobar.com";

/// What a lab DNS server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsZone {
    /// The zone, `www` reading the web's address.
    Serving,
    /// The zone is configured, its file is missing: SERVFAIL for every
    /// name in it.
    Missing,
}

/// The VIP's DNS service address.
pub fn vip_dns() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, DNS_PORT))
}

/// The `dns` service of `lb lab up`'s configs: UDP on VIP:53, round robin
/// over the webs' NSD, each checked with a DNS query for [`DNS_NAME`].
pub fn dns_service_config() -> String {
    let backends: Vec<String> = (1..=WEB_NAMES.len())
        .map(|n| {
            format!(
                "{{ address = \"{}:{DNS_PORT}\", name = \"web{n}\" }}",
                web_addr(n)
            )
        })
        .collect();
    format!(
        "\n[[service]]\nname = \"dns\"\nvip = \"{VIP}:{DNS_PORT}\"\nprotocol = \"udp\"\n\
         scheduler = \"round-robin\"\n\
         health = {{ check = \"dns\", query-name = \"{DNS_NAME}\", query-type = \"A\", \
         interval = \"1s\", timeout = \"500ms\", rise = 2, fall = 2 }}\n\
         backends = [ {} ]\n",
        backends.join(", ")
    )
}

impl Lab {
    fn dns_dir(&self, n: usize) -> PathBuf {
        self.run_dir().join(format!("dns-web{n}"))
    }

    /// Starts NSD in web `n`'s namespace (1-based) on its own address and
    /// the VIP (so DSR replies leave from the VIP), port 53, and waits until
    /// it answers.
    pub fn start_dns(&mut self, n: usize, zone: DnsZone) -> anyhow::Result<()> {
        netns::require_tool("nsd", "run `cargo xtask setup` (Debian package nsd)")?;
        if !(1..=WEB_NAMES.len()).contains(&n) {
            bail!("no web server {n}");
        }
        let dir = self.dns_dir(n);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let d = dir.display();
        let addr = web_addr(n);
        let zone_file = match zone {
            DnsZone::Serving => "foobar.com.zone",
            DnsZone::Missing => "missing.zone",
        };
        fs::write(
            dir.join("foobar.com.zone"),
            format!(
                "$ORIGIN {DNS_ZONE}.\n$TTL 60\n@ IN SOA ns1 hostmaster 1 3600 600 86400 60\n\
                 @ IN NS ns1\nns1 IN A {addr}\nwww IN A {addr}\n"
            ),
        )?;
        let conf = dir.join("nsd.conf");
        fs::write(
            &conf,
            format!(
                "server:\n  ip-address: {addr}\n  ip-address: {VIP}\n  port: {DNS_PORT}\n  \
                 username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n  \
                 pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  \
                 zonelistfile: \"{d}/zone.list\"\n  xfrdir: \"{d}\"\n  server-count: 1\n  \
                 verbosity: 1\n  hide-version: yes\n\
                 remote-control:\n  control-enable: no\n\
                 zone:\n  name: \"{DNS_ZONE}\"\n  zonefile: \"{zone_file}\"\n"
            ),
        )?;
        let log = dir.join("nsd.log");
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let conf = conf.display().to_string();
        let mut cmd = netns::ns_command(&self.web_ns(n), &["nsd", "-d", "-c", &conf]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // Its own process group, as the lab's MariaDB: `lb lab up` returns
        // and leaves it running (teardown finds it in its namespace).
        netns::new_session(&mut cmd);
        let child = cmd.spawn_gated().context("starting nsd")?;
        self.children.push(child);
        // Up when it answers (any rcode: a missing zone is SERVFAIL).
        let target = SocketAddr::V4(SocketAddrV4::new(addr, DNS_PORT));
        let deadline = Instant::now() + Duration::from_secs(10);
        while in_netns(&self.client_ns(), || {
            dns_query(target, DNS_NAME, Duration::from_millis(200)).is_err()
        })? {
            if Instant::now() > deadline {
                let log = fs::read_to_string(&log).unwrap_or_default();
                bail!("nsd in web{n} does not answer on {target}; its log:\n{log}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops web `n`'s NSD (SIGTERM) and waits until it has exited.
    pub fn stop_dns(&mut self, n: usize) -> anyhow::Result<()> {
        let pid_file = self.dns_dir(n).join("nsd.pid");
        let pid: u32 = fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{}: not a pid", pid_file.display()))?;
        let Some(child) = self.children.iter_mut().find(|c| c.id() == pid) else {
            bail!("nsd of web{n} (pid {pid}) is not a lab child");
        };
        netns::signal(pid, Signal::TERM);
        child.wait().context("waiting for nsd to exit")?;
        self.children.retain(|c| c.id() != pid);
        Ok(())
    }
}

/// What a DNS server said to one query: its rcode (by name, e.g.
/// `"NOERROR"`, `"SERVFAIL"`) and the addresses of its A answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    pub rcode: String,
    pub addresses: Vec<Ipv4Addr>,
}

/// Asks `target` for `name`'s A records over UDP from the calling thread's
/// namespace (a client's query, built and read with hickory-proto), waiting
/// at most `wait` for the reply.
pub fn dns_query(target: SocketAddr, name: &str, wait: Duration) -> anyhow::Result<DnsAnswer> {
    let mut query = Message::query();
    query.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let wire = query.to_vec()?;
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(wait))?;
    socket.send(&wire)?;
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("no DNS reply from {target}"))?;
    let reply = Message::from_vec(&buf[..n]).context("the DNS reply does not parse")?;
    if reply.metadata.id != query.metadata.id {
        bail!(
            "DNS reply id {} for query {}",
            reply.metadata.id,
            query.metadata.id
        );
    }
    let code = u16::from(reply.metadata.response_code);
    let rcode = crate::config::DnsRcode::ALL
        .iter()
        .find(|(.., c)| *c == code)
        .map_or_else(|| code.to_string(), |(_, name, _)| (*name).to_owned());
    let addresses = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    Ok(DnsAnswer { rcode, addresses })
}
