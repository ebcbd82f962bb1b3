//! XDP helpers of `lb pktgen`, which the harness and the kernel tests use
//! too: interface indexes and MACs (in the calling thread's namespace), the
//! `xdp_md` context and one BPF_PROG_TEST_RUN call, and loading the tools'
//! embedded objects and their programs.

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::{Context, ensure};
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};
use rustix::net::{AddressFamily, SocketFlags, SocketType, netdevice, socket_with};

use crate::object::MissingObject;

/// XDP actions (`enum xdp_action`), as BPF_PROG_TEST_RUN returns them.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// An AF_INET datagram socket: the handle interface ioctls go through.
fn inet_socket() -> io::Result<OwnedFd> {
    Ok(socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Interface index in the calling thread's network namespace.
pub fn ifindex(dev: &str) -> anyhow::Result<u32> {
    let index = inet_socket()
        .and_then(|fd| Ok(netdevice::name_to_index(&fd, dev)?))
        .with_context(|| format!("no interface {dev}"))?;
    ensure!(index != 0, "no interface {dev}");
    Ok(index)
}

/// MAC address of an interface in the calling thread's network namespace
/// (SIOCGIFHWADDR; /sys would show the namespace /sys was mounted in).
pub fn if_mac(dev: &str) -> anyhow::Result<[u8; 6]> {
    ensure!(dev.len() < libc::IFNAMSIZ, "interface name {dev} too long");
    let fd = inet_socket().context("socket")?;
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    // SIOCGIFHWADDR has no rustix wrapper.
    // SAFETY: req is a valid ifreq with a NUL-terminated name; fd is open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    ensure!(
        rc == 0,
        "SIOCGIFHWADDR {dev}: {}",
        io::Error::last_os_error()
    );
    // SAFETY: the kernel filled ifru_hwaddr.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data) {
        *m = d as u8;
    }
    Ok(mac)
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{s:?}: expected six hex bytes separated by ':'"));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|e| format!("{s:?}: {e}"))?;
    }
    Ok(mac)
}

pub fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Loads one of the tools' embedded objects (every program, none loaded into
/// the kernel yet): the generator's (`lb pktgen`), or the harness's bench
/// object (the generator, the sink and the baselines). Empty: this build
/// had no BPF toolchain.
pub fn load_tool(object: &[u8]) -> anyhow::Result<Ebpf> {
    if object.is_empty() {
        return Err(MissingObject.into());
    }
    // The generator's table of drawn flows: one entry in the object, full
    // size as the generator uses it.
    EbpfLoader::new()
        .map_max_entries("PKTGEN_FLOWS", lb_common::PKTGEN_FLOW_TABLE)
        .load(object)
        .context("loading the eBPF object")
}

/// A program of `ebpf` as `Xdp`, loaded into the kernel if it is not yet.
pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name}"))?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("loading program {name}"))?;
    }
    Ok(prog)
}

/// The `xdp_md` context for BPF_PROG_RUN: frame of `len` bytes received on
/// `ifindex` (`{data, data_end, data_meta, ingress_ifindex, rx_queue_index,
/// egress_ifindex}`).
pub fn xdp_md(len: usize, ifindex: u32) -> Vec<u8> {
    [0u32, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}

/// What one BPF_PROG_TEST_RUN call returned.
#[derive(Clone, Debug)]
pub struct TestRunResult {
    /// The XDP action.
    pub action: u32,
    /// Mean time per repetition, as the kernel measured it.
    pub duration: Duration,
    /// The frame as the program left it, when asked for.
    pub frame: Option<Vec<u8>>,
}

/// BPF_PROG_TEST_RUN of `prog` on `frame` as received on `ifindex`, run
/// `repeat` times (0 counts as 1); `output` also returns the frame as the
/// program left it.
pub fn test_run(
    prog: &Xdp,
    ifindex: u32,
    frame: &[u8],
    repeat: u32,
    output: bool,
) -> anyhow::Result<TestRunResult> {
    let md = xdp_md(frame.len(), ifindex);
    let mut out = if output {
        vec![0u8; frame.len() + 64]
    } else {
        Vec::new()
    };
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: output.then_some(out.as_mut_slice()),
        ctx_in: Some(&md),
        repeat,
        ..Default::default()
    };
    let result = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    let frame = output.then(|| {
        out.truncate(result.data_size_out as usize);
        out
    });
    Ok(TestRunResult {
        action: result.return_value,
        duration: result.duration,
        frame,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Ok([2, 0, 0xa, 0xff, 0, 1]));
        assert!(parse_mac("02:00:0a:ff:00").is_err());
        assert_eq!(mac_text([2, 0, 0xa, 0xff, 0, 1]), "02:00:0a:ff:00:01");
    }
}
