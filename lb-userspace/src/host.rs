//! The agent's footing on the host: the network namespace it runs in, the
//! bpffs its pins live on, the lock that makes it the only agent of its pin
//! directory, and its control socket file. Each is checked, not assumed:
//! the agent never claims that its data plane outlives it unless the pins
//! are on a bpffs that does.

use std::{
    fs,
    os::unix::{
        fs::{FileTypeExt, MetadataExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use rustix::{
    fs::FlockOperation,
    mount::MountFlags,
    thread::{LinkNameSpaceType, move_into_link_name_space},
};
use tracing::info;

/// Where the agent pins its data plane unless told otherwise (`--pin-dir`
/// of `lb run`, and of every verb that reads the pins).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

/// `statfs.f_type` of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Moves the calling thread into network namespace `name` (as `ip netns`
/// names them, /run/netns/NAME), and nothing else: the mount namespace
/// stays the host's, so a bpffs there outlives the agent. Threads created
/// afterwards by this thread inherit the namespace.
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    let path = Path::new("/run/netns").join(name);
    let file = fs::File::open(&path).with_context(|| {
        format!(
            "--netns {name}: opening {} (does `ip netns list` show it?)",
            path.display()
        )
    })?;
    move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(LinkNameSpaceType::Network),
    )
    .with_context(|| format!("--netns {name}: entering the network namespace"))
}

// `f_type` is i64 here but of another width on other architectures.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn is_bpffs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type as i64 == BPF_FS_MAGIC)
}

/// Whether this process runs in a mount namespace of its own: other than
/// init's, or other than its parent's (as under `ip netns exec`, which
/// unshares the mount namespace and then execs us; /proc/1 may be
/// unreadable from there). What cannot be read counts as shared.
fn in_private_mount_namespace() -> bool {
    let ns = |pid: &str| fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| (m.dev(), m.ino()));
    let Ok(mine) = ns("self") else {
        return false;
    };
    let parent = std::os::unix::process::parent_id().to_string();
    [ns("1"), ns(&parent)]
        .into_iter()
        .any(|other| other.is_ok_and(|other| other != mine))
}

/// The pin directory's parent must be a bpffs that outlives the agent.
/// /sys/fs/bpf is mounted on most hosts; when it is not, the agent mounts
/// one — but only in the host's mount namespace. In a private one (`ip netns
/// exec` remounts /sys), such a mount would end with the agent and take the
/// pins, and with them XDP, away: refused, with the fix.
pub fn ensure_lasting_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    // The nearest directory that exists: the pin dir's parents are created
    // on whatever filesystem that is.
    let existing = parent
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    if in_private_mount_namespace() {
        bail!(
            "{} is not on a bpffs, and this agent runs in a private mount namespace \
             (`ip netns exec`?): a bpffs mounted here would vanish with the agent, and the \
             pinned data plane with it. Run `lb run --netns NAME ...` instead of \
             `ip netns exec NAME lb run ...` (it enters only the network namespace), or pass \
             --pin-dir on a bpffs mounted in the host's mount namespace",
            parent.display()
        );
    }
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    // Root only: a world-writable bpffs (the default mode is 1777) lets any
    // user create directories there, or the pin dir before the agent does.
    rustix::mount::mount("bpf", parent, "bpf", MountFlags::empty(), c"mode=0700").with_context(|| {
        format!(
            "{} is not on a bpffs and mounting one failed: run `mount -t bpf bpf {}` or pass --pin-dir",
            parent.display(),
            parent.display()
        )
    })?;
    info!(
        "mounted a bpffs at {} in the host's mount namespace",
        parent.display()
    );
    Ok(())
}

