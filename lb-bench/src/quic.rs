//! QUIC on the bench's side, on quinn: the `lb-echo` protocol's backends and
//! clients, for `lb-bench serve quic:...`, the migration experiment and the
//! end-to-end tests.
//!
//! - The protocol (ALPN [`ALPN`]): one request per bidirectional stream. The
//!   client writes and finishes; the server reads to the end (at most
//!   [`MAX_MESSAGE`] bytes), answers and finishes. [`WHOAMI`] is answered
//!   with `NAME PEER_ADDR`, where PEER_ADDR is the connection's remote
//!   address at that moment (after a migration, the new path); anything else
//!   is echoed.
//! - The server ([`server_endpoint`], [`serve`]): every connection ID it
//!   issues carries its QUIC-LB server ID (lb-core's [`QuicLbCidGenerator`]),
//!   so a balancer in QUIC mode can route a client back to it whatever the
//!   client's address. Migration is allowed (quinn's default, set explicitly
//!   because the experiment depends on it).
//! - The client ([`client_endpoint`], [`connect`], [`request`], [`whoami`]):
//!   it trusts ANY server certificate (the handshake signature is still
//!   checked). Test-only: every server here has a fresh self-signed
//!   certificate, often in another process, so there is nothing to pin.

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lb_core::{QuicLbCidGenerator, QuicLbConfig, ServerId};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, EndpointConfig, RecvStream, SendStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::error::{Error, Result};

/// The application protocol both ends name in the TLS handshake.
pub const ALPN: &[u8] = b"lb-echo";
/// The name the client asks for and the server's certificate carries.
pub const SERVER_NAME: &str = "localhost";
/// The request the server answers with its name and the peer it sees.
pub const WHOAMI: &[u8] = b"whoami";
/// The most a request or an answer may carry: bounds what one stream costs.
pub const MAX_MESSAGE: usize = 1 << 20;

/// A backend's place in QUIC-LB: the config rotation and its server ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbIdentity {
    pub config: QuicLbConfig,
    pub server_id: ServerId,
}

impl LbIdentity {
    /// Config `config_id` with a nonce of `nonce_len` bytes; the server ID's
    /// length comes from `server_id`.
    pub fn new(config_id: u8, server_id: ServerId, nonce_len: usize) -> Result<LbIdentity> {
        let config = QuicLbConfig::new(config_id, server_id.as_bytes().len(), nonce_len)
            .map_err(|e| Error::BadArgument(format!("QUIC-LB config: {e}")))?;
        Ok(LbIdentity { config, server_id })
    }
}

/// What one QUIC server has done, for tests that assert on the backend's view.
#[derive(Debug, Default)]
pub struct QuicCounts {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
}

/// A quinn server endpoint on `socket` whose connection IDs carry `id`.
/// Call it inside a tokio runtime.
pub fn server_endpoint(socket: std::net::UdpSocket, id: LbIdentity) -> Result<Endpoint> {
    let mut endpoint_config = EndpointConfig::default();
    install_cid_generator(&mut endpoint_config, id)?;
    let server = server_config()?;
    Endpoint::new(
        endpoint_config,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| Error::io("start the QUIC server endpoint", e))
}

/// Installs QUIC-LB CIDs for `id`. quinn calls the factory once per
/// endpoint; each call still gets its own seed, so two generators never
/// issue the same nonce sequence.
fn install_cid_generator(config: &mut EndpointConfig, id: LbIdentity) -> Result<()> {
    let seeds = AtomicU64::new(random_seed());
    // Validated here so that the factory below cannot fail.
    QuicLbCidGenerator::new(id.config, id.server_id, 0)
        .map_err(|e| Error::BadArgument(format!("server ID {}: {e}", id.server_id)))?;
    config.cid_generator(move || {
        let seed = seeds.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        let generator = QuicLbCidGenerator::new(id.config, id.server_id, seed)
            .expect("the same config and server ID were accepted above");
        Box::new(generator)
    });
    Ok(())
}

