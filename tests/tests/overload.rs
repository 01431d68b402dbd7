//! Overload and slow-peer cases end to end (issue 12):
//! - a backend that stops reading while a client sends 1 GiB, and a client
//!   that stops reading a 1 GiB download: while the reader is paused the
//!   sender blocks (the balancer stops reading too, rather than buffering), the
//!   balancer's resident memory stays within [`RSS_GROWTH_BOUND`] of where it
//!   started, and once the reader reads again the transfer completes
//!   byte-exact;
//! - a sender blocked behind a reader that never reads: no bytes move, so the
//!   idle timeout ends the flow although the balancer still holds bytes for
//!   the reader;
//! - 5,000 clients that connect and never send: the balancer closes every one
//!   at the idle timeout, gives back every fd, and while they are open other
//!   clients' request latency stays close to its unloaded figure.
//!
//! The tests here take turns ([`serial`]): each measures the balancer (memory,
//! latency), and another test's gigabyte moving at the same time on the same
//! two cores would be what it measured.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::{
    backend_toml, connect, http_get, one_frontend_config, open_fd_count, peak_rss_bytes,
    raise_fd_limit, rss_bytes, wait_until, web_proxy, Backend, Gate, Proxy, SeededStream,
    IO_TIMEOUT, NO_PROBES, READY_TIMEOUT,
};
use sha2::Digest;

/// Bytes streamed one way in each slow-peer test (the 1 GiB).
const TRANSFER: u64 = 1 << 30;
/// Where the slow reader stops reading.
const PAUSE_AT: u64 = 64 << 20;
/// The test's own read and write size (at most [`PAD_LEN`]).
const CHUNK: usize = 256 * 1024;
/// How much the balancer's resident memory may grow while a gigabyte passes
/// through one flow whose reader stalls. What it may legitimately hold: per
/// direction one pending remainder of at most one read (`SCRATCH_LEN`, 64 KiB,
/// lb-proxy/src/tcp/copy.rs), the per-worker scratch buffer (64 KiB each) and
/// the flow's task; splice(2)'s pipe and the socket buffers are kernel memory,
/// not resident set. That is well under 1 MiB (measured: +0 to +64 KiB); 16 MiB
/// leaves room for the allocator and a debug build. A balancer that read on
/// for a reader that does not read would hold everything sent past the kernel's
/// buffers: with copy.rs changed to do so, the upload case measured +955 MiB.
const RSS_GROWTH_BOUND: u64 = 16 << 20;
/// Polls ([`lb_tests::POLL_INTERVAL`] apart) in a row without the sender's count
/// moving, with the reader paused, that count as "the sender is blocked"; each
/// such poll samples the balancer's resident memory.
const STALLED_POLLS: usize = 30;
/// Seed of the streamed bytes.
const SEED: u64 = 0x5107_7ead;
/// Failure bound for the whole transfer (a debug build on a busy 2-core machine).
const TRANSFER_BOUND: Duration = Duration::from_secs(120);

/// Makes the tests in this file take turns (see the module doc). A test that
/// panicked leaves nothing behind that the next one depends on, so a poisoned
/// lock is taken as it is.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Slow peers.

/// Opens the gate when dropped, so a failing main thread never leaves the
/// reader waiting (and the test's thread scope never ends).
struct OpenOnDrop<'a>(&'a Gate);

impl Drop for OpenOnDrop<'_> {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Progress both ends of a transfer publish for the main thread to watch.
#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    received: AtomicU64,
    /// The reader has stopped at [`PAUSE_AT`] and waits at the gate.
    paused: AtomicBool,
    gate: Gate,
}

/// Length of [`BulkStream`]'s pad.
const PAD_LEN: usize = 1 << 20;

/// A seeded byte stream cheap enough to send a gigabyte of from a debug build
/// (where [`SeededStream`] makes 1 GiB in several seconds): a 1 MiB pad drawn
/// from [`SeededStream`] once, each chunk of it read from an offset the same
/// generator draws, wrapping. Chunks differ from one another, so a lost,
/// repeated or reordered chunk changes the receiver's SHA-256 as surely as a
/// changed byte does.
struct BulkStream {
    pad: Vec<u8>,
    offsets: SeededStream,
}

