//! `[sync]`: flow-state sync with the other LBs (issue 27, sync/): where
//! this LB listens, its peers, the shared key's file and the bulk copy's
//! wait at start.

use std::{net::SocketAddrV4, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{Secret, duration, validate::Validator};

/// The shortest key a key file may hold.
pub const MIN_KEY_LEN: usize = 32;

/// `[sync]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sync {
    /// The UDP address this LB sends from and receives on; its IPv4
    /// address is this LB's sender id in the messages.
    pub listen: SocketAddrV4,
    /// The other LBs' `listen` addresses.
    pub peers: Vec<SocketAddrV4>,
    pub key_file: PathBuf,
    /// The shared key (the key file's first line): never shown by `Debug`.
    pub key: Secret,
    /// How long a starting agent waits for its peers' established flows
    /// before it says `lb: ready` (and announces its VIPs) without them.
    pub bulk_timeout: Duration,
}

pub const DEFAULT_BULK_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest `bulk-timeout`: the VIPs wait that long at every start.
const MAX_BULK_TIMEOUT: Duration = Duration::from_secs(60);
/// Key files hold a line, not a document.
const KEY_FILE_MAX: u64 = 4096;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "sync")]
pub(super) struct RawSync {
    listen: Option<String>,
    peers: Option<Vec<String>>,
    key_file: Option<String>,
    bulk_timeout: Option<String>,
}

impl From<&Sync> for RawSync {
    fn from(s: &Sync) -> RawSync {
        RawSync {
            listen: Some(s.listen.to_string()),
            peers: Some(s.peers.iter().map(ToString::to_string).collect()),
            key_file: Some(s.key_file.display().to_string()),
            bulk_timeout: Some(duration::show(s.bulk_timeout)),
        }
    }
}

impl Validator<'_> {
    pub(super) fn sync(&self, raw: RawSync) -> Result<Sync, super::ConfigError> {
        let address = |key: &str, text: &str| {
            text.parse::<SocketAddrV4>().map_err(|_| {
                self.err(
                    key,
                    format!("{text:?}: expected IPv4:port, e.g. \"198.19.0.11:7890\""),
                )
            })
        };
        let listen_text = self.required(raw.listen, "sync.listen")?;
        let listen = address("sync.listen", &listen_text)?;
        if listen.ip().is_unspecified() || listen.port() == 0 {
            return Err(self.err(
                "sync.listen",
                format!(
                    "{listen}: a specific address and port (its address is this LB's id to its peers)"
                ),
            ));
        }
        let texts = self.required(raw.peers, "sync.peers")?;
        if texts.is_empty() {
            return Err(self.err(
                "sync.peers",
                "list at least one peer, e.g. [\"198.19.0.12:7890\"]",
            ));
        }
        let mut peers = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let key = format!("sync.peers[{i}]");
            let peer = address(&key, text)?;
            if *peer.ip() == *listen.ip() {
                return Err(self.err(
                    key,
                    format!("{peer} is this LB's own address (sync.listen)"),
                ));
            }
            if peers.iter().any(|p: &SocketAddrV4| p.ip() == peer.ip()) {
                return Err(self.err(key, format!("{} is listed twice", peer.ip())));
            }
            peers.push(peer);
        }
        let file = self.required(raw.key_file, "sync.key-file")?;
        let key_file = PathBuf::from(&file);
        if !key_file.is_absolute() {
            return Err(self.err(
                "sync.key-file",
                format!("must be an absolute path, got {file:?}"),
            ));
        }
        let key = read_key(&key_file)
            .map_err(|why| self.err("sync.key-file", format!("{file}: {why}")))?;
        let bulk_timeout = match raw.bulk_timeout {
            None => DEFAULT_BULK_TIMEOUT,
            Some(text) => {
                let d = duration::parse(&text).map_err(|r| self.err("sync.bulk-timeout", r))?;
                if d > MAX_BULK_TIMEOUT {
                    return Err(self.err(
                        "sync.bulk-timeout",
                        format!("{text:?}: at most 60s (the VIPs wait that long at every start)"),
                    ));
                }
                d
            }
        };
        Ok(Sync {
            listen,
            peers,
            key_file,
            key: Secret::new(key),
            bulk_timeout,
        })
    }
}

/// The key file's first line: at least 32 characters (`openssl rand -hex
/// 32` makes 64), in a file no one but its owner may read or write (the
/// key lets anyone who has it put flows into this LB's table).
fn read_key(path: &std::path::Path) -> Result<String, String> {
    use std::{io::Read as _, os::unix::fs::PermissionsExt as _};
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mode = file
        .metadata()
        .map_err(|e| format!("cannot read: {e}"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "mode {:o} lets others read or write the key: chmod 600 it",
            mode & 0o777
        ));
    }
    let mut text = String::new();
    file.take(KEY_FILE_MAX)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    let line = text.lines().next().unwrap_or_default().trim();
    if line.len() < MIN_KEY_LEN {
        return Err(format!(
            "the key (first line) has {} characters, at least {} are needed (e.g. `openssl rand -hex 32`)",
            line.len(),
            MIN_KEY_LEN
        ));
    }
    Ok(line.to_owned())
}
