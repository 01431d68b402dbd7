//! `lb-proxy demo --quic`'s nodes: QUIC greeters. Each answers every
//! bidirectional stream (ALPN `lb-echo`) with one line naming its node and
//! the client address it sees, and puts its QUIC-LB server ID in every
//! connection ID it issues, so the demo's QUIC frontend routes a client that
//! changes port back to it; the greeting then names the new address. Each
//! also listens for HTTP on TCP at the same port number (the HTTP demo's node
//! server), the health signal Azure needs for a UDP service.
//!
//! lb-bench's `quic:` servers are the measured, tested backends; these are
//! only the demo's, and lb-proxy does not depend on lb-bench.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use lb_core::{QuicLbCidGenerator, QuicLbConfig, ServerId};

/// The QUIC-LB layout, the same as config/quic.toml: config 0, 3-byte server
/// IDs (node N has N repeated: 010101, 020202, ...), 4-byte nonces.
pub const CONFIG_ID: u8 = 0;
pub const SERVER_ID_LEN: usize = 3;
pub const NONCE_LEN: usize = 4;
/// Where `demo --quic` listens and where its nodes start, unless told.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4433";
pub const DEFAULT_BACKEND_BASE_PORT: u16 = 4434;
/// The ALPN lb-bench's `quic-client` speaks: one request per stream.
const ALPN: &[u8] = b"lb-echo";
/// A request is read to its end, up to this much.
const MAX_REQUEST: usize = 64 * 1024;
/// Port-0 nodes: UDP ports tried for one whose TCP twin is free too.
const BIND_TRIES: usize = 20;

/// One greeter node.
#[derive(Clone, Debug)]
pub struct QuicNode {
    pub name: String,
    /// Its UDP address; its health listener has the same port on TCP.
    pub addr: SocketAddr,
    pub server_id: ServerId,
}

/// The demo's QUIC-LB layout.
pub fn lb_config() -> QuicLbConfig {
    QuicLbConfig::new(CONFIG_ID, SERVER_ID_LEN, NONCE_LEN).expect("a valid constant layout")
}

/// Node `n`'s (1-based) server ID: `n` in every byte.
fn server_id(n: usize) -> ServerId {
    ServerId::new(&[n as u8; SERVER_ID_LEN]).expect("SERVER_ID_LEN is a valid length")
}

/// Starts `count` greeters and their health listeners on their own thread.
pub fn start_nodes(count: usize, base_port: u16) -> anyhow::Result<Vec<QuicNode>> {
    let mut bound = Vec::new();
    for i in 0..count {
        let (name, port) = super::node_slot(i, base_port);
        let (udp, tcp) = bind_pair(port)
            .with_context(|| format!("cannot bind demo node {name} on 127.0.0.1:{port}"))?;
        tcp.set_nonblocking(true)?;
        let node = QuicNode {
            addr: udp.local_addr()?,
            name,
            server_id: server_id(i + 1),
        };
        bound.push((node, udp, tcp));
    }
    let nodes = bound.iter().map(|(n, _, _)| n.clone()).collect();
    std::thread::Builder::new()
        .name("lb-demo-quic-nodes".into())
        .spawn(move || run_nodes(bound))?;
    Ok(nodes)
}

/// UDP on 127.0.0.1:`port`, then TCP on the same port (another port when a
/// kernel-chosen one is taken on TCP).
fn bind_pair(port: u16) -> std::io::Result<(UdpSocket, TcpListener)> {
    let tries = if port == 0 { BIND_TRIES } else { 1 };
    let mut last = std::io::Error::from(std::io::ErrorKind::AddrInUse);
    for _ in 0..tries {
        let udp = UdpSocket::bind(("127.0.0.1", port))?;
        match TcpListener::bind(udp.local_addr()?) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

fn run_nodes(bound: Vec<(QuicNode, UdpSocket, TcpListener)>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("demo runtime");
    rt.block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for (node, udp, tcp) in bound {
            let name: Arc<str> = Arc::from(node.name.as_str());
            let tcp = tokio::net::TcpListener::from_std(tcp).expect("register demo listener");
            tasks.spawn(super::serve_node(Arc::clone(&name), tcp));
            match endpoint(&node, udp) {
                Ok(ep) => {
                    tasks.spawn(greet(ep, name));
                }
                Err(e) => eprintln!("demo node {}: {e:#}", node.name),
            }
        }
        while tasks.join_next().await.is_some() {}
    });
}

/// A quinn server whose CIDs carry the node's server ID.
fn endpoint(node: &QuicNode, socket: UdpSocket) -> anyhow::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    // Nonces are a seeded sequence; the clock makes each run's differ.
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    QuicLbCidGenerator::new(lb_config(), node.server_id, seed)?;
    let id = node.server_id;
    config.cid_generator(move || {
        Box::new(QuicLbCidGenerator::new(lb_config(), id, seed).expect("accepted above"))
    });
    let runtime = Arc::new(quinn::TokioRuntime);
    Ok(quinn::Endpoint::new(config, Some(tls()?), socket, runtime)?)
}

/// TLS 1.3 with a fresh self-signed certificate for `localhost`.
fn tls() -> anyhow::Result<quinn::ServerConfig> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key.into())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// Greets on every stream of every connection until the endpoint closes.
async fn greet(endpoint: quinn::Endpoint, name: Arc<str>) {
    while let Some(incoming) = endpoint.accept().await {
        let name = Arc::clone(&name);
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(greet_stream(conn.clone(), Arc::clone(&name), send, recv));
            }
        });
    }
}

/// Reads the request to its end, then answers with one line.
async fn greet_stream(
    conn: quinn::Connection,
    name: Arc<str>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    if recv.read_to_end(MAX_REQUEST).await.is_err() {
        return;
    }
    // The address now: after a migration, the client's new one.
    let line = format!("hello from {name}, you are {}\n", conn.remote_address());
    let _ = send.write_all(line.as_bytes()).await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_server_ids_match_config_quic_toml() {
        let ids: Vec<String> = (1..=3).map(|n| server_id(n).to_string()).collect();
        assert_eq!(ids, ["010101", "020202", "030303"]);
        assert_eq!(lb_config().server_id_len(), SERVER_ID_LEN);
    }

    #[test]
    fn a_node_gets_one_port_number_for_udp_and_tcp() {
        let (udp, tcp) = bind_pair(0).unwrap();
        let port = udp.local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert_eq!(tcp.local_addr().unwrap().port(), port);
        let taken = udp.local_addr().unwrap().port();
        assert!(bind_pair(taken).is_err());
    }
}
