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
//! - [`Classifier::classify`]: what kind of datagram arrived (Initial, 0-RTT, Handshake,
//!   Retry, short header, version negotiation, not QUIC), parsed with
//!   quinn-proto's public [`ProtectedHeader::decode`]; never panics.
//! - [`QuicRouter`]: server ID → backend for one snapshot, and the routing
//!   step the draft requires first (a routable CID of a healthy backend).
//!
//! The first octet: 3 config-rotation bits (0b111 = unroutable), then 5 bits
//! that self-encode the length of the rest of the CID. The draft's test
//! vector: config 0, server ID `c4605e`, nonce `4504cc4f` → `07c4605e4504cc4f`.

use std::io::Cursor;
use std::time::Duration;

use bytes::{Buf, BytesMut};
pub use quinn_proto::ConnectionId;
use quinn_proto::{
    ConnectionIdGenerator, ConnectionIdParser, InvalidCid, LongType, PacketDecodeError,
    ProtectedHeader, DEFAULT_SUPPORTED_VERSIONS,
};

use crate::backend::BackendId;
use crate::snapshot::Snapshot;

/// The config rotation value that marks a CID as unroutable.
pub const UNROUTABLE_CONFIG: u8 = 0b111;
/// QUIC v1 caps connection IDs at 20 bytes: the first octet plus 19.
pub const MAX_CID_LEN: usize = 20;
pub const MIN_SERVER_ID_LEN: usize = 1;
pub const MIN_NONCE_LEN: usize = 4;
/// The longest server ID: what a 20-byte CID leaves after its first octet and the shortest nonce.
pub const MAX_SERVER_ID_LEN: usize = MAX_CID_LEN - 1 - MIN_NONCE_LEN;
/// The low 5 bits of the first octet: the self-encoded length of the rest.
const LENGTH_BITS: u8 = 0b1_1111;
/// How far the config rotation bits sit from the bottom of the first octet.
const CONFIG_SHIFT: u32 = 5;

/// A server ID: 1 to 15 bytes (15 = 19 − the 4-byte minimum nonce).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId {
    len: u8,
    bytes: [u8; MAX_SERVER_ID_LEN],
}

impl ServerId {
    pub fn new(bytes: &[u8]) -> Result<Self, QuicLbError> {
        if !(MIN_SERVER_ID_LEN..=MAX_SERVER_ID_LEN).contains(&bytes.len()) {
            return Err(QuicLbError::ServerIdLength(bytes.len()));
        }
        let mut id = ServerId {
            len: bytes.len() as u8,
            bytes: [0; MAX_SERVER_ID_LEN],
        };
        id.bytes[..bytes.len()].copy_from_slice(bytes);
        Ok(id)
    }

