//! The CLI's side of the control socket: [`request`] sends one request to
//! a running agent and waits for its answer (retrying while it is busy);
//! [`render`] is `lb status` as text. The messages themselves are the
//! leaf module [`wire`](crate::wire), re-exported here for the CLI's
//! callers. A unix socket (mode 0600, root only), one JSON request line
//! in, one JSON response line out.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

mod render;

pub use render::render;

pub use crate::wire::{
    AdminState, AgentStatus, AnnounceStatus, BackendChange, BackendStatus, ConntrackStatus,
    DEFAULT_SOCKET, FirewallChange, HealthStatus, PoolRole, ReloadStatus, Request, Response,
    RuleEdit, RuntimeStatus, ServiceStatus, Status, VipChange, ring_violations,
};

/// How long a CLI command waits for the agent, retries included.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause between attempts while the agent is busy.
const BUSY_RETRY: Duration = Duration::from_millis(250);

/// Sends one request to the agent at `socket` and returns its response.
/// While the agent is busy (every client slot taken, e.g. by clients that
/// connect and say nothing) it says so once on stderr and tries again,
/// within [`CLIENT_TIMEOUT`] in all.
pub fn request(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    let started = Instant::now();
    let mut said = false;
    loop {
        let left = CLIENT_TIMEOUT.saturating_sub(started.elapsed());
        match attempt(socket, req, left)? {
            Attempt::Answered(response) => return Ok(*response),
            Attempt::Busy(why) => {
                if left <= BUSY_RETRY {
                    bail!(
                        "the agent at {} stayed busy for {} s: {why}",
                        socket.display(),
                        CLIENT_TIMEOUT.as_secs()
                    );
                }
                if !said {
                    eprintln!(
                        "lb: the agent is busy, retrying (for up to {} s): {why}",
                        CLIENT_TIMEOUT.as_secs()
                    );
                    said = true;
                }
                std::thread::sleep(BUSY_RETRY);
            }
        }
    }
}

enum Attempt {
    Answered(Box<Response>),
    /// Refused before the request was read: safe to send again.
    Busy(String),
}

/// One connection, one request, within `left`.
fn attempt(socket: &Path, req: &Request, left: Duration) -> anyhow::Result<Attempt> {
    use std::io::ErrorKind;
    let mut stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        // The listen backlog is full: the agent has not even accepted.
        Err(e) if e.kind() == ErrorKind::WouldBlock => {
            return Ok(Attempt::Busy("its listen queue is full".to_owned()));
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "connecting to the agent at {} (is `lb run` running? --socket)",
                    socket.display()
                )
            });
        }
    };
    let left = left.max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(left))
        .and_then(|()| stream.set_write_timeout(Some(left)))
        .context("socket timeout")?;
    let mut line = serde_json::to_string(req).context("encoding request")?;
    line.push('\n');
    // A busy agent may answer and close before the request is sent: the
    // write then fails (EPIPE), and the answer, if any, is still there.
    let sent = stream.write_all(line.as_bytes());
    let mut reply = String::new();
    let read = BufReader::new(stream).read_line(&mut reply);
    let closed_early = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
        )
    };
    match (sent, read) {
        (_, Ok(_)) if !reply.is_empty() => {
            let response: Response = serde_json::from_str(&reply)
                .with_context(|| format!("decoding the agent's reply {reply:?}"))?;
            Ok(if response.is_busy() {
                Attempt::Busy(response.message)
            } else {
                Attempt::Answered(Box::new(response))
            })
        }
        // Closed on us before the request was read: refused, not failed.
        (Err(e), _) if closed_early(&e) => {
            Ok(Attempt::Busy(format!("it closed the connection ({e})")))
        }
        (Err(e), _) => Err(e).context("sending request"),
        (Ok(()), Err(e))
            if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
        {
            Err(e).with_context(|| {
                format!(
                    "no reply from the agent within {} s",
                    CLIENT_TIMEOUT.as_secs()
                )
            })
        }
        (Ok(()), Err(e)) => Err(e).context("reading the agent's reply"),
        (Ok(()), Ok(_)) => bail!("the agent closed the connection without answering"),
    }
}
