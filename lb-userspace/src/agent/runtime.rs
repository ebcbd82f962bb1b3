//! Runtime changes that outlive the agent: every `lb backend …` and
//! `lb firewall …` change is kept in a state file beside the config
//! (`lb.toml` → `lb.state.toml`, or `lb run --state`), written atomically
//! after each change, read back at start and on reload and applied over the
//! config. bpffs (the pin dir) holds only BPF objects, not files, so the
//! state lives beside the config.
//!
//! The state is not a log of commands but the difference between the
//! config file and what runs ([`diff`]): for each backend a runtime change
//! touched, what the file said when the change was made and what runs now
//! (and its admin state); for each firewall prefix, added or removed. The
//! merge rule ([`merge`]) is one sentence per kind:
//! - weight, backup and presence (added, removed): the runtime change wins
//!   while the file's backend of that name is still what it was when the
//!   change was made; once the file changed that backend (or added one of
//!   that name), the file wins and the change is dropped, with a warning;
//! - admin state (drain, disabled): kept as long as a backend of that name
//!   at the same address runs (the file has no admin state to disagree);
//! - a firewall prefix added or removed at run time stays so until the file
//!   says the same (then the change is moot and dropped);
//! - a change whose service is gone, or that the config's rules reject
//!   after the file changed, is dropped with the reason.
//!
//! A state file that cannot be read or parsed is reported, moved aside
//! (`….corrupt`) and ignored: the agent serves the config.

use std::{
    collections::BTreeMap,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::state::{Admin, Key, key};
use crate::config::{self, Config, Firewall};

/// A backend's shape as the config gives it (what runtime changes touch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Shape {
    pub address: SocketAddr,
    pub weight: u32,
    pub backup: bool,
}

impl Shape {
    fn of(b: &config::Backend) -> Shape {
        Shape {
            address: b.address,
            weight: b.weight,
            backup: b.backup,
        }
    }
}

/// One backend a runtime change touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BackendEntry {
    pub service: String,
    pub backend: String,
    /// The admin state set with `lb backend drain|disable`.
    #[serde(default = "enabled", skip_serializing_if = "is_enabled")]
    pub admin: Admin,
    /// The backend as it runs; absent: removed at run time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now: Option<Shape>,
    /// The file's backend of that name when the change was made; absent:
    /// the file had none (added at run time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<Shape>,
}

fn enabled() -> Admin {
    Admin::Enabled
}

fn is_enabled(a: &Admin) -> bool {
    *a == Admin::Enabled
}

/// `[firewall]`'s lists or a service's (`allow-from`, `deny-from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListName {
    Deny,
    Allow,
}

/// One firewall prefix added or removed at run time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FirewallEntry {
    /// The service whose lists it is in; absent: `[firewall]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub list: ListName,
    pub prefix: String,
    /// Added (true) or removed (false) at run time.
    pub added: bool,
}

/// The state file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuntimeState {
    #[serde(default, rename = "backend", skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendEntry>,
    #[serde(default, rename = "firewall", skip_serializing_if = "Vec::is_empty")]
    pub firewall: Vec<FirewallEntry>,
}

impl RuntimeState {
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty() && self.firewall.is_empty()
    }

    /// One line per change, as `lb status` lists them.
    pub fn describe(&self) -> Vec<String> {
        let backends = self
            .backends
            .iter()
            .map(|e| format!("{}/{}: {}", e.service, e.backend, e.describe()));
        let firewall = self.firewall.iter().map(|f| {
            format!(
                "{}: {} {} {}",
                f.service
                    .as_deref()
                    .map_or("[firewall]".to_owned(), |s| format!("service {s}")),
                list_name(f.list),
                f.prefix,
                if f.added { "added" } else { "removed" }
            )
        });
        backends.chain(firewall).collect()
    }
}

impl BackendEntry {
    /// What the change is, e.g. "drain", "weight 5 (file: 1)", "added".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match (&self.file, &self.now) {
            (None, Some(n)) => parts.push(format!(
                "added {} weight {}{}",
                n.address,
                n.weight,
                if n.backup { " backup" } else { "" }
            )),
            (Some(_), None) => parts.push("removed".to_owned()),
            (Some(f), Some(n)) => {
                if f.weight != n.weight {
                    parts.push(format!("weight {} (file: {})", n.weight, f.weight));
                }
                if f.backup != n.backup {
                    parts.push(format!("backup {} (file: {})", n.backup, f.backup));
                }
            }
            (None, None) => {}
        }
        if self.admin != Admin::Enabled {
            parts.push(self.admin.to_string());
        }
        parts.join(", ")
    }
}

