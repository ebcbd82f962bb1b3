//! The record an agent leaves of its `[announce]` under [`RECORDS_DIR`],
//! one file per pin dir, so that `lb teardown` finds the include file to
//! withdraw without the agent's config; refused when another user owns it
//! or may write it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Announce;

/// Where agents record what they announce through, one file per pin dir:
/// root's, like the pins (the directory is made mode 0700). Not under
/// /run/lb: the unit's `RuntimeDirectory=lb` goes when the service stops,
/// and teardown comes after the stop.
pub const RECORDS_DIR: &str = "/run/lb-announce";

/// What `lb teardown --pin-dir D` needs to withdraw the VIPs of the agent
/// that ran with pin dir D: its `[announce]`. Written by the agent at
/// start, kept when it stops (the VIPs stay announced), removed by
/// teardown once they are withdrawn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub bird_socket: PathBuf,
    pub include: PathBuf,
    pub med: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Untrusted { path: PathBuf, reason: String },
}

impl Record {
    pub fn of(cfg: &Announce) -> Record {
        Record {
            bird_socket: cfg.bird_socket.clone(),
            include: cfg.include.clone(),
            med: cfg.med,
        }
    }

    pub fn announce(&self) -> Announce {
        Announce {
            bird_socket: self.bird_socket.clone(),
            include: self.include.clone(),
            med: self.med,
        }
    }

    /// The record file of the agent pinned at `pin_dir`, under `dir`: the
    /// pin dir's path with `%` and `/` escaped, so two pin dirs never share
    /// one.
    pub fn path_in(dir: &Path, pin_dir: &Path) -> PathBuf {
        let normal: PathBuf = pin_dir.components().collect();
        let name = normal
            .to_string_lossy()
            .replace('%', "%25")
            .replace('/', "%2F");
        dir.join(format!("{name}.json"))
    }

    /// Writes the record of `pin_dir` (replacing any), making `dir` mode
    /// 0700 if it is new.
    pub fn write(&self, dir: &Path, pin_dir: &Path) -> Result<PathBuf, RecordError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RecordError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        trusted(dir)?;
        let path = Record::path_in(dir, pin_dir);
        let text = serde_json::to_string(self).map_err(|e| RecordError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        let tmp = path.with_extension("lb-tmp");
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(path)
    }

    /// The record of `pin_dir`, if there is one. Teardown writes where it
    /// says, as root: a record (or its directory) that another user owns
    /// or may write is refused.
    pub fn read(dir: &Path, pin_dir: &Path) -> Result<Option<(PathBuf, Record)>, RecordError> {
        let path = Record::path_in(dir, pin_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RecordError::Io { path, source }),
        };
        trusted(dir)?;
        trusted(&path)?;
        let record = serde_json::from_str(&text).map_err(|e| RecordError::Untrusted {
            path: path.clone(),
            reason: format!("not a record written by lb: {e}"),
        })?;
        Ok(Some((path, record)))
    }

    /// Removes the records of `pin_dir` and of every pin dir under it
    /// (a lab's LBs), none being fine.
    pub fn remove_under(dir: &Path, pin_dir: &Path) -> Result<(), RecordError> {
        let own = Record::path_in(dir, pin_dir);
        let stem = own
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".json").to_owned())
            .unwrap_or_default();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(RecordError::Io {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == format!("{stem}.json") || name.starts_with(&format!("{stem}%2F")) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|source| RecordError::Io { path, source })?;
            }
        }
        Ok(())
    }

    /// Removes the record of `pin_dir` (none is fine).
    pub fn remove(dir: &Path, pin_dir: &Path) -> Result<(), RecordError> {
        let path = Record::path_in(dir, pin_dir);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(RecordError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }
}

/// `path` is owned by this process's user and writable by no one else.
fn trusted(path: &Path) -> Result<(), RecordError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(path).map_err(|source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let me = rustix::process::geteuid().as_raw();
    let reason = if meta.uid() != me {
        Some(format!("owned by uid {}, not by uid {me}", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "writable by others (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(RecordError::Untrusted {
            path: path.to_path_buf(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_per_pin_dir_is_written_read_and_refused_if_others_may_write_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("lb-record-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let record = Record {
            bird_socket: "/run/bird/bird.ctl".into(),
            include: "/etc/bird/lb-vips.conf".into(),
            med: 7,
        };
        let pins = Path::new("/sys/fs/bpf/lb");
        assert!(Record::read(&dir, pins).expect("no record yet").is_none());
        let path = record.write(&dir, pins).expect("write");
        assert_eq!(path, dir.join("%2Fsys%2Ffs%2Fbpf%2Flb.json"));
        // The same pin dir spelled with a trailing slash; another one.
        let (_, back) = Record::read(&dir, Path::new("/sys/fs/bpf/lb/"))
            .expect("read")
            .expect("found");
        assert_eq!(back, record);
        assert!(
            Record::read(&dir, Path::new("/sys/fs/bpf/lb2"))
                .expect("read")
                .is_none()
        );
        // A lab's records go with its pin dir, not a neighbour's.
        let lab = Path::new("/sys/fs/bpf/lb-lab-x");
        record.write(&dir, &lab.join("lb1")).expect("write lb1");
        record
            .write(&dir, Path::new("/sys/fs/bpf/lb-lab-xy"))
            .expect("write xy");
        Record::remove_under(&dir, lab).expect("remove");
        assert!(
            Record::read(&dir, &lab.join("lb1"))
                .expect("read")
                .is_none()
        );
        assert!(
            Record::read(&dir, Path::new("/sys/fs/bpf/lb-lab-xy"))
                .expect("read")
                .is_some()
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let e = Record::read(&dir, pins).expect_err("writable by others");
        assert!(e.to_string().contains("writable by others"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
