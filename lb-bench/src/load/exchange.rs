//! One request on a worker's connection (opening one if needed): the
//! HTTP/1.1 path through the fast client in [`crate::http`], the raw-TCP echo
//! path, and what the response adds to the worker's tally.

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::conn::{self, io_kind, Conn, ConnIo};
use super::state::Shared;
use super::tally::{Answer, Arrival, WorkerStats};
use crate::http::{HttpConn, RequestError};

/// A request that got its response.
pub(super) struct Done {
    /// The connection must not be reused.
    pub(super) close: bool,
}

/// One request on the worker's connection (opening one if needed); the error
/// is the error table's name.
pub(super) async fn one_request(
    shared: &Shared,
    slot: &mut Option<Conn>,
    stats: &mut WorkerStats,
) -> Result<Done, String> {
    if slot.is_none() {
        *slot = Some(conn::open(shared, stats).await?);
    }
    let conn = slot.as_mut().expect("just opened");
    let answer = match &mut conn.io {
        ConnIo::Http(h) => http_exchange(shared, h, conn.flow.is_some()).await?,
        ConnIo::Tcp(t) => tcp_exchange(shared, t, &conn.greeting).await?,
    };
    let close = answer.close;
    let at = Arrival {
        source: conn.local.ip(),
        first_on_conn: !conn.first_done,
        flow: conn.flow,
    };
    stats.count(&answer, &at, shared.spec.per_source);
    if at.flow.is_some() {
        stats.note_flow(answer, &at, shared.elapsed_ms());
    }
    conn.first_done = true;
    Ok(Done { close })
}

/// HTTP: the prepared `GET` and its response; `recording` reads what the
/// backend saw too.
async fn http_exchange(
    shared: &Shared,
    h: &mut HttpConn,
    recording: bool,
) -> Result<Answer, String> {
    let spec = &shared.spec;
    let r = h
        .request(&shared.request, &spec.node_header, &spec.seen_header)
        .await
        .map_err(request_error)?;
    let node = r.node.as_ref().map(|n| h.slice(n).to_vec());
    let seen = if recording {
        r.seen
            .as_ref()
            .map(|s| String::from_utf8_lossy(h.slice(s)).into_owned())
    } else {
        None
    };
    Ok(Answer {
        status: Some(r.status),
        node,
        seen,
        bytes: r.bytes,
        close: r.close || !spec.keepalive,
    })
}

fn request_error(e: RequestError) -> String {
    match e {
        RequestError::Io(e) => io_kind(&e),
        RequestError::Eof {
            mid_response: false,
        } => "connection closed before the response".into(),
        RequestError::Eof { mid_response: true } => "connection closed mid-response".into(),
        RequestError::Malformed(why) => format!("bad response: {why}"),
    }
}

/// Raw TCP: the payload out, the same bytes back; the backend is the one
/// that greeted this connection.
async fn tcp_exchange(
    shared: &Shared,
    t: &mut BufReader<TcpStream>,
    greeting: &Option<Vec<u8>>,
) -> Result<Answer, String> {
    t.get_mut()
        .write_all(&shared.tcp_payload)
        .await
        .map_err(|e| io_kind(&e))?;
    let mut back = vec![0u8; shared.tcp_payload.len()];
    t.read_exact(&mut back).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "connection closed before the echo".into()
        } else {
            io_kind(&e)
        }
    })?;
    if back != shared.tcp_payload {
        return Err("echo mismatch (if the server names itself first, use --greeting)".into());
    }
    Ok(Answer {
        status: None,
        node: greeting.clone(),
        seen: None,
        bytes: back.len(),
        close: !shared.spec.keepalive,
    })
}