/// The pin directory is the agent's alone: whoever can write in it can
/// remove the link pins and so detach the data plane. The agent creates
/// it (mode 0700) or, if it exists, refuses it unless it is a directory
/// owned by the agent's own user (root in production) that no group or
/// other user can write to. On a world-writable bpffs (mounted without
/// `mode=`, 1777) another user could create the pin dir first and keep it.
pub fn secure_pin_dir(pin_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = pin_dir.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    match fs::DirBuilder::new().mode(PIN_DIR_MODE).create(pin_dir) {
        Ok(()) => {
            // The umask may have taken bits away, never added one; set the
            // mode exactly anyway.
            fs::set_permissions(pin_dir, fs::Permissions::from_mode(PIN_DIR_MODE))
                .with_context(|| format!("restricting {} to its owner", pin_dir.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", pin_dir.display())),
    }
    check_pin_dir(
        pin_dir,
        &format!(
            "Whoever can write there can remove the link pins and detach the data plane: \
             remove it (`rm -r {}`) and let the agent create it, or pass another --pin-dir",
            pin_dir.display()
        ),
    )
}

/// Refuses an existing pin directory that another user owns or could
/// write to (the rule of [`secure_pin_dir`]), naming the problem and then
/// `remedy`. `lb teardown` checks it too before it trusts what is pinned
/// there: it runs as root and acts on whatever it finds.
pub fn check_pin_dir(pin_dir: &Path, remedy: &str) -> anyhow::Result<()> {
    let meta =
        fs::symlink_metadata(pin_dir).with_context(|| format!("reading {}", pin_dir.display()))?;
    if let Some(problem) = pin_dir_problem(&meta, rustix::process::geteuid().as_raw()) {
        bail!(
            "refusing pin dir {}: {problem}. {remedy}",
            pin_dir.display()
        );
    }
    Ok(())
}

/// The mode the agent gives its pin directory.
const PIN_DIR_MODE: u32 = 0o700;

/// What is wrong with an existing pin directory, for an agent running as
/// user `me`.
fn pin_dir_problem(meta: &fs::Metadata, me: u32) -> Option<String> {
    let mode = meta.mode() & 0o7777;
    if meta.file_type().is_symlink() {
        Some("it is a symbolic link".to_owned())
    } else if !meta.is_dir() {
        Some("it is not a directory".to_owned())
    } else if meta.uid() != me {
        Some(format!(
            "it is owned by uid {}, not by the agent's user (uid {me})",
            meta.uid()
        ))
    } else if mode & 0o022 != 0 {
        Some(format!(
            "group or other users can write to it (mode {mode:04o}; the agent makes it {PIN_DIR_MODE:04o})"
        ))
    } else {
        None
    }
}

/// An exclusive lock on the pin directory, held for the agent's life (the
/// kernel drops it when the process dies, however it dies).
#[derive(Debug)]
pub struct PinLock {
    _dir: fs::File,
}

impl PinLock {
    /// Takes the lock, or fails naming the agent that holds it; `hint`
    /// says what to do about it.
    pub fn acquire(pin_dir: &Path, hint: &str) -> anyhow::Result<PinLock> {
        fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
        let dir =
            fs::File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
        match rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(PinLock { _dir: dir }),
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let holder = dir
                    .metadata()
                    .ok()
                    .and_then(|m| lock_holder(m.ino()))
                    .map_or_else(
                        || "another process".to_owned(),
                        |pid| format!("the agent with pid {pid} ({})", command_line(pid)),
                    );
                bail!(
                    "{holder} already runs with pin dir {}: {hint}",
                    pin_dir.display()
                )
            }
            Err(e) => Err(e).with_context(|| format!("locking {}", pin_dir.display())),
        }
    }
}

/// The pid holding a flock on inode `ino`, from /proc/locks
/// ("1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF").
fn lock_holder(ino: u64) -> Option<u32> {
    let locks = fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, file) = (fields.get(1)?, fields.get(4)?, fields.get(5)?);
        let lock_ino: u64 = file.rsplit(':').next()?.parse().ok()?;
        (*kind == "FLOCK" && lock_ino == ino)
            .then(|| pid.parse().ok())
            .flatten()
    })
}

fn command_line(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".to_owned())
}