/// A seed from the OS's randomness (std's hasher keys), so restarts differ.
fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// TLS 1.3 with a fresh self-signed certificate for [`SERVER_NAME`].
fn server_config() -> Result<quinn::ServerConfig> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
        .map_err(|e| tls_error("generate a self-signed certificate", e))?;
    let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("TLS 1.3", e))?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key.into())
        .map_err(|e| tls_error("the server certificate", e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| tls_error("QUIC TLS", e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.migration(true);
    Ok(config)
}

/// Serves `endpoint` as backend `name` until the endpoint closes: one task
/// per connection, one per stream.
pub async fn serve(endpoint: Endpoint, name: Arc<str>, counts: Arc<QuicCounts>) {
    while let Some(incoming) = endpoint.accept().await {
        let name = Arc::clone(&name);
        let counts = Arc::clone(&counts);
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else {
                return;
            };
            counts.connections.fetch_add(1, Ordering::Relaxed);
            serve_connection(conn, name, counts).await;
        });
    }
}

/// Answers each bidirectional stream of `conn` until the connection ends.
async fn serve_connection(conn: Connection, name: Arc<str>, counts: Arc<QuicCounts>) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let conn = conn.clone();
        let name = Arc::clone(&name);
        let counts = Arc::clone(&counts);
        tokio::spawn(async move {
            if answer(&conn, &name, send, recv).await.is_ok() {
                counts.requests.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// One request: read it to the end, answer `whoami` or echo, finish.
async fn answer(
    conn: &Connection,
    name: &str,
    mut send: SendStream,
    mut recv: RecvStream,
) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let request = recv.read_to_end(MAX_MESSAGE).await?;
    if request == WHOAMI {
        // Read now, not at accept: after a migration it is the new path.
        let reply = format!("{name} {}", conn.remote_address());
        send.write_all(reply.as_bytes()).await?;
    } else {
        send.write_all(&request).await?;
    }
    send.finish()?;
    Ok(())
}

/// A quinn client endpoint on `socket` (bind it where the client should
/// appear from). Call it inside a tokio runtime.
pub fn client_endpoint(socket: std::net::UdpSocket) -> Result<Endpoint> {
    let mut endpoint = Endpoint::new(
        EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| Error::io("start the QUIC client endpoint", e))?;
    endpoint.set_default_client_config(client_config()?);
    Ok(endpoint)
}

/// TLS 1.3 that accepts any server certificate: test-only (see the module doc).
fn client_config() -> Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("TLS 1.3", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider())))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| tls_error("QUIC TLS", e))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Connects `endpoint` to `server` and completes the handshake.
pub async fn connect(endpoint: &Endpoint, server: SocketAddr) -> Result<Connection> {
    let what = || format!("QUIC connect to {server}");
    endpoint
        .connect(server, SERVER_NAME)
        .map_err(|e| quic_error(what(), e))?
        .await
        .map_err(|e| quic_error(what(), e))
}

/// One request on a new bidirectional stream: write all, finish, read the
/// answer to its end.
pub async fn request(conn: &Connection, body: &[u8]) -> Result<Vec<u8>> {
    let what = || format!("QUIC request to {}", conn.remote_address());
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| quic_error(what(), e))?;
    send.write_all(body)
        .await
        .map_err(|e| quic_error(what(), e))?;
    send.finish().map_err(|e| quic_error(what(), e))?;
    recv.read_to_end(MAX_MESSAGE)
        .await
        .map_err(|e| quic_error(what(), e))
}

/// Asks the server who it is: its name, and the client address it sees.
pub async fn whoami(conn: &Connection) -> Result<(String, SocketAddr)> {
    let reply = request(conn, WHOAMI).await?;
    parse_whoami(&reply).ok_or_else(|| Error::Protocol {
        what: format!("whoami to {}", conn.remote_address()),
        detail: format!(
            "want `NAME IP:PORT`, got {:?}",
            String::from_utf8_lossy(&reply)
        ),
    })
}

/// `NAME IP:PORT` → (name, address).
fn parse_whoami(reply: &[u8]) -> Option<(String, SocketAddr)> {
    let text = std::str::from_utf8(reply).ok()?;
    let (name, peer) = text.split_once(' ')?;
    Some((name.to_owned(), peer.parse().ok()?))
}

/// Both ends use ring, named explicitly so no process-wide default is needed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::io(what, std::io::Error::other(e))
}

fn quic_error(what: String, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::io(what, std::io::Error::other(e))
}