    /// Parses hex, as the config writes it (`"c4605e"`; upper case is fine too).
    pub fn from_hex(hex: &str) -> Result<Self, QuicLbError> {
        let not_hex = || QuicLbError::NotHex(hex.to_owned());
        if hex.is_empty() || !hex.len().is_multiple_of(2) || !hex.is_ascii() {
            return Err(not_hex());
        }
        let mut bytes = [0u8; MAX_SERVER_ID_LEN];
        let count = hex.len() / 2;
        if count > MAX_SERVER_ID_LEN {
            return Err(QuicLbError::ServerIdLength(count));
        }
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| not_hex())?;
            bytes[i] = u8::from_str_radix(text, 16).map_err(|_| not_hex())?;
        }
        ServerId::new(&bytes[..count])
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::fmt::Display for ServerId {
    /// Lower-case hex, as configured.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_bytes()
            .iter()
            .try_for_each(|b| write!(f, "{b:02x}"))
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
    #[error("nonce is {got} bytes, the config says {want}")]
    NonceMismatch { got: usize, want: usize },
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
        if config_id >= UNROUTABLE_CONFIG {
            return Err(QuicLbError::ConfigId(config_id));
        }
        if !(MIN_SERVER_ID_LEN..=MAX_SERVER_ID_LEN).contains(&server_id_len) {
            return Err(QuicLbError::ServerIdLength(server_id_len));
        }
        if nonce_len < MIN_NONCE_LEN {
            return Err(QuicLbError::NonceLength(nonce_len));
        }
        let total = server_id_len + nonce_len;
        if total > MAX_CID_LEN - 1 {
            return Err(QuicLbError::TooLong {
                server_id: server_id_len,
                nonce: nonce_len,
                total,
            });
        }
        Ok(QuicLbConfig {
            config_id,
            server_id_len: server_id_len as u8,
            nonce_len: nonce_len as u8,
        })
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
        let (sid, want_nonce) = (self.server_id_len(), self.nonce_len());
        if server_id.as_bytes().len() != sid {
            return Err(QuicLbError::ServerIdMismatch {
                got: server_id.as_bytes().len(),
                want: sid,
            });
        }
        if nonce.len() != want_nonce {
            return Err(QuicLbError::NonceMismatch {
                got: nonce.len(),
                want: want_nonce,
            });
        }
        let mut cid = [0u8; MAX_CID_LEN];
        let rest = sid + want_nonce; // at most 19, so it fits the 5 length bits
        cid[0] = (self.config_id << CONFIG_SHIFT) | rest as u8;
        cid[1..=sid].copy_from_slice(server_id.as_bytes());
        cid[1 + sid..=rest].copy_from_slice(nonce);
        Ok(ConnectionId::new(&cid[..=rest]))
    }

    /// The server ID a CID carries, or why it carries none usable.
    pub fn decode(&self, cid: &[u8]) -> Result<ServerId, Unroutable> {
        let Some(&first) = cid.first() else {
            return Err(Unroutable::ShortCid);
        };
        match first >> CONFIG_SHIFT {
            UNROUTABLE_CONFIG => return Err(Unroutable::UnroutableConfig),
            id if id != self.config_id => return Err(Unroutable::UnknownConfig),
            _ => {}
        }
        if cid.len() < self.cid_len() {
            return Err(Unroutable::ShortCid);
        }
        ServerId::new(&cid[1..=self.server_id_len()]).map_err(|_| Unroutable::ShortCid)
    }
}

/// Reads a short header's destination CID length from its first octet's
/// self-encoded length (low 5 bits + 1), as QUIC-LB servers write it.
#[derive(Clone, Copy, Debug, Default)]
pub struct QuicLbCidParser;

impl ConnectionIdParser for QuicLbCidParser {
    fn parse(&self, buf: &mut dyn Buf) -> Result<ConnectionId, PacketDecodeError> {
        let Some(&first) = buf.chunk().first() else {
            return Err(PacketDecodeError::InvalidHeader("no connection ID"));
        };
        let len = usize::from(first & LENGTH_BITS) + 1;
        if len > MAX_CID_LEN {
            return Err(PacketDecodeError::InvalidHeader(
                "self-encoded connection ID length over 20",
            ));
        }
        if buf.remaining() < len {
            return Err(PacketDecodeError::InvalidHeader(
                "connection ID longer than the packet",
            ));
        }
        let mut bytes = [0u8; MAX_CID_LEN];
        buf.copy_to_slice(&mut bytes[..len]);
        Ok(ConnectionId::new(&bytes[..len]))
    }
}

/// A backend's CID generator: every CID carries its server ID; nonces come
/// from a seeded counter run through a bijection, so they never repeat
/// within a generator and two generators with different seeds differ.
pub struct QuicLbCidGenerator {
    config: QuicLbConfig,
    server_id: ServerId,
    seed: u64,
    counter: u64,
}

impl QuicLbCidGenerator {
    pub fn new(config: QuicLbConfig, server_id: ServerId, seed: u64) -> Result<Self, QuicLbError> {
        if server_id.as_bytes().len() != config.server_id_len() {
            return Err(QuicLbError::ServerIdMismatch {
                got: server_id.as_bytes().len(),
                want: config.server_id_len(),
            });
        }
        Ok(QuicLbCidGenerator {
            config,
            server_id,
            seed,
            counter: 0,
        })
    }