impl BulkStream {
    fn new(seed: u64) -> Self {
        let mut offsets = SeededStream::new(seed);
        let mut pad = vec![0u8; PAD_LEN];
        offsets.fill(&mut pad);
        BulkStream { pad, offsets }
    }

    /// Fills `buf` (at most [`PAD_LEN`] bytes) with the next chunk.
    fn fill(&mut self, buf: &mut [u8]) {
        assert!(buf.len() <= PAD_LEN, "a chunk is at most the pad");
        let start = usize::try_from(self.offsets.next_u64() % PAD_LEN as u64).expect("< PAD_LEN");
        let first = (PAD_LEN - start).min(buf.len());
        let (head, tail) = buf.split_at_mut(first);
        head.copy_from_slice(&self.pad[start..start + first]);
        tail.copy_from_slice(&self.pad[..tail.len()]);
    }
}

/// Writes `len` bytes of the [`BulkStream`] seeded with `seed` to `w`, counting
/// each chunk in `sent` once written; closes the write side; returns their SHA-256.
fn send_counted(mut w: TcpStream, seed: u64, len: u64, sent: &AtomicU64) -> io::Result<[u8; 32]> {
    let mut gen = BulkStream::new(seed);
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        gen.fill(&mut buf[..n]);
        sha.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        sent.fetch_add(n as u64, Ordering::SeqCst);
        left -= n as u64;
    }
    w.shutdown(std::net::Shutdown::Write)?;
    Ok(sha.finalize().into())
}

/// Reads `r` to EOF, stopping once at [`PAUSE_AT`] until the gate opens;
/// returns (bytes read, their SHA-256).
fn receive_with_pause(mut r: TcpStream, progress: &Progress) -> io::Result<(u64, [u8; 32])> {
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        // Never read past the pause point before pausing.
        let room = if total < PAUSE_AT {
            usize::try_from(PAUSE_AT - total).map_or(CHUNK, |l| l.min(CHUNK))
        } else {
            CHUNK
        };
        let n = match r.read(&mut buf[..room]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sha.update(&buf[..n]);
        total += n as u64;
        progress.received.store(total, Ordering::SeqCst);
        if total == PAUSE_AT {
            progress.paused.store(true, Ordering::SeqCst);
            progress.gate.wait();
        }
    }
    Ok((total, sha.finalize().into()))
}

/// The one flow of a slow-peer test: both of its ends, in this process.
struct Flow {
    client: TcpStream,
    backend: TcpStream,
}

/// Connects a client through `proxy` and accepts the balancer's connection on
/// `listener` (the only backend, with no probes, so it is that flow's).
fn open_flow(proxy: &Proxy, listener: &TcpListener) -> Flow {
    let client = connect(proxy.frontend("web")).expect("connect to the frontend");
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let backend = wait_until(
        "the balancer to connect to the backend",
        READY_TIMEOUT,
        || listener.accept().ok().map(|(s, _)| s),
    );
    backend
        .set_nonblocking(false)
        .expect("blocking backend socket");
    let backend = lb_bench::client::with_timeouts(backend).expect("backend socket timeouts");
    Flow { client, backend }
}

/// What the main thread saw while the sender was blocked.
struct Blocked {
    /// Bytes the sender had written when it blocked.
    sent: u64,
    /// The balancer's resident set at each poll while blocked.
    rss: Vec<u64>,
}

/// Waits until the reader has paused and the sender's count has stayed put for
/// [`STALLED_POLLS`] polls in a row, sampling the balancer's RSS at each of them.
fn wait_for_blocked_sender(progress: &Progress, pid: u32) -> Blocked {
    let mut last = None;
    let mut rss = Vec::new();
    wait_until(
        "the sender to block behind the paused reader",
        TRANSFER_BOUND,
        || {
            let sent = progress.sent.load(Ordering::SeqCst);
            if !progress.paused.load(Ordering::SeqCst) || last != Some(sent) {
                last = Some(sent);
                rss.clear();
                return None;
            }
            rss.push(rss_bytes(pid));
            (rss.len() >= STALLED_POLLS).then(|| Blocked {
                sent,
                rss: std::mem::take(&mut rss),
            })
        },
    )
}

