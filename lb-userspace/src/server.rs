//! The control server: serves `lb status`, `lb backend …` and `lb reload`
//! clients concurrently (at most [`MAX_CLIENTS`] at once), each bounded in
//! size ([`MAX_REQUEST`]) and time ([`REQUEST_TIMEOUT`] to send the request,
//! as long again to take the answer), and hands their
//! requests to the agent's loop one at a time through a channel. A slow,
//! silent or hostile client therefore never delays a health transition, a
//! signal or another client; every change still goes through the agent's
//! one commit path. The flow counts of `lb status` are walked here, off the
//! agent's loop.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::warn;

use crate::{
    dataplane::FlowTable,
    wire::{Request, Response, Status},
};

/// Control clients served at once; more are told to retry.
pub const MAX_CLIENTS: usize = 16;
/// The longest request line accepted (requests are a few hundred bytes).
pub const MAX_REQUEST: usize = 64 * 1024;
/// A client must send its whole request line within this time.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One request for the agent's loop, and where its answer goes.
pub struct Call {
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

/// The agent's answer. A status comes without flow counts, plus the backend
/// ids (per service, per backend) to count them for.
pub enum Reply {
    Done(Response),
    Status(anyhow::Result<(Status, Vec<Vec<u32>>)>),
    /// Answered later (a database promotion talks to the servers first).
    Later(oneshot::Receiver<Response>),
}

/// Accepts clients until the listener fails for good.
pub async fn accept(listener: UnixListener, calls: mpsc::Sender<Call>, flows: Arc<FlowTable>) {
    let permits = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. out of file descriptors: wait rather than spin.
                warn!("control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => {
                let (calls, flows) = (calls.clone(), Arc::clone(&flows));
                tokio::spawn(async move {
                    serve(stream, &calls, &flows).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(answer(
                    stream,
                    Response::busy(format!("{MAX_CLIENTS} control clients are being served")),
                ));
            }
        }
    }
}

async fn serve(stream: UnixStream, calls: &mpsc::Sender<Call>, flows: &Arc<FlowTable>) {
    let (read, write) = stream.into_split();
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(read)).await {
        Err(_) => Response::error(format!(
            "no complete request line within {} s",
            REQUEST_TIMEOUT.as_secs()
        )),
        Ok(Err(why)) => Response::error(why),
        Ok(Ok(request)) => ask_agent(request, calls, flows).await,
    };
    write_response(write, &response).await;
}

async fn answer(stream: UnixStream, response: Response) {
    let (_, write) = stream.into_split();
    write_response(write, &response).await;
}

async fn write_response(mut write: tokio::net::unix::OwnedWriteHalf, response: &Response) {
    let mut out = serde_json::to_string(response)
        .unwrap_or_else(|e| format!("{{\"ok\":false,\"message\":\"encoding the reply: {e}\"}}"));
    out.push('\n');
    // A client that never reads must not hold its slot (and descriptor)
    // once its answer no longer fits the socket's buffer.
    match tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(out.as_bytes())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("control client: {e}"),
        Err(_) => warn!(
            "control client: did not read its answer within {} s; dropped",
            REQUEST_TIMEOUT.as_secs()
        ),
    }
}

/// Reads one request line of at most [`MAX_REQUEST`] bytes (a last line
/// without its newline counts, as when a client shuts down its side).
pub async fn read_request(read: impl AsyncRead + Unpin) -> Result<Request, String> {
    let mut line = Vec::new();
    BufReader::new(read.take(MAX_REQUEST as u64 + 1))
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("reading request: {e}"))?;
    if line.len() > MAX_REQUEST {
        return Err(format!(
            "request longer than {} KiB: refused",
            MAX_REQUEST / 1024
        ));
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err("empty request: send one JSON line, e.g. {\"op\":\"status\"}".to_owned());
    }
    serde_json::from_slice(&line).map_err(|e| format!("bad request: {e}"))
}