/// The control socket's file: bound before the agent touches the data
/// plane, removed when the agent stops.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl ControlSocket {
    /// Binds `path` (mode 0600). Replaces only a stale socket (one nobody
    /// listens on); a live socket or any other kind of file is refused.
    pub fn bind(path: &Path) -> anyhow::Result<ControlSocket> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if let Ok(meta) = fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                bail!(
                    "--socket {}: the file exists and is not a socket; not replacing it \
                     (choose another --socket path)",
                    path.display()
                );
            }
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "--socket {}: another agent is listening there (stop it, or choose \
                     another --socket path)",
                    path.display()
                );
            }
            // Left by an agent that was killed: nobody listens on it.
            fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        // Created 0600 from the start (not chmod-ed after a window with the
        // umask's permissions). The agent has no other thread yet, so the
        // process-wide umask is ours to change for the moment.
        let previous = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = UnixListener::bind(path);
        rustix::process::umask(previous);
        let listener =
            bound.with_context(|| format!("binding the control socket {}", path.display()))?;
        let socket = ControlSocket {
            path: path.to_path_buf(),
            listener: Some(listener),
        };
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {} to root", path.display()))?;
        Ok(socket)
    }

    /// The listener, for the async runtime (once).
    pub fn listener(&mut self) -> anyhow::Result<tokio::net::UnixListener> {
        let listener = self
            .listener
            .take()
            .context("the control socket's listener was already taken")?;
        listener
            .set_nonblocking(true)
            .context("control socket: non-blocking mode")?;
        tokio::net::UnixListener::from_std(listener).context("control socket: registering it")
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_never_replaced_by_the_socket() {
        let dir = std::env::temp_dir().join(format!("lb-host-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("precious");
        fs::write(&file, "keep me").expect("write");
        let err = ControlSocket::bind(&file).expect_err("must refuse");
        assert!(format!("{err:#}").contains("not a socket"), "{err:#}");
        assert_eq!(fs::read_to_string(&file).expect("read"), "keep me");

        // A live socket is refused; a stale one is replaced.
        let sock = dir.join("sock");
        let live = ControlSocket::bind(&sock).expect("bind");
        let mode = fs::metadata(&sock).expect("socket").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let err = ControlSocket::bind(&sock).expect_err("live socket");
        assert!(format!("{err:#}").contains("another agent"), "{err:#}");
        drop(live);
        assert!(!sock.exists(), "removed when the agent stops");
        drop(UnixListener::bind(&sock).expect("stale socket"));
        assert!(sock.exists());
        let replaced = ControlSocket::bind(&sock).expect("stale socket replaced");
        drop(replaced);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_pin_dir_is_made_private_and_a_shared_one_refused() {
        let base = std::env::temp_dir().join(format!("lb-pin-test-{}", std::process::id()));
        let dir = base.join("pins");
        secure_pin_dir(&dir).expect("created");
        let mode = fs::metadata(&dir).expect("dir").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{mode:o}");
        secure_pin_dir(&dir).expect("its own, as it left it");

        for shared in [0o777, 0o1777, 0o770, 0o702] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(shared)).expect("chmod");
            let err = format!("{:#}", secure_pin_dir(&dir).expect_err("shared"));
            assert!(
                err.contains("group or other users can write to it") && err.contains("pins"),
                "{shared:o}: {err}"
            );
        }
        let me = rustix::process::geteuid().as_raw();
        let meta = fs::symlink_metadata(&dir).expect("dir");
        let other = pin_dir_problem(&meta, me.wrapping_add(1)).expect("someone else's");
        assert!(other.contains(&format!("owned by uid {me}")), "{other}");

        let file = base.join("file");
        fs::write(&file, "").expect("file");
        let err = format!("{:#}", secure_pin_dir(&file).expect_err("a file"));
        assert!(err.contains("not a directory"), "{err}");
        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).expect("symlink");
        let err = format!("{:#}", secure_pin_dir(&link).expect_err("a link"));
        assert!(err.contains("symbolic link"), "{err}");
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn the_lock_holder_is_found_in_proc_locks() {
        let dir = std::env::temp_dir().join(format!("lb-lock-test-{}", std::process::id()));
        let held = PinLock::acquire(&dir, "test").expect("first lock");
        let err = PinLock::acquire(&dir, "test").expect_err("second lock");
        let text = format!("{err:#}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "names the holder: {text}"
        );
        drop(held);
        let again = PinLock::acquire(&dir, "test").expect("free again");
        drop(again);
        let _ = fs::remove_dir_all(&dir);
    }
}
