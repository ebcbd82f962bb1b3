//! A real etcd cluster for tests and the lab (`[coordination]`): one
//! `etcd` (Debian's `etcd-server`) per member, each in the namespace given,
//! listening on its address (client port 2379, peer port 2380), data in a
//! directory of its own; stopped and removed on drop.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::netns::{SpawnGated as _, in_netns, require_tool};
use crate::coord::etcd::Etcd;

pub const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

/// One member: its namespace and address.
#[derive(Debug, Clone)]
pub struct Member {
    pub ns: String,
    pub ip: Ipv4Addr,
}

pub struct EtcdCluster {
    members: Vec<Member>,
    children: Vec<Option<Child>>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// Starts every member in `dir` (created, removed on drop) and waits
    /// until each answers.
    pub fn start(token: &str, members: Vec<Member>, dir: &Path) -> anyhow::Result<EtcdCluster> {
        require_tool("etcd", "run `cargo xtask setup` (installs etcd-server)")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let initial: Vec<String> = members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("etcd{}=http://{}:{PEER_PORT}", i + 1, m.ip))
            .collect();
        let mut cluster = EtcdCluster {
            members,
            children: Vec::new(),
            dir: dir.to_path_buf(),
        };
        for i in 0..cluster.members.len() {
            let m = cluster.members[i].clone();
            let log = std::fs::File::create(dir.join(format!("etcd{}.log", i + 1)))?;
            let child = Command::new("ip")
                .args(["netns", "exec", &m.ns, "etcd"])
                .arg(format!("--name=etcd{}", i + 1))
                .arg(format!(
                    "--data-dir={}",
                    dir.join(format!("etcd{}", i + 1)).display()
                ))
                .arg(format!(
                    "--listen-client-urls=http://{}:{CLIENT_PORT}",
                    m.ip
                ))
                .arg(format!(
                    "--advertise-client-urls=http://{}:{CLIENT_PORT}",
                    m.ip
                ))
                .arg(format!("--listen-peer-urls=http://{}:{PEER_PORT}", m.ip))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://{}:{PEER_PORT}",
                    m.ip
                ))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg(format!("--initial-cluster-token={token}"))
                .arg("--initial-cluster-state=new")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn_gated()?;
            cluster.children.push(Some(child));
        }
        for m in cluster.members.clone() {
            cluster.wait_ready(&m, Duration::from_secs(20))?;
        }
        Ok(cluster)
    }

    /// `http://ip:2379` of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}:{CLIENT_PORT}", m.ip))
            .collect()
    }

    /// Leaves the members running and their data in place (`lb lab up`:
    /// `lb lab down` kills them with the lab's namespaces and removes the
    /// run dir holding their data).
    pub fn detach(mut self) {
        // A dropped `Child` is neither killed nor waited for.
        self.children.clear();
        std::mem::forget(self);
    }

    fn wait_ready(&mut self, m: &Member, limit: Duration) -> anyhow::Result<()> {
        let endpoint = format!("http://{}:{CLIENT_PORT}", m.ip);
        let start = Instant::now();
        loop {
            let e = endpoint.clone();
            let answer = in_netns(&m.ns, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(Etcd::new(&[e], Duration::from_secs(1)).status())
                    .map_err(anyhow::Error::from)
            })?;
            match answer {
                Ok(()) => return Ok(()),
                Err(e) if start.elapsed() > limit => {
                    bail!(
                        "etcd at {endpoint} (namespace {}) not ready after {limit:?}: {e:#} (log in {})",
                        m.ns,
                        self.dir.display()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