async fn ask_agent(
    request: Request,
    calls: &mpsc::Sender<Call>,
    flows: &Arc<FlowTable>,
) -> Response {
    let (reply, answer) = oneshot::channel();
    if calls.send(Call { request, reply }).await.is_err() {
        return Response::error("the agent is stopping");
    }
    match answer.await {
        Err(_) => Response::error("the agent is stopping"),
        Ok(Reply::Done(response)) => response,
        Ok(Reply::Later(answer)) => answer
            .await
            .unwrap_or_else(|_| Response::error("the agent is stopping")),
        Ok(Reply::Status(reply)) => match with_flows(reply, flows).await {
            Ok(status) => Response {
                ok: true,
                message: String::new(),
                status: Some(status),
            },
            Err(e) => Response::error(e),
        },
    }
}

/// The whole status, flow counts included, as `lb status` gets it: asked
/// of the agent's loop through `calls` (answered there in microseconds),
/// the flows counted here, off the loop. For the monitoring listener.
pub async fn status(calls: &mpsc::Sender<Call>, flows: &Arc<FlowTable>) -> Result<Status, String> {
    match ask_agent(Request::Status, calls, flows).await {
        Response {
            status: Some(status),
            ..
        } => Ok(status),
        Response { message, .. } => Err(message),
    }
}

/// Fills in the flows per backend (and in the whole table), walking the
/// flow table on a blocking thread.
async fn with_flows(
    reply: anyhow::Result<(Status, Vec<Vec<u32>>)>,
    flows: &Arc<FlowTable>,
) -> Result<Status, String> {
    let (mut status, ids) = reply.map_err(|e| format!("{e:#}"))?;
    let table = Arc::clone(flows);
    let all: Vec<u32> = ids.iter().flatten().copied().collect();
    let full_nat = status.full_nat.is_some();
    let counted = tokio::task::spawn_blocking(move || {
        let active: Result<Vec<u64>, _> = all.iter().map(|&id| table.active(id)).collect();
        let ports = if full_nat {
            table.fnat_ports_in_use()?
        } else {
            Default::default()
        };
        Ok::<_, crate::dataplane::DataplaneError>((
            table.per_backend()?,
            active?,
            ports,
            table.v6_flows()?,
        ))
    })
    .await;
    let (counts, active, ports, v6) = match counted {
        Ok(Ok(counted)) => counted,
        Ok(Err(e)) => return Err(format!("counting flows: {e}")),
        Err(e) => return Err(format!("counting flows: {e}")),
    };
    status.conntrack.entries = counts.values().sum();
    status.conntrack.entries_v6 = v6;
    for source in status
        .full_nat
        .iter_mut()
        .flat_map(|f| f.sources.iter_mut())
    {
        let claims = source
            .address
            .parse()
            .ok()
            .and_then(|a| ports.get(&a).copied())
            .unwrap_or_default();
        source.ports_in_use = claims.in_use;
        source.quarantined = claims.quarantined;
    }
    let mut active = active.into_iter();
    for (service, ids) in status.services.iter_mut().zip(ids) {
        for (backend, id) in service.backends.iter_mut().zip(ids) {
            backend.flows = counts.get(&id).copied().unwrap_or(0);
            backend.active = active.next().unwrap_or(0);
        }
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Request, String> {
        read_request(bytes).await
    }

    #[tokio::test]
    async fn requests_are_bounded_and_bad_ones_named() {
        assert_eq!(parse(b"{\"op\":\"status\"}\n").await, Ok(Request::Status));
        // A last line without its newline still counts.
        assert_eq!(parse(b"{\"op\":\"reload\"}").await, Ok(Request::Reload));
        let huge = vec![b'x'; MAX_REQUEST * 4];
        assert_eq!(
            parse(&huge).await,
            Err("request longer than 64 KiB: refused".to_owned())
        );
        for (input, want) in [
            (&b""[..], "empty request"),
            (b"\n", "empty request"),
            (b"garbage\n", "bad request: expected value"),
            (b"{\"op\":\"status\"\n", "bad request: EOF while parsing"),
            (
                b"{\"op\":\"explode\"}\n",
                "bad request: unknown variant `explode`",
            ),
        ] {
            let got = parse(input).await.expect_err("rejected");
            assert!(got.starts_with(want), "{input:?}: {got}");
        }
    }
}
