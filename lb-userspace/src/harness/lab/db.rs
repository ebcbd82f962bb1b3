//! The lab's database tier: `db1` (primary), `db2` and `db3` (replicas),
//! each a real MariaDB server (`mariadbd`, Debian's `mariadb-server`) in its
//! own namespace on the back switch, with real GTID replication set up by
//! the lab. Everything lives under the lab's run dir (`{run_dir}/dbN`:
//! datadir, socket, pid file, error log) and goes with the lab.
//!
//! ```text
//!   {P}-lb: lb-back 198.19.0.1 and 198.19.1.1, lo 198.18.0.20 (write VIP)
//!                                                  198.18.0.21 (read VIP)
//!   {P}-sw: br0 ── p-dbN ── {P}-dbN: eth0 198.19.1.2N, default via 198.19.1.1
//! ```
//!
//! The databases sit on their own subnet (198.19.1.0/24) on the same
//! switch, with the LB as their gateway: a web server (198.19.0.1N) that
//! talks to a DB VIP gets its answers back through the LB, which reverses
//! the NAT; on a shared subnet the database would answer the web server
//! directly, with the wrong source address.
//!
//! Every database also has an IPv6 address (2001:db8:19:1::2N, the LB
//! ::1 their IPv6 gateway). [`Lab::start_databases6`] runs the tier over
//! IPv6: the replicas replicate from db1's IPv6 address, and the IPv6 DB
//! VIPs 2001:db8:18::20 (write) and ::21 (read) sit on the LB's `lo`,
//! routed from the client through the LB's front address, for a pool of
//! IPv6 VIPs and members ([`pool_config6`]).
//!
//! A second LB carries the pool's traffic too ([`Lab::add_pool_lb`]), for
//! clients of its own and without full NAT: it keeps the source address,
//! so the replies must come back through it and not through lb1. Its
//! clients get a network of their own (198.18.1N.0/24 behind LB N), and
//! every database a route to that network via LB N's back address:
//!
//! ```text
//!   {P}-client2: eth0 198.18.12.2 ── lb-front 198.18.12.1 :{P}-lb2
//!   {P}-lb2: lb-back 198.19.1.2 on br0, lo 198.18.0.20 + .21 (the VIPs)
//!   {P}-dbN: 198.18.12.0/24 via 198.19.1.2 (default still via 198.19.1.1)
//! ```
//!
//! Small and fast rather than durable: 16 MB buffer pool, no fsync
//! (`innodb_flush_log_at_trx_commit = 2`, `sync_binlog = 0`),
//! `skip-name-resolve`; semi-synchronous replication, so that an
//! acknowledged write survives a failover. One `mariadb-install-db` makes a template datadir
//! that every member copies.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use rustix::process::Signal;

use super::{Lab, WEB_NAMES, web_addr};
use crate::harness::netns::{self, SpawnGated as _, VethEnd, in_netns};

/// Database server names; db1 starts as the primary.
pub const DB_NAMES: [&str; 3] = ["db1", "db2", "db3"];
/// The MySQL port of every member and of both DB VIPs.
pub const DB_PORT: u16 = 3306;
/// The write service's VIP (routes to the primary).
pub const WRITE_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
/// The read service's VIP (spreads over the replicas).
pub const READ_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 21);
/// The write service's IPv6 VIP, 2001:db8:18::20 (the twin of
/// [`WRITE_VIP`]; [`Lab::start_databases6`]).
pub const WRITE_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x20);
/// The read service's IPv6 VIP, 2001:db8:18::21.
pub const READ_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x21);
/// The LB's address on the databases' subnet: their gateway.
pub const DB_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
/// The account the agent checks, promotes and fences with (and replicas
/// replicate with); its password is in [`admin_password_file`].
pub const ADMIN_USER: &str = "lb";
const ADMIN_PASSWORD: &str = "lb-lab-only";
/// The application's account: SELECT and INSERT on `app.*`, no admin
/// rights, so `read_only` stops its writes.
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-lab-only";
/// The application's table: one row per visit.
pub const VISITS_TABLE: &str = "app.visits";

