//! `lb-proxy demo`: three built-in HTTP backends standing for three AKS nodes,
//! and a balancer in front of them, ready for `hey`. With `--quic`, the nodes
//! are QUIC greeters whose connection IDs carry their QUIC-LB server IDs
//! ([`quic`]), behind a `protocol = "quic"` frontend.

pub mod quic;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::{self, Config};

pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub nodes: usize,
    /// First backend port; 0 picks free ports.
    pub backend_base_port: u16,
    pub workers: Option<usize>,
    pub distribution: lb_core::DistributionMode,
    /// QUIC nodes and a QUIC-LB frontend instead of HTTP.
    pub quic: bool,
}

/// The `i`th demo node's name and port: consecutive ports from `base_port`,
/// or 0 (any free port) when `base_port` is 0. Shared by the HTTP and QUIC demos.
pub fn node_slot(i: usize, base_port: u16) -> (String, u16) {
    let port = if base_port == 0 {
        0
    } else {
        base_port + i as u16
    };
    (format!("node-{}", i + 1), port)
}

/// Starts the demo backends on their own thread and returns their addresses.
pub fn start_backends(count: usize, base_port: u16) -> anyhow::Result<Vec<(String, SocketAddr)>> {
    let mut bound = Vec::new();
    for i in 0..count {
        let (name, port) = node_slot(i, base_port);
        let l = std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("cannot bind demo backend {name} on 127.0.0.1:{port}"))?;
        l.set_nonblocking(true)?;
        bound.push((name, l));
    }
    let addrs = bound
        .iter()
        .map(|(n, l)| Ok((n.clone(), l.local_addr()?)))
        .collect::<std::io::Result<Vec<_>>>()?;
    std::thread::Builder::new()
        .name("lb-demo-backends".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("demo runtime");
            rt.block_on(async move {
                let mut tasks = tokio::task::JoinSet::new();
                for (name, l) in bound {
                    let l = TcpListener::from_std(l).expect("register demo listener");
                    tasks.spawn(serve_node(Arc::from(name.as_str()), l));
                }
                while tasks.join_next().await.is_some() {}
            });
        })?;
    Ok(addrs)
}

async fn serve_node(name: Arc<str>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let name = Arc::clone(&name);
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let name = Arc::clone(&name);
                async move {
                    let resp = Response::builder()
                        .header("X-Node", &*name)
                        .header(hyper::header::CONTENT_TYPE, "text/plain")
                        .body(Full::new(Bytes::from(format!("{name}\n"))))
                        .expect("static response");
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The demo's balancer config: one frontend over the demo nodes, with HTTP
/// probes (the QUIC nodes' health listeners answer HTTP too).
pub fn config(
    options: &DemoOptions,
    backends: &[(String, SocketAddr)],
) -> Result<Config, config::ConfigError> {
    config::parse("<demo>", &config_text(options, backends, &[]))
}

/// The `--quic` demo's config: a QUIC-LB frontend over the greeters.
pub fn quic_config(
    options: &DemoOptions,
    nodes: &[quic::QuicNode],
) -> Result<Config, config::ConfigError> {
    let backends: Vec<_> = nodes.iter().map(|n| (n.name.clone(), n.addr)).collect();
    let ids: Vec<_> = nodes.iter().map(|n| n.server_id).collect();
    config::parse("<demo>", &config_text(options, &backends, &ids))
}

/// The config's text; `server_ids` (one per backend) makes it a QUIC frontend.
fn config_text(
    options: &DemoOptions,
    backends: &[(String, SocketAddr)],
    server_ids: &[lb_core::ServerId],
) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    if let Some(w) = options.workers {
        let _ = writeln!(text, "workers = {w}");
    }
    let _ = writeln!(
        text,
        "drain_timeout = \"5s\"\n[admin]\nlisten = \"{}\"",
        options.admin
    );
    // Named only for QUIC: TCP is the default.
    let protocol = if server_ids.is_empty() {
        ""
    } else {
        "protocol = \"quic\"\n"
    };
    let _ = writeln!(
        text,
        "[[frontends]]\nname = \"demo\"\nlisten = \"{}\"\n{protocol}distribution = \"{}\"\n[frontends.health]\nkind = \"http\"\npath = \"/\"\ninterval = \"5s\"",
        options.listen,
        options.distribution.azure_name()
    );
    if !server_ids.is_empty() {
        let lb = quic::lb_config();
        let _ = writeln!(
            text,
            "[frontends.quic]\nconfig_id = {}\nserver_id_length = {}\nnonce_length = {}",
            lb.config_id(),
            lb.server_id_len(),
            lb.nonce_len()
        );
    }
    for (i, (name, addr)) in backends.iter().enumerate() {
        let _ = writeln!(
            text,
            "[[frontends.backends]]\nname = \"{name}\"\naddress = \"{addr}\""
        );
        if let Some(id) = server_ids.get(i) {
            let _ = writeln!(text, "server_id = \"{id}\"");
        }
    }
    text
}
