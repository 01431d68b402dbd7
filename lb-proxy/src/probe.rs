//! Active health probes: TCP connect, or HTTP GET expecting 200.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use lb_core::ProbeOutcome;
use tokio::net::TcpStream;

use crate::config::ProbeKind;

/// Where a probe of `target` goes: `port` on the target's IP when the
/// frontend's health section sets one (an Azure probe has its own port, and a
/// UDP service is probed over TCP or HTTP), else the target itself.
pub fn probe_address(target: SocketAddr, port: Option<u16>) -> SocketAddr {
    port.map_or(target, |p| SocketAddr::new(target.ip(), p))
}

/// Runs one probe. A refusal (RST, or an HTTP status other than 200) is
/// `Rejected`, which Azure treats as down at once; silence is `Failure`.
/// `None` means the probe could not even be tried (this machine is out of fds
/// or memory): that says nothing about the backend, so nothing is recorded.
pub async fn probe(addr: SocketAddr, kind: &ProbeKind, timeout: Duration) -> Option<ProbeOutcome> {
    match tokio::time::timeout(timeout, probe_inner(addr, kind)).await {
        Ok(outcome) => outcome,
        Err(_) => Some(ProbeOutcome::Failure),
    }
}

fn is_local_shortage(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE)
            | Some(libc::ENFILE)
            | Some(libc::ENOBUFS)
            | Some(libc::ENOMEM)
            | Some(libc::EADDRNOTAVAIL)
    )
}

async fn probe_inner(addr: SocketAddr, kind: &ProbeKind) -> Option<ProbeOutcome> {
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Some(ProbeOutcome::Rejected)
        }
        Err(e) if is_local_shortage(&e) => return None,
        Err(_) => return Some(ProbeOutcome::Failure),
    };
    Some(match kind {
        ProbeKind::None | ProbeKind::Tcp => ProbeOutcome::Success,
        ProbeKind::Http { path } => http_probe(stream, addr, path).await,
    })
}

async fn http_probe(stream: TcpStream, addr: SocketAddr, path: &str) -> ProbeOutcome {
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
    else {
        return ProbeOutcome::Failure;
    };
    let driver = tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "lb-proxy-health-check")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::new());
    let outcome = match request {
        Ok(req) => match sender.send_request(req).await {
            Ok(resp) if resp.status() == hyper::StatusCode::OK => ProbeOutcome::Success,
            Ok(_) => ProbeOutcome::Rejected,
            Err(_) => ProbeOutcome::Failure,
        },
        Err(_) => ProbeOutcome::Failure,
    };
    driver.abort();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `health.port`, the probe goes to that port on the target's IP:
    /// the target's own port refuses, the probe port answers.
    #[tokio::test]
    async fn a_probe_port_replaces_the_targets_port_and_keeps_its_ip() {
        let health = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health_port = health.local_addr().unwrap().port();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = closed.local_addr().unwrap();
        drop(closed);
        let timeout = Duration::from_secs(5);
        assert_eq!(
            probe(probe_address(target, None), &ProbeKind::Tcp, timeout).await,
            Some(ProbeOutcome::Rejected),
            "nothing listens on the target's own port"
        );
        let addr = probe_address(target, Some(health_port));
        assert_eq!(addr, SocketAddr::new(target.ip(), health_port));
        assert_eq!(
            probe(addr, &ProbeKind::Tcp, timeout).await,
            Some(ProbeOutcome::Success)
        );
    }
}
