//! End-to-end tests of HTTPS through the load balancer (issue 14): TLS
//! passthrough. The web servers hold the lab's certificates and terminate
//! TLS; the LB forwards TCP on VIP:443 like any other port. A real curl in
//! the client namespace verifies the certificate against the lab CA, in NAT
//! and in DSR mode, and a web server that the HTTP check (on :80) marks
//! down gets no TLS handshake at all. The same through the IPv6 VIP
//! [2001:db8:18::10]:443 (issue 24), in NAT66 and DSR.
//!
//! Needs root, curl and openssl (`cargo xtask setup`), and `LB_BIN`
//! (`cargo xtask test` sets it).

use std::{net::IpAddr, process::Output, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::{
    FALL, INTERVAL_MS, RISE, backend_status, in_each_mode,
    lab6::{self, checked_config_v6},
    lb_bin, unique_prefix, wait_for_status,
};
use lb_userspace::{
    config::Forwarding,
    control::HealthStatus,
    harness::{
        lab::{HTTPS_PORT, Lab, SITE_NAME, VIP, VIP6, WEB_NAMES, web_addr},
        netns::require_tool,
    },
};

const SERVICE: &str = "www-tls";

fn new_lab() -> Result<Lab> {
    require_tools()?;
    let prefix = unique_prefix("lbh");
    Lab::up(&prefix, &lb_bin()).with_context(|| format!("building lab {prefix}"))
}

fn require_tools() -> Result<()> {
    require_tool(
        "curl",
        "apt-get install curl (cargo xtask setup installs it)",
    )?;
    require_tool(
        "openssl",
        "apt-get install openssl (cargo xtask setup installs it)",
    )
}

/// www (VIP:80) and www-tls (VIP:443 → webN:443), both round robin over
/// web1..3 and checked over HTTP on the webs' port 80, fast.
fn tls_config(mode: Forwarding) -> String {
    let health = format!(
        "health = {{ check = \"http\", port = 80, path = \"/\", interval = \"{INTERVAL_MS}ms\", timeout = \"{INTERVAL_MS}ms\", rise = {RISE}, fall = {FALL} }}"
    );
    let mut toml = format!(
        "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nforwarding = \"{}\"\n",
        mode.name()
    );
    for (name, port) in [("www", 80), (SERVICE, HTTPS_PORT)] {
        let backends: Vec<String> = (1..=WEB_NAMES.len())
            .map(|n| {
                format!(
                    "{{ name = \"web{n}\", address = \"{}:{port}\" }}",
                    web_addr(n)
                )
            })
            .collect();
        toml.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{VIP}:{port}\"\nprotocol = \"tcp\"\nscheduler = \"round-robin\"\n{health}\nbackends = [ {} ]\n",
            backends.join(", ")
        ));
    }
    toml
}

fn verdict_window() -> Duration {
    Duration::from_millis(FALL.max(RISE) * INTERVAL_MS + 3000)
}

/// Waits until every web is (`up`) or all but `down` are, as `lb status`
/// reports www-tls.
fn wait_for_health(lab: &Lab, down: Option<&str>) -> Result<Duration> {
    wait_for_health_of(lab, SERVICE, down)
}

/// [`wait_for_health`] of `service`.
fn wait_for_health_of(lab: &Lab, service: &str, down: Option<&str>) -> Result<Duration> {
    wait_for_status(
        lab,
        &format!("{service} health with {down:?} down"),
        verdict_window(),
        |s| {
            WEB_NAMES.iter().all(|name| {
                let want_up = Some(*name) != down;
                backend_status(s, service, name).is_ok_and(|b| {
                    let up = b.health == HealthStatus::Up && b.in_ring;
                    let out = b.health == HealthStatus::Down && !b.in_ring;
                    if want_up { up } else { out }
                })
            })
        },
    )
}

/// Runs curl in the client namespace; `args` go after the common ones.
fn curl(lab: &Lab, args: &[&str]) -> Result<Output> {
    let mut full = vec!["curl", "-sS", "--max-time", "5"];
    full.extend_from_slice(args);
    lab.exec(&lab.client_ns(), &full)
}

/// `https://www.foobar.com/` (resolved to the VIP) on a new connection,
/// verified against the lab CA: the web server that answered.
fn https_get(lab: &Lab) -> Result<String> {
    https_get_at(lab, VIP.into())
}