const DB_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Address of database `n` (1-based): 198.19.1.2N.
pub fn db_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1, u8::try_from(20 + n).unwrap_or(u8::MAX))
}

/// IPv6 address of database `n` (1-based): 2001:db8:19:1::2N, beside
/// [`db_addr`] (the dual-stack lab: the databases' subnet 198.19.1.0/24 is
/// 2001:db8:19:1::/64, the LB's address there ::1, their IPv6 gateway).
pub fn db_addr6(n: usize) -> Ipv6Addr {
    let last = u16::try_from(0x20 + n).unwrap_or(u16::MAX);
    Ipv6Addr::new(0x2001, 0xdb8, 0x19, 1, 0, 0, 0, last)
}

/// The LB's IPv6 address on the databases' subnet: their IPv6 gateway.
pub const DB_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 1, 0, 0, 0, 1);

/// LB `n`'s (2..) address on the databases' subnet when it runs the
/// pool next to lb1: 198.19.1.N. Its agent probes the databases from there,
/// and replies to its own client network return through it.
pub fn pool_lb_back_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1, u8::try_from(n).unwrap_or(u8::MAX))
}

/// LB `n`'s own client network ([`Lab::add_pool_lb`]):
/// 198.18.(10+N).0/24, the LB's `lb-front` at .1, the client at .2.
fn pool_client_net(n: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, u8::try_from(10 + n).unwrap_or(u8::MAX), host)
}

/// The client behind LB `n` ([`Lab::add_pool_lb`]): 198.18.(10+N).2.
pub fn pool_client_addr(n: usize) -> Ipv4Addr {
    pool_client_net(n, 2)
}

pub fn write_vip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(WRITE_VIP, DB_PORT))
}

pub fn read_vip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(READ_VIP, DB_PORT))
}

pub fn write_vip6() -> SocketAddr {
    SocketAddr::new(WRITE_VIP6.into(), DB_PORT)
}

pub fn read_vip6() -> SocketAddr {
    SocketAddr::new(READ_VIP6.into(), DB_PORT)
}

/// The family of a lab pool's VIPs and members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolFamily {
    V4,
    V6,
}

impl PoolFamily {
    /// (write VIP, read VIP).
    fn vips(self) -> (SocketAddr, SocketAddr) {
        match self {
            PoolFamily::V4 => (write_vip(), read_vip()),
            PoolFamily::V6 => (write_vip6(), read_vip6()),
        }
    }

    /// Database `n`'s MySQL address.
    fn member(self, n: usize) -> SocketAddr {
        let ip: IpAddr = match self {
            PoolFamily::V4 => db_addr(n).into(),
            PoolFamily::V6 => db_addr6(n).into(),
        };
        SocketAddr::new(ip, DB_PORT)
    }
}

/// Where the lab keeps the application's database password (mode 0600),
/// for the web servers' `/visits`.
pub fn app_password_file(run_dir: &Path) -> PathBuf {
    run_dir.join("db-app-password")
}

/// Where the lab keeps the agent's database password (mode 0600).
pub fn admin_password_file(run_dir: &Path) -> PathBuf {
    run_dir.join("db-password")
}

/// The `[[pool]]` of the lab's databases: write VIP 198.18.0.20:3306,
/// read VIP 198.18.0.21:3306, checked every 500 ms (rise 2, fall 2),
/// `max-lag` 2 s, and automatic failover after `auto_failover` if given.
pub fn pool_config(run_dir: &Path, auto_failover: Option<&str>) -> String {
    pool_toml(PoolFamily::V4, run_dir, auto_failover, "")
}

/// [`pool_config`] over IPv6: write VIP [2001:db8:18::20]:3306, read VIP
/// [2001:db8:18::21]:3306, the members by their IPv6 addresses
/// ([`db_addr6`]), and `extra` (keys, one a line, e.g. `auto-rejoin`).
pub fn pool_config6(run_dir: &Path, auto_failover: Option<&str>, extra: &str) -> String {
    pool_toml(PoolFamily::V6, run_dir, auto_failover, extra)
}

