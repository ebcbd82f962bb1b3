//! End to end, the firewall over IPv6 (issue 24) on the lab: real `curl -6`
//! clients through the IPv6 VIP [2001:db8:18::10]:80. A denied IPv6
//! source cannot connect while an allowed one can (`drop_firewall_deny`
//! counted, the rule's counter in `lb firewall show`); `lb firewall`
//! changes of IPv6 prefixes apply live to new connections without a
//! restart, a per-service allow list refuses every other IPv6 source
//! (`drop_firewall_not_allowed`); IPv4's rules beside them filter IPv4
//! clients as before; `lb firewall reset` brings the file's rules back.
//!
//! The client gets a second IPv6 address, 2001:db8:18::3, on its eth0; the
//! LB's kernel forwards IPv6 (`bpf_fib_lookup` AF_INET6 needs it).
//! Everything stays inside the lab's namespaces. Needs root and the `lb`
//! binary (`cargo xtask test` sets both up); fails loudly without them.

use anyhow::{Context, Result, bail, ensure};
use lb_tests::{lab6, ok, status};
use lb_userspace::{
    control::{FirewallChange, Request, RuleEdit},
    harness::{
        lab::{HTTP_PORT, Lab, VIP6},
        netns::{self, require_tool},
    },
};

const CLIENT6: &str = "2001:db8:18::2";
const SECOND6: &str = "2001:db8:18::3";
const CLIENT4: &str = "198.18.0.2";

/// The lab with IPv6 forwarding on the LB and the client's second address.
fn lab() -> Result<Lab> {
    lab6::up_nat_with_second_address("lbf6", SECOND6)
}

/// The lab's IPv4 web service plus `www6` on the VIP6, and the file's
/// firewall: the second IPv6 address denied, the IPv4 client denied.
fn config() -> String {
    lab6::three_webs_and_www6(&format!(
        "\n[firewall]\ndeny = [\"{SECOND6}/128\", \"{CLIENT4}/32\"]\n"
    ))
}