fn list_name(l: ListName) -> &'static str {
    match l {
        ListName::Deny => "deny",
        ListName::Allow => "allow",
    }
}

/// Why a state file was not used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: not a state file: {reason}")]
    Parse { file: PathBuf, reason: String },
    #[error("{file}: cannot write: {source}")]
    Write {
        file: PathBuf,
        source: std::io::Error,
    },
}

/// Where the state of an agent running `config` lives by default: beside
/// it, `NAME.state.toml` for `NAME.toml`.
pub fn default_path(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map_or("lb".into(), |s| s.to_string_lossy().into_owned());
    config.with_file_name(format!("{stem}.state.toml"))
}

/// Reads the state file; no file: no runtime changes.
pub fn load(path: &Path) -> Result<RuntimeState, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RuntimeState::default()),
        Err(source) => {
            return Err(StateError::Read {
                file: path.to_path_buf(),
                source,
            });
        }
    };
    toml::from_str(&text).map_err(|e| StateError::Parse {
        file: path.to_path_buf(),
        reason: e.message().to_owned(),
    })
}

/// Writes `state` so that a crash at any moment leaves either the old file
/// or the new one, never a part: a temporary file in the same directory,
/// fsynced, renamed over the old one, then the directory fsynced so the
/// rename itself is durable. No runtime changes: the file is removed.
pub fn save(path: &Path, state: &RuntimeState) -> Result<(), StateError> {
    let write_err = |source| StateError::Write {
        file: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if state.is_empty() {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(write_err(e)),
        }
    } else {
        let text = toml::to_string(state).map_err(|e| write_err(std::io::Error::other(e)))?;
        let name = path
            .file_name()
            .map_or("state".into(), |n| n.to_string_lossy().into_owned());
        let (tmp, mut f) = create_temporary(&dir, &name).map_err(write_err)?;
        let written = (|| {
            f.write_all(HEADER.as_bytes())?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e));
        }
    }
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)
}

/// A new temporary file beside the state file, mode 0600. Never an
/// existing path: `create_new` (O_EXCL) does not follow a symlink planted
/// at the name, so the agent (root) cannot be made to write elsewhere.
fn create_temporary(dir: &Path, name: &str) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut last = None;
    for n in 0..8 {
        let tmp = dir.join(format!(".{name}.tmp.{}.{n}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary name")))
}

const HEADER: &str = "# Runtime changes of `lb backend` and `lb firewall`, written by the agent.\n\
# Applied over the config at start and reload; `lb backend reset` drops them.\n\n";

/// Moves an unusable state file aside (`….corrupt`) so the next change
/// does not overwrite what an operator may want to read; the new name.
pub fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".corrupt");
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

/// The runtime changes: how `running` (with its admin states) differs
/// from the config file `file`. A pool's services take their backends from
/// the pool, so only their admin states count.
pub fn diff(file: &Config, running: &Config, admin: &BTreeMap<Key, Admin>) -> RuntimeState {
    let mut state = RuntimeState::default();
    let pooled = |name: &str| running.pools.iter().any(|p| p.owns_service(name));
    for svc in &running.services {
        let base = file.services.iter().find(|s| s.name == svc.name);
        let base_backends = base.map_or(&[][..], |s| &s.backends[..]);
        let mut names: Vec<&str> = base_backends.iter().map(|b| b.name.as_str()).collect();
        for b in &svc.backends {
            if !names.contains(&b.name.as_str()) {
                names.push(&b.name);
            }
        }
        for name in names {
            let shape =
                |list: &[config::Backend]| list.iter().find(|b| b.name == name).map(Shape::of);
            let (was, now) = (shape(base_backends), shape(&svc.backends));
            let (was, now) = if pooled(&svc.name) {
                (now, now)
            } else {
                (was, now)
            };
            let state_of = now
                .and_then(|_| admin.get(&key(&svc.name, name)).copied())
                .unwrap_or(Admin::Enabled);
            if was != now || state_of != Admin::Enabled {
                state.backends.push(BackendEntry {
                    service: svc.name.clone(),
                    backend: name.to_owned(),
                    admin: state_of,
                    now,
                    file: was,
                });
            }
        }
    }
    let scopes = std::iter::once((None, &file.firewall, &running.firewall)).chain(
        running
            .services
            .iter()
            .filter(|s| !pooled(&s.name))
            .filter_map(|s| {
                let base = file.services.iter().find(|b| b.name == s.name)?;
                Some((Some(s.name.clone()), &base.firewall, &s.firewall))
            }),
    );
    for (service, base, now) in scopes {
        // As text (canonical: each parsed), both families in one list.
        for (list, was, is) in [
            (ListName::Deny, base.deny_texts(), now.deny_texts()),
            (ListName::Allow, base.allow_texts(), now.allow_texts()),
        ] {
            let entry = |p: &String, added| FirewallEntry {
                service: service.clone(),
                list,
                prefix: p.clone(),
                added,
            };
            state.firewall.extend(
                is.iter()
                    .filter(|p| !was.contains(p))
                    .map(|p| entry(p, true)),
            );
            state.firewall.extend(
                was.iter()
                    .filter(|p| !is.contains(p))
                    .map(|p| entry(p, false)),
            );
        }
    }
    state
}

