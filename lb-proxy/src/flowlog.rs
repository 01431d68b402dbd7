//! The opt-in flow log: one line per flow, written when it closes, the way the
//! seed article's tshark view shows it (client, frontend, node, the source the
//! pod saw, the pod, bytes each way, duration).
//!
//! Workers never block on it: records go through a bounded channel to a writer
//! thread, and a record that does not fit is dropped and counted. Nothing is
//! lost silently: a line counts as written (`lb_flow_log_lines_total`) once
//! the destination took it, and as dropped (`lb_flow_log_dropped_total`) when
//! the queue was full, the writer had stopped, or writing failed. At exit the
//! server calls [`FlowLog::close`], which writes out everything queued.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use prometheus::IntCounter;
use serde_json::json;

use crate::config::{FlowLogConfig, FlowLogFormat};
use crate::target::ZoneHop;

const QUEUE_DEPTH: usize = 16 * 1024;
/// Lines are written in batches of about this many bytes, or once the oldest
/// line has waited `MAX_DELAY`, so the file is never far behind.
const BATCH_BYTES: usize = 64 * 1024;
const MAX_DELAY: Duration = Duration::from_millis(200);

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
    /// The node's and the pod's zones, when both have one.
    pub zones: Option<ZoneHop>,
}

/// Lines written, and lines lost on the way.
#[derive(Clone)]
pub struct FlowLogCounters {
    pub written: IntCounter,
    pub dropped: IntCounter,
}

pub struct FlowLog {
    tx: Sender<FlowRecord>,
    /// Asks the writer to write out what is queued and stop.
    close: Sender<()>,
    /// Disconnected when the writer thread has finished.
    finished: Receiver<()>,
    dropped: IntCounter,
}

impl FlowLog {
    /// Opens the destination and starts the writer thread.
    pub fn start(config: &FlowLogConfig, counters: FlowLogCounters) -> io::Result<Self> {
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
        Self::start_writing(out, config.format, counters)
    }

    /// Starts the writer thread on `out`.
    pub fn start_writing(
        out: Box<dyn Write + Send>,
        format: FlowLogFormat,
        counters: FlowLogCounters,
    ) -> io::Result<Self> {
        let (tx, rx) = channel::bounded::<FlowRecord>(QUEUE_DEPTH);
        let (close, close_rx) = channel::bounded::<()>(1);
        let (finished_tx, finished) = channel::bounded::<()>(0);
        let dropped = counters.dropped.clone();
        std::thread::Builder::new()
            .name("lb-flow-log".into())
            .spawn(move || {
                let mut batch = Batch::new(out, counters);
                write_until_closed(&rx, &close_rx, &mut batch, format);
                // Whatever was queued before the close is written too.
                while let Ok(rec) = rx.try_recv() {
                    batch.push(&rec, format);
                }
                // From here on `log` finds the queue disconnected and counts what it is given as dropped.
                drop(rx);
                batch.write_out();
                drop(finished_tx);
            })?;
        Ok(FlowLog {
            tx,
            close,
            finished,
            dropped,
        })
    }

    /// Queues a record; never blocks.
    pub fn log(&self, record: FlowRecord) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Writes out every record queued so far and stops the writer, waiting
    /// for it at most `timeout` (a destination that blocks, such as a full
    /// pipe on stdout, must not hold the process forever). Records logged
    /// afterwards are counted as dropped.
    pub fn close(&self, timeout: Duration) -> bool {
        let _ = self.close.try_send(());
        matches!(
            self.finished.recv_timeout(timeout),
            Err(channel::RecvTimeoutError::Disconnected)
        )
    }
}

/// Writes records as they come until asked to close (or every sender is gone).
fn write_until_closed(
    rx: &Receiver<FlowRecord>,
    close: &Receiver<()>,
    batch: &mut Batch,
    format: FlowLogFormat,
) {
    loop {
        channel::select! {
            recv(rx) -> rec => match rec {
                Ok(rec) => batch.push(&rec, format),
                Err(_) => return,
            },
            recv(close) -> _ => return,
            default(MAX_DELAY) => batch.write_out(),
        }
    }
}

/// Lines rendered but not yet handed to the destination.
struct Batch {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    lines: u64,
    /// When the oldest line in `buf` was added.
    since: Instant,
    counters: FlowLogCounters,
}

impl Batch {
    fn new(out: Box<dyn Write + Send>, counters: FlowLogCounters) -> Self {
        Batch {
            out,
            buf: Vec::with_capacity(BATCH_BYTES),
            lines: 0,
            since: Instant::now(),
            counters,
        }
    }

    fn push(&mut self, rec: &FlowRecord, format: FlowLogFormat) {
        if self.lines == 0 {
            self.since = Instant::now();
        }
        self.buf.extend_from_slice(render(rec, format).as_bytes());
        self.buf.push(b'\n');
        self.lines += 1;
        if self.buf.len() >= BATCH_BYTES || self.since.elapsed() >= MAX_DELAY {
            self.write_out();
        }
    }