/// The most the kernel can hold of a stalled one-way stream between the
/// sender's `write` and the reader's `read`: the sender's send buffer, the
/// balancer's receive and send buffers, the reader's receive buffer (each at
/// most the `tcp_wmem`/`tcp_rmem` maximum), splice(2)'s 1 MiB pipe, and one
/// chunk of the sender's in its `write`.
fn kernel_buffer_bound() -> u64 {
    let max_of = |path: &str| -> u64 {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{path}: `{text}`"))
    };
    let rmem = max_of("/proc/sys/net/ipv4/tcp_rmem");
    let wmem = max_of("/proc/sys/net/ipv4/tcp_wmem");
    2 * (rmem + wmem) + (1 << 20) + CHUNK as u64
}

/// Which end of the flow stops reading.
#[derive(Clone, Copy, Debug)]
enum SlowReader {
    /// The backend stops reading an upload.
    Backend,
    /// The client stops reading a download.
    Client,
}

impl SlowReader {
    /// The copy engine the balancer runs for this case. Both engines are
    /// covered without moving a second gigabyte per case: the upload takes the
    /// userspace copy, the one that keeps a remainder in the balancer's own
    /// memory; the download takes the default (`auto`), which splices bulk
    /// runs through a pipe. Both directions share one copy loop (`Direction`
    /// in copy.rs), so the engine, not the direction, is what varies.
    fn copy_mode(self) -> &'static str {
        match self {
            SlowReader::Backend => "userspace",
            SlowReader::Client => "auto",
        }
    }
}

/// What one slow-peer transfer came to.
struct Transfer {
    /// SHA-256 of what the sender sent, or why it stopped.
    sent: io::Result<[u8; 32]>,
    /// Bytes received and their SHA-256, or why the reader stopped.
    received: io::Result<(u64, [u8; 32])>,
    blocked: Blocked,
    took: Duration,
}

/// Streams [`TRANSFER`] bytes from `sender` to `reader`, which pauses at
/// [`PAUSE_AT`] until the sender has blocked (sampling the RSS of `pid`, the
/// balancer, meanwhile), then reads to the end.
fn stream_past_a_pause(sender: TcpStream, reader: TcpStream, pid: u32) -> Transfer {
    let progress = Progress::default();
    let started = Instant::now();
    thread::scope(|scope| {
        let _unblock = OpenOnDrop(&progress.gate);
        let tx = scope.spawn(|| send_counted(sender, SEED, TRANSFER, &progress.sent));
        let rx = scope.spawn(|| receive_with_pause(reader, &progress));
        let blocked = wait_for_blocked_sender(&progress, pid);
        progress.gate.open();
        Transfer {
            sent: tx.join().expect("sender thread"),
            received: rx.join().expect("reader thread"),
            blocked,
            took: started.elapsed(),
        }
    })
}

/// Streams through the balancer towards `slow`, which stops reading at
/// [`PAUSE_AT`] until the sender has blocked; asserts a byte-exact end, the
/// memory bound, and the kernel-buffer bound on what was in flight.
fn slow_reader_bounds_memory_and_resumes(slow: SlowReader) {
    let _turn = serial();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
    let backend_addr = listener.local_addr().expect("backend address");
    let settings = format!("copy = \"{}\"\n{NO_PROBES}", slow.copy_mode());
    let proxy = Proxy::run(&one_frontend_config(
        "web",
        &settings,
        &[backend_toml("slow", backend_addr)],
    ));
    let pid = proxy.pid();
    let Flow { client, backend } = open_flow(&proxy, &listener);
    let (sender, reader) = match slow {
        SlowReader::Backend => (client, backend),
        SlowReader::Client => (backend, client),
    };
    let baseline = rss_bytes(pid);
    let transfer = stream_past_a_pause(sender, reader, pid);
    let peak = peak_rss_bytes(pid);

    let sent = (transfer.sent.as_ref())
        .unwrap_or_else(|e| panic!("{slow:?} test: the sender failed: {e}"));
    let (n, hash) = (transfer.received.as_ref())
        .unwrap_or_else(|e| panic!("{slow:?} test: the reader failed: {e}"));
    assert_eq!(*n, TRANSFER, "{slow:?} test: bytes received");
    assert_eq!(hash, sent, "{slow:?} test: the bytes differ");
    let counted = match slow {
        SlowReader::Backend => "lb_backend_sent_bytes_total",
        SlowReader::Client => "lb_backend_received_bytes_total",
    };
    assert_eq!(
        proxy.metric(counted, &[("frontend", "web"), ("backend", "slow")]),
        Some(TRANSFER as f64),
        "{counted}"
    );
    assert_bounds(slow, &transfer, baseline, peak);
}

