//! A table of malformed configs: `lb-proxy check` must refuse each one with a
//! message that names the file, the line and the field, says what is wrong,
//! and never panics.
//!
//! Each row mutates one of two well-formed configs (the plain-backends fixture
//! shared with lb-proxy's unit tests, and the shipped AKS lab for the hop
//! model) and says where the error must point: the line is computed from the
//! mutated text, not written down, so editing a base config cannot make a row
//! pass by accident. A bad config at reload is covered by tests/tests/reload.rs
//! (refused with check's message, and the old config keeps serving).

use std::path::Path;

use lb_tests::run_check;

/// The well-formed plain-backends config (also lb-proxy's unit-test fixture).
const GOOD: &str = include_str!("../../lb-proxy/tests/fixtures/good.toml");
/// The well-formed hop-model config: three nodes, one pod.
const LAB: &str = include_str!("../../config/aks-lab.toml");
/// The shipped zones lab: three nodes in zones 1, 2 and 3, one pod.
const ZONES: &str = include_str!("../../config/aks-zones.toml");
/// The shipped plain UDP frontend: three backends.
const UDP: &str = include_str!("../../config/udp.toml");
/// The shipped QUIC-LB frontend: three backends with server IDs.
const QUIC: &str = include_str!("../../config/quic.toml");

