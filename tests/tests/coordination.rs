//! `[coordination]` against a real three-member etcd cluster: two LBs'
//! coordination tasks (the product's `coord::run` and `coord::record`), each
//! in a namespace of its own linked to the etcd namespace. One LB leads; only
//! the leader's record is accepted; a leader cut off from etcd stops leading
//! before the other takes over (never two leaders at once) and its late
//! record is refused; a dead leader's pools are taken over within the
//! documented bound. Run with `--nocapture` to see the measured takeovers.

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::unique_prefix;
use lb_userspace::{
    config::Coordination as Config,
    coord::{self, Coordination, Report},
    harness::{
        etcd::{EtcdCluster, EtcdPki, Member},
        netns::{self, Netns, VethEnd, in_netns},
    },
};
use tokio::sync::{mpsc, oneshot};

const TTL: Duration = Duration::from_secs(2);
const POOL: &str = "db";

/// What one LB's task reported, in order.
#[derive(Debug, Clone)]
enum Seen {
    Round(Instant, Result<coord::View, String>),
    Recorded(Result<Option<i64>, String>),
}

struct Lb {
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    records: mpsc::UnboundedSender<(String, i64)>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Lb {
    fn start(ns: &str, name: &str, endpoints: Vec<String>) -> Lb {
        Lb::start_with(
            ns,
            Config {
                etcd: endpoints,
                name: name.to_owned(),
                lease_ttl: TTL,
                tls: None,
                login: None,
            },
        )
    }

    /// An LB's coordination task with `cfg` (its name, TTL, TLS, login).
    fn start_with(ns: &str, cfg: Config) -> Lb {
        let name = cfg.name.clone();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (records, mut record_rx) = mpsc::unbounded_channel::<(String, i64)>();
        let (stop, mut stop_rx) = oneshot::channel::<()>();
        let (ns, log) = (ns.to_owned(), seen.clone());
        let thread = thread::spawn(move || {
            let run = in_netns(&ns, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let (tx, mut rx) = mpsc::unbounded_channel();
                    let task = tokio::spawn(coord::run(cfg.clone(), vec![POOL.to_owned()], tx.clone()));
                    loop {
                        tokio::select! {
                            _ = &mut stop_rx => break,
                            Some((primary, tenure)) = record_rx.recv() => {
                                tokio::spawn(coord::record(cfg.clone(), POOL.to_owned(), tenure, primary, tx.clone()));
                            }
                            Some(event) = rx.recv() => {
                                let s = match event {
                                    Report::Coordinated { result, .. } => Seen::Round(Instant::now(), result),
                                    Report::Recorded { result, .. } => Seen::Recorded(result),
                                };
                                log.lock().expect("log").push(s);
                            }
                        }
                    }
                    // A dead LB: its lease is not revoked, it just stops.
                    task.abort();
                });
            });
            run.expect("LB thread");
        });
        Lb {
            name,
            seen,
            records,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("log").clone()
    }

    /// Its pure coordination state after everything it saw.
    fn state(&self) -> Coordination {
        let mut c = Coordination::new(&self.name, TTL);
        for s in self.seen() {
            match s {
                Seen::Round(at, Ok(v)) => c.observed(v, at),
                Seen::Round(_, Err(e)) => c.unreachable(e),
                Seen::Recorded(_) => {}
            }
        }
        c
    }

    /// When each round saying this LB leads was seen, and until when that
    /// lets it act.
    fn tenures(&self) -> Vec<(Instant, Instant)> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Round(at, Ok(v)) if v.mine => Some((at, v.renewed + TTL / 2)),
                _ => None,
            })
            .collect()
    }

    fn record(&self, primary: &str, tenure: i64) -> Result<Result<Option<i64>, String>> {
        let before = self
            .seen()
            .iter()
            .filter(|s| matches!(s, Seen::Recorded(_)))
            .count();
        self.records.send((primary.to_owned(), tenure))?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Some(Seen::Recorded(r)) = self
                .seen()
                .into_iter()
                .filter(|s| matches!(s, Seen::Recorded(_)))
                .nth(before)
            {
                return Ok(r);
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!("{}: no answer to the record of {primary}", self.name)
    }

    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Ok(start.elapsed());
        }
        thread::sleep(Duration::from_millis(20));
    }
    bail!("{what}: not within {limit:?}")
}

/// No instant at which both LBs could act as leader.
fn never_two_leaders(a: &Lb, b: &Lb) -> Result<()> {
    for (a_from, a_until) in a.tenures() {
        for (b_from, b_until) in b.tenures() {
            ensure!(
                a_until <= b_from || b_until <= a_from,
                "{} led from {a_from:?} until {a_until:?} and {} from {b_from:?} until {b_until:?}",
                a.name,
                b.name
            );
        }
    }
    Ok(())
}