/// Reports the transfer's figures, then asserts that the balancer's RSS (while
/// the sender was blocked, and at its peak) stayed within [`RSS_GROWTH_BOUND`]
/// of `baseline`, and that no more was in flight than the kernel's buffers hold.
fn assert_bounds(slow: SlowReader, transfer: &Transfer, baseline: u64, peak: u64) {
    let blocked = &transfer.blocked;
    let in_flight = blocked.sent - PAUSE_AT;
    let kernel_bound = kernel_buffer_bound();
    let blocked_max = blocked.rss.iter().copied().max().unwrap_or(0);
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let kib = |b: u64| b as f64 / 1024.0;
    eprintln!(
        "{slow:?} stops reading (copy = {}): 1 GiB in {:.1?} ({:.0} MiB/s); the sender blocked \
         with {:.1} MiB in flight (kernel buffers allow {:.1} MiB); balancer RSS {:.1} MiB at the \
         start, +{:.0} KiB at most over {} samples while blocked, +{:.0} KiB at peak (VmHWM)",
        slow.copy_mode(),
        transfer.took,
        mib(TRANSFER) / transfer.took.as_secs_f64(),
        mib(in_flight),
        mib(kernel_bound),
        mib(baseline),
        kib(blocked_max.saturating_sub(baseline)),
        blocked.rss.len(),
        kib(peak.saturating_sub(baseline)),
    );
    for (what, rss) in [
        ("while the sender was blocked", blocked_max),
        ("at peak", peak),
    ] {
        assert!(
            rss.saturating_sub(baseline) < RSS_GROWTH_BOUND,
            "{slow:?} test: balancer RSS {what} was {rss} bytes, {} over its {baseline} at the \
             start (bound {RSS_GROWTH_BOUND})",
            rss.saturating_sub(baseline)
        );
    }
    assert!(
        in_flight <= kernel_bound,
        "{slow:?} test: {in_flight} bytes were in flight when the sender blocked, more than \
         the kernel's buffers hold ({kernel_bound}): the balancer buffered them"
    );
}

#[test]
fn backend_that_stops_reading_bounds_memory_and_resumes() {
    slow_reader_bounds_memory_and_resumes(SlowReader::Backend);
}

#[test]
fn client_that_stops_reading_bounds_memory_and_resumes() {
    slow_reader_bounds_memory_and_resumes(SlowReader::Client);
}

