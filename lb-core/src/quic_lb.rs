//! QUIC-LB (draft-ietf-quic-load-balancers-21), plaintext mode: connection IDs
//! that carry the backend's server ID, so a QUIC connection stays on its
//! backend when the client's address changes (NAT rebinding, Wi-Fi to cellular).
//!
//! - [`QuicLbConfig`]: one config rotation's layout (config ID, server ID
//!   length, nonce length), with [`QuicLbConfig::encode`] for backends and
//!   [`QuicLbConfig::decode`] for the balancer.
//! - [`QuicLbCidParser`]: the quinn-proto [`ConnectionIdParser`] that reads a
//!   short header's CID length from its self-encoded first octet.
//! - [`QuicLbCidGenerator`]: the quinn-proto [`ConnectionIdGenerator`] a
//!   backend installs so that every CID it issues routes back to it.
//! - [`classify`]: what kind of datagram arrived (Initial, 0-RTT, Handshake,
//!   Retry, short header, version negotiation, not QUIC), parsed with
//!   quinn-proto's public [`ProtectedHeader::decode`]; never panics.
//! - [`QuicRouter`]: server ID → backend for one snapshot, and the routing
//!   step the draft requires first (a routable CID of a healthy backend).
//!
//! The first octet: 3 config-rotation bits (0b111 = unroutable), then 5 bits
//! that self-encode the length of the rest of the CID. The draft's test
//! vector: config 0, server ID `c4605e`, nonce `4504cc4f` → `07c4605e4504cc4f`.

use std::time::Duration;

use bytes::BytesMut;
pub use quinn_proto::ConnectionId;
use quinn_proto::{ConnectionIdGenerator, ConnectionIdParser, ProtectedHeader};

use crate::backend::BackendId;
use crate::snapshot::Snapshot;

/// The config rotation value that marks a CID as unroutable.
pub const UNROUTABLE_CONFIG: u8 = 0b111;
/// QUIC v1 caps connection IDs at 20 bytes: the first octet plus 19.
pub const MAX_CID_LEN: usize = 20;
pub const MIN_SERVER_ID_LEN: usize = 1;
pub const MIN_NONCE_LEN: usize = 4;

/// A server ID: 1 to 15 bytes (15 = 19 − the 4-byte minimum nonce).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId {
    len: u8,
    bytes: [u8; 15],
}

impl ServerId {
    pub fn new(bytes: &[u8]) -> Result<Self, QuicLbError> {
        let _ = bytes;
        todo!()
    }

    /// Parses hex, as the config writes it (`"c4605e"`).
    pub fn from_hex(hex: &str) -> Result<Self, QuicLbError> {
        let _ = hex;
        todo!()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::fmt::Display for ServerId {
    /// Lower-case hex, as configured.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let _ = f;
        todo!()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuicLbError {
    #[error("config ID {0} is not 0..=6 (7, 0b111, marks unroutable CIDs)")]
    ConfigId(u8),
    #[error("server ID length {0} is not 1..=15")]
    ServerIdLength(usize),
    #[error("nonce length {0} is not at least 4")]
    NonceLength(usize),
    #[error("server ID ({server_id} bytes) plus nonce ({nonce} bytes) is {total} bytes, more than the 19 a 20-byte connection ID leaves after its first octet")]
    TooLong {
        server_id: usize,
        nonce: usize,
        total: usize,
    },
    #[error("server ID `{0}` is not hex")]
    NotHex(String),
    #[error("server ID is {got} bytes, the config says {want}")]
    ServerIdMismatch { got: usize, want: usize },
}

/// One config rotation's plaintext layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuicLbConfig {
    config_id: u8,
    server_id_len: u8,
    nonce_len: u8,
}

/// Why a datagram could not be routed by its connection ID (each is a label
/// of `lb_quic_unroutable_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unroutable {
    /// Config rotation bits 0b111.
    UnroutableConfig,
    /// A config rotation that is not this frontend's.
    UnknownConfig,
    /// Shorter than the config's first octet + server ID + nonce.
    ShortCid,
    /// A server ID no backend has.
    UnknownServerId,
    /// The server ID's backend is down (or draining out of the table).
    BackendDown,
    /// An Initial or 0-RTT packet: its CID was chosen by the client.
    ClientChosen,
    /// Not a QUIC packet quinn-proto can parse.
    NotQuic,
}

impl Unroutable {
    pub const ALL: [Unroutable; 7] = [
        Unroutable::UnroutableConfig,
        Unroutable::UnknownConfig,
        Unroutable::ShortCid,
        Unroutable::UnknownServerId,
        Unroutable::BackendDown,
        Unroutable::ClientChosen,
        Unroutable::NotQuic,
    ];

    /// The metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Unroutable::UnroutableConfig => "unroutable_config",
            Unroutable::UnknownConfig => "unknown_config",
            Unroutable::ShortCid => "short_cid",
            Unroutable::UnknownServerId => "unknown_server_id",
            Unroutable::BackendDown => "backend_down",
            Unroutable::ClientChosen => "client_chosen",
            Unroutable::NotQuic => "not_quic",
        }
    }
}