/// Where the error must point: the line holding this text in the mutated file.
#[derive(Clone, Copy)]
enum At {
    /// Its first occurrence.
    First(&'static str),
    /// Its last occurrence (for a duplicate, which is the second of two).
    Last(&'static str),
}

/// One malformed config.
struct Case {
    /// The file's stem, so a failure names the case.
    name: &'static str,
    base: &'static str,
    /// Text that occurs once in `base`, and what replaces it.
    from: &'static str,
    to: &'static str,
    at: At,
    /// The field the message must name, as `` field `NAME` ``.
    field: &'static str,
    /// A fragment the message must contain: what is wrong.
    says: &'static str,
}

/// `Case` without the noise: base, name, from, to, at, field, says.
const fn case(
    base: &'static str,
    name: &'static str,
    (from, to): (&'static str, &'static str),
    at: At,
    field: &'static str,
    says: &'static str,
) -> Case {
    Case {
        name,
        base,
        from,
        to,
        at,
        field,
        says,
    }
}

use At::{First, Last};

/// The plain-backends fixture's last backend, to delete every backend.
const GOOD_BACKENDS: &str = "[[frontends.backends]]\nname = \"node-1\"\naddress = \"127.0.0.1:9001\"\n\n[[frontends.backends]]\nname = \"node-2\"\naddress = \"127.0.0.1:9002\"\nweight = 3";

/// A second frontend after the first, to clash with it.
const SECOND_WEB: &str = "drain_timeout = \"10s\"\n\n[[frontends]]\nname = \"web\"\nlisten = \"127.0.0.1:8081\"\n\n[[frontends.backends]]\nname = \"x\"\naddress = \"127.0.0.1:9009\"";
const SECOND_LISTEN: &str = "drain_timeout = \"10s\"\n\n[[frontends]]\nname = \"web2\"\nlisten = \"127.0.0.1:8080\"\n\n[[frontends.backends]]\nname = \"x\"\naddress = \"127.0.0.1:9009\"";

const IDLE: &str = "idle_timeout = \"30s\"";
const POD: &str = "endpoints = [\"127.0.2.2:8000\"]";

fn syntax_and_type_errors() -> Vec<Case> {
    vec![
        case(
            GOOD,
            "unterminated-string",
            ("path = \"/healthz\"", "path = \"/healthz"),
            First("path = "),
            "path",
            "invalid basic string",
        ),
        case(
            GOOD,
            "missing-equals",
            (IDLE, "idle_timeout \"30s\""),
            First("idle_timeout"),
            "idle_timeout",
            "expected",
        ),
        case(
            GOOD,
            "duplicate-key",
            (IDLE, "idle_timeout = \"30s\"\nidle_timeout = \"31s\""),
            First("\"31s\""),
            "idle_timeout",
            "duplicate key",
        ),
        case(
            GOOD,
            "misspelt-table",
            ("[frontends.health]", "[frontends.healt]"),
            First("[frontends.healt]"),
            "frontends.healt",
            "unknown field `healt`",
        ),
        case(
            GOOD,
            "unknown-top-level-field",
            ("workers = 2", "worker = 2"),
            First("worker ="),
            "worker",
            "unknown field `worker`",
        ),
        case(
            GOOD,
            "workers-a-string",
            ("workers = 2", "workers = \"two\""),
            First("workers"),
            "workers",
            "invalid type",
        ),
        case(
            GOOD,
            "workers-negative",
            ("workers = 2", "workers = -1"),
            First("workers"),
            "workers",
            "invalid value",
        ),
        case(
            GOOD,
            "weight-negative",
            ("weight = 3", "weight = -3"),
            First("weight"),
            "weight",
            "invalid value",
        ),
        case(
            GOOD,
            "timeout-an-integer",
            (IDLE, "idle_timeout = 30"),
            First("idle_timeout"),
            "idle_timeout",
            "expected a duration",
        ),
        case(
            GOOD,
            "timeout-not-a-duration",
            (IDLE, "idle_timeout = \"soon\""),
            First("idle_timeout"),
            "idle_timeout",
            "expected a duration",
        ),
        case(
            GOOD,
            "hash-seed-a-string",
            (IDLE, "hash_seed = \"abc\""),
            First("hash_seed"),
            "hash_seed",
            "invalid type",
        ),
    ]
}

fn out_of_range_values() -> Vec<Case> {
    vec![
        case(
            GOOD,
            "workers-zero",
            ("workers = 2", "workers = 0"),
            First("workers"),
            "workers",
            "between 1 and 1024",
        ),
        case(
            GOOD,
            "workers-too-many",
            ("workers = 2", "workers = 5000"),
            First("workers"),
            "workers",
            "between 1 and 1024",
        ),
        case(
            GOOD,
            "fd-reserve-too-small",
            ("workers = 2", "workers = 2\nfd_reserve = 2"),
            First("fd_reserve"),
            "fd_reserve",
            "at least 4",
        ),
        case(
            GOOD,
            "withdraw-delay-too-long",
            (
                "drain_timeout = \"10s\"",
                "drain_timeout = \"10s\"\nwithdraw_delay = \"1h\"",
            ),
            First("withdraw_delay"),
            "withdraw_delay",
            "at most 5m",
        ),
        case(
            GOOD,
            "withdraw-delay-not-a-duration",
            (
                "drain_timeout = \"10s\"",
                "drain_timeout = \"10s\"\nwithdraw_delay = \"5 parsecs\"",
            ),
            First("withdraw_delay"),
            "withdraw_delay",
            "string \"5 parsecs\", expected a duration",
        ),
        case(
            GOOD,
            "withdraw-delay-a-bare-number",
            (
                "drain_timeout = \"10s\"",
                "drain_timeout = \"10s\"\nwithdraw_delay = 5",
            ),
            First("withdraw_delay"),
            "withdraw_delay",
            "invalid type",
        ),
        case(
            GOOD,
            "weight-too-large",
            ("weight = 3", "weight = 70000"),
            First("weight"),
            "frontends[0].backends[1].weight",
            "at most 65535",
        ),
        case(
            GOOD,
            "table-size-not-a-supported-prime",
            (IDLE, "table_size = 1000"),
            First("table_size"),
            "frontends[0].table_size",
            "supported primes",
        ),
        case(
            GOOD,
            "backlog-zero",
            (IDLE, "backlog = 0"),
            First("backlog"),
            "frontends[0].backlog",
            "at least 1",
        ),
        case(
            GOOD,
            "max-connections-zero",
            (IDLE, "max_connections = 0"),
            First("max_connections"),
            "frontends[0].max_connections",
            "at least 1",
        ),
        case(
            GOOD,
            "connect-retries-too-many",
            (IDLE, "connect_retries = 99"),
            First("connect_retries"),
            "frontends[0].connect_retries",
            "retries are supported",
        ),
        case(
            GOOD,
            "idle-timeout-zero",
            (IDLE, "idle_timeout = \"0s\""),
            First("idle_timeout"),
            "frontends[0].idle_timeout",
            "greater than zero",
        ),
        case(
            GOOD,
            "connect-timeout-zero",
            (IDLE, "connect_timeout = \"0s\""),
            First("connect_timeout"),
            "frontends[0].connect_timeout",
            "greater than zero",
        ),
        case(
            GOOD,
            "probe-interval-too-short",
            ("interval = \"1s\"", "interval = \"1ms\""),
            First("interval"),
            "frontends[0].health.interval",
            "at least 10ms",
        ),
        case(
            GOOD,
            "probe-timeout-zero",
            ("interval = \"1s\"", "interval = \"1s\"\ntimeout = \"0s\""),
            First("timeout = \"0s\""),
            "frontends[0].health.timeout",
            "greater than zero",
        ),
        case(
            GOOD,
            "probe-path-relative",
            ("path = \"/healthz\"", "path = \"healthz\""),
            First("path"),
            "frontends[0].health.path",
            "must start with '/'",
        ),
        case(
            GOOD,
            "probe-rise-zero",
            ("interval = \"1s\"", "interval = \"1s\"\nrise = 0"),
            First("rise"),
            "frontends[0].health.rise",
            "between 1 and 100",
        ),
        case(
            LAB,
            "affinity-timeout-zero",
            ("timeout_seconds = 10800", "timeout_seconds = 0"),
            First("timeout_seconds = 0"),
            "frontends[0].service.timeout_seconds",
            "between 1 and 86400",
        ),
        case(
            LAB,
            "affinity-timeout-over-a-day",
            ("timeout_seconds = 10800", "timeout_seconds = 90000"),
            First("timeout_seconds = 90000"),
            "frontends[0].service.timeout_seconds",
            "between 1 and 86400",
        ),
    ]
}

fn unsupported_enums() -> Vec<Case> {
    vec![
        case(
            GOOD,
            "distribution",
            ("\"SourceIP\"", "\"RoundRobin\""),
            First("distribution"),
            "distribution",
            "unknown value `RoundRobin`",
        ),
        case(
            GOOD,
            "copy",
            (IDLE, "copy = \"zerocopy\""),
            First("copy"),
            "copy",
            "unknown variant `zerocopy`",
        ),
        case(
            GOOD,
            "accept",
            (IDLE, "accept = \"epoll\""),
            First("accept"),
            "accept",
            "unknown variant `epoll`",
        ),
        case(
            GOOD,
            "client-address",
            (IDLE, "client_address = \"x-forwarded-for\""),
            First("client_address"),
            "client_address",
            "unknown variant `x-forwarded-for`",
        ),
        case(
            GOOD,
            "no-healthy-backends",
            (IDLE, "no_healthy_backends = \"panic\""),
            First("no_healthy_backends"),
            "no_healthy_backends",
            "unknown variant `panic`",
        ),
        case(
            GOOD,
            "health-kind",
            ("kind = \"http\"", "kind = \"icmp\""),
            First("kind"),
            "frontends[0].health.kind",
            "unknown probe kind `icmp`",
        ),
        case(
            GOOD,
            "flow-log-format",
            (
                "workers = 2",
                "workers = 2\n[flow_log]\npath = \"flows.log\"\nformat = \"xml\"",
            ),
            First("format"),
            "format",
            "unknown variant `xml`",
        ),
        case(
            LAB,
            "traffic-policy",
            (
                "external_traffic_policy = \"Cluster\"",
                "external_traffic_policy = \"Both\"",
            ),
            First("external_traffic_policy = \"Both\""),
            "external_traffic_policy",
            "unknown variant `Both`",
        ),
        case(
            LAB,
            "session-affinity",
            (
                "session_affinity = \"None\"",
                "session_affinity = \"Sticky\"",
            ),
            First("session_affinity = \"Sticky\""),
            "session_affinity",
            "unknown variant `Sticky`",
        ),
        case(
            LAB,
            "snat",
            ("snat = \"cross-node\"", "snat = \"never\""),
            First("snat = \"never\""),
            "snat",
            "unknown variant `never`",
        ),
    ]
}

fn names_and_addresses() -> Vec<Case> {
    vec![
        case(
            GOOD,
            "duplicate-frontend-name",
            ("drain_timeout = \"10s\"", SECOND_WEB),
            Last("name = \"web\""),
            "frontends[1].name",
            "defined twice",
        ),
        case(
            GOOD,
            "duplicate-frontend-listen",
            ("drain_timeout = \"10s\"", SECOND_LISTEN),
            Last("listen = \"127.0.0.1:8080\""),
            "frontends[1].listen",
            "used by another frontend",
        ),
        case(
            GOOD,
            "frontend-name-with-a-space",
            ("name = \"web\"", "name = \"web site\""),
            First("web site"),
            "frontends[0].name",
            "only letters, digits",
        ),
        case(
            GOOD,
            "backend-name-with-a-space",
            ("name = \"node-1\"", "name = \"node 1\""),
            First("node 1"),
            "frontends[0].backends[0].name",
            "only letters, digits",
        ),
        case(
            GOOD,
            "backend-address-a-hostname",
            ("127.0.0.1:9001", "localhost:9001"),
            First("localhost"),
            "address",
            "invalid socket address",
        ),
        case(
            GOOD,
            "backend-port-zero",
            ("127.0.0.1:9001", "127.0.0.1:0"),
            First("127.0.0.1:0"),
            "frontends[0].backends[0].address",
            "not a connectable address",
        ),
        case(
            GOOD,
            "backend-address-unspecified",
            ("127.0.0.1:9001", "0.0.0.0:9001"),
            First("0.0.0.0:9001"),
            "frontends[0].backends[0].address",
            "not a connectable address",
        ),
        case(
            GOOD,
            "admin-on-a-public-address",
            ("listen = \"127.0.0.1:9180\"", "listen = \"0.0.0.0:9180\""),
            First("0.0.0.0:9180"),
            "admin.listen",
            "not a loopback address",
        ),
        case(
            GOOD,
            "no-backends",
            (GOOD_BACKENDS, ""),
            First("name = \"web\""),
            "frontends[0].backends",
            "at least one",
        ),
    ]
}

fn hop_model_errors() -> Vec<Case> {
    vec![
        case(GOOD, "service-without-nodes", (IDLE, "idle_timeout = \"30s\"\n\n[frontends.service]\nsnat = \"always\""), First("[frontends.service]"), "frontends[0].service", "needs [[frontends.nodes]]"),
        case(LAB, "backends-and-nodes", ("client_address = \"snat\"", "client_address = \"snat\"\n\n[[frontends.backends]]\nname = \"x\"\naddress = \"127.0.0.1:9009\""), First("name = \"testapp\""), "frontends[0].nodes", "not both"),
        case(LAB, "node-name-uppercase", ("name = \"node-3\"", "name = \"Node_3\""), First("Node_3"), "frontends[0].nodes[2].name", "RFC 1123"),
        case(LAB, "duplicate-node-name", ("name = \"node-3\"", "name = \"node-1\""), Last("name = \"node-1\""), "frontends[0].nodes[2].name", "node-1"),
        case(LAB, "duplicate-node-address", ("address = \"127.0.1.3\"", "address = \"127.0.1.1\""), Last("address = \"127.0.1.1\""), "frontends[0].nodes[2].address", "127.0.1.1"),
        case(LAB, "node-address-not-local", ("address = \"127.0.1.2\"", "address = \"10.0.1.2\""), First("10.0.1.2"), "frontends[0].nodes[1].address", "not a local address"),
        case(LAB, "node-address-not-an-ip", ("address = \"127.0.1.2\"", "address = \"127.0.1\""), First("\"127.0.1\""), "address", "invalid IP address"),
        case(LAB, "endpoint-port-zero", (POD, "endpoints = [\"127.0.2.2:0\"]"), First("127.0.2.2:0"), "frontends[0].nodes[1].endpoints[0]", "not a connectable address"),
        case(LAB, "duplicate-endpoint", ("name = \"node-3\"\naddress = \"127.0.1.3\"\nendpoints = []", "name = \"node-3\"\naddress = \"127.0.1.3\"\nendpoints = [\"127.0.2.2:8000\"]"), Last("127.0.2.2:8000"), "frontends[0].nodes[2].endpoints[0]", "127.0.2.2:8000"),
        case(LAB, "endpoint-a-hostname", (POD, "endpoints = [\"pod-a:8000\"]"), First("pod-a"), "endpoints", "`pod-a:8000` is not IP:PORT"),
        case(LAB, "endpoint-ready-a-string", (POD, "endpoints = [{ address = \"127.0.2.2:8000\", ready = \"yes\" }]"), First("ready = \"yes\""), "endpoints", "invalid type: string \"yes\", expected a boolean"),
        case(LAB, "endpoint-names-a-node", (POD, "endpoints = [{ address = \"127.0.2.2:8000\", node = \"node-9\" }]"), First("node-9"), "endpoints", "unknown field `node`"),
        case(ZONES, "zones-down-no-node-is-in", ("zones_down = []", "zones_down = [\"2\", \"4\"]"), First("zones_down = ["), "zones_down[1]", "no node is in zone `4`"),
        case(LAB, "listen-not-local-with-cross-node-snat", ("listen = \"127.0.0.1:8080\"", "listen = \"10.0.0.1:8080\""), First("10.0.0.1"), "frontends[0].listen", "only works for local clients"),
    ]
}

/// A place in the udp and quic examples to add a frontend field.
const BATCH: &str = "udp_batch = 32";

/// Fields of the other protocol, refused where they would be ignored.
fn protocol_mismatches() -> Vec<Case> {
    const TCP_ONLY: &str = "is for tcp frontends, and this frontend's protocol is udp";
    vec![
        case(UDP, "udp-backlog", (BATCH, "udp_batch = 32\nbacklog = 1024"), First("backlog = 1024"), "frontends[0].backlog", TCP_ONLY),
        case(UDP, "udp-accept", (BATCH, "udp_batch = 32\naccept = \"shared\""), First("accept = "), "frontends[0].accept", TCP_ONLY),
        case(UDP, "udp-copy", (BATCH, "udp_batch = 32\ncopy = \"splice\""), First("copy = "), "frontends[0].copy", TCP_ONLY),
        case(UDP, "udp-connect-timeout", (BATCH, "udp_batch = 32\nconnect_timeout = \"5s\""), First("connect_timeout = "), "frontends[0].connect_timeout", TCP_ONLY),
        case(UDP, "udp-connect-retries", (BATCH, "udp_batch = 32\nconnect_retries = 2"), First("connect_retries = "), "frontends[0].connect_retries", TCP_ONLY),
        case(UDP, "udp-max-connections", (BATCH, "udp_batch = 32\nmax_connections = 10"), First("max_connections = "), "frontends[0].max_connections", "bounds its flows with `max_flows`"),
        case(UDP, "udp-tcp-reset-on-idle", (BATCH, "udp_batch = 32\ntcp_reset_on_idle = false"), First("tcp_reset_on_idle = "), "frontends[0].tcp_reset_on_idle", TCP_ONLY),
        case(UDP, "udp-half-close", (BATCH, "udp_batch = 32\nhalf_close = false"), First("half_close = "), "frontends[0].half_close", TCP_ONLY),
        case(GOOD, "half-close-off-with-sockmap", (IDLE, "copy = \"sockmap\"\nhalf_close = false"), First("half_close = "), "frontends[0].half_close", "needs a userspace copy engine"),
        case(UDP, "udp-engine", (BATCH, "udp_batch = 32\nengine = \"io-uring\""), First("engine = "), "frontends[0].engine", TCP_ONLY),
        case(GOOD, "io-uring-with-a-copy", (IDLE, "engine = \"io-uring\"\ncopy = \"splice\""), First("copy = "), "frontends[0].copy", "copies through its ring"),
        case(ZONES, "io-uring-with-zones", ("client_address = \"snat\"", "client_address = \"snat\"\nengine = \"io-uring\""), First("engine = "), "frontends[0].engine", "no cross-zone delay line"),
        case(GOOD, "engine-unknown", (IDLE, "engine = \"epoll\""), First("engine = "), "engine", "unknown variant `epoll`"),
        case(QUIC, "quic-connect-timeout", (BATCH, "udp_batch = 32\nconnect_timeout = \"5s\""), First("connect_timeout = "), "frontends[0].connect_timeout", "this frontend's protocol is quic"),
        case(UDP, "udp-proxy-protocol", ("client_address = \"snat\"", "client_address = \"proxy-protocol-v2\""), First("proxy-protocol-v2"), "frontends[0].client_address", "PROXY protocol header precedes a TCP stream"),
        case(UDP, "udp-route-all", ("no_healthy_backends = \"refuse\"", "no_healthy_backends = \"route-all\""), First("= \"route-all\""), "frontends[0].no_healthy_backends", "Azure ends all UDP flows"),
        case(QUIC, "quic-route-all", (BATCH, "udp_batch = 32\nno_healthy_backends = \"route-all\""), First("= \"route-all\""), "frontends[0].no_healthy_backends", "Azure ends all UDP flows"),
        case(GOOD, "tcp-max-flows", (IDLE, "max_flows = 100"), First("max_flows"), "frontends[0].max_flows", "is for udp and quic frontends"),
        case(GOOD, "tcp-udp-batch", (IDLE, "udp_batch = 8"), First("udp_batch"), "frontends[0].udp_batch", "is for udp and quic frontends"),
        case(GOOD, "tcp-quic-table", ("[frontends.health]", "[frontends.quic]\nconfig_id = 0\nserver_id_length = 3\n\n[frontends.health]"), First("[frontends.quic]"), "frontends[0].quic", "this frontend's protocol is tcp"),
        case(UDP, "udp-quic-table", ("[frontends.health]", "[frontends.quic]\nconfig_id = 0\nserver_id_length = 3\n\n[frontends.health]"), First("[frontends.quic]"), "frontends[0].quic", "is for protocol = \"quic\""),
        case(GOOD, "tcp-server-id", ("weight = 3", "weight = 3\nserver_id = \"020202\""), First("server_id"), "frontends[0].backends[1].server_id", "for backends of a quic frontend"),
        case(UDP, "udp-server-id", ("address = \"127.0.0.1:9102\"", "address = \"127.0.0.1:9102\"\nserver_id = \"020202\""), First("server_id = "), "frontends[0].backends[1].server_id", "for backends of a quic frontend"),
        case(UDP, "quic-without-its-table", ("protocol = \"udp\"", "protocol = \"quic\""), First("protocol = \"quic\""), "frontends[0].quic", "needs a [frontends.quic] table"),
        case(QUIC, "quic-with-nodes", ("[[frontends.backends]]\nname = \"node-1\"", "[[frontends.nodes]]\nname = \"n1\"\naddress = \"127.0.1.1\"\n\n[[frontends.backends]]\nname = \"node-1\""), First("[[frontends.nodes]]"), "frontends[0].nodes", "not [[frontends.nodes]]"),
        case(UDP, "protocol-unknown", ("protocol = \"udp\"", "protocol = \"sctp\""), First("sctp"), "protocol", "unknown variant `sctp`"),
    ]
}

/// The UDP data plane's settings and the QUIC-LB layout out of range.
fn udp_and_quic_values() -> Vec<Case> {
    const BACKEND_2: &str = "frontends[0].backends[1].server_id";
    const NODES_2_3: &str = "server_id = \"020202\"\n\n[[frontends.backends]]\nname = \"node-3\"\naddress = \"127.0.0.1:4436\"\nserver_id = \"030303\"";
    vec![
        case(UDP, "max-flows-zero", ("max_flows = 16384", "max_flows = 0"), First("max_flows = 0"), "frontends[0].max_flows", "at least 1"),
        case(UDP, "udp-batch-zero", (BATCH, "udp_batch = 0"), First("udp_batch = 0"), "frontends[0].udp_batch", "between 1"),
        case(UDP, "udp-batch-too-large", (BATCH, "udp_batch = 65"), First("udp_batch = 65"), "frontends[0].udp_batch", "and 64"),
        case(UDP, "udp-idle-timeout-zero", ("idle_timeout = \"4m\"", "idle_timeout = \"0s\""), First("idle_timeout = \"0s\""), "frontends[0].idle_timeout", "greater than zero"),
        case(UDP, "health-port-zero", ("kind = \"tcp\"", "kind = \"tcp\"\nport = 0"), First("port = 0"), "frontends[0].health.port", "1 to 65535"),
        case(UDP, "health-port-too-large", ("kind = \"tcp\"", "kind = \"tcp\"\nport = 70000"), First("port = 70000"), "port", "invalid value"),
        case(QUIC, "quic-config-id-unroutable", ("config_id = 0", "config_id = 7"), First("config_id = 7"), "frontends[0].quic.config_id", "not 0..=6"),
        case(QUIC, "quic-config-id-not-a-byte", ("config_id = 0", "config_id = 300"), First("config_id = 300"), "config_id", "invalid value"),
        case(QUIC, "quic-server-id-length-zero", ("server_id_length = 3", "server_id_length = 0"), First("server_id_length = 0"), "frontends[0].quic.server_id_length", "not 1..=15"),
        case(QUIC, "quic-server-id-length-16", ("server_id_length = 3", "server_id_length = 16"), First("server_id_length = 16"), "frontends[0].quic.server_id_length", "not 1..=15"),
        case(QUIC, "quic-nonce-too-short", ("nonce_length = 4", "nonce_length = 3"), First("nonce_length = 3"), "frontends[0].quic.nonce_length", "at least 4"),
        case(QUIC, "quic-cid-too-long", ("nonce_length = 4", "nonce_length = 17"), First("nonce_length = 17"), "frontends[0].quic.nonce_length", "more than the 19"),
        case(QUIC, "quic-unknown-field", ("nonce_length = 4", "nonce_len = 4"), First("nonce_len = 4"), "nonce_len", "unknown field `nonce_len`"),
        case(QUIC, "quic-missing-server-id-length", ("server_id_length = 3\n", ""), First("[frontends.quic]"), "frontends.quic", "missing field `server_id_length`"),
        case(QUIC, "server-id-not-hex", ("server_id = \"020202\"", "server_id = \"02020g\""), First("02020g"), BACKEND_2, "`02020g` is not hex"),
        case(QUIC, "server-id-odd-digits", ("server_id = \"020202\"", "server_id = \"20202\""), First("\"20202\""), BACKEND_2, "is not hex"),
        case(QUIC, "server-id-too-short", ("server_id = \"020202\"", "server_id = \"0202\""), First("\"0202\""), BACKEND_2, "2 bytes, the config says 3"),
        case(QUIC, "server-id-too-long", ("server_id = \"020202\"", "server_id = \"02020202\""), First("02020202"), BACKEND_2, "4 bytes, the config says 3"),
        case(QUIC, "server-id-duplicate", ("server_id = \"030303\"", "server_id = \"010101\""), Last("server_id = \"010101\""), "frontends[0].backends[2].server_id", "010101 is also backend `node-1`'s"),
        case(QUIC, "server-id-duplicate-in-capitals", (NODES_2_3, "server_id = \"0a0b0c\"\n\n[[frontends.backends]]\nname = \"node-3\"\naddress = \"127.0.0.1:4436\"\nserver_id = \"0A0B0C\""), First("0A0B0C"), "frontends[0].backends[2].server_id", "0a0b0c is also backend `node-2`'s"),
        case(QUIC, "server-id-missing", ("\nserver_id = \"020202\"", ""), First("name = \"node-2\""), BACKEND_2, "needs a server_id: 3 bytes in hex"),
        case(UDP, "duplicate-udp-listen", ("[frontends.health]", "[[frontends.backends]]\nname = \"x\"\naddress = \"127.0.0.1:9109\"\n\n[[frontends]]\nname = \"udp2\"\nlisten = \"127.0.0.1:8053\"\nprotocol = \"udp\"\n\n[frontends.health]"), Last("listen = \"127.0.0.1:8053\""), "frontends[1].listen", "127.0.0.1:8053 (UDP) is used by another frontend"),
    ]
}

/// `source_ranges`: each bad entry is located at its own line and index.
fn source_range_errors() -> Vec<Case> {
    const RANGES: &str = "idle_timeout = \"30s\"\nsource_ranges = [\n  \"127.0.1.0/24\",\n  \"127.0.2.0/24\",\n  \"127.0.3/24\",\n]";
    vec![
        case(
            GOOD,
            "source-range-malformed",
            (IDLE, RANGES),
            First("127.0.3/24"),
            "frontends[0].source_ranges[2]",
            "`127.0.3/24` is not an IPv4 or IPv6 address",
        ),
        case(
            GOOD,
            "source-range-length-too-long",
            (
                IDLE,
                "idle_timeout = \"30s\"\nsource_ranges = [\"127.0.0.0/33\"]",
            ),
            First("127.0.0.0/33"),
            "frontends[0].source_ranges[0]",
            "prefix length out of range: 0 to 32",
        ),
        case(
            GOOD,
            "source-range-length-not-a-number",
            (
                IDLE,
                "idle_timeout = \"30s\"\nsource_ranges = [\"::1\", \"10.0.0.0/eight\"]",
            ),
            First("10.0.0.0/eight"),
            "frontends[0].source_ranges[1]",
            "prefix length that is not a number",
        ),
        case(
            UDP,
            "udp-source-range-v6-length",
            (
                "idle_timeout = \"4m\"",
                "idle_timeout = \"4m\"\nsource_ranges = [\"2001:db8::/129\"]",
            ),
            First("2001:db8::/129"),
            "frontends[0].source_ranges[0]",
            "0 to 128",
        ),
        case(
            GOOD,
            "source-ranges-empty",
            (IDLE, "source_ranges = []"),
            First("source_ranges"),
            "frontends[0].source_ranges",
            "an empty list would refuse every client",
        ),
        case(
            GOOD,
            "source-range-not-a-string",
            (IDLE, "source_ranges = [24]"),
            First("source_ranges"),
            "source_ranges",
            "expected a string",
        ),
    ]
}

/// Every row.
fn cases() -> Vec<Case> {
    [
        syntax_and_type_errors(),
        out_of_range_values(),
        unsupported_enums(),
        names_and_addresses(),
        hop_model_errors(),
        protocol_mismatches(),
        udp_and_quic_values(),
        source_range_errors(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The 1-based line of `at` in `text`.
fn line_of(text: &str, at: At) -> Option<usize> {
    let offset = match at {
        First(needle) => text.find(needle)?,
        Last(needle) => text.rfind(needle)?,
    };
    Some(text[..offset].matches('\n').count() + 1)
}

/// Writes the case's config into `dir`, runs check on it, and returns what is
/// wrong with the answer (`None` when it is right).
fn verdict(dir: &Path, c: &Case) -> Option<String> {
    let found = c.base.matches(c.from).count();
    if found != 1 {
        return Some(format!("`{}` occurs {found} times in the base", c.from));
    }
    let text = c.base.replacen(c.from, c.to, 1);
    let Some(line) = line_of(&text, c.at) else {
        return Some("the `at` text is not in the mutated config".into());
    };
    let path = dir.join(format!("{}.toml", c.name));
    std::fs::write(&path, &text).expect("write config");
    let (status, stdout, stderr) = run_check(&path);
    let located = format!("{}:{line}:", path.display());
    let field = format!("field `{}`", c.field);
    let problems: Vec<String> = [
        (status.code() == Some(1), "exit status 1".to_owned()),
        (!stderr.contains("panicked"), "no panic".to_owned()),
        (stderr.contains(&located), format!("`{located}`")),
        (stderr.contains(&field), field),
        (stderr.contains(c.says), format!("`{}`", c.says)),
    ]
    .into_iter()
    .filter_map(|(ok, wanted)| (!ok).then_some(wanted))
    .collect();
    (!problems.is_empty()).then(|| {
        format!(
            "wanted {} ({status}); got: {}{}",
            problems.join(", "),
            stdout.trim(),
            stderr.trim()
        )
    })
}

/// Every row at once, so one run lists every row that fails.
#[test]
fn every_malformed_config_is_refused_naming_file_line_and_field() {
    let cases = cases();
    assert!(cases.len() >= 25, "the table has {} rows", cases.len());
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "row names must be unique");
    let dir = tempfile::tempdir().expect("tempdir");
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| verdict(dir.path(), c).map(|why| format!("{}: {why}", c.name)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} malformed configs were not refused as they should be:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Errors about what is missing have no line to name; they still name the
/// file and the field.
#[test]
fn a_config_without_frontends_names_file_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("empty.toml");
    std::fs::write(&path, "workers = 2\n").expect("write config");
    let (status, _, stderr) = run_check(&path);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let want = format!("{}: field `frontends`: at least one", path.display());
    assert!(stderr.contains(&want), "`{want}` missing from: {stderr}");
}

/// Whatever bytes the file holds, check answers with an error, never a panic.
#[test]
fn garbage_is_refused_without_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs: [&[u8]; 5] = [
        b"",
        b"\xff\xfe\x00garbage",
        b"[[frontends]]\n[[frontends]]\n",
        b"[frontends]\nname = \"web\"\n",
        b"workers = 99999999999999999999999\n",
    ];
    for (i, bytes) in inputs.iter().enumerate() {
        let path = dir.path().join(format!("garbage-{i}.toml"));
        std::fs::write(&path, bytes).expect("write config");
        let (status, _, stderr) = run_check(&path);
        assert_eq!(status.code(), Some(1), "input #{i}: {stderr}");
        assert!(!stderr.contains("panicked"), "input #{i}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "input #{i} not named: {stderr}"
        );
    }
}