/// The idle timeout of [`a_flow_stalled_by_a_reader_that_never_reads_ends_at_the_idle_timeout`].
const STALLED_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// No bytes move while a sender is blocked behind a reader that never reads,
/// so the idle timeout must end the flow even though the balancer still holds
/// bytes for that reader (and is waiting to write them, not to read).
#[test]
fn a_flow_stalled_by_a_reader_that_never_reads_ends_at_the_idle_timeout() {
    let _turn = serial();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
    let settings = format!(
        "idle_timeout = \"{}s\"\n{NO_PROBES}",
        STALLED_IDLE_TIMEOUT.as_secs()
    );
    let proxy = Proxy::run(&one_frontend_config(
        "web",
        &settings,
        &[backend_toml(
            "slow",
            listener.local_addr().expect("address"),
        )],
    ));
    let Flow { client, backend } = open_flow(&proxy, &listener);
    let labels = [("frontend", "web"), ("backend", "slow")];

    // The backend never reads: it is "paused" from the start.
    let progress = Progress::default();
    progress.paused.store(true, Ordering::SeqCst);
    let (sent, stalled_for) = thread::scope(|scope| {
        let tx = scope.spawn(|| send_counted(client, SEED, TRANSFER, &progress.sent));
        wait_for_blocked_sender(&progress, proxy.pid());
        let stalled = Instant::now();
        proxy.wait_metric(
            "lb_backend_idle_timeouts_total",
            &labels,
            STALLED_IDLE_TIMEOUT + CLOSE_MARGIN,
            |v| v == 1.0,
        );
        (tx.join().expect("sender thread"), stalled.elapsed())
    });
    // Closed with the sender's bytes unread on both sides, so the kernel resets.
    match sent {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) => {}
        other => panic!("the blocked sender should see its flow reset, got {other:?}"),
    }
    proxy.wait_metric("lb_frontend_active_connections", &[], IO_TIMEOUT, |v| {
        v == 0.0
    });
    // The backend side was closed too: past what was queued for it, EOF or a reset.
    let mut backend = backend;
    match io::copy(&mut backend, &mut io::sink()) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the backend's side of the stalled flow was not closed: {e}"),
    }
    eprintln!(
        "a sender blocked behind a reader that never reads: the flow ended by the idle timeout \
         ({STALLED_IDLE_TIMEOUT:?}) {stalled_for:?} after the sender was seen blocked"
    );
}

// ---------------------------------------------------------------------------
// Connect and never send.

/// Clients that connect and never send (the 5,000).
const IDLE_CLIENTS: usize = 5_000;
/// The frontend's idle timeout in this test: long enough that the latency
/// round finishes before the first idle client is closed, short enough for CI.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How late after the idle timeout the last idle client may be closed.
const CLOSE_MARGIN: Duration = Duration::from_secs(5);
/// Requests, each on a new connection, per latency round.
const LATENCY_REQUESTS: usize = 200;
/// How far the fd count may end from where it started (a scrape in flight).
const FD_SLACK: usize = 4;
/// The p99 latency beside the idle clients must stay under this many times the
/// unloaded p99, plus [`LATENCY_SLACK`]: generous, for a debug build on 2 busy cores.
const LATENCY_FACTOR: u32 = 5;
const LATENCY_SLACK: Duration = Duration::from_millis(20);

/// Latency percentiles of one round.
#[derive(Clone, Copy, Debug)]
struct Latency {
    p50: Duration,
    p99: Duration,
}

/// [`LATENCY_REQUESTS`] sequential `GET /`s, each on a new connection through
/// `frontend`, each answered 200.
fn latency_round(frontend: SocketAddr) -> Latency {
    let mut took: Vec<Duration> = (0..LATENCY_REQUESTS)
        .map(|i| {
            let t = Instant::now();
            let (status, head, _) =
                http_get(frontend, "/").unwrap_or_else(|e| panic!("request #{i}: {e}"));
            assert_eq!(status, 200, "request #{i}: {head}");
            t.elapsed()
        })
        .collect();
    took.sort();
    Latency {
        p50: took[took.len() / 2],
        p99: took[took.len() * 99 / 100],
    }
}

/// Opens [`IDLE_CLIENTS`] connections to `frontend` that never send.
fn open_idle_clients(frontend: SocketAddr) -> Vec<TcpStream> {
    (0..IDLE_CLIENTS)
        .map(|i| connect(frontend).unwrap_or_else(|e| panic!("idle client #{i}: connect: {e}")))
        .collect()
}

/// Asserts every idle client has been closed by the balancer: a read returns
/// EOF (FIN) or a reset at once, never data and never a timeout.
fn assert_all_closed(clients: &mut [TcpStream]) {
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("read timeout");
        let mut byte = [0u8; 1];
        match c.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Ok(_) => panic!("idle client #{i} was sent data"),
            Err(e) => panic!("idle client #{i} was not closed: {e}"),
        }
    }
}