    /// Hands the batch to the destination; its lines count as written when
    /// that succeeds, as dropped when it fails.
    fn write_out(&mut self) {
        if self.lines == 0 {
            return;
        }
        let result = self
            .out
            .write_all(&self.buf)
            .and_then(|()| self.out.flush());
        match result {
            Ok(()) => self.counters.written.inc_by(self.lines),
            Err(e) => {
                tracing::warn!(error = %e, lines = self.lines, "flow log write failed; lines dropped");
                self.counters.dropped.inc_by(self.lines);
            }
        }
        self.buf.clear();
        self.lines = 0;
    }
}

/// Renders a record as a text line or a JSON object.
pub fn render(r: &FlowRecord, format: FlowLogFormat) -> String {
    let at = humantime::format_rfc3339_millis(r.closed_at);
    let (node_zone, endpoint_zone) = match &r.zones {
        Some(z) => (Some(&*z.node_zone), Some(&*z.endpoint_zone)),
        None => (None, None),
    };
    match format {
        FlowLogFormat::Text => format!(
            "{at} {proto} {client} -> {fe} [{frontend}] via {via}: {seen} -> {endpoint}{zones} sent={up} received={down} duration={dur:.3}s {outcome}",
            proto = r.proto,
            client = r.client,
            fe = r.frontend_addr,
            frontend = r.frontend,
            via = r.via,
            seen = r.seen_source,
            endpoint = r.endpoint,
            zones = r.zones.as_ref().map_or(String::new(), |z| format!(
                " zone={}->{}",
                z.node_zone, z.endpoint_zone
            )),
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
            "node_zone": node_zone,
            "endpoint_zone": endpoint_zone,
            "bytes_to_backend": r.bytes_to_backend,
            "bytes_from_backend": r.bytes_from_backend,
            "duration_seconds": r.duration.as_secs_f64(),
            "outcome": r.outcome,
        })
        .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A destination the test can read back, or one that fails every write.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        broken: bool,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.broken {
                return Err(io::Error::other("disk full"));
            }
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn record(port: u16) -> FlowRecord {
        FlowRecord {
            closed_at: SystemTime::UNIX_EPOCH,
            frontend: Arc::from("web"),
            client: SocketAddr::from(([127, 0, 0, 1], port)),
            frontend_addr: "127.0.0.1:8080".parse().unwrap(),
            proto: lb_core::Protocol::Tcp,
            via: Arc::from("a"),
            seen_source: "127.0.0.1".parse().unwrap(),
            endpoint: "127.0.0.1:9001".parse().unwrap(),
            bytes_to_backend: 1,
            bytes_from_backend: 2,
            duration: Duration::ZERO,
            outcome: "closed",
            zones: None,
        }
    }

    fn counters() -> FlowLogCounters {
        FlowLogCounters {
            written: IntCounter::new("w", "w").unwrap(),
            dropped: IntCounter::new("d", "d").unwrap(),
        }
    }

    /// Everything queued before `close` is in the destination when it
    /// returns, counted as written; a record after it is counted as dropped.
    #[test]
    fn close_writes_out_every_queued_record_and_counts_the_rest() {
        const N: u16 = 1000;
        let sink = Sink::default();
        let c = counters();
        let log =
            FlowLog::start_writing(Box::new(sink.clone()), FlowLogFormat::Text, c.clone()).unwrap();
        for port in 1..=N {
            log.log(record(port));
        }
        assert!(log.close(Duration::from_secs(10)), "the writer finished");
        let text = String::from_utf8(sink.bytes.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), N as usize);
        assert!(text.ends_with("closed\n"));
        assert_eq!((c.written.get(), c.dropped.get()), (u64::from(N), 0));
        log.log(record(1));
        assert_eq!((c.written.get(), c.dropped.get()), (u64::from(N), 1));
    }

    /// Lines the destination refused are dropped, not written.
    #[test]
    fn failed_writes_count_as_dropped() {
        let sink = Sink {
            broken: true,
            ..Sink::default()
        };
        let c = counters();
        let log = FlowLog::start_writing(Box::new(sink), FlowLogFormat::Json, c.clone()).unwrap();
        for port in 1..=10 {
            log.log(record(port));
        }
        assert!(log.close(Duration::from_secs(10)));
        assert_eq!((c.written.get(), c.dropped.get()), (0, 10));
    }

    /// Both zones are in the text line and the JSON object; a flow without
    /// zones says nothing of them in text and null in JSON.
    #[test]
    fn records_carry_both_zones() {
        let mut r = record(1);
        assert!(!render(&r, FlowLogFormat::Text).contains("zone="));
        let json: serde_json::Value =
            serde_json::from_str(&render(&r, FlowLogFormat::Json)).unwrap();
        assert!(json["node_zone"].is_null() && json["endpoint_zone"].is_null());
        r.zones = Some(ZoneHop::new(
            "1".into(),
            "2".into(),
            Duration::from_millis(2),
        ));
        let text = render(&r, FlowLogFormat::Text);
        assert!(text.contains("127.0.0.1:9001 zone=1->2 sent=1"), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&render(&r, FlowLogFormat::Json)).unwrap();
        assert_eq!(
            (json["node_zone"].as_str(), json["endpoint_zone"].as_str()),
            (Some("1"), Some("2"))
        );
    }
}