    /// The next nonce: its first 4 bytes are a bijection of a 32-bit counter
    /// (so 2^32 CIDs in a row never repeat), the rest a 64-bit mix of the seed
    /// and counter (more entropy for longer nonces).
    fn next_nonce(&mut self, out: &mut [u8]) {
        self.counter = self.counter.wrapping_add(1);
        let head = mix32((self.counter as u32).wrapping_add(self.seed as u32));
        out[..MIN_NONCE_LEN].copy_from_slice(&head.to_be_bytes());
        let mut tail = self.seed ^ self.counter.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for chunk in out[MIN_NONCE_LEN..].chunks_mut(8) {
            tail = mix64(tail);
            chunk.copy_from_slice(&tail.to_be_bytes()[..chunk.len()]);
        }
    }
}

/// A bijection on u32 (lowbias32, from Chris Wellons' hash-prospector).
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// A bijection on u64 (SplitMix64's finaliser).
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl ConnectionIdGenerator for QuicLbCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut nonce = [0u8; MAX_CID_LEN];
        let len = self.config.nonce_len();
        self.next_nonce(&mut nonce[..len]);
        self.config
            .encode(&self.server_id, &nonce[..len])
            .expect("new() checked the server ID against the config, and the nonce is its length")
    }

    /// Rejects CIDs that are not this server's, so that quinn drops stray
    /// short-header packets without answering them.
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        match self.config.decode(cid) {
            Ok(id) if id == self.server_id && cid.len() == self.config.cid_len() => Ok(()),
            _ => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        self.config.cid_len()
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
    /// A long header of a QUIC version quinn-proto does not speak: its type,
    /// and so whether the client chose its CID, is unknown.
    OtherVersion,
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

    /// Never panics, whatever the bytes. Only the first packet of a
    /// coalesced datagram is read: every packet in it has the same DCID.
    pub fn classify(&mut self, datagram: &[u8]) -> Classified {
        // quinn-proto decodes from a Cursor<BytesMut>; lending it the scratch
        // buffer (and taking it back) keeps this free of allocation once warm.
        self.scratch.clear();
        self.scratch.extend_from_slice(datagram);
        let mut cursor = Cursor::new(std::mem::take(&mut self.scratch));
        // grease_quic_bit: peers may clear the fixed bit (RFC 9287), so a clear
        // bit does not make a datagram "not QUIC".
        let header = ProtectedHeader::decode(
            &mut cursor,
            &QuicLbCidParser,
            DEFAULT_SUPPORTED_VERSIONS,
            true,
        );
        self.scratch = cursor.into_inner();
        match header {
            Ok(h) => Classified {
                kind: kind_of(&h),
                dst_cid: *h.dst_cid(),
            },
            Err(PacketDecodeError::UnsupportedVersion { dst_cid, .. }) => Classified {
                kind: DatagramKind::OtherVersion,
                dst_cid,
            },
            Err(PacketDecodeError::InvalidHeader(_)) => Classified {
                kind: DatagramKind::NotQuic,
                dst_cid: ConnectionId::new(&[]),
            },
        }
    }
}