impl QuicLbConfig {
    /// Validates the layout: config ID 0..=6, server ID ≥ 1, nonce ≥ 4, sum ≤ 19.
    pub fn new(config_id: u8, server_id_len: usize, nonce_len: usize) -> Result<Self, QuicLbError> {
        let _ = (config_id, server_id_len, nonce_len);
        todo!()
    }

    pub fn config_id(&self) -> u8 {
        self.config_id
    }

    pub fn server_id_len(&self) -> usize {
        self.server_id_len as usize
    }

    pub fn nonce_len(&self) -> usize {
        self.nonce_len as usize
    }

    /// Whole CID length: first octet + server ID + nonce.
    pub fn cid_len(&self) -> usize {
        1 + self.server_id_len() + self.nonce_len()
    }

    /// A CID for `server_id` with `nonce` (exactly `nonce_len` bytes), its
    /// first octet self-encoding the length.
    pub fn encode(&self, server_id: &ServerId, nonce: &[u8]) -> Result<ConnectionId, QuicLbError> {
        let _ = (server_id, nonce);
        todo!()
    }

    /// The server ID a CID carries, or why it carries none usable.
    pub fn decode(&self, cid: &[u8]) -> Result<ServerId, Unroutable> {
        let _ = cid;
        todo!()
    }
}

/// Reads a short header's destination CID length from its first octet's
/// self-encoded length (low 5 bits + 1), as QUIC-LB servers write it.
#[derive(Clone, Copy, Debug, Default)]
pub struct QuicLbCidParser;

impl ConnectionIdParser for QuicLbCidParser {
    fn parse(
        &self,
        buf: &mut dyn bytes::Buf,
    ) -> Result<ConnectionId, quinn_proto::PacketDecodeError> {
        let _ = buf;
        todo!()
    }
}

/// A backend's CID generator: every CID carries its server ID; nonces come
/// from a seeded counter run through a bijection, so they never repeat
/// within a generator and two generators with different seeds differ.
pub struct QuicLbCidGenerator {
    _todo: (),
}

impl QuicLbCidGenerator {
    pub fn new(config: QuicLbConfig, server_id: ServerId, seed: u64) -> Result<Self, QuicLbError> {
        let _ = (config, server_id, seed);
        todo!()
    }
}

impl ConnectionIdGenerator for QuicLbCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        todo!()
    }

    fn cid_len(&self) -> usize {
        todo!()
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// What a datagram is, as far as routing cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DatagramKind {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
    Short,
    VersionNegotiation,
    NotQuic,
}

/// A classified datagram: its kind and destination CID (empty when `NotQuic`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classified {
    pub kind: DatagramKind,
    pub dst_cid: ConnectionId,
}

/// Classifies datagrams without allocating per datagram: it keeps one
/// scratch buffer that quinn-proto's decoder reads from.
pub struct Classifier {
    scratch: BytesMut,
}

impl Classifier {
    pub fn new() -> Self {
        Classifier {
            scratch: BytesMut::with_capacity(2048),
        }
    }

    /// Never panics, whatever the bytes.
    pub fn classify(&mut self, datagram: &[u8]) -> Classified {
        let _ = (datagram, &self.scratch, ProtectedHeader::dst_cid);
        todo!()
    }
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new()
    }
}

/// How the router decided, for `/explain` and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CidRoute {
    /// Step 1: a routable CID whose server ID belongs to a healthy backend.
    Backend {
        server_id: ServerId,
        backend: BackendId,
    },
    /// Fall back to the flow table, then the hash, for this reason.
    Fallback(Unroutable),
}

/// Server ID → backend for one frontend, rebuilt with each snapshot (off the
/// per-datagram path); lookups neither lock nor allocate.
#[derive(Clone, Debug)]
pub struct QuicRouter {
    _todo: (),
}

impl QuicRouter {
    /// `server_ids` pairs each backend id of the snapshot with its server ID.
    /// Duplicate server IDs are the config's to refuse; here the lowest id wins.
    pub fn new(config: QuicLbConfig, server_ids: &[(BackendId, ServerId)]) -> Self {
        let _ = (config, server_ids);
        todo!()
    }

    pub fn config(&self) -> QuicLbConfig {
        todo!()
    }

    /// The backend a classified datagram's CID names, if that backend serves
    /// in `snapshot`; Initial and 0-RTT always fall back (client-chosen CID).
    pub fn route(&self, datagram: &Classified, snapshot: &Snapshot) -> CidRoute {
        let _ = (datagram, snapshot);
        todo!()
    }

    /// The server ID's backend, healthy or not (for `/explain`).
    pub fn backend_of(&self, server_id: &ServerId) -> Option<BackendId> {
        let _ = server_id;
        todo!()
    }
}
