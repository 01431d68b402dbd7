//! The opt-in flow log: one line per flow, written when it closes, the way the
//! seed article's tshark view shows it (client, frontend, node, the source the
//! pod saw, the pod, bytes each way, duration).
//!
//! Workers never block on it: records go through a bounded channel to a writer
//! thread, and a record that does not fit is dropped and counted.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam::channel::{self, RecvTimeoutError, Sender, TrySendError};
use prometheus::IntCounter;
use serde_json::json;

use crate::config::{FlowLogConfig, FlowLogFormat};

const QUEUE_DEPTH: usize = 16 * 1024;

/// One closed flow.
#[derive(Debug, Clone)]
pub struct FlowRecord {
    pub closed_at: SystemTime,
    pub frontend: Arc<str>,
    pub client: SocketAddr,
    pub frontend_addr: SocketAddr,
    pub proto: lb_core::Protocol,
    /// The backend: the configured one, or the node with the hop model.
    pub via: Arc<str>,
    /// The address the backend or pod saw as the source.
    pub seen_source: IpAddr,
    pub endpoint: SocketAddr,
    pub bytes_to_backend: u64,
    pub bytes_from_backend: u64,
    pub duration: Duration,
    pub outcome: &'static str,
}

pub struct FlowLog {
    tx: Sender<FlowRecord>,
    written: IntCounter,
    dropped: IntCounter,
}

impl FlowLog {
    /// Opens the destination and starts the writer thread.
    pub fn start(
        config: &FlowLogConfig,
        written: IntCounter,
        dropped: IntCounter,
    ) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = if config.path.as_os_str() == "-" {
            Box::new(io::stdout())
        } else {
            Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&config.path)?,
            )
        };
        let (tx, rx) = channel::bounded::<FlowRecord>(QUEUE_DEPTH);
        let format = config.format;
        std::thread::Builder::new()
            .name("lb-flow-log".into())
            .spawn(move || {
                let mut out = BufWriter::new(out);
                loop {
                    match rx.recv_timeout(Duration::from_millis(200)) {
                        Ok(rec) => {
                            let _ = writeln!(out, "{}", render(&rec, format));
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            let _ = out.flush();
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                let _ = out.flush();
            })?;
        Ok(FlowLog {
            tx,
            written,
            dropped,
        })
    }

    /// Queues a record; never blocks.
    pub fn log(&self, record: FlowRecord) {
        match self.tx.try_send(record) {
            Ok(()) => self.written.inc(),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Renders a record as a text line or a JSON object.
pub fn render(r: &FlowRecord, format: FlowLogFormat) -> String {
    let at = humantime::format_rfc3339_millis(r.closed_at);
    match format {
        FlowLogFormat::Text => format!(
            "{at} {proto} {client} -> {fe} [{frontend}] via {via}: {seen} -> {endpoint} sent={up} received={down} duration={dur:.3}s {outcome}",
            proto = r.proto,
            client = r.client,
            fe = r.frontend_addr,
            frontend = r.frontend,
            via = r.via,
            seen = r.seen_source,
            endpoint = r.endpoint,
            up = r.bytes_to_backend,
            down = r.bytes_from_backend,
            dur = r.duration.as_secs_f64(),
            outcome = r.outcome,
        ),
        FlowLogFormat::Json => json!({
            "time": at.to_string(),
            "frontend": &*r.frontend,
            "proto": r.proto.as_str(),
            "client": r.client.to_string(),
            "frontend_addr": r.frontend_addr.to_string(),
            "via": &*r.via,
            "seen_source": r.seen_source.to_string(),
            "endpoint": r.endpoint.to_string(),
            "bytes_to_backend": r.bytes_to_backend,
            "bytes_from_backend": r.bytes_from_backend,
            "duration_seconds": r.duration.as_secs_f64(),
            "outcome": r.outcome,
        })
        .to_string(),
    }
}