fn kind_of(header: &ProtectedHeader) -> DatagramKind {
    match header {
        ProtectedHeader::Initial(_) => DatagramKind::Initial,
        ProtectedHeader::Long {
            ty: LongType::ZeroRtt,
            ..
        } => DatagramKind::ZeroRtt,
        ProtectedHeader::Long {
            ty: LongType::Handshake,
            ..
        } => DatagramKind::Handshake,
        ProtectedHeader::Retry { .. } => DatagramKind::Retry,
        ProtectedHeader::Short { .. } => DatagramKind::Short,
        ProtectedHeader::VersionNegotiate { .. } => DatagramKind::VersionNegotiation,
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
    config: QuicLbConfig,
    /// Sorted by server ID for a binary search: a handful of backends, no hashing to seed.
    by_server_id: Vec<(ServerId, BackendId)>,
}

impl QuicRouter {
    /// `server_ids` pairs each backend id of the snapshot with its server ID.
    /// Duplicate server IDs are the config's to refuse; here the lowest id wins.
    pub fn new(config: QuicLbConfig, server_ids: &[(BackendId, ServerId)]) -> Self {
        let mut by_server_id: Vec<(ServerId, BackendId)> =
            server_ids.iter().map(|&(b, s)| (s, b)).collect();
        by_server_id.sort();
        by_server_id.dedup_by_key(|(s, _)| *s);
        QuicRouter {
            config,
            by_server_id,
        }
    }

    pub fn config(&self) -> QuicLbConfig {
        self.config
    }

    /// The backend a classified datagram's CID names, if that backend serves
    /// in `snapshot`; Initial and 0-RTT always fall back (client-chosen CID).
    pub fn route(&self, datagram: &Classified, snapshot: &Snapshot) -> CidRoute {
        match datagram.kind {
            DatagramKind::NotQuic => return CidRoute::Fallback(Unroutable::NotQuic),
            DatagramKind::Initial | DatagramKind::ZeroRtt | DatagramKind::OtherVersion => {
                return CidRoute::Fallback(Unroutable::ClientChosen)
            }
            DatagramKind::Handshake
            | DatagramKind::Retry
            | DatagramKind::Short
            | DatagramKind::VersionNegotiation => {}
        }
        let server_id = match self.config.decode(&datagram.dst_cid) {
            Ok(id) => id,
            Err(reason) => return CidRoute::Fallback(reason),
        };
        match self.backend_of(&server_id) {
            None => CidRoute::Fallback(Unroutable::UnknownServerId),
            Some(backend) if !snapshot.is_healthy(backend) => {
                CidRoute::Fallback(Unroutable::BackendDown)
            }
            Some(backend) => CidRoute::Backend { server_id, backend },
        }
    }

    /// The server ID's backend, healthy or not (for `/explain`).
    pub fn backend_of(&self, server_id: &ServerId) -> Option<BackendId> {
        self.by_server_id
            .binary_search_by(|(s, _)| s.cmp(server_id))
            .ok()
            .map(|i| self.by_server_id[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackendSet, BackendSpec, SnapshotParams};
    use proptest::prelude::*;

    fn hex(cid: &[u8]) -> String {
        cid.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn config_0() -> QuicLbConfig {
        QuicLbConfig::new(0, 3, 4).unwrap()
    }

    /// draft-ietf-quic-load-balancers-21, plaintext test vector.
    #[test]
    fn the_drafts_plaintext_test_vector_encodes_and_decodes() {
        let sid = ServerId::from_hex("c4605e").unwrap();
        let cid = config_0().encode(&sid, &[0x45, 0x04, 0xcc, 0x4f]).unwrap();
        assert_eq!(hex(&cid), "07c4605e4504cc4f");
        assert_eq!(config_0().decode(&cid), Ok(sid));
        assert_eq!(sid.to_string(), "c4605e");
    }

    #[test]
    fn unroutable_cids_say_why() {
        let c = config_0();
        assert_eq!(c.decode(&[]), Err(Unroutable::ShortCid));
        assert_eq!(
            c.decode(&[0xe7, 1, 2, 3, 4, 5, 6, 7]),
            Err(Unroutable::UnroutableConfig)
        );
        assert_eq!(
            c.decode(&[0x27, 1, 2, 3, 4, 5, 6, 7]),
            Err(Unroutable::UnknownConfig)
        );
        assert_eq!(
            c.decode(&[0x07, 1, 2, 3, 4, 5, 6]),
            Err(Unroutable::ShortCid)
        );
    }

    #[test]
    fn layouts_that_do_not_fit_are_refused() {
        assert_eq!(QuicLbConfig::new(7, 3, 4), Err(QuicLbError::ConfigId(7)));
        assert_eq!(
            QuicLbConfig::new(0, 0, 4),
            Err(QuicLbError::ServerIdLength(0))
        );
        assert_eq!(
            QuicLbConfig::new(0, 16, 4),
            Err(QuicLbError::ServerIdLength(16))
        );
        assert_eq!(QuicLbConfig::new(0, 3, 3), Err(QuicLbError::NonceLength(3)));
        assert!(matches!(
            QuicLbConfig::new(0, 15, 5),
            Err(QuicLbError::TooLong { total: 20, .. })
        ));
        assert_eq!(QuicLbConfig::new(6, 15, 4).unwrap().cid_len(), MAX_CID_LEN);
        assert!(matches!(
            ServerId::from_hex("c4605"),
            Err(QuicLbError::NotHex(_))
        ));
        assert!(matches!(
            ServerId::from_hex("zz"),
            Err(QuicLbError::NotHex(_))
        ));
        assert!(matches!(
            ServerId::from_hex(""),
            Err(QuicLbError::NotHex(_))
        ));
        assert!(matches!(
            ServerId::from_hex("é1"),
            Err(QuicLbError::NotHex(_))
        ));
        assert_eq!(ServerId::from_hex("C4605E").unwrap().to_string(), "c4605e");
        let sid = ServerId::from_hex("c460").unwrap();
        assert!(matches!(
            config_0().encode(&sid, &[0; 4]),
            Err(QuicLbError::ServerIdMismatch { got: 2, want: 3 })
        ));
    }

    #[test]
    fn a_generator_issues_distinct_cids_that_route_back_to_its_server() {
        let sid = ServerId::from_hex("0a0b0c").unwrap();
        let mut g = QuicLbCidGenerator::new(QuicLbConfig::new(2, 3, 6).unwrap(), sid, 42).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let cid = g.generate_cid();
            assert_eq!(cid.len(), g.cid_len());
            assert_eq!(cid[0] >> CONFIG_SHIFT, 2);
            assert_eq!(
                usize::from(cid[0] & LENGTH_BITS) + 1,
                cid.len(),
                "self-encoded length"
            );
            assert_eq!(g.config.decode(&cid), Ok(sid));
            assert!(g.validate(&cid).is_ok());
            assert!(seen.insert(cid), "a CID repeated");
        }
        let other =
            QuicLbCidGenerator::new(g.config, ServerId::from_hex("0a0b0d").unwrap(), 42).unwrap();
        assert!(other.validate(&g.generate_cid()).is_err());
    }

    /// A short-header packet: form bit 0, fixed bit 1, then the DCID.
    fn short_packet(cid: &[u8]) -> Vec<u8> {
        let mut p = vec![0x40];
        p.extend_from_slice(cid);
        p.extend_from_slice(&[0u8; 24]);
        p
    }

    fn snapshot(healthy: Vec<bool>) -> Snapshot {
        let backends = (0..healthy.len())
            .map(|i| BackendSpec::new(format!("b{i}"), ([127, 0, 0, 1], 9000 + i as u16).into(), 1))
            .collect();
        Snapshot::build(
            1,
            SnapshotParams::default(),
            BackendSet::new(backends).unwrap(),
            healthy,
        )
        .unwrap()
    }

    #[test]
    fn short_headers_route_by_server_id_and_every_miss_is_a_fallback_with_its_reason() {
        let c = config_0();
        let ids = [
            ServerId::from_hex("000001").unwrap(),
            ServerId::from_hex("000002").unwrap(),
        ];
        let router = QuicRouter::new(c, &[(0, ids[0]), (1, ids[1])]);
        let mut classifier = Classifier::new();
        let route = |cl: &mut Classifier, cid: &[u8], snap: &Snapshot| {
            router.route(&cl.classify(&short_packet(cid)), snap)
        };
        let both_up = snapshot(vec![true, true]);
        let cid = c.encode(&ids[1], &[9; 4]).unwrap();
        assert_eq!(
            route(&mut classifier, &cid, &both_up),
            CidRoute::Backend {
                server_id: ids[1],
                backend: 1
            }
        );
        assert_eq!(
            route(&mut classifier, &cid, &snapshot(vec![true, false])),
            CidRoute::Fallback(Unroutable::BackendDown)
        );
        let unknown = c
            .encode(&ServerId::from_hex("0000ff").unwrap(), &[9; 4])
            .unwrap();
        assert_eq!(
            route(&mut classifier, &unknown, &both_up),
            CidRoute::Fallback(Unroutable::UnknownServerId)
        );
        assert_eq!(
            route(&mut classifier, &[0xe7, 0, 0, 1, 1, 2, 3, 4], &both_up),
            CidRoute::Fallback(Unroutable::UnroutableConfig)
        );
        assert_eq!(
            route(&mut classifier, &[0x27, 0, 0, 1, 1, 2, 3, 4], &both_up),
            CidRoute::Fallback(Unroutable::UnknownConfig)
        );
        // A self-encoded length of 4: a CID too short for server ID plus nonce.
        assert_eq!(
            route(&mut classifier, &[0x03, 0, 0, 1], &both_up),
            CidRoute::Fallback(Unroutable::ShortCid)
        );
        assert_eq!(
            router.route(&classifier.classify(&[]), &both_up),
            CidRoute::Fallback(Unroutable::NotQuic)
        );
        // A self-encoded length over 20, or longer than the datagram, is not QUIC.
        assert_eq!(
            classifier.classify(&[0x40, 0x1f, 1, 2]).kind,
            DatagramKind::NotQuic
        );
        assert_eq!(
            classifier.classify(&[0x40, 0x07, 1, 2]).kind,
            DatagramKind::NotQuic
        );
    }

    proptest! {
        #[test]
        fn classify_and_route_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            let router = QuicRouter::new(config_0(), &[(0, ServerId::from_hex("000001").unwrap())]);
            let c = Classifier::new().classify(&bytes);
            let _ = router.route(&c, &snapshot(vec![true]));
            prop_assert!(c.dst_cid.len() <= MAX_CID_LEN);
        }

        #[test]
        fn encode_then_decode_gives_the_server_id_back(
            config_id in 0u8..7,
            sid in proptest::collection::vec(any::<u8>(), 1..=MAX_SERVER_ID_LEN),
            nonce_extra in 0usize..=14,
        ) {
            let nonce_len = (MIN_NONCE_LEN + nonce_extra).min(MAX_CID_LEN - 1 - sid.len());
            let c = QuicLbConfig::new(config_id, sid.len(), nonce_len).unwrap();
            let id = ServerId::new(&sid).unwrap();
            let cid = c.encode(&id, &vec![0xab; nonce_len]).unwrap();
            prop_assert_eq!(cid.len(), c.cid_len());
            prop_assert_eq!(c.decode(&cid), Ok(id));
            let mut p = Classifier::new();
            prop_assert_eq!(p.classify(&short_packet(&cid)).dst_cid, cid);
        }
    }
}

/// Real QUIC packets from quinn-proto's own endpoints, driven in memory: the
/// client's first Initial falls back, and once the server's generator has
/// issued CIDs, the client's short-header packets route to that server.
#[cfg(test)]
mod quinn_packets {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Instant;

    use quinn_proto::{ClientConfig, DatagramEvent, Endpoint, EndpointConfig, ServerConfig};

    use super::*;
    use crate::{BackendSet, BackendSpec, SnapshotParams};

    struct Side {
        endpoint: Endpoint,
        conn: Option<(quinn_proto::ConnectionHandle, quinn_proto::Connection)>,
        addr: SocketAddr,
    }

    impl Side {
        /// Feeds a datagram from `from`; accepts it as a new connection on the server.
        fn receive(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
            let mut buf = Vec::new();
            match self
                .endpoint
                .handle(now, from, None, None, BytesMut::from(datagram), &mut buf)
            {
                Some(DatagramEvent::NewConnection(incoming)) => {
                    self.conn = Some(
                        self.endpoint
                            .accept(incoming, now, &mut buf, None)
                            .expect("accept"),
                    );
                }
                Some(DatagramEvent::ConnectionEvent(_, event)) => {
                    self.conn
                        .as_mut()
                        .expect("a connection")
                        .1
                        .handle_event(event);
                }
                Some(DatagramEvent::Response(_)) | None => {}
            }
            self.pump_endpoint_events();
        }

        fn pump_endpoint_events(&mut self) {
            let Some((ch, conn)) = self.conn.as_mut() else {
                return;
            };
            while let Some(event) = conn.poll_endpoint_events() {
                if let Some(back) = self.endpoint.handle_event(*ch, event) {
                    conn.handle_event(back);
                }
            }
        }

        fn transmit(&mut self, now: Instant) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            let Some((_, conn)) = self.conn.as_mut() else {
                return out;
            };
            let mut buf = Vec::new();
            while let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
                out.push(buf[..t.size].to_vec());
                buf.clear();
            }
            out
        }
    }

    fn configs() -> (ServerConfig, ClientConfig) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = rustls::pki_types::CertificateDer::from(cert.cert);
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der());
        let server = ServerConfig::with_single_cert(vec![der.clone()], key.into()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        (
            server,
            ClientConfig::with_root_certificates(Arc::new(roots)).unwrap(),
        )
    }

    #[test]
    fn a_real_client_falls_back_on_initial_then_routes_by_the_servers_cid() {
        let lb = QuicLbConfig::new(1, 2, 6).unwrap();
        let sid = ServerId::from_hex("beef").unwrap();
        let (server_config, client_config) = configs();
        let mut endpoint_config = EndpointConfig::default();
        endpoint_config
            .cid_generator(move || Box::new(QuicLbCidGenerator::new(lb, sid, 7).unwrap()));
        let mut server = Side {
            endpoint: Endpoint::new(
                Arc::new(endpoint_config),
                Some(Arc::new(server_config)),
                true,
                Some([1; 32]),
            ),
            conn: None,
            addr: "127.0.0.1:4433".parse().unwrap(),
        };
        let mut client = Side {
            endpoint: Endpoint::new(
                Arc::new(EndpointConfig::default()),
                None,
                true,
                Some([2; 32]),
            ),
            conn: None,
            addr: "127.0.0.2:50000".parse().unwrap(),
        };
        let now = Instant::now();
        client.conn = Some(
            client
                .endpoint
                .connect(now, client_config, server.addr, "localhost")
                .unwrap(),
        );

        let backends = vec![
            BackendSpec::new("a", "127.0.0.1:1".parse().unwrap(), 1),
            BackendSpec::new("b", "127.0.0.1:2".parse().unwrap(), 1),
        ];
        let snapshot = Snapshot::build(
            1,
            SnapshotParams::default(),
            BackendSet::new(backends).unwrap(),
            vec![true; 2],
        )
        .unwrap();
        let other = ServerId::from_hex("0001").unwrap();
        let router = QuicRouter::new(lb, &[(0, other), (1, sid)]);
        let mut classifier = Classifier::new();

        let mut kinds = Vec::new();
        let mut routed_to_server = 0;
        for _round in 0..10 {
            for d in client.transmit(now) {
                let c = classifier.classify(&d);
                match router.route(&c, &snapshot) {
                    CidRoute::Backend { server_id, backend } => {
                        assert_eq!((server_id, backend), (sid, 1));
                        routed_to_server += 1;
                    }
                    CidRoute::Fallback(reason) => {
                        assert!(
                            matches!(c.kind, DatagramKind::Initial | DatagramKind::ZeroRtt),
                            "{:?} fell back: {reason:?}",
                            c.kind
                        );
                        assert_eq!(reason, Unroutable::ClientChosen);
                    }
                }
                kinds.push(c.kind);
                server.receive(now, client.addr, &d);
            }
            for d in server.transmit(now) {
                client.receive(now, server.addr, &d);
            }
        }
        assert_eq!(kinds.first(), Some(&DatagramKind::Initial), "{kinds:?}");
        assert!(
            kinds.contains(&DatagramKind::Short) || kinds.contains(&DatagramKind::Handshake),
            "{kinds:?}"
        );
        assert!(
            routed_to_server > 0,
            "no client datagram routed by CID: {kinds:?}"
        );
        assert!(client.conn.as_ref().unwrap().1.side().is_client());
    }
}
