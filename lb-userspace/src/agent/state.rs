//! The agent's decisions, without I/O: what an operator's admin state and
//! a backend's health mean for the ring (admission), how health carries
//! over a config change, and how an `lb backend …` command edits the
//! running config. The agent applies the results through its one commit
//! path; these functions are tested on the host without root.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use anyhow::Context;

use crate::{
    config::{self, Config, OnBackendDown},
    dataplane::Admission,
    dataplane::firewall::List,
    health::{Health, Target},
    wire::{BackendChange, RuleEdit},
};

/// What an operator set with `lb backend`, as the control protocol names it.
pub use crate::wire::AdminState as Admin;

/// (service name, backend name).
pub type Key = (String, String);

pub fn key(service: &str, backend: &str) -> Key {
    (service.to_string(), backend.to_string())
}

/// The health of every checked backend of `next`: what `current` knows for
/// the same service and address, else `new` (pending for a new backend).
/// Unchecked backends have no entry: they always serve.
pub fn carry_health(
    next: &Config,
    current: &BTreeMap<Target, Health>,
    new: &dyn Fn(&config::Service, &config::Backend) -> Health,
) -> BTreeMap<Target, Health> {
    let mut health = BTreeMap::new();
    for svc in &next.services {
        for b in &svc.backends {
            if svc.health_for(b).is_none() {
                continue;
            }
            let target = Target {
                service: svc.name.clone(),
                address: b.address,
            };
            let state = current.get(&target).copied().unwrap_or_else(|| new(svc, b));
            health.insert(target, state);
        }
    }
    health
}

/// Whether a backend takes new flows, from its admin state first, then its
/// health; what happens to its flows when it does not.
pub fn admission(admin: Admin, health: Option<Health>, on_down: OnBackendDown) -> Admission {
    match (admin, health) {
        (Admin::Disabled, _) => Admission {
            in_rotation: false,
            drop_flows: true,
        },
        (Admin::Drain, _) => Admission {
            in_rotation: false,
            drop_flows: false,
        },
        // Never judged: nothing is pinned to it that it did not serve.
        (Admin::Enabled, Some(Health::Pending)) => Admission {
            in_rotation: false,
            drop_flows: false,
        },
        (Admin::Enabled, Some(Health::Down)) => Admission {
            in_rotation: false,
            drop_flows: on_down == OnBackendDown::DropFlows,
        },
        (Admin::Enabled, Some(Health::Up) | None) => Admission::SERVING,
    }
}

/// A live change, checked: the next config and admin state, and what to
/// tell the operator.
#[derive(Debug)]
pub struct Edit {
    pub config: Config,
    pub admin: BTreeMap<Key, Admin>,
    pub message: String,
}

/// Applies an `lb backend …` command to the running config and admin
/// state, and checks the result with the rules a config file goes through.
pub fn edit(
    cfg: &Config,
    admin: &BTreeMap<Key, Admin>,
    change: BackendChange,
) -> anyhow::Result<Edit> {
    let mut next = cfg.clone();
    let (service, backend) = match &change {
        BackendChange::Add {
            service, backend, ..
        }
        | BackendChange::Remove { service, backend }
        | BackendChange::Enable { service, backend }
        | BackendChange::Disable { service, backend }
        | BackendChange::Drain {
            service, backend, ..
        }
        | BackendChange::Weight {
            service, backend, ..
        } => (service.clone(), backend.clone()),
        // It needs the config file, which only the agent has.
        BackendChange::Reset { .. } => anyhow::bail!("reset is the agent's to apply"),
    };
    let si = next
        .services
        .iter()
        .position(|s| s.name == service)
        .with_context(|| format!("service: no service named {service:?}"))?;
    let svc = &mut next.services[si];
    let position = svc.backends.iter().position(|b| b.name == backend);
    let key = key(&service, &backend);
    let mut admin = admin.clone();
    let msg = match change {
        BackendChange::Add {
            address,
            weight,
            backup,
            ..
        } => {
            // Either family; `config::check` below applies the file's
            // rules (the VIP's family, address problems, the IPv6 gate).
            let address: SocketAddr = address.parse().with_context(|| {
                format!(
                    "address: expected IPv4 address and port like \"198.19.0.14:80\" \
                     or IPv6 in brackets like \"[2001:db8::14]:80\", got {address:?}"
                )
            })?;
            svc.backends.push(config::Backend {
                name: backend.clone(),
                address,
                weight,
                backup,
                health: None,
                max_connections: None,
            });
            format!("added {service}/{backend} {address}")
        }
        BackendChange::Remove { .. } => {
            let i = position
                .with_context(|| format!("backend: no backend {backend:?} in {service}"))?;
            svc.backends.remove(i);
            admin.remove(&key);
            format!("removed {service}/{backend}; its flows are dropped")
        }
        BackendChange::Enable { .. }
        | BackendChange::Disable { .. }
        | BackendChange::Drain { .. } => {
            position.with_context(|| format!("backend: no backend {backend:?} in {service}"))?;
            let (state, msg) = match change {
                BackendChange::Enable { .. } => (Admin::Enabled, "enabled"),
                BackendChange::Disable { .. } => {
                    (Admin::Disabled, "disabled (its flows are dropped)")
                }
                _ => (
                    Admin::Drain,
                    "draining (no new flows; established flows continue)",
                ),
            };
            admin.insert(key.clone(), state);
            format!("{service}/{backend} {msg}")
        }
        BackendChange::Reset { .. } => anyhow::bail!("reset is the agent's to apply"),
        BackendChange::Weight { weight, .. } => {
            let i = position
                .with_context(|| format!("backend: no backend {backend:?} in {service}"))?;
            svc.backends[i].weight = weight;
            format!("{service}/{backend} weight {weight}")
        }
    };
    // The rules a config file goes through, so a live change can never
    // get in what a file could not (duplicates, weights, DSR ports, limits).
    let next = config::check(&next, Path::new("lb backend"))?;
    Ok(Edit {
        config: next,
        admin,
        message: msg,
    })
}

