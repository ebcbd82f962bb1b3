//! nginx with `listen … proxy_protocol` in a namespace, for the PROXY v2
//! tests (tests/tests/proxy_nginx.rs, proxy_e2e.rs): one foreground process
//! (no master, no workers), an access log of `$proxy_protocol_addr
//! $proxy_protocol_port $remote_addr "$request" $status`; stopped and its
//! files removed on drop.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_userspace::harness::netns::{in_netns, ns_command};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// nginx in `ns` with its files under `dir`; stopped (SIGTERM, then
/// SIGKILL) and `dir` removed on drop.
pub struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx in the namespace `ns` listening with `proxy_protocol`
    /// on each of `listens` (the first is waited for).
    pub fn start(ns: &str, dir: &Path, listens: &[&str]) -> Result<Nginx> {
        fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let d = dir.display();
        let listen: String = listens
            .iter()
            .map(|l| format!("listen {l} proxy_protocol;\n"))
            .collect();
        // One process (no master/workers), in the foreground: the test's
        // child is all of nginx, so stopping it leaves nothing behind.
        let conf = format!(
            "daemon off;\nmaster_process off;\nuser root;\npid {d}/nginx.pid;\n\
             error_log {d}/logs/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               log_format proxied '$proxy_protocol_addr $proxy_protocol_port $remote_addr \"$request\" $status';\n\
               access_log {d}/logs/access.log proxied;\n\
               client_body_temp_path {d}/body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               server {{\n\
                 {listen}\
                 location / {{ return 200 \"client $proxy_protocol_addr $proxy_protocol_port\\n\"; }}\n\
               }}\n\
             }}\n"
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).context("writing nginx.conf")?;
        let conf_text = conf_path.display().to_string();
        let prefix = format!("{d}/");
        let err_log = format!("{d}/logs/error.log");
        let mut cmd = ns_command(
            ns,
            &["nginx", "-p", &prefix, "-c", &conf_text, "-e", &err_log],
        );
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().context("starting nginx")?;
        let mut nginx = Nginx {
            child,
            dir: dir.to_owned(),
        };
        nginx.wait_ready(ns, listens[0].parse()?)?;
        Ok(nginx)
    }

    fn wait_ready(&mut self, ns: &str, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "nginx exited ({status}) before listening: {}",
                    self.log("error.log")
                );
            }
            if in_netns(ns, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx not listening on {addr} after {READY_TIMEOUT:?}: {}",
                    self.log("error.log")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The contents of `logs/<name>` (access.log, error.log).
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join("logs").join(name)).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: nginx's fast shutdown; then make sure.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