/// Accepts any certificate, but checks the handshake signature against it.
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    /// Every step of a test gets this long: loopback answers in milliseconds.
    const STEP: Duration = Duration::from_secs(10);

    fn identity() -> LbIdentity {
        LbIdentity::new(0, ServerId::from_hex("c4605e").unwrap(), 4).unwrap()
    }

    /// A server named `name` on loopback, served on the current runtime.
    fn start_server(name: &str) -> (SocketAddr, Endpoint, Arc<QuicCounts>) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let endpoint = server_endpoint(socket, identity()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let counts = Arc::new(QuicCounts::default());
        tokio::spawn(serve(
            endpoint.clone(),
            Arc::from(name),
            Arc::clone(&counts),
        ));
        (addr, endpoint, counts)
    }

    fn client() -> Endpoint {
        client_endpoint(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap()
    }

    async fn step<T>(f: impl std::future::Future<Output = Result<T>>) -> T {
        tokio::time::timeout(STEP, f)
            .await
            .expect("step timed out")
            .unwrap()
    }

    #[test]
    fn whoami_parses_name_and_address() {
        assert_eq!(
            parse_whoami(b"node-1 127.0.0.1:5000"),
            Some(("node-1".into(), "127.0.0.1:5000".parse().unwrap()))
        );
        assert_eq!(parse_whoami(b"node-1"), None);
        assert_eq!(parse_whoami(b"node-1 nowhere"), None);
        assert_eq!(parse_whoami(&[0xff, b' ', b'1']), None);
    }

    #[tokio::test]
    async fn a_client_talks_to_a_server_on_loopback() {
        let (server, _server_ep, counts) = start_server("node-1");
        let ep = client();
        let me = ep.local_addr().unwrap();
        let conn = step(connect(&ep, server)).await;
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(step(request(&conn, &body)).await, body);
        assert_eq!(step(request(&conn, b"")).await, b"");
        assert_eq!(step(whoami(&conn)).await, ("node-1".to_owned(), me));
        assert_eq!(counts.connections.load(Ordering::Relaxed), 1);
        // The third answer may be counted just after the client reads it.
        let deadline = tokio::time::Instant::now() + STEP;
        while counts.requests.load(Ordering::Relaxed) < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "requests not counted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn the_server_issues_cids_with_its_server_id() {
        let (server, _server_ep, _) = start_server("node-1");
        let (relay, seen) = relay_to(server).await;
        let ep = client();
        let conn = step(connect(&ep, relay)).await;
        step(whoami(&conn)).await;
        // Once the handshake is done the client addresses the server by the
        // CIDs the server issued: short headers whose CID carries the ID.
        let id = identity();
        let mut classifier = lb_core::Classifier::new();
        let seen = seen.lock().unwrap().clone();
        let short: Vec<_> = seen
            .iter()
            .map(|d| classifier.classify(d))
            .filter(|c| c.kind == lb_core::DatagramKind::Short)
            .collect();
        assert!(
            !short.is_empty(),
            "no short header among {} datagrams",
            seen.len()
        );
        for c in short {
            assert_eq!(id.config.decode(&c.dst_cid), Ok(id.server_id), "{:?}", c);
        }
    }

    /// A one-client UDP relay in front of `server` that records every
    /// datagram it passes toward the server.
    async fn relay_to(server: SocketAddr) -> (SocketAddr, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        back.connect(server).await.unwrap();
        let addr = front.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65_535], vec![0u8; 65_535]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        log.lock().unwrap().push(up[..n].to_vec());
                        let _ = back.send(&up[..n]).await;
                    }
                    Ok(n) = back.recv(&mut down) => {
                        if let Some(c) = client {
                            let _ = front.send_to(&down[..n], c).await;
                        }
                    }
                }
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn after_a_rebind_whoami_reports_the_new_port() {
        let (server, _server_ep, _) = start_server("node-1");
        let ep = client();
        let before = ep.local_addr().unwrap();
        let conn = step(connect(&ep, server)).await;
        assert_eq!(step(whoami(&conn)).await, ("node-1".to_owned(), before));
        let moved = UdpSocket::bind("127.0.0.1:0").unwrap();
        let after = moved.local_addr().unwrap();
        assert_ne!(after, before);
        ep.rebind(moved).unwrap();
        assert_eq!(step(whoami(&conn)).await, ("node-1".to_owned(), after));
        assert_eq!(step(request(&conn, b"still here")).await, b"still here");
    }
}