/// Applies an `lb firewall deny|allow add|remove` to the running config and
/// checks the result with the rules a config file goes through (prefix
/// syntax, host bits, a prefix in both lists, limits).
pub fn firewall_edit(
    cfg: &Config,
    list: List,
    edit: &RuleEdit,
) -> anyhow::Result<(Config, String)> {
    let mut next = cfg.clone();
    let (prefix, service, add) = match edit {
        RuleEdit::Add { prefix, service } => (prefix, service, true),
        RuleEdit::Remove { prefix, service } => (prefix, service, false),
    };
    let (fw, scope) = match service {
        None => (&mut next.firewall, "[firewall]".to_owned()),
        // A pool's services are rebuilt from the pool by `check`: their
        // rules live in the pool.
        Some(name) => match next.pools.iter_mut().find_map(|p| p.firewall_of_mut(name)) {
            Some(fw) => (fw, format!("service {name}")),
            None => {
                let svc = next
                    .services
                    .iter_mut()
                    .find(|s| &s.name == name)
                    .with_context(|| format!("service: no service named {name:?}"))?;
                (&mut svc.firewall, format!("service {name}"))
            }
        },
    };
    // Either family: the list of the prefix's family changes.
    let (prefix, changed) = fw
        .edit(list == List::Deny, add, prefix)
        .map_err(|e| anyhow::anyhow!("prefix: {e}"))?;
    let kind = list.name();
    let msg = match (add, changed) {
        (true, true) => format!("{scope}: {kind} {prefix} added (kept until `lb firewall reset`)"),
        (true, false) => anyhow::bail!("{prefix} is already in {scope}'s {kind} list"),
        (false, true) => {
            format!("{scope}: {kind} {prefix} removed (kept until `lb firewall reset`)")
        }
        (false, false) => anyhow::bail!("{prefix} is not in {scope}'s {kind} list"),
    };
    let next = config::check(&next, Path::new("lb firewall"))?;
    Ok((next, msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = r#"
[dataplane]
interfaces = ["lb-front", "lb-back"]

[[service]]
name = "www"
vip = "198.18.0.10:80"
scheduler = "weighted-round-robin"
health = { check = "tcp", interval = "1s", timeout = "500ms", rise = 2, fall = 2 }
backends = [
  { name = "web1", address = "198.19.0.11:80" },
  { name = "web2", address = "198.19.0.12:80" },
]

[[service]]
name = "dns"
vip = "198.18.0.10:53"
protocol = "udp"
backends = [ { name = "ns1", address = "198.19.0.21:53" } ]
"#;

    fn site() -> Config {
        config::parse(SITE, Path::new("site.toml")).expect("valid site")
    }

    fn change(action: &str, backend: &str) -> BackendChange {
        let (service, backend) = ("www".to_owned(), backend.to_owned());
        match action {
            "remove" => BackendChange::Remove { service, backend },
            "enable" => BackendChange::Enable { service, backend },
            "disable" => BackendChange::Disable { service, backend },
            "drain" => BackendChange::Drain {
                service,
                backend,
                wait: false,
                timeout: 0,
            },
            other => panic!("no action {other}"),
        }
    }

    #[test]
    fn admission_follows_admin_state_then_health() {
        use OnBackendDown::{DropFlows, KeepFlows};
        let out = |in_rotation, drop_flows| Admission {
            in_rotation,
            drop_flows,
        };
        for (admin, health, on_down, want) in [
            (Admin::Enabled, None, KeepFlows, Admission::SERVING),
            (
                Admin::Enabled,
                Some(Health::Up),
                KeepFlows,
                Admission::SERVING,
            ),
            (
                Admin::Enabled,
                Some(Health::Pending),
                DropFlows,
                out(false, false),
            ),
            (
                Admin::Enabled,
                Some(Health::Down),
                KeepFlows,
                out(false, false),
            ),
            (
                Admin::Enabled,
                Some(Health::Down),
                DropFlows,
                out(false, true),
            ),
            (Admin::Drain, Some(Health::Up), DropFlows, out(false, false)),
            (
                Admin::Disabled,
                Some(Health::Up),
                KeepFlows,
                out(false, true),
            ),
            (Admin::Disabled, None, KeepFlows, out(false, true)),
        ] {
            assert_eq!(
                admission(admin, health, on_down),
                want,
                "{admin:?} {health:?} {on_down:?}"
            );
        }
    }

    #[test]
    fn health_carries_over_by_service_and_address() {
        let cfg = site();
        let web1 = Target {
            service: "www".into(),
            address: "198.19.0.11:80".parse().expect("addr"),
        };
        let gone = Target {
            service: "www".into(),
            address: "198.19.0.99:80".parse().expect("addr"),
        };
        let current = BTreeMap::from([(web1.clone(), Health::Down), (gone.clone(), Health::Up)]);
        let next = carry_health(&cfg, &current, &|_, _| Health::Pending);
        // web1 keeps its state, web2 is new, ns1 is unchecked (no entry),
        // and the backend that left is forgotten.
        assert_eq!(next.get(&web1), Some(&Health::Down));
        assert_eq!(next.len(), 2);
        assert!(next.values().filter(|h| **h == Health::Pending).count() == 1);
        assert!(!next.contains_key(&gone));
    }

    #[test]
    fn backend_commands_edit_config_and_admin_state() {
        let cfg = site();
        let none = BTreeMap::new();
        let added = edit(
            &cfg,
            &none,
            BackendChange::Add {
                service: "www".into(),
                backend: "web3".into(),
                address: "198.19.0.13:80".into(),
                weight: 2,
                backup: true,
            },
        )
        .expect("add");
        let web3 = &added.config.services[0].backends[2];
        assert_eq!(
            (web3.name.as_str(), web3.weight, web3.backup),
            ("web3", 2, true)
        );
        assert_eq!(added.message, "added www/web3 198.19.0.13:80");

        let drained = edit(&cfg, &none, change("drain", "web1")).expect("drain");
        assert_eq!(drained.admin.get(&key("www", "web1")), Some(&Admin::Drain));
        assert_eq!(drained.config, cfg, "admin changes leave the config alone");
        let enabled = edit(&cfg, &drained.admin, change("enable", "web1")).expect("enable");
        assert_eq!(
            enabled.admin.get(&key("www", "web1")),
            Some(&Admin::Enabled)
        );
        let disabled = edit(&cfg, &none, change("disable", "web2")).expect("disable");
        assert_eq!(
            disabled.admin.get(&key("www", "web2")),
            Some(&Admin::Disabled)
        );

        // Removing forgets the admin state with the backend.
        let removed = edit(&cfg, &drained.admin, change("remove", "web1")).expect("remove");
        assert_eq!(removed.config.services[0].backends.len(), 1);
        assert!(!removed.admin.contains_key(&key("www", "web1")));

        let weighted = edit(
            &cfg,
            &none,
            BackendChange::Weight {
                service: "www".into(),
                backend: "web2".into(),
                weight: 5,
            },
        )
        .expect("weight");
        assert_eq!(weighted.config.services[0].backends[1].weight, 5);
    }

    #[test]
    fn bad_backend_commands_name_what_is_wrong() {
        let cfg = site();
        let none = BTreeMap::new();
        let message = |c| format!("{:#}", edit(&cfg, &none, c).expect_err("rejected"));
        assert_eq!(
            message(BackendChange::Drain {
                service: "nope".into(),
                backend: "web1".into(),
                wait: false,
                timeout: 0,
            }),
            "service: no service named \"nope\""
        );
        assert_eq!(
            message(change("disable", "web9")),
            "backend: no backend \"web9\" in www"
        );
        assert!(
            message(BackendChange::Add {
                service: "www".into(),
                backend: "web3".into(),
                address: "nowhere".into(),
                weight: 1,
                backup: false,
            })
            .starts_with("address: expected IPv4 address and port")
        );
        // The file's rules apply: a duplicate address is refused with its key.
        let dup = message(BackendChange::Add {
            service: "www".into(),
            backend: "web3".into(),
            address: "198.19.0.11:80".into(),
            weight: 1,
            backup: false,
        });
        assert!(dup.contains("service[0].backends[2].address"), "{dup}");
    }

    #[test]
    fn backend_add_parses_ipv6_and_checks_it_like_the_file() {
        let cfg = site();
        let none = BTreeMap::new();
        let add = |cfg: &Config, address: &str| {
            let change = BackendChange::Add {
                service: "www".into(),
                backend: "web3".into(),
                address: address.into(),
                weight: 1,
                backup: false,
            };
            format!("{:#}", edit(cfg, &none, change).expect_err("rejected"))
        };
        // Parsed (brackets), then the file's one-family rule names the key.
        let mixed = add(&cfg, "[2001:db8:19::13]:80");
        assert!(
            mixed.contains("service[0].backends[2].address")
                && mixed.contains(
                    "[2001:db8:19::13]:80 is an IPv6 address but the service's VIP \
                     198.18.0.10:80 is IPv4"
                ),
            "{mixed}"
        );
        let unbracketed = add(&cfg, "2001:db8:19::13:80");
        assert!(
            unbracketed.starts_with("address: expected IPv4 address and port")
                && unbracketed.contains("IPv6 in brackets like \"[2001:db8::14]:80\""),
            "{unbracketed}"
        );
        // An IPv6 service: the backend fits its family and is added.
        let mut v6 = cfg.clone();
        v6.services[0].vip = "[2001:db8:18::10]:80".parse().expect("vip");
        for (i, b) in v6.services[0].backends.iter_mut().enumerate() {
            b.address = format!("[2001:db8:19::1{}]:80", i + 1)
                .parse()
                .expect("addr");
        }
        let change = BackendChange::Add {
            service: "www".into(),
            backend: "web3".into(),
            address: "[2001:db8:19::13]:80".into(),
            weight: 1,
            backup: false,
        };
        let added = edit(&v6, &none, change).expect("an IPv6 backend of an IPv6 service");
        let www = added
            .config
            .services
            .iter()
            .find(|s| s.name == "www")
            .expect("www");
        assert!(
            www.backends
                .iter()
                .any(|b| b.address == "[2001:db8:19::13]:80".parse().expect("addr")),
            "{:?}",
            www.backends
        );
        let multicast = add(&v6, "[ff02::1]:80");
        assert!(
            multicast.contains("service[0].backends[2].address")
                && multicast.contains("ff02::1 is a multicast address"),
            "{multicast}"
        );
    }

    #[test]
    fn firewall_edits_take_ipv6_prefixes_into_their_own_list() {
        let cfg = site();
        let add = |prefix: &str, service: Option<&str>| RuleEdit::Add {
            prefix: prefix.into(),
            service: service.map(Into::into),
        };
        let (next, msg) =
            firewall_edit(&cfg, List::Deny, &add("2001:db8:bad::/48", None)).expect("deny add");
        assert_eq!(
            msg,
            "[firewall]: deny 2001:db8:bad::/48 added (kept until `lb firewall reset`)"
        );
        assert!(next.firewall.deny.is_empty());
        assert_eq!(next.firewall.deny_texts(), ["2001:db8:bad::/48"]);
        let again =
            firewall_edit(&next, List::Deny, &add("2001:db8:bad::/48", None)).expect_err("twice");
        assert_eq!(
            format!("{again:#}"),
            "2001:db8:bad::/48 is already in [firewall]'s deny list"
        );
        let remove = RuleEdit::Remove {
            prefix: "2001:db8:bad::/48".into(),
            service: None,
        };
        let (back, _) = firewall_edit(&next, List::Deny, &remove).expect("remove");
        assert!(back.firewall.deny6.is_empty());
        let bad = firewall_edit(&cfg, List::Allow, &add("2001:db8::1/64", Some("www")))
            .expect_err("host bits");
        assert!(format!("{bad:#}").starts_with("prefix: \"2001:db8::1/64\" has host bits set"));
        // The file's rules apply across families: allowed and denied.
        let (allowed, _) =
            firewall_edit(&cfg, List::Allow, &add("2001:db8:1::/64", Some("www"))).expect("allow");
        let both = firewall_edit(&allowed, List::Deny, &add("2001:db8:1::/64", Some("www")))
            .expect_err("both");
        assert!(
            format!("{both:#}").contains("service[0].allow-from[0]: 2001:db8:1::/64 is also"),
            "{both:#}"
        );
    }

    #[test]
    fn firewall_edits_are_checked_like_the_file() {
        let cfg = site();
        let add = |prefix: &str, service: Option<&str>| RuleEdit::Add {
            prefix: prefix.into(),
            service: service.map(Into::into),
        };
        let (next, msg) =
            firewall_edit(&cfg, List::Deny, &add("203.0.113.0/24", None)).expect("deny add");
        assert_eq!(next.firewall.deny.len(), 1);
        assert!(msg.contains("deny 203.0.113.0/24 added"), "{msg}");
        // Same rules as a file: host bits, a prefix in both lists, duplicates.
        let e = firewall_edit(&cfg, List::Deny, &add("203.0.113.7/24", None)).unwrap_err();
        assert!(format!("{e:#}").contains("host bits set"), "{e:#}");
        let e = firewall_edit(&next, List::Allow, &add("203.0.113.0/24", None)).unwrap_err();
        assert!(
            format!("{e:#}").contains("lb firewall: firewall.allow[0]"),
            "{e:#}"
        );
        let e = firewall_edit(&next, List::Deny, &add("203.0.113.0/24", None)).unwrap_err();
        assert!(format!("{e:#}").contains("already"), "{e:#}");
        let (svc, _) =
            firewall_edit(&cfg, List::Allow, &add("198.18.0.0/24", Some("www"))).expect("allow");
        assert_eq!(svc.services[0].firewall.allow.len(), 1);
        assert!(firewall_edit(&cfg, List::Allow, &add("198.18.0.0/24", Some("nope"))).is_err());
        let remove = RuleEdit::Remove {
            prefix: "203.0.113.0/24".into(),
            service: None,
        };
        let (back, _) = firewall_edit(&next, List::Deny, &remove).expect("remove");
        assert_eq!(back, cfg);
        assert!(firewall_edit(&cfg, List::Deny, &remove).is_err());
    }

    #[test]
    fn firewall_edits_reach_a_pools_services() {
        let text = format!(
            "{SITE}\n[[pool]]\nname = \"db\"\nwrite-vip = \"198.18.0.20:3306\"\n\
             read-vip = \"198.18.0.21:3306\"\n\
             health = {{ check = \"mysql\", user = \"lb\", password = \"pw\" }}\n\
             members = [ {{ name = \"db1\", address = \"198.19.1.21:3306\" }} ]\n"
        );
        let cfg = config::parse(&text, Path::new("site.toml")).expect("valid site");
        let edit = RuleEdit::Add {
            prefix: "198.18.0.2/32".into(),
            service: Some("db-write".into()),
        };
        let (next, msg) = firewall_edit(&cfg, List::Deny, &edit).expect("deny on db-write");
        assert!(
            msg.contains("service db-write: deny 198.18.0.2/32 added"),
            "{msg}"
        );
        let rules = |c: &Config, name: &str| {
            c.services
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.firewall.deny.len())
        };
        // The rule is in the applied service, and only in the write one.
        assert_eq!(rules(&next, "db-write"), Some(1));
        assert_eq!(rules(&next, "db-read"), Some(0));
        assert_eq!(next.pools[0].write_firewall.deny.len(), 1);
        let remove = RuleEdit::Remove {
            prefix: "198.18.0.2/32".into(),
            service: Some("db-write".into()),
        };
        let (back, _) = firewall_edit(&next, List::Deny, &remove).expect("remove");
        assert_eq!(back, cfg);
    }
}