#[test]
fn one_leader_records_the_primary_and_a_cut_off_or_dead_leader_is_replaced_in_bounded_time()
-> Result<()> {
    let prefix = unique_prefix("co");
    let etcd_ns = Netns::create(&format!("{prefix}-etcd"))?;
    let ns_a = Netns::create(&format!("{prefix}-a"))?;
    let ns_b = Netns::create(&format!("{prefix}-b"))?;
    for (i, lb) in [&ns_a, &ns_b].iter().enumerate() {
        let n = i + 1;
        let (near, far) = (format!("e{n}"), format!("lb{n}"));
        netns::add_veth(
            &VethEnd::new(etcd_ns.name(), &near),
            &VethEnd::new(lb.name(), &far),
        )?;
        netns::add_addr(etcd_ns.name(), &near, &format!("198.19.21{n}.1/30"))?;
        netns::add_addr(lb.name(), &far, &format!("198.19.21{n}.2/30"))?;
        netns::ip(etcd_ns.name(), &["link", "set", &near, "up"])?;
        netns::ip(lb.name(), &["link", "set", &far, "up"])?;
        netns::add_default_route(lb.name(), format!("198.19.21{n}.1").parse()?)?;
    }
    let members: Vec<Member> = (1..=3)
        .map(|n| -> Result<Member> {
            netns::add_addr(etcd_ns.name(), "lo", &format!("198.19.210.{n}/32"))?;
            Ok(Member {
                ns: etcd_ns.name().to_owned(),
                ip: Ipv4Addr::new(198, 19, 210, n),
            })
        })
        .collect::<Result<_>>()?;
    let dir = std::env::temp_dir().join(format!("{prefix}-etcd"));
    let cluster = EtcdCluster::start(&prefix, members, &dir)?;
    let endpoints = cluster.endpoints();

    let mut lbs = [
        Lb::start(ns_a.name(), "lb1", endpoints.clone()),
        Lb::start(ns_b.name(), "lb2", endpoints.clone()),
    ];

    // One leader, and both LBs name it.
    wait_until("both LBs see one leader", Duration::from_secs(10), || {
        let (a, b) = (lbs[0].state(), lbs[1].state());
        a.leader.is_some() && a.leader == b.leader
    })?;
    let leader_name = lbs[0].state().leader.context("leader")?.0;
    let (l, f) = if leader_name == "lb1" { (0, 1) } else { (1, 0) };
    let now = Instant::now();
    ensure!(lbs[l].state().leads(now) && !lbs[f].state().leads(now));
    println!("leader: {leader_name}");

    // Only the leader's record is accepted; both LBs read it back.
    let tenure = lbs[l].state().leader.context("tenure")?.1;
    let rev1 = lbs[l]
        .record("db1", tenure)?
        .map_err(anyhow::Error::msg)?
        .context("the leader's record was refused")?;
    ensure!(
        lbs[f].record("db9", tenure)? == Ok(None),
        "a follower's record was accepted"
    );
    wait_until("both LBs read db1's record", Duration::from_secs(3), || {
        lbs.iter().all(|lb| {
            lb.state()
                .recorded
                .is_some_and(|r| r.primary == "db1" && r.revision == rev1)
        })
    })?;

    // Cut the leader off from etcd (and so from the other LB).
    let link = format!("e{}", l + 1);
    netns::ip(etcd_ns.name(), &["link", "set", &link, "down"])?;
    let cut = Instant::now();
    let stepped_down = wait_until("the cut-off leader steps down", TTL * 2, || {
        !lbs[l].state().leads(Instant::now())
    })?;
    wait_until("the other LB takes over", TTL * 4, || {
        lbs[f].state().leads(Instant::now())
    })?;
    let takeover = cut.elapsed();
    println!(
        "cut-off leader {} stopped acting after {} ms; {} took over {} ms after the cut (TTL {} s)",
        lbs[l].name,
        stepped_down.as_millis(),
        lbs[f].name,
        takeover.as_millis(),
        TTL.as_secs()
    );
    ensure!(
        takeover <= TTL + coord::tick(TTL) * 3,
        "takeover took {takeover:?}, bound TTL + 3 ticks"
    );
    // The cut-off LB keeps the record it had.
    let cut_off = lbs[l].state();
    ensure!(cut_off.error.is_some(), "the cut-off LB reached etcd?");
    ensure!(cut_off.recorded.is_some_and(|r| r.primary == "db1"));
    let new_tenure = lbs[f].state().leader.context("tenure")?.1;
    let rev2 = lbs[f]
        .record("db2", new_tenure)?
        .map_err(anyhow::Error::msg)?
        .context("the new leader's record was refused")?;
    ensure!(rev2 > rev1);

    // Healed: the old leader follows the new record, and a late record of
    // its old tenure is refused.
    netns::ip(etcd_ns.name(), &["link", "set", &link, "up"])?;
    wait_until(
        "the healed LB reads db2's record",
        Duration::from_secs(5),
        || {
            let s = lbs[l].state();
            s.error.is_none()
                && s.recorded
                    .as_ref()
                    .is_some_and(|r| r.primary == "db2" && r.revision == rev2)
                && s.leader.as_ref().is_some_and(|(n, _)| *n == lbs[f].name)
        },
    )?;
    let late = lbs[l].record("db1", tenure)?;
    ensure!(
        late == Ok(None),
        "a deposed leader's record was not refused: {late:?}"
    );

    // The leader dies (its lease is not revoked): the other LB leads within
    // TTL and a tick or two.
    lbs[f].kill();
    let died = Instant::now();
    wait_until("the survivor takes over", TTL * 4, || {
        lbs[l].state().leads(Instant::now())
    })?;
    let took = died.elapsed();
    println!(
        "leader {} died; {} took over after {} ms (TTL {} s)",
        lbs[f].name,
        lbs[l].name,
        took.as_millis(),
        TTL.as_secs()
    );
    ensure!(took <= TTL + coord::tick(TTL) * 3);
    ensure!(
        lbs[l]
            .state()
            .recorded
            .is_some_and(|r| r.primary == "db2" && r.revision == rev2),
        "the new leader does not know the record"
    );
    never_two_leaders(&lbs[0], &lbs[1])?;
    for lb in &mut lbs {
        lb.kill();
    }
    drop(cluster);
    Ok(())
}