/// The site's pool ([`pool_config`]) with the database reachable only from
/// the web servers: `allow-from` each web's address, so the client (or
/// anyone else) is refused on both database VIPs
/// (`drop_firewall_not_allowed`) while the webs' `/visits` go on.
pub fn site_pool_config(run_dir: &Path, auto_failover: Option<&str>) -> String {
    let webs = (1..=WEB_NAMES.len())
        .map(|n| format!("\"{}\"", web_addr(n)))
        .collect::<Vec<_>>()
        .join(", ");
    pool_toml(
        PoolFamily::V4,
        run_dir,
        auto_failover,
        &format!("allow-from = [{webs}]\n"),
    )
}

/// A `[[pool]]` of `family` with `extra` (keys, one a line) before its
/// health check.
fn pool_toml(
    family: PoolFamily,
    run_dir: &Path,
    auto_failover: Option<&str>,
    extra: &str,
) -> String {
    let members = (1..=DB_NAMES.len())
        .map(|n| {
            format!(
                "  {{ name = \"{}\", address = \"{}\" }},\n",
                DB_NAMES[n - 1],
                family.member(n)
            )
        })
        .collect::<String>();
    let auto = auto_failover
        .map(|d| format!("auto-failover = \"{d}\"\n"))
        .unwrap_or_default();
    let (write, read) = family.vips();
    format!(
        "\n[[pool]]\nname = \"db\"\nwrite-vip = \"{write}\"\nread-vip = \"{read}\"\n\
         max-lag = \"2s\"\nprimary-fallback = true\n{auto}{extra}\
         health = {{ check = \"mysql\", user = \"{ADMIN_USER}\", password-file = \"{}\", interval = \"500ms\", timeout = \"500ms\", rise = 2, fall = 2 }}\n\
         members = [\n{members}]\n",
        admin_password_file(run_dir).display()
    )
}

impl Lab {
    /// The LB that is the databases' gateway and holds the DB VIPs: the
    /// lab's LB, or lb1 of a multi-LB lab (the webs' gateway too, so their
    /// database traffic and its NAT replies cross it).
    pub fn db_gateway_ns(&self) -> String {
        if self.lbs() == 0 {
            self.lb_ns()
        } else {
            self.lb_ns_of(1)
        }
    }

    /// Namespace of database `n` (1-based).
    pub fn db_ns(&self, n: usize) -> String {
        format!("{}-db{n}", self.prefix)
    }

    fn db_dir(&self, n: usize) -> PathBuf {
        self.run_dir().join(format!("db{n}"))
    }

    /// The unix socket of database `n` (for the lab's own admin SQL).
    pub fn db_socket(&self, n: usize) -> PathBuf {
        self.db_dir(n).join("mysqld.sock")
    }

    /// Adds db1..db3 to the lab and starts them with db1 the primary and
    /// db2, db3 replicating from it by GTID; returns once both replicas
    /// have applied the lab's schema (`app.visits`) and accounts.
    pub fn start_databases(&mut self) -> anyhow::Result<()> {
        self.start_databases_from(db_addr(1).into())
    }

    /// [`Lab::start_databases`] over IPv6, for a pool of IPv6 VIPs and
    /// members ([`pool_config6`]): db2 and db3 replicate from db1's IPv6
    /// address ([`db_addr6`]), the IPv6 DB VIPs ([`WRITE_VIP6`],
    /// [`READ_VIP6`]) are on the LB's `lo` and routed from the client
    /// through the LB's front address (as the VIP6 is), and the LB's
    /// kernel forwards IPv6 (an IPv6 service needs it). The single-LB lab
    /// only.
    pub fn start_databases6(&mut self) -> anyhow::Result<()> {
        if self.lbs() != 0 {
            bail!("the databases over IPv6 are set up in the single-LB lab only");
        }
        self.start_databases_from(db_addr6(1).into())?;
        let (lb, client) = (self.lb_ns(), self.client_ns());
        let via = super::LB_FRONT6.to_string();
        for vip in [WRITE_VIP6, READ_VIP6] {
            let host = format!("{vip}/128");
            super::add_addr6(&lb, "lo", &host)?;
            netns::ns_run(&client, &["ip", "-6", "route", "add", &host, "via", &via])
                .with_context(|| format!("routing {host} via the LB on the client"))?;
        }
        self.forward_ipv6()
    }