/// Backend `web-1` behind frontend `web` with [`IDLE_TIMEOUT`], after raising
/// the fd limit (inherited by both) to what [`IDLE_CLIENTS`] need.
fn idle_timeout_proxy() -> (Backend, Proxy) {
    // Each idle client costs this process 1 fd, the backend 1 and the balancer 2.
    let fd_limit = raise_fd_limit();
    assert!(
        fd_limit >= 2 * IDLE_CLIENTS as u64 + 1_000,
        "RLIMIT_NOFILE's hard limit is {fd_limit}; {IDLE_CLIENTS} proxied connections need \
         {} fds in the balancer",
        2 * IDLE_CLIENTS
    );
    let web = Backend::http("web-1");
    let settings = format!(
        "idle_timeout = \"{}s\"\nbacklog = 4096\n{NO_PROBES}",
        IDLE_TIMEOUT.as_secs()
    );
    let proxy = web_proxy(&settings, &[&web]);
    (web, proxy)
}

/// Asserts the latency beside the idle clients is within [`LATENCY_FACTOR`]
/// times the unloaded p99 plus [`LATENCY_SLACK`].
fn assert_latency_kept(unloaded: Latency, loaded: Latency) {
    let bound = unloaded.p99 * LATENCY_FACTOR + LATENCY_SLACK;
    assert!(
        loaded.p99 < bound,
        "p99 latency beside {IDLE_CLIENTS} idle clients was {:?}, over {LATENCY_FACTOR}x the \
         unloaded {:?} + {LATENCY_SLACK:?}",
        loaded.p99,
        unloaded.p99
    );
}

#[test]
fn connect_and_never_send_clients_are_bounded_by_the_idle_timeout() {
    let _turn = serial();
    let (_web, proxy) = idle_timeout_proxy();
    let (pid, frontend) = (proxy.pid(), proxy.frontend("web"));
    let labels = [("frontend", "web"), ("backend", "web-1")];

    // The first round warms the path up (the backend's first connections, the
    // workers' first flows); the second is the unloaded figure.
    latency_round(frontend);
    let unloaded = latency_round(frontend);
    proxy.wait_metric("lb_frontend_active_connections", &[], IO_TIMEOUT, |v| {
        v == 0.0
    });
    let fds_before = open_fd_count(pid);

    let opening = Instant::now();
    let mut idle = open_idle_clients(frontend);
    let opened = opening.elapsed();
    proxy.wait_metric("lb_backend_active_connections", &labels, IO_TIMEOUT, |v| {
        v >= IDLE_CLIENTS as f64
    });
    let loaded = latency_round(frontend);
    let measured = opening.elapsed();
    let fds_open = open_fd_count(pid);
    assert_eq!(
        proxy.metric("lb_backend_idle_timeouts_total", &labels),
        Some(0.0),
        "idle clients were closed before the latency round ended ({measured:?} after the \
         first connected): raise IDLE_TIMEOUT"
    );
    eprintln!(
        "{IDLE_CLIENTS} idle clients opened in {opened:?}; balancer fds {fds_before} -> \
         {fds_open}; {LATENCY_REQUESTS} requests on new connections: p50 {:?} / p99 {:?} \
         unloaded, p50 {:?} / p99 {:?} beside the idle clients",
        unloaded.p50, unloaded.p99, loaded.p50, loaded.p99
    );
    assert_latency_kept(unloaded, loaded);

    // Every idle client is closed by the balancer's idle timeout, in time.
    let deadline = (opened + IDLE_TIMEOUT + CLOSE_MARGIN).saturating_sub(opening.elapsed());
    proxy.wait_metric("lb_backend_idle_timeouts_total", &labels, deadline, |v| {
        v == IDLE_CLIENTS as f64
    });
    let closed = opening.elapsed();
    proxy.wait_metric("lb_frontend_active_connections", &[], IO_TIMEOUT, |v| {
        v == 0.0
    });
    assert_all_closed(&mut idle);
    let fds_after = wait_until(
        "the balancer's fds to return to their count",
        IO_TIMEOUT,
        || {
            let n = open_fd_count(pid);
            (n.abs_diff(fds_before) <= FD_SLACK).then_some(n)
        },
    );
    eprintln!(
        "all {IDLE_CLIENTS} closed by the idle timeout ({IDLE_TIMEOUT:?}) {closed:?} after the \
         first connected; balancer fds back to {fds_after}"
    );
}