/// `vip` as curl's `--resolve` and openssl's `-connect` write it (an IPv6
/// address in brackets).
fn host(vip: IpAddr) -> String {
    match vip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// [`https_get`] with www.foobar.com resolved to `vip`.
fn https_get_at(lab: &Lab, vip: IpAddr) -> Result<String> {
    let ca = lab.ca_path().display().to_string();
    let resolve = format!("{SITE_NAME}:{HTTPS_PORT}:{}", host(vip));
    let url = format!("https://{SITE_NAME}/");
    let out = curl(lab, &["--cacert", &ca, "--resolve", &resolve, &url])?;
    ensure!(
        out.status.success(),
        "curl {url} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether `got` follows web1 → web2 → web3 → web1 ... from any start.
fn is_rotation(got: &[String]) -> bool {
    let Some(start) = got
        .first()
        .and_then(|first| WEB_NAMES.iter().position(|n| n == first))
    else {
        return false;
    };
    got.iter()
        .enumerate()
        .all(|(i, name)| name == WEB_NAMES[(start + i) % WEB_NAMES.len()])
}

/// Requirement 3: curl verifies www.foobar.com's certificate against the lab
/// CA through the VIP and rotates over the three webs; without the CA (or
/// for another name) verification fails; openssl shows the chain; plain
/// HTTP on :80 is redirected to HTTPS by the webs, through the LB.
#[test]
fn https_is_passed_through_and_verified_in_nat_and_dsr() -> Result<()> {
    let mut lab = new_lab()?;
    in_each_mode(&mut lab, tls_config, |lab, _| {
        wait_for_health(lab, None)?;
        let got: Vec<String> = (0..9).map(|_| https_get(lab)).collect::<Result<_>>()?;
        ensure!(
            is_rotation(&got),
            "HTTPS connections did not rotate over the webs: {got:?}"
        );
        for web in WEB_NAMES {
            ensure!(
                got.iter().filter(|g| *g == web).count() == 3,
                "{web}: {got:?}"
            );
        }
        check_verification_fails_without_the_ca(lab)?;
        check_chain_with_openssl(lab, VIP.into())?;
        check_redirect_to_https(lab)
    })
}

/// Issue 24: HTTPS through the IPv6 VIP. curl verifies www.foobar.com
/// (resolved to [2001:db8:18::10]) against the lab CA, new connections
/// rotate over the three webs' IPv6 addresses, and openssl shows the chain,
/// in NAT66 and DSR; a web the HTTP check over IPv6 marks down gets no
/// handshake, and one back up gets them again.
#[test]
fn https_through_the_ipv6_vip_is_verified_and_rotates_in_nat66_and_dsr() -> Result<()> {
    require_tools()?;
    let mut lab = lab6::up("lbh6")?;
    let vip6 = IpAddr::V6(VIP6);
    in_each_mode(&mut lab, checked_config_v6, |lab, _| {
        wait_for_health_of(lab, "www6-tls", None)?;
        let got: Vec<String> = (0..6)
            .map(|_| https_get_at(lab, vip6))
            .collect::<Result<_>>()?;
        ensure!(
            is_rotation(&got),
            "HTTPS connections to the VIP6 did not rotate over the webs: {got:?}"
        );
        check_chain_with_openssl(lab, vip6)?;
        lab.stop_web(2)?;
        wait_for_health_of(lab, "www6-tls", Some("web2"))?;
        let got: Vec<String> = (0..4)
            .map(|i| https_get_at(lab, vip6).with_context(|| format!("request {i} with web2 down")))
            .collect::<Result<_>>()?;
        ensure!(
            got.iter().all(|g| g == "web1" || g == "web3"),
            "with web2 down: {got:?}"
        );
        lab.start_web(2)?;
        wait_for_health_of(lab, "www6-tls", None)?;
        let back: Vec<String> = (0..6)
            .map(|_| https_get_at(lab, vip6))
            .collect::<Result<_>>()?;
        ensure!(
            back.iter().any(|g| g == "web2"),
            "web2 back in the VIP6's rotation: {back:?}"
        );
        Ok(())
    })
}

/// curl exits 60 (certificate not verified) without the lab CA, and also
/// with it for a name the certificate is not for.
fn check_verification_fails_without_the_ca(lab: &Lab) -> Result<()> {
    let resolve = format!("{SITE_NAME}:{HTTPS_PORT}:{VIP}");
    let out = curl(
        lab,
        &["--resolve", &resolve, &format!("https://{SITE_NAME}/")],
    )?;
    ensure!(
        out.status.code() == Some(60),
        "curl without the lab CA: want exit 60 (certificate not verified), got {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ca = lab.ca_path().display().to_string();
    let other = format!("other.example:{HTTPS_PORT}:{VIP}");
    let out = curl(
        lab,
        &[
            "--cacert",
            &ca,
            "--resolve",
            &other,
            "https://other.example/",
        ],
    )?;
    ensure!(
        out.status.code() == Some(60),
        "curl for a name not in the certificate: want exit 60, got {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `openssl s_client` through `vip`: the chain is www.foobar.com issued by
/// the lab CA, and it verifies.
fn check_chain_with_openssl(lab: &Lab, vip: IpAddr) -> Result<()> {
    let ca = lab.ca_path().display().to_string();
    let connect = format!("{}:{HTTPS_PORT}", host(vip));
    let script = format!(
        "openssl s_client -connect {connect} -servername {SITE_NAME} -verify_hostname {SITE_NAME} \
         -CAfile {ca} -verify_return_error </dev/null 2>&1"
    );
    let out = lab.exec(&lab.client_ns(), &["sh", "-c", &script])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "openssl s_client failed:\n{text}");
    for want in [
        "Verify return code: 0 (ok)",
        &format!("s:CN = {SITE_NAME}"),
        "i:CN = lb lab CA",
    ] {
        ensure!(
            text.contains(want),
            "no {want:?} in openssl s_client:\n{text}"
        );
    }
    Ok(())
}

/// `http://www.foobar.com/redirect` answers 301 to https (from a web, through
/// the LB on :80) and curl -L follows it through the LB on :443.
fn check_redirect_to_https(lab: &Lab) -> Result<()> {
    let ca = lab.ca_path().display().to_string();
    let r80 = format!("{SITE_NAME}:80:{VIP}");
    let r443 = format!("{SITE_NAME}:{HTTPS_PORT}:{VIP}");
    let url = format!("http://{SITE_NAME}/redirect");
    let out = curl(
        lab,
        &[
            "-L",
            "--cacert",
            &ca,
            "--resolve",
            &r80,
            "--resolve",
            &r443,
            "-w",
            "%{num_redirects} %{url_effective}",
            &url,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "curl -L {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines();
    let (Some(server), Some(trace)) = (lines.next(), lines.next()) else {
        bail!("curl -L {url}: unexpected output {text:?}");
    };
    ensure!(WEB_NAMES.contains(&server), "answered by {server:?}");
    ensure!(
        trace == format!("1 https://{SITE_NAME}/"),
        "curl -L {url}: want one redirect to https, got {trace:?}"
    );
    Ok(())
}

/// Requirement 3: once the HTTP check on :80 marks a web down, no HTTPS
/// connection goes to it — every TLS handshake lands on a live web and
/// succeeds (a handshake sent to the stopped one would be refused).
#[test]
fn no_tls_handshake_reaches_a_web_the_check_marked_down() -> Result<()> {
    let mut lab = new_lab()?;
    in_each_mode(&mut lab, tls_config, |lab, mode| {
        let name = mode.name();
        wait_for_health(lab, None)?;
        lab.stop_web(2)?;
        let took = wait_for_health(lab, Some("web2"))?;
        eprintln!("{name}: web2 marked down {took:?} after it stopped");
        let got: Vec<String> = (0..12)
            .map(|i| https_get(lab).with_context(|| format!("request {i} with web2 down")))
            .collect::<Result<_>>()?;
        ensure!(
            got.iter().all(|g| g == "web1" || g == "web3"),
            "with web2 down: {got:?}"
        );
        ensure!(
            got.iter().filter(|g| *g == "web1").count() == 6,
            "web1 and web3 share the rotation: {got:?}"
        );
        lab.start_web(2)?;
        wait_for_health(lab, None)?;
        let back: Vec<String> = (0..6).map(|_| https_get(lab)).collect::<Result<_>>()?;
        ensure!(
            back.iter().any(|g| g == "web2"),
            "web2 back in rotation: {back:?}"
        );
        Ok(())
    })
}