    /// The databases, db2 and db3 replicating from db1 at `primary`.
    fn start_databases_from(&mut self, primary: IpAddr) -> anyhow::Result<()> {
        netns::require_tool(
            "mariadbd",
            "apt-get install mariadb-server (cargo xtask setup installs it)",
        )?;
        self.build_db_topology()
            .context("adding the database hosts")?;
        let password_file = admin_password_file(&self.run_dir());
        fs::write(&password_file, format!("{ADMIN_PASSWORD}\n"))
            .with_context(|| format!("writing {}", password_file.display()))?;
        set_mode_0600(&password_file)?;
        let app_file = app_password_file(&self.run_dir());
        fs::write(&app_file, format!("{APP_PASSWORD}\n"))
            .with_context(|| format!("writing {}", app_file.display()))?;
        set_mode_0600(&app_file)?;
        self.install_datadirs()?;
        for n in 1..=DB_NAMES.len() {
            self.start_db(n)?;
        }
        self.db_admin(
            1,
            &format!(
                "CREATE USER '{ADMIN_USER}'@'%' IDENTIFIED BY '{ADMIN_PASSWORD}';\
                 GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'%';\
                 CREATE DATABASE app;\
                 CREATE TABLE {VISITS_TABLE} (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
                   seq BIGINT NOT NULL, writer VARCHAR(64) NOT NULL, server_id INT NOT NULL, \
                   at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3));\
                 CREATE USER '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}';\
                 GRANT SELECT, INSERT ON app.* TO '{APP_USER}'@'%';"
            ),
        )?;
        // An IPv6 host is written bare: MASTER_HOST takes no brackets.
        for n in 2..=DB_NAMES.len() {
            self.db_admin(
                n,
                &format!(
                    "CHANGE MASTER TO MASTER_HOST = '{primary}', MASTER_PORT = {DB_PORT}, \
                     MASTER_USER = '{ADMIN_USER}', MASTER_PASSWORD = '{ADMIN_PASSWORD}', \
                     MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 1; START SLAVE;"
                ),
            )?;
        }
        let pos = self.db_admin(1, "SELECT @@global.gtid_binlog_pos")?;
        for n in 2..=DB_NAMES.len() {
            let waited =
                self.db_admin(n, &format!("SELECT MASTER_GTID_WAIT('{}', 20)", pos.trim()))?;
            if waited.trim() != "0" {
                bail!(
                    "db{n} did not replicate db1's setup ({}) within 20 s; SHOW SLAVE STATUS:\n{}",
                    pos.trim(),
                    self.db_admin(n, "SHOW SLAVE STATUS\\G").unwrap_or_default()
                );
            }
        }
        Ok(())
    }

    /// A multi-LB lab's etcd for `[coordination]`: three members on the
    /// back switch's bridge (198.19.1.11–13, the databases' subnet), and
    /// lb2.. an address there (198.19.1.N) so their agents probe the
    /// databases directly. Left running ([`EtcdCluster::detach`]):
    /// `lb lab down` stops it. Returns the client URLs.
    pub fn start_lab_etcd(&self) -> anyhow::Result<Vec<String>> {
        use crate::harness::etcd::{EtcdCluster, Member};
        let sw = self.sw_ns();
        for n in 2..=self.lbs() {
            let addr = pool_lb_back_addr(n);
            netns::add_addr(&self.lb_ns_of(n), "lb-back", &format!("{addr}/24"))?;
        }
        let members: Vec<Member> = (11..=13)
            .map(|last| Member {
                ns: sw.clone(),
                ip: Ipv4Addr::new(198, 19, 1, last),
            })
            .collect();
        for m in &members {
            netns::add_addr(&sw, "br0", &format!("{}/24", m.ip))?;
        }
        let cluster = EtcdCluster::start(&self.prefix, members, &self.run_dir().join("etcd"))
            .context("starting the lab's etcd")?;
        let endpoints = cluster.endpoints();
        cluster.detach();
        Ok(endpoints)
    }

    /// Namespace of the client behind LB `n` ([`Lab::add_pool_lb`]).
    pub fn pool_client_ns(&self, n: usize) -> String {
        format!("{}-client{n}", self.prefix)
    }

    /// A second LB for the pool, carrying its own clients' database
    /// traffic without full NAT: namespace `{P}-lbN` with `lb-back`
    /// 198.19.1.N/24 on the back switch (next to the databases, which it
    /// probes directly), the pool's VIPs on its `lo`, and `lb-front`
    /// 198.18.(10+N).1/24 to a client of its own, `{P}-clientN`
    /// (198.18.(10+N).2, default route via LB N). Every database gets a
    /// route to that client network via 198.19.1.N: the NAT replies to a
    /// connection LB N translated go back through LB N (the databases'
    /// default gateway, lb1, never saw it). Call after
    /// [`Lab::start_databases`]; the lab's teardown removes both
    /// namespaces.
    pub fn add_pool_lb(&self, n: usize) -> anyhow::Result<()> {
        let (ns, client, sw) = (self.lb_ns_of(n), self.pool_client_ns(n), self.sw_ns());
        let port = format!("p-lb{n}");
        netns::add_namespace(&ns)?;
        netns::add_namespace(&client)?;
        netns::add_veth(&VethEnd::new(&ns, "lb-back"), &VethEnd::new(&sw, &port))?;
        netns::ns_run(&sw, &["ip", "link", "set", &port, "master", "br0", "up"])?;
        netns::add_addr(&ns, "lb-back", &format!("{}/24", pool_lb_back_addr(n)))?;
        netns::add_veth(
            &VethEnd::new(&client, "eth0"),
            &VethEnd::new(&ns, "lb-front"),
        )?;
        let gateway = pool_client_net(n, 1);
        netns::add_addr(&ns, "lb-front", &format!("{gateway}/24"))?;
        netns::add_addr(&client, "eth0", &format!("{}/24", pool_client_addr(n)))?;
        netns::add_default_route(&client, gateway)?;
        for vip in [WRITE_VIP, READ_VIP] {
            netns::add_addr(&ns, "lo", &format!("{vip}/32"))?;
        }
        // An LB host forwards (the agent's host check insists).
        netns::sysctl(&ns, "net/ipv4/ip_forward", "1")?;
        let net = format!("{}/24", pool_client_net(n, 0));
        let via = pool_lb_back_addr(n).to_string();
        for db in 1..=DB_NAMES.len() {
            netns::ns_run(&self.db_ns(db), &["ip", "route", "add", &net, "via", &via])
                .with_context(|| format!("routing {net} via LB {n} on db{db}"))?;
        }
        for (ns, dev) in [
            (&ns, "lb-back"),
            (&ns, "lb-front"),
            (&sw, &port),
            (&client, "eth0"),
        ] {
            netns::tune_veth(ns, dev)?;
        }
        fs::create_dir_all(self.lb_dir(n))
            .with_context(|| format!("creating {}", self.lb_dir(n).display()))
    }

    /// A root session on database `n` holding `LOCK TABLES {table} WRITE`
    /// until the guard is dropped: a replica's SQL thread waits for it, so
    /// what the replica received stays unapplied meanwhile (a slow
    /// catch-up, seen from outside).
    pub fn lock_table(&self, n: usize, table: &str) -> anyhow::Result<TableLock> {
        use std::io::{BufRead as _, BufReader, Write as _};
        let mut child = Command::new("mariadb")
            .args(["--no-defaults", "-uroot", "-N", "-B", "--unbuffered"])
            .arg(format!("--socket={}", self.db_socket(n).display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("running mariadb on db{n}"))?;
        let mut stdin = child.stdin.take().context("mariadb's stdin")?;
        let stdout = child.stdout.take().context("mariadb's stdout")?;
        let mut guard = TableLock {
            child,
            _stdin: None,
        };
        writeln!(stdin, "LOCK TABLES {table} WRITE; SELECT 'locked';")
            .with_context(|| format!("db{n}: writing to mariadb"))?;
        guard._stdin = Some(stdin);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .with_context(|| format!("db{n}: reading mariadb's answer"))?;
        if line.trim() != "locked" {
            bail!("db{n}: LOCK TABLES {table} WRITE failed ({line:?})");
        }
        Ok(guard)
    }

    fn build_db_topology(&self) -> anyhow::Result<()> {
        let sw = self.sw_ns();
        let lb = self.db_gateway_ns();
        netns::add_addr(&lb, "lb-back", &format!("{DB_GATEWAY}/24"))?;
        super::add_addr6(&lb, "lb-back", &format!("{DB_GATEWAY6}/64"))?;
        netns::add_addr(&lb, "lo", &format!("{WRITE_VIP}/32"))?;
        netns::add_addr(&lb, "lo", &format!("{READ_VIP}/32"))?;
        for n in 1..=DB_NAMES.len() {
            let ns = self.db_ns(n);
            let port = format!("p-db{n}");
            // Every lab namespace is made with the lab; an empty one costs nothing.
            if !netns::exists(&ns) {
                netns::add_namespace(&ns)?;
            }
            netns::add_veth(&VethEnd::new(&ns, "eth0"), &VethEnd::new(&sw, &port))?;
            netns::ns_run(&sw, &["ip", "link", "set", &port, "master", "br0", "up"])
                .with_context(|| format!("enslaving {port} to br0 in {sw}"))?;
            netns::add_addr(&ns, "eth0", &format!("{}/24", db_addr(n)))?;
            netns::ns_run(&ns, &["ip", "link", "set", "eth0", "up"])?;
            netns::ns_run(
                &ns,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &DB_GATEWAY.to_string(),
                ],
            )?;
            super::add_addr6(&ns, "eth0", &format!("{}/64", db_addr6(n)))?;
            let gateway6 = DB_GATEWAY6.to_string();
            netns::ns_run(
                &ns,
                &["ip", "-6", "route", "add", "default", "via", &gateway6],
            )?;
            netns::tune_veth(&ns, "eth0")?;
            netns::tune_veth(&sw, &port)?;
        }
        Ok(())
    }

    /// One `mariadb-install-db` into a template, copied to every member
    /// (a fresh install holds nothing member-specific: the server id and
    /// the roles come from the command line and the replication setup).
    fn install_datadirs(&self) -> anyhow::Result<()> {
        let template = self.run_dir().join("db-template");
        let log = self.run_dir().join("db-install.log");
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the install log")?;
        // A temp dir of the lab's own: labs install at the same time, and
        // MariaDB's temporary tables in a shared /tmp have been seen to clash.
        let tmp = self.run_dir().join("db-tmp");
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let status = Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                &format!("--datadir={}", template.display()),
                &format!("--tmpdir={}", tmp.display()),
                "--user=root",
                "--skip-test-db",
                "--auth-root-authentication-method=socket",
                "--innodb-buffer-pool-size=16M",
                "--innodb-log-file-size=8M",
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .context("running mariadb-install-db")?;
        if !status.success() {
            bail!(
                "mariadb-install-db failed ({status}):\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        for n in 1..=DB_NAMES.len() {
            let dir = self.db_dir(n);
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let data = dir.join("data");
            let copied = Command::new("cp")
                .args(["-a"])
                .arg(&template)
                .arg(&data)
                .status()
                .context("copying the template datadir")?;
            if !copied.success() {
                bail!("cp -a {} {} failed", template.display(), data.display());
            }
        }
        fs::remove_dir_all(&template).with_context(|| format!("removing {}", template.display()))
    }

    /// Starts (or restarts) `mariadbd` of database `n` on its datadir and
    /// waits until it accepts connections. db1 starts writable, the others
    /// read-only: a restarted db1 comes back claiming to be a primary.
    pub fn start_db(&mut self, n: usize) -> anyhow::Result<()> {
        let dir = self.db_dir(n);
        let arg = |name: &str, path: &str| format!("--{name}={}", dir.join(path).display());
        let args: Vec<String> = vec![
            "mariadbd".into(),
            "--no-defaults".into(),
            "--user=root".into(),
            arg("datadir", "data"),
            arg("socket", "mysqld.sock"),
            arg("pid-file", "mysqld.pid"),
            arg("log-error", "error.log"),
            // Its own temp dir (see `install_datadirs`).
            format!("--tmpdir={}", dir.display()),
            // Both families (MariaDB 10.11 takes a list).
            format!("--bind-address={},{}", db_addr(n), db_addr6(n)),
            format!("--port={DB_PORT}"),
            format!("--server-id={n}"),
            format!("--read-only={}", u8::from(n != 1)),
            "--log-bin=mysql-bin".into(),
            "--log-slave-updates".into(),
            "--binlog-format=ROW".into(),
            "--gtid-strict-mode=1".into(),
            "--skip-name-resolve".into(),
            "--performance-schema=OFF".into(),
            "--innodb-buffer-pool-size=16M".into(),
            "--innodb-log-file-size=8M".into(),
            "--innodb-flush-log-at-trx-commit=2".into(),
            "--sync-binlog=0".into(),
            "--innodb-use-native-aio=0".into(),
            "--max-connections=200".into(),
            // Semi-synchronous replication: a commit is acknowledged only
            // once a replica has it, so a promoted replica holds every
            // write a client saw acknowledged (every member can become the
            // primary: both sides on everywhere).
            "--rpl-semi-sync-master-enabled=ON".into(),
            "--rpl-semi-sync-slave-enabled=ON".into(),
            "--rpl-semi-sync-master-wait-point=AFTER_SYNC".into(),
            "--rpl-semi-sync-master-timeout=2000".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = dir.join("stdout.log");
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = netns::ns_command(&self.db_ns(n), &args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::null());
        // Its own process group: `lb lab up` returns and leaves it running
        // (teardown finds it in its namespace).
        netns::new_session(&mut cmd);
        let child = cmd
            .spawn_gated()
            .with_context(|| format!("starting mariadbd of db{n}"))?;
        self.children.push(child);
        let addr = SocketAddr::V4(SocketAddrV4::new(db_addr(n), DB_PORT));
        let deadline = Instant::now() + DB_READY_TIMEOUT;
        while !in_netns(&self.db_gateway_ns(), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
        })? {
            if Instant::now() > deadline {
                bail!(
                    "db{n} not accepting on {addr} after {DB_READY_TIMEOUT:?}; {}:\n{}",
                    dir.join("error.log").display(),
                    fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGKILLs database `n` (a crashed server) and waits until it is gone.
    pub fn kill_db(&mut self, n: usize) -> anyhow::Result<()> {
        let ns = self.db_ns(n);
        let pids = ns_pids(&ns)?;
        for pid in &pids {
            netns::signal(*pid, Signal::KILL);
        }
        let deadline = Instant::now() + DB_READY_TIMEOUT;
        while !ns_pids(&ns)?.is_empty() {
            if Instant::now() > deadline {
                bail!("db{n} survived SIGKILL");
            }
            thread::sleep(Duration::from_millis(20));
        }
        for child in &mut self.children {
            let _ = child.try_wait();
        }
        Ok(())
    }

    /// Runs SQL on database `n` as its root (over its unix socket, batch
    /// mode, no column names); returns stdout.
    pub fn db_admin(&self, n: usize, sql: &str) -> anyhow::Result<String> {
        let socket = self.db_socket(n);
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-uroot", "-N", "-B"])
            .arg(format!("--socket={}", socket.display()))
            .args(["-e", sql])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running mariadb on db{n}"))?;
        if !out.status.success() {
            bail!(
                "db{n}: {sql}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A table lock held by a root session ([`Lab::lock_table`]); dropping it
/// ends the session, which releases the lock.
pub struct TableLock {
    child: std::process::Child,
    /// Open while the session lives (its end would end the session).
    _stdin: Option<std::process::ChildStdin>,
}

impl Drop for TableLock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pids of the processes in namespace `ns`.
fn ns_pids(ns: &str) -> anyhow::Result<Vec<u32>> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .with_context(|| format!("ip netns pids {ns}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

fn set_mode_0600(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))
}