/// The config file with the runtime changes applied over it.
#[derive(Debug)]
pub struct Merged {
    pub config: Config,
    pub admin: BTreeMap<Key, Admin>,
    /// The changes that no longer apply, each with why (logged; they leave
    /// the state file at its next write).
    pub dropped: Vec<String>,
}

/// Applies `state` over the config file `file` by the merge rule (module
/// docs). Each change is checked with the config's own rules as it is
/// applied; one that breaks them is dropped, the others stay.
pub fn merge(file: &Config, state: &RuntimeState, origin: &Path) -> Merged {
    let mut cfg = file.clone();
    let mut admin = BTreeMap::new();
    let mut dropped = Vec::new();
    for e in &state.backends {
        let what = format!("{}/{} ({})", e.service, e.backend, e.describe());
        let Some(si) = cfg.services.iter().position(|s| s.name == e.service) else {
            dropped.push(format!("{what}: no service {} in the config", e.service));
            continue;
        };
        let mut next = cfg.clone();
        let svc = &mut next.services[si];
        let pos = svc.backends.iter().position(|b| b.name == e.backend);
        let current = pos.map(|i| Shape::of(&svc.backends[i]));
        if e.file != e.now {
            if current == e.file {
                match (pos, e.now) {
                    (Some(i), None) => {
                        svc.backends.remove(i);
                    }
                    (Some(i), Some(n)) => {
                        let b = &mut svc.backends[i];
                        (b.address, b.weight, b.backup) = (n.address, n.weight, n.backup);
                    }
                    (None, Some(n)) => svc.backends.push(config::Backend {
                        name: e.backend.clone(),
                        address: n.address,
                        weight: n.weight,
                        backup: n.backup,
                        health: None,
                        max_connections: None,
                    }),
                    (None, None) => {}
                }
            } else {
                dropped.push(format!(
                    "{what}: the config file changed this backend since; the file wins"
                ));
            }
        }
        match config::check(&next, origin) {
            Ok(checked) => cfg = checked,
            Err(err) => {
                dropped.push(format!("{what}: {err}"));
                continue;
            }
        }
        // Admin state: kept while the same server runs under that name.
        let runs = cfg.services[si]
            .backends
            .iter()
            .find(|b| b.name == e.backend)
            .map(|b| b.address);
        if e.admin != Admin::Enabled {
            if runs.is_some() && runs == e.now.map(|n| n.address) {
                admin.insert(key(&e.service, &e.backend), e.admin);
            } else {
                dropped.push(format!(
                    "{}/{} {}: that server is no longer in the config",
                    e.service, e.backend, e.admin
                ));
            }
        }
    }
    for f in &state.firewall {
        let what = format!(
            "{}: {} {} {}",
            f.service.as_deref().unwrap_or("[firewall]"),
            list_name(f.list),
            f.prefix,
            if f.added { "added" } else { "removed" }
        );
        let mut next = cfg.clone();
        let fw: &mut Firewall = match &f.service {
            None => &mut next.firewall,
            Some(name) => match next.services.iter_mut().find(|s| &s.name == name) {
                Some(s) => &mut s.firewall,
                None => {
                    dropped.push(format!("{what}: no service {name} in the config"));
                    continue;
                }
            },
        };
        match fw.edit(f.list == ListName::Deny, f.added, &f.prefix) {
            Ok((_, true)) => {}
            Ok((_, false)) => {
                dropped.push(format!("{what}: the config file says so now"));
                continue;
            }
            Err(why) => {
                dropped.push(format!("{what}: {why}"));
                continue;
            }
        }
        match config::check(&next, origin) {
            Ok(checked) => cfg = checked,
            Err(err) => dropped.push(format!("{what}: {err}")),
        }
    }
    Merged {
        config: cfg,
        admin,
        dropped,
    }
}

#[cfg(test)]
mod tests;