/// `[coordination]` over TLS with credentials from files, against a real
/// etcd started with TLS on its client URL, client certificates required
/// (`--client-cert-auth`) and its authentication on (user `lb` may read
/// and write `/lb/` only; certificates made by rcgen for the test). The
/// config's `ca-file`, `cert-file`, `key-file`, `user` and
/// `password-file` are parsed by the product's config: its coordination
/// task leads the pool and records a primary. A wrong password, no client
/// certificate, another CA, or no login are each refused by etcd with
/// their reason; the login gives nothing outside `/lb/`; config errors
/// name the file, the key and the reason.
#[test]
fn tls_and_credentials_from_files_lead_and_record_and_wrong_ones_are_refused() -> Result<()> {
    use lb_userspace::{
        config::{EtcdLogin, Secret},
        coord::etcd::Etcd,
    };
    let prefix = unique_prefix("ct");
    let etcd_ns = Netns::create(&format!("{prefix}-etcd"))?;
    let lb_ns = Netns::create(&format!("{prefix}-a"))?;
    netns::add_veth(
        &VethEnd::new(etcd_ns.name(), "e1"),
        &VethEnd::new(lb_ns.name(), "lb1"),
    )?;
    netns::add_addr(etcd_ns.name(), "e1", "198.19.221.1/30")?;
    netns::add_addr(lb_ns.name(), "lb1", "198.19.221.2/30")?;
    netns::add_default_route(lb_ns.name(), "198.19.221.1".parse()?)?;
    netns::add_addr(etcd_ns.name(), "lo", "198.19.220.1/32")?;
    let members = vec![Member {
        ns: etcd_ns.name().to_owned(),
        ip: Ipv4Addr::new(198, 19, 220, 1),
    }];
    let dir = std::env::temp_dir().join(format!("{prefix}-etcd"));
    let files = std::env::temp_dir().join(format!("{prefix}-files"));
    let _files = RemoveDir(files.clone());
    let pki = EtcdPki::write(&files, &members)?;
    let other_ca = EtcdPki::write(&files.join("other"), &members)?;
    let mut cluster = EtcdCluster::start_with(&prefix, members, &dir, Some(pki.clone()))?;
    cluster.enable_auth("root-secret", "lb", "lb-secret", "/lb/")?;
    let endpoint = cluster.endpoints()[0].clone();
    ensure!(endpoint.starts_with("https://"), "{endpoint}");
    let password_file = files.join("etcd-password");
    std::fs::write(&password_file, "lb-secret\n")?;

    // The product's config, files and all.
    let text = |ca: &std::path::Path, key: &std::path::Path| {
        format!(
            "[dataplane]\ninterfaces = [\"lb1\"]\n[[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\n\
             backends = [{{ address = \"198.19.0.11:80\" }}]\n\
             [coordination]\netcd = [\"{endpoint}\"]\nname = \"lb1\"\nlease-ttl = \"2s\"\n\
             ca-file = \"{}\"\ncert-file = \"{}\"\nkey-file = \"{}\"\nuser = \"lb\"\npassword-file = \"{}\"\n",
            ca.display(),
            pki.client_cert.display(),
            key.display(),
            password_file.display()
        )
    };
    let file = std::path::Path::new("/etc/lb/lb.toml");
    let cfg = lb_userspace::config::parse(&text(&pki.ca, &pki.client_key), file)?
        .coordination
        .context("[coordination]")?;
    ensure!(cfg.tls.as_ref().is_some_and(|t| t.client.is_some()) && cfg.login.is_some());
    let e = lb_userspace::config::parse(&text(&pki.ca, &pki.ca), file)
        .err()
        .context("a certificate given as key-file was accepted")?
        .to_string();
    println!("key-file that is a certificate: {e}");
    ensure!(
        e.contains("/etc/lb/lb.toml")
            && e.contains("coordination.key-file")
            && e.contains("no usable PEM private key"),
        "{e}"
    );
    let e = lb_userspace::config::parse(&text(&files.join("none.pem"), &pki.client_key), file)
        .err()
        .context("a missing ca-file was accepted")?
        .to_string();
    println!("missing ca-file: {e}");
    ensure!(
        e.contains("coordination.ca-file") && e.contains("none.pem"),
        "{e}"
    );

    // It leads and records, over TLS with its token.
    let lb = Lb::start_with(lb_ns.name(), cfg.clone());
    wait_until(
        "lb1 leads over TLS with its login",
        Duration::from_secs(10),
        || lb.state().leads(Instant::now()),
    )
    .with_context(|| format!("lb1's last error: {:?}", lb.state().error))?;
    let tenure = lb.state().leader.context("leader")?.1;
    let written = lb.record("db1", tenure)?;
    ensure!(
        matches!(written, Ok(Some(_))),
        "the record over TLS: {written:?}"
    );
    println!("over https with a client certificate and user lb: leads, recorded db1 ({written:?})");
    drop(lb);

    // What etcd refuses, and why.
    let attempt = |cfg: Config| -> Result<String> {
        let answer = in_netns(lb_ns.name(), move || -> Result<String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let etcd = Etcd::from_config(&cfg, Duration::from_secs(2))?;
            Ok(
                match rt.block_on(etcd.campaign(
                    "/lb/pool/x/leader",
                    "lb9",
                    0,
                    "/lb/pool/x/primary",
                )) {
                    Ok(c) => format!("accepted: {c:?}"),
                    Err(e) => e.to_string(),
                },
            )
        })??;
        Ok(answer)
    };
    let login = |password: &str| EtcdLogin {
        user: "lb".into(),
        password: Secret::new(password.into()),
        password_file: password_file.clone(),
    };
    let cases = [
        (
            "a wrong password",
            Config {
                login: Some(login("wrong")),
                ..cfg.clone()
            },
            "authentication failed",
        ),
        (
            "no client certificate",
            Config {
                tls: Some(pki.tls(false)?),
                ..cfg.clone()
            },
            "fatal alert: BadCertificate",
        ),
        (
            "another CA",
            Config {
                tls: Some(other_ca.tls(true)?),
                ..cfg.clone()
            },
            "invalid peer certificate",
        ),
        (
            "no login",
            Config {
                login: None,
                ..cfg.clone()
            },
            "permission denied",
        ),
    ];
    for (what, c, want) in cases {
        let answer = attempt(c)?;
        println!("{what}: {answer}");
        ensure!(
            answer.contains(want),
            "{what}: expected {want:?}, got {answer}"
        );
    }
    // The login reaches /lb/ only.
    let outside = in_netns(lb_ns.name(), || -> Result<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let etcd = Etcd::from_config(&cfg, Duration::from_secs(2))?;
        Ok(
            match rt.block_on(etcd.campaign("/other/leader", "lb9", 0, "/other/primary")) {
                Ok(c) => format!("accepted: {c:?}"),
                Err(e) => e.to_string(),
            },
        )
    })??;
    println!("user lb outside /lb/: {outside}");
    ensure!(outside.contains("permission denied"), "{outside}");
    drop(cluster);
    Ok(())
}

/// Removes a directory on drop.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