/// One HTTP GET of `url` from the client's address `src` (a new
/// connection) within `secs` seconds: the server's name, or why it failed.
fn get_from(lab: &Lab, src: &str, url: &str, secs: u32) -> Result<String, String> {
    let secs = secs.to_string();
    let out = netns::ns_output(
        &lab.client_ns(),
        &[
            "curl",
            "-sS",
            "--connect-timeout",
            &secs,
            "--max-time",
            &secs,
            "--interface",
            src,
            url,
        ],
    )
    .map_err(|e| format!("{e:#}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn url(src: &str) -> String {
    if src.contains(':') {
        format!("http://[{VIP6}]:{HTTP_PORT}/")
    } else {
        format!("http://198.18.0.10:{HTTP_PORT}/")
    }
}

fn connects(lab: &Lab, src: &str) -> Result<()> {
    match get_from(lab, src, &url(src), 5) {
        Ok(name) if name.starts_with("web") => Ok(()),
        Ok(other) => bail!("{src}: unexpected answer {other:?}"),
        Err(e) => bail!("{src} could not connect: {e}"),
    }
}

fn refused(lab: &Lab, src: &str) -> Result<()> {
    match get_from(lab, src, &url(src), 2) {
        Ok(name) => bail!("{src} connected ({name}) but its new flows are refused"),
        Err(_) => Ok(()),
    }
}

fn verdict(lab: &Lab, name: &str) -> Result<u64> {
    Ok(status(lab)?.verdicts.get(name).copied().unwrap_or(0))
}

fn firewall(lab: &Lab, change: FirewallChange) -> Result<String> {
    ok(lab, Request::Firewall(change))
}

fn edit(add: bool, prefix: &str, service: Option<&str>) -> RuleEdit {
    let (prefix, service) = (prefix.to_owned(), service.map(str::to_owned));
    if add {
        RuleEdit::Add { prefix, service }
    } else {
        RuleEdit::Remove { prefix, service }
    }
}

#[test]
fn ipv6_sources_are_denied_and_allowed_and_live_changes_apply() -> Result<()> {
    require_tool("curl", "apt-get install curl")?;
    let lab = lab()?;
    let agent = lab.start_agent(&config())?;

    // The file's rules: the second IPv6 address denied, the first one
    // balanced; IPv4's deny of the client as before.
    if let Err(e) = connects(&lab, CLIENT6) {
        let s = status(&lab)?;
        let v: Vec<_> = s.verdicts.iter().filter(|(_, n)| **n > 0).collect();
        bail!(
            "step 1: the allowed IPv6 source: {e:#}; verdicts {v:?}; log {}",
            agent.log_text()
        );
    }
    let denied = verdict(&lab, "drop_firewall_deny")?;
    refused(&lab, SECOND6).context("step 2: the denied IPv6 source")?;
    let after_v6 = verdict(&lab, "drop_firewall_deny")?;
    ensure!(
        after_v6 > denied,
        "the refused IPv6 SYNs were not counted as drop_firewall_deny"
    );
    refused(&lab, CLIENT4).context("step 3: IPv4's rule")?;
    ensure!(
        verdict(&lab, "drop_firewall_deny")? > after_v6,
        "the refused IPv4 SYNs were not counted"
    );
    let show = firewall(&lab, FirewallChange::Show)?;
    for rule in [format!("deny {SECOND6}/128"), format!("deny {CLIENT4}/32")] {
        ensure!(
            show.lines()
                .any(|l| l.starts_with(&format!("[firewall]: {rule}"))
                    && !l.ends_with(": 0 new flows")),
            "show lacks the counted rule {rule}:\n{show}"
        );
    }

    // Live, no restart: the whole client /64 denied for www6 only, the
    // second address's own rule removed: both IPv6 sources refused.
    firewall(
        &lab,
        FirewallChange::Deny {
            edit: edit(true, "2001:db8:18::/64", Some("www6")),
        },
    )?;
    firewall(
        &lab,
        FirewallChange::Deny {
            edit: edit(false, &format!("{SECOND6}/128"), None),
        },
    )?;
    refused(&lab, CLIENT6).context("step 4: the /64 denied live")?;
    refused(&lab, SECOND6).context("step 5: the /64 denied live")?;
    // The /64's rule removed, an allow list for www6 of the second address
    // only: it connects, the first address is not allowed.
    firewall(
        &lab,
        FirewallChange::Deny {
            edit: edit(false, "2001:db8:18::/64", Some("www6")),
        },
    )?;
    let not_allowed = verdict(&lab, "drop_firewall_not_allowed")?;
    firewall(
        &lab,
        FirewallChange::Allow {
            edit: edit(true, &format!("{SECOND6}/128"), Some("www6")),
        },
    )?;
    connects(&lab, SECOND6).context("step 6: in www6's allow list")?;
    refused(&lab, CLIENT6).context("step 7: outside www6's allow list")?;
    ensure!(
        verdict(&lab, "drop_firewall_not_allowed")? > not_allowed,
        "the refused SYNs were not counted as drop_firewall_not_allowed"
    );
    // A bad IPv6 prefix is refused with its reason; the rules stay.
    let r = lb_tests::ask(
        &lab,
        &Request::Firewall(FirewallChange::Deny {
            edit: edit(true, "2001:db8:18::2/64", None),
        }),
    )?;
    ensure!(
        !r.ok && r.message.contains("host bits set"),
        "expected a rejection, got {r:?}"
    );
    connects(&lab, SECOND6).context("step 8")?;
    refused(&lab, CLIENT4).context("step 9: IPv4's rule unchanged")?;

    // The file's rules again.
    firewall(&lab, FirewallChange::Reset)?;
    connects(&lab, CLIENT6).context("step 10")?;
    refused(&lab, SECOND6).context("step 11")?;
    Ok(())
}
