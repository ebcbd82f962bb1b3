//! The control socket's requests, one at a time on the agent's loop:
//! `lb status` (built in `status`), `lb reload`, `lb explain`,
//! `lb backend …`, `lb firewall …`, `lb db promote`, `lb vip …`. Every
//! change goes through the one commit path; its answer and log line say
//! what happened or why nothing did.

use anyhow::{Context, bail};
use tracing::{error, info, warn};

use super::{Agent, state};
use crate::{
    explain::{self, BackendView, FlowQuery, ServiceView},
    server,
    wire::{BackendChange, FirewallChange, Request, Response, VipChange},
};

impl Agent {
    pub(super) fn handle(&mut self, req: Request) -> server::Reply {
        match req {
            Request::Status => server::Reply::Status(self.status()),
            Request::Reload => server::Reply::Done(match self.reload_recorded() {
                Ok(()) => Response::ok(format!("reloaded {}", self.path.display())),
                Err(e) => {
                    error!("reload rejected, running config unchanged: {e:#}");
                    Response::error(format!("reload rejected, running config unchanged: {e:#}"))
                }
            }),
            Request::Explain { client, service } => {
                server::Reply::Done(match self.explain(&client, &service) {
                    Ok(text) => Response::ok(text),
                    Err(e) => Response::error(format!("{e:#}")),
                })
            }
            Request::Firewall(change) => {
                let what = command("firewall", &change);
                server::Reply::Done(match self.change_firewall(change) {
                    Ok(msg) => {
                        info!("{}", msg.lines().next().unwrap_or_default());
                        Response::ok(msg)
                    }
                    Err(e) => {
                        warn!("rejected {what}: {e:#}");
                        Response::error(format!("rejected, the running rules stay: {e:#}"))
                    }
                })
            }
            Request::Db(crate::db::DbCommand::Promote {
                pool,
                member,
                force,
            }) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                match self
                    .db
                    .promote(&pool, &member, force, Some(tx), "lb db promote")
                {
                    Ok(()) => {
                        info!(
                            "promoting {pool}/{member}{}",
                            if force { " (forced)" } else { "" }
                        );
                        server::Reply::Later(rx)
                    }
                    Err(why) => {
                        warn!("rejected lb db promote {pool} {member}: {why}");
                        server::Reply::Done(Response::error(format!("rejected: {why}")))
                    }
                }
            }
            Request::Vip(change) => {
                let what = command("vip", &change);
                server::Reply::Done(match self.change_vip(change) {
                    Ok(msg) => {
                        info!("{msg}");
                        Response::ok(msg)
                    }
                    Err(e) => {
                        warn!("rejected {what}: {e:#}");
                        Response::error(format!("rejected: {e:#}"))
                    }
                })
            }
            Request::Backend(change) => {
                let what = command("backend", &change);
                server::Reply::Done(match self.change_backend(change) {
                    Ok(msg) => {
                        info!("{msg}");
                        Response::ok(msg)
                    }
                    Err(e) => {
                        warn!("rejected {what}: {e:#}");
                        Response::error(format!("rejected, nothing changed: {e:#}"))
                    }
                })
            }
        }
    }

    /// `lb explain`: the maps' facts for the flow, with names, admin state
    /// and health from the agent, through the pure decision text.
    fn explain(&self, client: &str, service: &str) -> anyhow::Result<String> {
        let query = FlowQuery::parse(client, service)?;
        let on_vip: Vec<String> = self
            .cfg
            .services
            .iter()
            .filter(|s| s.vip.ip() == query.vip.ip())
            .map(|s| format!("{} {}/{}", s.name, s.vip, s.protocol.name()))
            .collect();
        let Some(key) = query.key() else {
            return self.explain6(&query, &on_vip);
        };
        let facts = self.dp.flow_facts(&key).context("reading the maps")?;
        let view = facts.service.as_ref().and_then(|f| self.service_view(f.id));
        Ok(explain::explain(&query, &facts, view.as_ref(), &on_vip))
    }

    /// `lb explain` of an IPv6 flow: its entry in IPv6's flow tables (or,
    /// without one, what a new flow meets in IPv6's maps) and the agent's
    /// view of the service on its VIP.
    fn explain6(&self, query: &FlowQuery, on_vip: &[String]) -> anyhow::Result<String> {
        let key = query.key6().context("an IPv6 flow")?;
        let flows6 = self.dp.flows6().context("reading IPv6's flow tables")?;
        let found = flows6.lookup(&key).context("reading IPv6's flow tables")?;
        let flow6 = match found {
            None => None,
            Some((established, entry)) => {
                // Half-open entries serve both directions: no pair.
                let pair = if established {
                    flows6
                        .pair_entry(&key, &entry)
                        .context("reading IPv6's flow tables")?
                } else {
                    None
                };
                let conf = self.dp.flow_conf().context("reading FLOW_CONF")?;
                let now = crate::dataplane::now_ticks();
                Some(explain::Flow6Facts {
                    established,
                    entry,
                    age: explain::EntryAge::of(&conf, key.protocol, &entry, pair.as_ref(), now),
                })
            }
        };
        let view = self
            .cfg
            .services
            .iter()
            .zip(&self.applied)
            .find(|(s, _)| {
                s.vip == query.vip
                    && crate::dataplane::protocol_number(s.protocol) == query.protocol
            })
            .and_then(|(_, a)| self.service_view(a.id));
        // A new flow's facts: none in the tables, or an expired entry (a miss).
        let facts = match flow6 {
            Some(f) if !f.age.is_miss() => explain::FlowFacts6::default(),
            _ => self.dp.flow_facts6(&key).context("reading the maps")?,
        };
        Ok(explain::explain6(
            query,
            flow6.as_ref(),
            &facts,
            view.as_ref(),
            on_vip,
        ))
    }

    /// The agent's view of service `id`: names, admin state, health.
    fn service_view(&self, id: u32) -> Option<ServiceView> {
        let (svc, applied) = self
            .cfg
            .services
            .iter()
            .zip(&self.applied)
            .find(|(_, a)| a.id == id)?;
        Some(ServiceView {
            name: svc.name.clone(),
            forwarding: svc.forwarding,
            scheduler: svc.scheduler,
            backends: svc
                .backends
                .iter()
                .zip(&applied.backends)
                .map(|(b, (_, id))| {
                    let standing = self.standing(svc, b);
                    BackendView {
                        id: *id,
                        name: b.name.clone(),
                        address: b.address.to_string(),
                        admin: standing.admin,
                        health: standing.health.into(),
                        at_limit: standing.at_limit,
                    }
                })
                .collect(),
        })
    }

    /// `lb firewall`: an edit goes through the one commit path (checked
    /// whole, applied atomically); `show` reads the rules and counters.
    fn change_firewall(&mut self, change: FirewallChange) -> anyhow::Result<String> {
        use crate::dataplane::firewall::List;
        let (list, edit) = match change {
            FirewallChange::Show => return self.firewall_show(),
            FirewallChange::Reset => return self.reset_firewall(),
            FirewallChange::Deny { edit } => (List::Deny, edit),
            FirewallChange::Allow { edit } => (List::Allow, edit),
        };
        let (next, msg) = state::firewall_edit(&self.cfg, list, &edit)?;
        self.commit_change(next, self.admin.clone())?;
        Ok(msg + &self.save_runtime_state())
    }

    /// `lb firewall reset`: the file's rules again, backend changes kept.
    fn reset_firewall(&mut self) -> anyhow::Result<String> {
        let mut kept = self.runtime_state();
        let undone = std::mem::take(&mut kept.firewall);
        if undone.is_empty() {
            bail!("no runtime changes of the firewall: the config file's rules apply");
        }
        self.commit_runtime(&self.file_cfg.clone(), &kept)?;
        Ok(format!(
            "the config file's firewall rules apply again ({} runtime change(s) undone){}",
            undone.len(),
            self.save_runtime_state()
        ))
    }

    /// Every rule with its scope and counter, and each scope's rate limit.
    fn firewall_show(&self) -> anyhow::Result<String> {
        let name = |scope: u32| {
            if scope == lb_common::FW_GLOBAL {
                "[firewall]".to_owned()
            } else {
                self.applied
                    .iter()
                    .find(|a| a.id == scope)
                    .map_or(format!("service id {scope}"), |a| {
                        format!("service {}", a.name)
                    })
            }
        };
        let mut out = String::new();
        let limits = std::iter::once(("[firewall]".to_owned(), &self.cfg.firewall)).chain(
            self.cfg
                .services
                .iter()
                .map(|s| (format!("service {}", s.name), &s.firewall)),
        );
        for (scope, fw) in limits {
            if let Some(r) = fw.rate_limit {
                out.push_str(&format!(
                    "{scope}: rate-limit {} new flows/s, burst {}, per {}\n",
                    r.new_flows_per_second,
                    r.burst,
                    r.per_text()
                ));
            }
        }
        let rules = self
            .dp
            .firewall_rules()
            .context("reading the rule counters")?;
        if rules.is_empty() && out.is_empty() {
            return Ok("no firewall rules".to_owned());
        }
        for r in rules {
            out.push_str(&format!(
                "{}: {} (rule {}): {} new flows\n",
                name(r.rule.scope),
                r.rule,
                r.id,
                r.new_flows
            ));
        }
        Ok(out)
    }

    fn change_backend(&mut self, change: BackendChange) -> anyhow::Result<String> {
        if let BackendChange::Reset { service, backend } = change {
            return self.reset_backend(&service, backend.as_deref());
        }
        let edit = state::edit(&self.cfg, &self.admin, change)?;
        self.commit_change(edit.config, edit.admin)?;
        Ok(edit.message + &self.save_runtime_state())
    }

    /// `lb backend reset SERVICE [NAME]`: drops the runtime changes of the
    /// service (or one backend) and applies the rest over the file.
    fn reset_backend(&mut self, service: &str, backend: Option<&str>) -> anyhow::Result<String> {
        if !self.cfg.services.iter().any(|s| s.name == service) {
            bail!("service: no service named {service:?}");
        }
        let mut kept = self.runtime_state();
        let (dropped, rest): (Vec<_>, Vec<_>) = kept
            .backends
            .into_iter()
            .partition(|e| e.service == service && backend.is_none_or(|b| e.backend == b));
        kept.backends = rest;
        let what = backend.map_or(service.to_owned(), |b| format!("{service}/{b}"));
        if dropped.is_empty() {
            bail!("{what} has no runtime changes: it runs as the config file says");
        }
        self.commit_runtime(&self.file_cfg.clone(), &kept)?;
        let undone: Vec<String> = dropped
            .iter()
            .map(|e| format!("{}/{} {}", e.service, e.backend, e.describe()))
            .collect();
        Ok(format!(
            "{what}: back to the config file (undid {}){}",
            undone.join("; "),
            self.save_runtime_state()
        ))
    }

    /// `lb vip withdraw|announce [VIP]`.
    fn change_vip(&mut self, change: VipChange) -> anyhow::Result<String> {
        let reach = self.service_reach();
        let Some(a) = &mut self.announcer else {
            bail!("this agent announces nothing: its config has no [announce] section");
        };
        Ok(a.change(&change, &reach)?)
    }
}

/// A control command as a log line names it: the verb and its request as
/// the control protocol spells it (`lb backend {"action":"drain",…}`), not
/// Rust's Debug form.
fn command(verb: &str, change: &impl serde::Serialize) -> String {
    format!(
        "lb {verb} {}",
        serde_json::to_string(change).unwrap_or_default()
    )
}
