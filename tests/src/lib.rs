//! The end-to-end test harness for `lb-proxy`: real processes, real sockets,
//! loopback addresses (127.0.0.0/8) only.
//!
//! It owns:
//! - [`Proxy`]: an `lb-proxy run --config` or `lb-proxy demo` child process in its
//!   own temporary directory, started with `--ready-file` and waited for (then for
//!   the admin endpoint to answer); its stdout and stderr go to files there so
//!   tests can assert on log lines ([`Proxy::run_with_flow_log`] adds a JSON
//!   flow log there). It is killed when dropped.
//! - [`Backend`]: an `lb-bench serve` child process (echo or HTTP: lb-bench's
//!   one backend, the one the benchmarks use) that tests can SIGKILL and
//!   restart on the same address. Also killed when dropped.
//! - The admin client: `/metrics` fetched with lb-bench's blocking client
//!   ([`http_get`], re-exported with the rest of `lb_bench::client`), parsed
//!   by [`Metrics`]; `/explain` as JSON.
//! - Waiting: [`wait_until`] polls an observable condition (a metric, a port
//!   refusing, a file) every 10 ms with a deadline. Tests never sleep in place of
//!   synchronisation.
//! - Socket helpers: connecting from a chosen source address, accepting with
//!   timeouts ([`accept_one`]), a port that is reserved but refuses connections
//!   ([`RefusingPort`]), and a seeded pseudo-random byte stream
//!   ([`SeededStream`]) for byte-exact transfers, the whole both-ways check of
//!   which is [`assert_exact_both_ways`].
//! - Idle timeouts: two frontends that end idle flows with RST and with FIN
//!   ([`idle_pair_config`]), and how their clients saw it ([`assert_idle_ends`]).
//! - Process resources: a process's resident memory ([`rss_bytes`],
//!   [`peak_rss_bytes`]) and open fds ([`open_fd_count`]) from `/proc`, and
//!   [`raise_fd_limit`] for tests that open thousands of connections.
//! - `hey`: run to the end ([`run_hey`]) or in the background while a test
//!   acts on the balancer ([`spawn_hey`]); its status codes ([`hey_status_counts`],
//!   [`assert_hey_all_ok`]).
//! - [`netns`]: the scale-out lab (network namespaces, BIRD, ExaBGP) of issue 15.
//! - [`udp`]: UDP clients, the windowed echo load, a UDP pod that reports the
//!   source it saw, and lb-core's own routing model, for the UDP and QUIC tests.
//! - [`zones`]: what the zone tests share (the admin's zone actions, the flow
//!   log, the cross-zone delay histogram, the median of timings).
//!
//! Every address used is on 127.0.0.0/8 and every port is 0 (chosen by the
//! kernel) until a ready file reports it, so tests run in parallel.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use lb_bench::client::{
    connect, header, http_get, http_get_close, http_keepalive_get, IO_TIMEOUT,
};
pub use tempfile::TempDir;

pub use lb_bench::lbproxy::Ready;
use lb_bench::serve::{self, ServerSpec};

pub mod netns;
pub mod udp;
pub mod zones;

/// How long a child may take to write its ready file.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How often [`wait_until`] looks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// The flow log's file name in the proxy's directory ([`Proxy::run_with_flow_log`]).
pub const FLOW_LOG_FILE: &str = "flows.jsonl";
/// The flags of every `lb-proxy` the harness starts from arguments rather
/// than a config: an admin endpoint on a free port, and two workers.
const ADMIN_AND_WORKERS: [&str; 4] = ["--admin", "127.0.0.1:0", "--workers", "2"];

// ---------------------------------------------------------------------------
// Waiting.

/// Polls `check` every [`POLL_INTERVAL`] until it returns `Some`, and returns that;
/// panics naming `what` once `timeout` has passed.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------
// Binaries.

/// The directory cargo puts the workspace's binaries in (`target/<profile>`),
/// found from the running test executable (`target/<profile>/deps/<test>`).
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("the test executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The `lb-proxy` binary next to this test's target directory.
pub fn proxy_bin() -> PathBuf {
    workspace_bin("lb-proxy", "lb-proxy")
}

/// The `lb-bench` binary (its `serve` is the tests' backend process).
pub fn bench_bin() -> PathBuf {
    workspace_bin("lb-bench", "lb-bench")
}

/// Binary `name` of package `package`, built by `cargo build --workspace --bins`.
fn workspace_bin(name: &str, package: &str) -> PathBuf {
    let path = target_profile_dir().join(name);
    if !path.is_file() {
        panic!(
            "{name} binary not found at {}: build it first: cargo build -p {package}",
            path.display()
        );
    }
    path
}

/// Runs `lb-proxy check --config FILE`; returns (exit status, stdout, stderr).
pub fn run_check(config: &Path) -> (ExitStatus, String, String) {
    let out = Command::new(proxy_bin())
        .args(["check", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run lb-proxy check");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------
// Signals.

/// Sends `signal` (e.g. `libc::SIGTERM`) to `pid`.
pub fn send_signal(pid: u32, signal: i32) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        io::Error::last_os_error()
    );
}

/// Kills a child with SIGKILL and reaps it (no-op if it already exited).
fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Waits (polling) until `child` exits or `timeout` passes.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// How to look for a ready file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Poll {
    /// Every [`POLL_INTERVAL`].
    Interval,
    /// As fast as possible, to act the moment the file appears.
    Spin,
}

/// Polls for `path` to appear (written atomically by the child) and returns its
/// contents; panics with `log`'s contents if the child exits first or time runs out.
fn wait_for_file(path: &Path, child: &mut Child, what: &str, log: &Path, poll: Poll) -> String {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(text) = fs::read_to_string(path) {
            if !text.trim().is_empty() {
                return text;
            }
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "{what} exited ({status}) before writing {}; its log:\n{}",
                path.display(),
                read_lossy(log)
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!(
                "{what} did not write {} within {READY_TIMEOUT:?}; its log:\n{}",
                path.display(),
                read_lossy(log)
            );
        }
        match poll {
            Poll::Interval => std::thread::sleep(POLL_INTERVAL),
            Poll::Spin => std::thread::yield_now(),
        }
    }
}

// ---------------------------------------------------------------------------
// The balancer process.

/// A running `lb-proxy`, killed (SIGKILL) on drop.
pub struct Proxy {
    child: Child,
    exited: Option<ExitStatus>,
    pub ready: Ready,
    dir: TempDir,
    config_path: PathBuf,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Proxy {
    /// Writes `config` to `<tmp>/lb.toml`, starts `lb-proxy run --config` on it,
    /// and waits for the ready file and then for the admin endpoint to answer
    /// `/healthz` (when it is enabled).
    pub fn run(config: &str) -> Proxy {
        Self::run_with_flags(config, |_| Vec::new())
    }

    /// Like [`Proxy::run`], but returns the moment the ready file appears (polling
    /// it in a tight loop) and does not wait for anything else: for tests of what
    /// the ready file promises.
    pub fn run_eager(config: &str) -> Proxy {
        Self::run_with(config, Poll::Spin, &[], |_| Vec::new())
    }

    /// Like [`Proxy::run`], with more command-line flags after `run --config
    /// FILE`; `flags` is given the proxy's directory, to name files in it.
    pub fn run_with_flags(config: &str, flags: impl FnOnce(&Path) -> Vec<String>) -> Proxy {
        Self::run_with_env(config, &[], flags)
    }

    /// Like [`Proxy::run_with_flags`], with `env` set in the child's
    /// environment only (a test binary runs its tests on several threads,
    /// so its own environment is not changed).
    pub fn run_with_env(
        config: &str,
        env: &[(&str, &str)],
        flags: impl FnOnce(&Path) -> Vec<String>,
    ) -> Proxy {
        let proxy = Self::run_with(config, Poll::Interval, env, flags);
        proxy.wait_admin();
        proxy
    }

    /// Like [`Proxy::run`], writing a JSON flow log (`--flow-log FILE
    /// --flow-log-format json`) to [`FLOW_LOG_FILE`] in the proxy's
    /// directory; returns the proxy and the log's path.
    pub fn run_with_flow_log(config: &str) -> (Proxy, PathBuf) {
        let proxy = Self::run_with_flags(config, |dir| {
            vec![
                "--flow-log".to_owned(),
                dir.join(FLOW_LOG_FILE).display().to_string(),
                "--flow-log-format".to_owned(),
                "json".to_owned(),
            ]
        });
        let path = proxy.dir().join(FLOW_LOG_FILE);
        (proxy, path)
    }

    fn run_with(
        config: &str,
        poll: Poll,
        env: &[(&str, &str)],
        flags: impl FnOnce(&Path) -> Vec<String>,
    ) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("lb.toml");
        fs::write(&config_path, config).expect("write config");
        let mut args = vec![
            "run".to_owned(),
            "--config".to_owned(),
            config_path.display().to_string(),
        ];
        args.extend(flags(dir.path()));
        Self::spawn(dir, config_path, args, poll, env)
    }

    /// Starts `lb-proxy` with `args` as given (e.g. `run --service F --cluster F`;
    /// `--ready-file` is added), in `dir`, where the files `args` name may live;
    /// waits as [`Proxy::run`] does.
    pub fn start_in(dir: TempDir, args: Vec<String>) -> Proxy {
        let proxy = Self::spawn(dir, PathBuf::new(), args, Poll::Interval, &[]);
        proxy.wait_admin();
        proxy
    }

    /// `lb-proxy run --service SERVICE --cluster CLUSTER` with a `--port` flag
    /// per entry of `ports` (`"80=0"`), an admin endpoint on a free port and
    /// two workers, in `dir` (where the two files may live); waits as
    /// [`Proxy::run`] does.
    pub fn run_service(dir: TempDir, service: &Path, cluster: &Path, ports: &[&str]) -> Proxy {
        let mut args = vec![
            "run".to_owned(),
            "--service".to_owned(),
            service.display().to_string(),
            "--cluster".to_owned(),
            cluster.display().to_string(),
        ];
        for port in ports {
            args.extend(["--port".to_owned(), (*port).to_owned()]);
        }
        args.extend(ADMIN_AND_WORKERS.map(str::to_owned));
        Self::start_in(dir, args)
    }

    /// Sends SIGHUP and waits (up to `timeout`) until
    /// `lb_config_reloads_total{result}` reaches `count`.
    pub fn sighup_until(&self, result: &str, count: f64, timeout: Duration) {
        self.signal(libc::SIGHUP);
        self.wait_metric(
            "lb_config_reloads_total",
            &[("result", result)],
            timeout,
            |v| v >= count,
        );
    }

    /// Waits until the admin endpoint (if any) answers `/healthz`.
    fn wait_admin(&self) {
        if let Some(admin) = self.ready.admin {
            wait_until(
                "the admin endpoint to answer /healthz",
                READY_TIMEOUT,
                || matches!(http_get(admin, "/healthz"), Ok((200, _, _))).then_some(()),
            );
        }
    }

    /// Starts `lb-proxy demo` on ephemeral ports with two workers.
    pub fn demo() -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = ["demo", "--listen", "127.0.0.1:0"]
            .into_iter()
            .chain(ADMIN_AND_WORKERS)
            .map(str::to_owned)
            .collect();
        let proxy = Self::spawn(dir, PathBuf::new(), args, Poll::Interval, &[]);
        proxy.wait_admin();
        proxy
    }

    fn spawn(
        dir: TempDir,
        config_path: PathBuf,
        mut args: Vec<String>,
        poll: Poll,
        env: &[(&str, &str)],
    ) -> Proxy {
        let ready_path = dir.path().join("ready.json");
        let stdout_path = dir.path().join("stdout.log");
        let stderr_path = dir.path().join("stderr.log");
        args.push("--ready-file".to_owned());
        args.push(ready_path.display().to_string());
        let mut child = Command::new(proxy_bin())
            .args(&args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_path).expect("stdout log"))
            .stderr(fs::File::create(&stderr_path).expect("stderr log"))
            .spawn()
            .expect("spawn lb-proxy");
        let text = wait_for_file(&ready_path, &mut child, "lb-proxy", &stderr_path, poll);
        let ready = Ready::parse(&text).unwrap_or_else(|e| panic!("lb-proxy ready file: {e}"));
        assert_eq!(ready.pid, child.id(), "ready file pid");
        Proxy {
            child,
            exited: None,
            ready,
            dir,
            config_path,
            stdout_path,
            stderr_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The real address of frontend `name`.
    pub fn frontend(&self, name: &str) -> SocketAddr {
        *self
            .ready
            .frontends
            .get(name)
            .unwrap_or_else(|| panic!("no frontend `{name}` in {:?}", self.ready.frontends))
    }

    pub fn admin(&self) -> SocketAddr {
        self.ready.admin.expect("the admin endpoint is enabled")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Replaces the config file (atomically, so a reload never reads half of it).
    pub fn write_config(&self, config: &str) {
        let tmp = self.dir.path().join("lb.toml.tmp");
        fs::write(&tmp, config).expect("write config");
        fs::rename(&tmp, &self.config_path).expect("replace config");
    }

    /// Everything the process has logged to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    pub fn signal(&self, signal: i32) {
        assert!(self.exited.is_none(), "lb-proxy already exited");
        send_signal(self.pid(), signal);
    }

    /// `GET path` on the admin endpoint: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let (status, _, body) = http_get(self.admin(), path).expect("admin GET");
        (status, body)
    }

    /// The current `/metrics`.
    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        Metrics(body)
    }

    /// One metric (summed over series matching `labels`); `None` when no series matches.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.metrics().get(name, labels)
    }

    /// Polls the metric until `ok(value)` holds (absent series read as 0) and returns it.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(name, labels).unwrap_or(0.0);
            if ok(v) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {name}{labels:?} \
                     to reach the expected value; last value {v}"
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until the byte metrics of the (frontend, backend) pair `labels`
    /// read exactly `sent` (to the backend) and `received` (from it).
    pub fn wait_backend_bytes(
        &self,
        labels: &[(&str, &str)],
        sent: u64,
        received: u64,
        timeout: Duration,
    ) {
        self.wait_metric("lb_backend_sent_bytes_total", labels, timeout, |v| {
            v == sent as f64
        });
        self.wait_metric("lb_backend_received_bytes_total", labels, timeout, |v| {
            v == received as f64
        });
    }

    /// `/explain?frontend=..&src=..` as JSON.
    pub fn explain(&self, frontend: &str, src: SocketAddr) -> serde_json::Value {
        self.explain_query(&format!("frontend={frontend}&src={src}"))
    }

    /// `/explain?QUERY` as JSON (e.g. with a QUIC frontend's `&cid=HEX`).
    pub fn explain_query(&self, query: &str) -> serde_json::Value {
        let (status, body) = self.admin_get(&format!("/explain?{query}"));
        assert_eq!(status, 200, "/explain?{query}: {body}");
        serde_json::from_str(&body).expect("explain JSON")
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Waits for the process to exit; panics if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        match wait_child(&mut self.child, timeout) {
            Some(s) => {
                self.exited = Some(s);
                s
            }
            None => panic!(
                "lb-proxy still running after {timeout:?}; its log:\n{}",
                self.stderr()
            ),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.exited.is_none() {
            kill_and_reap(&mut self.child);
        }
        if std::thread::panicking() {
            eprintln!("--- lb-proxy stderr ---\n{}", self.stderr());
        }
    }
}

// ---------------------------------------------------------------------------
// Test backends.

/// An `lb-bench serve` process serving one backend (`echo`, `http`,
/// `udp-echo` or `quic`), killed (SIGKILL) on drop.
pub struct Backend {
    child: Option<Child>,
    kind: &'static str,
    /// `,opt=value...` after the address in the spec (`quic`'s server ID).
    options: String,
    pub name: String,
    pub addr: SocketAddr,
    dir: TempDir,
    /// While killed, a TCP socket bound to `addr` and not listening: connects
    /// are refused as by a dead backend, and no other socket (another test's
    /// listener on port 0, say) takes the port before [`Backend::restart`].
    hold: Option<socket2::Socket>,
}

impl Backend {
    /// An echo backend: writes `NAME\n` on each connection, then echoes; on
    /// the client's EOF it shuts down its write side.
    pub fn echo(name: &str) -> Backend {
        Self::start("echo", name, "127.0.0.1:0".parse().expect("addr"))
    }

    /// An HTTP/1.1 backend answering 200 with `X-Node: NAME` and body `NAME\n`.
    pub fn http(name: &str) -> Backend {
        Self::start("http", name, "127.0.0.1:0".parse().expect("addr"))
    }

    /// A UDP echo backend (each datagram back to its sender), with an HTTP
    /// health listener on TCP at the same port number. `addr` is the UDP one.
    pub fn udp_echo(name: &str) -> Backend {
        Self::start("udp-echo", name, "127.0.0.1:0".parse().expect("addr"))
    }

    /// A quinn server of the `lb-echo` protocol whose connection IDs carry
    /// server ID `sid` (hex; QUIC-LB config 0, 4-byte nonce), with an HTTP
    /// health listener on TCP at the same port number.
    pub fn quic(name: &str, sid: &str) -> Backend {
        Self::start_with_options(
            "quic",
            name,
            "127.0.0.1:0".parse().expect("addr"),
            &format!(",sid={sid}"),
        )
    }

    /// `kind` is `lb-bench serve`'s KIND: `echo`, `http`, `sink` or `udp-echo`.
    pub fn start(kind: &'static str, name: &str, listen: SocketAddr) -> Backend {
        Self::start_with_options(kind, name, listen, "")
    }

    /// [`Backend::start`] with `options` (`,key=value...`) after the address.
    pub fn start_with_options(
        kind: &'static str,
        name: &str,
        listen: SocketAddr,
        options: &str,
    ) -> Backend {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Backend {
            child: None,
            kind,
            options: options.to_owned(),
            name: name.to_owned(),
            addr: listen,
            dir,
            hold: None,
        };
        b.spawn();
        b
    }

    /// Runs `lb-bench serve KIND:NAME=ADDR --ready-file PATH` and takes the
    /// bound address from the ready file (`{"NAME": "IP:PORT"}`).
    fn spawn(&mut self) {
        let ready = self.dir.path().join("ready.json");
        let _ = fs::remove_file(&ready);
        let log = self.dir.path().join("stderr.log");
        let spec = format!("{}:{}={}{}", self.kind, self.name, self.addr, self.options);
        let mut child = Command::new(bench_bin())
            .arg("serve")
            .arg(&spec)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("backend log"))
            .spawn()
            .expect("spawn lb-bench serve");
        let what = format!("lb-bench serve {}", self.name);
        let text = wait_for_file(&ready, &mut child, &what, &log, Poll::Interval);
        let spec: ServerSpec = spec.parse().expect("backend spec");
        let bound = serve::parse_serve_ready(&text, &[spec])
            .unwrap_or_else(|e| panic!("backend ready file: {e}"));
        self.addr = bound[0].addr;
        self.child = Some(child);
    }

    /// SIGKILL, and wait until the process is gone. The port stays this
    /// backend's until [`Backend::restart`] (TCP kinds; a UDP socket bound in
    /// its place would take datagrams a dead backend answers with ICMP port
    /// unreachable).
    pub fn kill(&mut self) {
        self.stop();
        if !matches!(self.kind, "udp-echo" | "quic") && self.hold.is_none() {
            self.hold = hold_port(self.addr);
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }

    /// Starts the process again on the same address.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() needs kill() first");
        self.hold = None;
        self.spawn();
    }

    /// `name = "..", address = ".."` as a `[[frontends.backends]]` table.
    pub fn toml(&self) -> String {
        backend_toml(&self.name, self.addr)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP socket bound to `addr` (SO_REUSEADDR, as the backend's own
/// listener, so the killed process's TIME_WAIT sockets do not stand in the
/// way) that never listens. None, said on stderr, where another socket took
/// the port in the moment since the kill (a restart then says so too).
fn hold_port(addr: SocketAddr) -> Option<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .and_then(|socket| {
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        Ok(socket)
    });
    socket
        .map_err(|e| eprintln!("could not hold the killed backend's port {addr}: {e}"))
        .ok()
}

/// A `[[frontends.backends]]` table.
pub fn backend_toml(name: &str, addr: SocketAddr) -> String {
    format!("[[frontends.backends]]\nname = \"{name}\"\naddress = \"{addr}\"\n")
}

/// A config with `workers = 2`, the admin endpoint on 127.0.0.1:0 and one
/// frontend `name` on 127.0.0.1:0. `settings` goes into the frontend table (plain
/// keys first; it may end with a `[frontends.health]` table); `backends` are
/// the frontend's sub-tables, appended as given: `[[frontends.backends]]`
/// (see [`backend_toml`]) or `[[frontends.nodes]]` for the hop model.
pub fn one_frontend_config(name: &str, settings: &str, backends: &[String]) -> String {
    format!(
        "workers = 2\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[frontends]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n{settings}\n\n{}",
        backends.join("\n")
    )
}

/// Frontend settings for no active probes, so only a test's own flows reach
/// the backends and nothing marks them down.
pub const NO_PROBES: &str = "[frontends.health]\nkind = \"none\"";

/// How long the flows of [`idle_pair_config`]'s frontends may stay idle.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// A config with two frontends in front of `backend` (a
/// `[[frontends.backends]]` table) whose flows end after [`IDLE_TIMEOUT`]
/// idle: `rst` with `tcp_reset_on_idle = true`, `fin` with `false`.
/// `settings` (plain keys, e.g. `copy = "sockmap"`) go into both.
pub fn idle_pair_config(settings: &str, backend: &str) -> String {
    let frontend = |name: &str, reset: bool| {
        format!(
            "[[frontends]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n{settings}\n\
             idle_timeout = \"{}s\"\ntcp_reset_on_idle = {reset}\n{NO_PROBES}\n\n{backend}\n",
            IDLE_TIMEOUT.as_secs()
        )
    };
    format!(
        "workers = 2\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{}{}",
        frontend("rst", true),
        frontend("fin", false)
    )
}

/// Asserts how the idle timeout ended the flows of [`idle_pair_config`]'s
/// frontends, by what their clients' next read returned: `rst` ECONNRESET,
/// `fin` EOF.
pub fn assert_idle_ends(rst: io::Result<usize>, fin: io::Result<usize>) {
    match rst {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("tcp_reset_on_idle = true: expected ECONNRESET, got {other:?}"),
    }
    match fin {
        Ok(0) => {}
        other => panic!("tcp_reset_on_idle = false: expected EOF, got {other:?}"),
    }
}

/// On [`idle_pair_config`]'s frontends (echo backend `a`): a flow that goes
/// idle after a round trip ends `IDLE_TIMEOUT` after its last byte, not
/// before (and not much after), with a reset on `rst` and a FIN on `fin`,
/// each counted once in `lb_backend_idle_timeouts_total`.
pub fn assert_idle_timeouts_from_the_last_byte(proxy: &Proxy) {
    let idle = |addr: SocketAddr| {
        std::thread::spawn(move || {
            let mut c = connect(addr).expect("connect");
            assert_eq!(read_line(&mut c).expect("greeting"), "a");
            // The clock starts before the last round trip: the balancer's
            // last activity is after this instant.
            let started = Instant::now();
            c.write_all(b"ping").expect("write");
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).expect("echo");
            let result = c.read(&mut [0u8; 64]);
            (started.elapsed(), result)
        })
    };
    let (rst, fin) = (idle(proxy.frontend("rst")), idle(proxy.frontend("fin")));
    let (rst_after, rst_result) = rst.join().expect("rst thread");
    let (fin_after, fin_result) = fin.join().expect("fin thread");
    assert_idle_ends(rst_result, fin_result);
    for (what, after) in [("rst", rst_after), ("fin", fin_after)] {
        assert!(
            after >= IDLE_TIMEOUT && after < IDLE_TIMEOUT * 4,
            "{what}: closed after {after:?}, expected {IDLE_TIMEOUT:?} ≤ t < 4 × that"
        );
        proxy.wait_metric(
            "lb_backend_idle_timeouts_total",
            &[("frontend", what), ("backend", "a")],
            Duration::from_secs(10),
            |v| v == 1.0,
        );
    }
}

/// [`Proxy::run`] on [`one_frontend_config`]: frontend `web` with `settings`
/// in front of `backends`.
pub fn web_proxy(settings: &str, backends: &[&Backend]) -> Proxy {
    let tables: Vec<String> = backends.iter().map(|b| b.toml()).collect();
    Proxy::run(&one_frontend_config("web", settings, &tables))
}

// ---------------------------------------------------------------------------
// hey.

/// The `hey` binary: on PATH or at /usr/bin/hey; panics saying how to install it.
pub fn hey_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("hey"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/bin/hey")])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`hey` (https://github.com/rakyll/hey) is not installed: not on PATH nor at /usr/bin/hey. \
                 Install it (.ci/run does so in CI), e.g. `apt-get install hey` or \
                 `go install github.com/rakyll/hey@latest`"
            )
        })
}

/// Runs `hey ARGS -t 10 URL` with its stdout in `dir/hey.out`, killed after
/// `limit`; asserts it exited 0 and returns its stdout.
pub fn run_hey(dir: &Path, args: &[&str], url: &str, limit: Duration) -> String {
    spawn_hey(dir, args, url).wait(limit)
}

/// A `hey` run in the background (see [`spawn_hey`]), killed if dropped unfinished.
pub struct HeyRun {
    child: Child,
    out_path: PathBuf,
}

/// Starts `hey ARGS -t 10 URL` with its stdout in `dir/hey.out`, and returns
/// at once: for tests that act on the balancer while hey's load runs.
pub fn spawn_hey(dir: &Path, args: &[&str], url: &str) -> HeyRun {
    let out_path = dir.join("hey.out");
    let child = Command::new(hey_bin())
        .args(args)
        .args(["-t", "10", url])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("hey output file"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run hey");
    HeyRun { child, out_path }
}

impl HeyRun {
    /// Whether hey is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for hey to exit (killing it after `limit`); asserts it exited 0
    /// and returns its stdout.
    pub fn wait(mut self, limit: Duration) -> String {
        let Some(status) = wait_child(&mut self.child, limit) else {
            kill_and_reap(&mut self.child);
            panic!("hey did not finish within {limit:?}");
        };
        let out = fs::read_to_string(&self.out_path).expect("hey output");
        assert!(status.success(), "hey failed ({status}):\n{out}");
        out
    }
}

impl Drop for HeyRun {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// Metrics.

/// A `/metrics` body (Prometheus text format).
#[derive(Clone, Debug)]
pub struct Metrics(pub String);

impl Metrics {
    /// The sum of every series of `name` whose labels include all of `labels`;
    /// `None` when no series matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for line in self.0.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (metric, series_labels) = match series.split_once('{') {
                Some((m, rest)) => (m, parse_labels(rest.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            if metric != name {
                continue;
            }
            let matches = labels
                .iter()
                .all(|(k, v)| series_labels.iter().any(|(sk, sv)| sk == k && sv == v));
            if matches {
                let v: f64 = value.parse().unwrap_or(f64::NAN);
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }
}

/// Parses `a="x",b="y"` (with `\"` and `\\` escapes) into pairs.
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(if e == 'n' { '\n' } else { e });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').trim().to_owned(), value));
        rest = &after[end..];
    }
    out
}

// ---------------------------------------------------------------------------
// Sockets.

/// A socket bound to `(ip, 0)`, not yet connected, so its source address is
/// known before connecting (to ask `/explain` about the flow first).
pub struct BoundClient {
    socket: socket2::Socket,
    pub local: SocketAddr,
}

impl BoundClient {
    pub fn new(ip: Ipv4Addr) -> io::Result<BoundClient> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())?;
        let local = socket.local_addr()?.as_socket().expect("an inet address");
        Ok(BoundClient { socket, local })
    }

    pub fn connect(self, to: SocketAddr) -> io::Result<TcpStream> {
        self.socket.connect_timeout(&to.into(), IO_TIMEOUT)?;
        lb_bench::client::with_timeouts(self.socket.into())
    }
}

/// A loopback port that refuses connections: bound (so nothing else takes it)
/// but never listening, so a SYN to it is answered with RST.
pub struct RefusingPort {
    _socket: socket2::Socket,
    pub addr: SocketAddr,
}

impl RefusingPort {
    pub fn new(ip: Ipv4Addr) -> RefusingPort {
        let c = BoundClient::new(ip).expect("bind a refusing port");
        RefusingPort {
            addr: c.local,
            _socket: c.socket,
        }
    }
}

/// Reads up to and including the first `\n` (the echo backend's greeting), byte by byte
/// so nothing after it is consumed. Returns the line without the newline.
pub fn read_line(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {:?}", String::from_utf8_lossy(&line)),
                ))
            }
            _ if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            _ => line.push(b[0]),
        }
    }
}

/// Accepts one connection on an in-test backend listener, with [`IO_TIMEOUT`]
/// on reads and writes, so a test that goes wrong fails instead of hanging.
pub fn accept_one(listener: &TcpListener) -> TcpStream {
    let (s, _) = listener.accept().expect("backend accept");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s
}

/// Whether a connect to `addr` is refused (RST) right now.
pub fn connect_refused(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => false,
        Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
    }
}

/// Shuts down our write side and reads until EOF; returns what arrived.
pub fn finish(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    s.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    Ok(rest)
}

// ---------------------------------------------------------------------------
// Data.

/// A seeded pseudo-random byte stream (SplitMix64): the same seed gives the same
/// bytes on both ends of a transfer, so the receiver can check them.
#[derive(Clone, Debug)]
pub struct SeededStream {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl SeededStream {
    pub fn new(seed: u64) -> Self {
        SeededStream {
            state: seed,
            word: [0; 8],
            used: 8,
        }
    }

    /// The next 64 bits of the stream (also a seeded generator for tests).
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && self.used < 8 {
            buf[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        let mut chunks = buf[i..].chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_u64().to_le_bytes();
            let n = tail.len();
            tail.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }
}

/// Writes `len` bytes of the stream seeded with `seed` to `w`; returns their SHA-256.
pub fn send_stream(w: &mut impl Write, seed: u64, len: usize) -> io::Result<[u8; 32]> {
    use sha2::Digest;
    let mut gen = SeededStream::new(seed);
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        gen.fill(&mut buf[..n]);
        sha.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n;
    }
    Ok(sha.finalize().into())
}

/// Reads `r` to EOF; returns (bytes read, SHA-256 of them).
pub fn receive_hashed(r: &mut impl Read) -> io::Result<(u64, [u8; 32])> {
    use sha2::Digest;
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sha.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, sha.finalize().into()))
}

/// Bytes each way in the bulk transfer tests (data_path's for each copy
/// engine, sockmap's): 64 MiB, a bulk run for every engine (`auto`
/// switches to splice partway).
pub const BULK_LEN: usize = 64 << 20;

/// What one end of a both-ways transfer saw: the bytes it received (count
/// and SHA-256) and the SHA-256 of what it sent.
struct EndSaw {
    received: u64,
    received_sha: [u8; 32],
    sent_sha: [u8; 32],
}

/// Sends `len` bytes of the stream seeded with `seed` on `s` (then shuts its
/// write side) while reading `s` to EOF, both at once: a side that only
/// wrote would stall once the peer's buffers filled.
fn send_and_receive(s: TcpStream, seed: u64, len: usize, who: &'static str) -> EndSaw {
    let mut w = s.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let sha = send_stream(&mut w, seed, len).unwrap_or_else(|e| panic!("{who} send: {e}"));
        w.shutdown(Shutdown::Write)
            .unwrap_or_else(|e| panic!("{who} shutdown: {e}"));
        sha
    });
    let mut r = s;
    let (received, received_sha) =
        receive_hashed(&mut r).unwrap_or_else(|e| panic!("{who} receive: {e}"));
    let sent_sha = sender.join().expect("sender thread");
    EndSaw {
        received,
        received_sha,
        sent_sha,
    }
}

/// `len` seeded bytes each way at once through the balancer at `frontend`,
/// to the one connection its backend `listener` accepts (`seeds`: client →
/// backend, backend → client); asserts each end received exactly what the
/// other sent, by count and SHA-256.
pub fn assert_exact_both_ways(
    listener: TcpListener,
    frontend: SocketAddr,
    len: usize,
    (up_seed, down_seed): (u64, u64),
) {
    let backend = std::thread::spawn(move || {
        send_and_receive(accept_one(&listener), down_seed, len, "backend")
    });
    let started = Instant::now();
    let c = connect(frontend).expect("connect");
    let client = send_and_receive(c, up_seed, len, "client");
    let backend = backend.join().expect("backend thread");
    eprintln!("{} MiB moved in {:?}", (2 * len) >> 20, started.elapsed());

    assert_eq!(backend.received, len as u64, "bytes the backend received");
    assert_eq!(
        backend.received_sha, client.sent_sha,
        "SHA-256 of client → backend stream"
    );
    assert_eq!(client.received, len as u64, "bytes the client received");
    assert_eq!(
        client.received_sha, backend.sent_sha,
        "SHA-256 of backend → client stream"
    );
}

// ---------------------------------------------------------------------------
// Process resources and hey's summary.

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`...), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix(" kB")?.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or_else(|| panic!("no `{field}: N kB` in /proc/{pid}/status"))
}

/// The resident set of `pid` now (`VmRSS`), in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS")
}

/// The highest resident set `pid` has had (`VmHWM`), in bytes.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM")
}

/// How many file descriptors `pid` has open (entries of `/proc/PID/fd`).
pub fn open_fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (children
/// started afterwards, the balancer and backends, inherit it); returns the new
/// soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, which `limit` is.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(rc, 0, "getrlimit: {}", io::Error::last_os_error());
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads one rlimit struct, which `limit` is.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(rc, 0, "setrlimit: {}", io::Error::last_os_error());
    limit.rlim_cur
}

/// hey's "Status code distribution" as (status, responses) pairs; panics
/// (quoting the output) when hey printed none.
pub fn hey_status_counts(out: &str) -> Vec<(u16, u64)> {
    let section = out
        .split("Status code distribution:")
        .nth(1)
        .unwrap_or_else(|| panic!("no status code distribution in hey's output:\n{out}"));
    section
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| l.starts_with('['))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let parsed = match words.as_slice() {
                [code, n, "responses"] => code
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .ok()
                    .zip(n.parse().ok()),
                _ => None,
            };
            parsed.unwrap_or_else(|| panic!("unexpected status line `{l}` from hey:\n{out}"))
        })
        .collect()
}

/// Asserts hey saw no errors and only 200s; returns how many responses it got.
pub fn assert_hey_all_ok(out: &str) -> u64 {
    assert!(
        !out.contains("Error distribution"),
        "hey reported errors:\n{out}"
    );
    let statuses = hey_status_counts(out);
    match statuses.as_slice() {
        [(200, n)] if *n > 0 => *n,
        _ => panic!("status codes {statuses:?}, want only 200s:\n{out}"),
    }
}

/// A gate threads wait at until the test opens it: the writers of a
/// transfer until a backend is killed, a paused reader until the sender is
/// seen blocked. Opened once, it stays open.
#[derive(Default)]
pub struct Gate {
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Gate {
    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = self.cv.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

// ---------------------------------------------------------------------------
// A backend that speaks first, and a client that hears it (the engine tests).

/// One backend flow: the banner right after accept, then either FIN (and
/// the client's EOF), or one request answered and the client's EOF.
pub fn serve_banner(s: &mut TcpStream, fin: bool, body: &[u8]) {
    let first = if fin { "banner fin\n" } else { "banner open\n" };
    s.write_all(first.as_bytes()).expect("banner line");
    s.write_all(body).expect("banner body");
    if fin {
        s.shutdown(Shutdown::Write).expect("backend FIN");
    } else {
        let line = read_line(s).expect("request");
        s.write_all(format!("got {line}\n").as_bytes())
            .expect("reply");
        s.shutdown(Shutdown::Write).expect("backend FIN");
    }
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty(), "bytes after the request: {rest:?}");
}

/// One client flow through the balancer: the whole banner first, then EOF
/// (a banner with FIN) or a request answered (an open one).
pub fn hear_banner(frontend: SocketAddr, body: &[u8], who: &str) {
    let mut c = connect(frontend).expect("connect");
    let first = read_line(&mut c).unwrap_or_else(|e| panic!("{who}: banner line: {e}"));
    let mut got = vec![0u8; body.len()];
    c.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{who}: banner body: {e}"));
    assert!(got == body, "{who}: the banner body arrived changed");
    match first.as_str() {
        "banner fin" => {}
        "banner open" => {
            c.write_all(format!("request {who}\n").as_bytes())
                .expect("request");
            let reply = read_line(&mut c).unwrap_or_else(|e| panic!("{who}: reply: {e}"));
            assert_eq!(reply, format!("got request {who}"));
        }
        other => panic!("{who}: banner line {other:?}"),
    }
    let rest = finish(&mut c).unwrap_or_else(|e| panic!("{who}: EOF: {e}"));
    assert!(rest.is_empty(), "{who}: bytes after the banner: {rest:?}");
}

// ---------------------------------------------------------------------------
// The answer and the FIN in one segment (change C, both engines).

/// A backend on `listener` that answers its one flow with `body` and its
/// FIN in one segment (the body sent with MSG_MORE, then the FIN); a client
/// through `frontend` that reads it all. Asserts the client received two
/// segments in all (`tcpi_segs_in`: the SYN-ACK, then the body with the
/// FIN): the balancer passed the answer on corked with the FIN it found
/// queued behind it, rather than the answer and then a FIN of its own.
pub fn assert_answer_and_fin_in_one_segment(frontend: SocketAddr, listener: TcpListener) {
    let body: Vec<u8> = (0..200u8).collect();
    let answer = body.clone();
    let backend = std::thread::spawn(move || {
        let s = accept_one(&listener);
        send_more(&s, &answer);
        s.shutdown(Shutdown::Write).expect("backend FIN");
        let mut rest = Vec::new();
        (&s).read_to_end(&mut rest).expect("the balancer's FIN");
    });
    let mut c = connect(frontend).expect("connect");
    // Read without sending a FIN of our own: its ACK would be one more segment.
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("the answer and EOF");
    assert_eq!(got, body, "the answer arrived changed");
    let segments = segments_in(&c);
    drop(c);
    backend.join().expect("backend");
    assert_eq!(
        segments, 2,
        "the client received {segments} segments: the answer and the FIN apart"
    );
}

/// One send(2) of `bytes` with MSG_MORE: held until the FIN goes with it.
fn send_more(s: &TcpStream, bytes: &[u8]) {
    use std::os::fd::AsRawFd;
    // SAFETY: a send of a buffer we own on a socket we hold.
    let n = unsafe {
        libc::send(
            s.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_MORE,
        )
    };
    assert_eq!(
        n,
        bytes.len() as isize,
        "send: {}",
        std::io::Error::last_os_error()
    );
}

/// The segments `s` has received (`TCP_INFO`'s `tcpi_segs_in`).
fn segments_in(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: all-zero is a valid tcp_info.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt into a tcp_info we own, its size given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_segs_in
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_found_by_name_and_label_subset() {
        let m = Metrics(
            "# HELP x y\n\
             lb_backend_up{backend=\"a\",frontend=\"web\"} 1\n\
             lb_backend_up{backend=\"b\",frontend=\"web\"} 0\n\
             lb_config_reloads_total{result=\"success\"} 2\n\
             process_open_fds 12\n"
                .to_owned(),
        );
        assert_eq!(m.get("lb_backend_up", &[("backend", "a")]), Some(1.0));
        assert_eq!(m.get("lb_backend_up", &[("frontend", "web")]), Some(1.0));
        assert_eq!(m.get("lb_backend_up", &[("backend", "c")]), None);
        assert_eq!(
            m.get("lb_config_reloads_total", &[("result", "success")]),
            Some(2.0)
        );
        assert_eq!(m.get("process_open_fds", &[]), Some(12.0));
        assert_eq!(m.get("lb_backend", &[]), None);
    }

    #[test]
    fn hey_status_codes_and_errors_are_read_from_its_summary() {
        let ok = "Latency distribution:\n  50% in 0.0015 secs\n\n\
                  Status code distribution:\n  [200]\t20 responses\n\n\n\n";
        assert_eq!(hey_status_counts(ok), vec![(200, 20)]);
        assert_eq!(assert_hey_all_ok(ok), 20);
        let mixed = "Status code distribution:\n  [200]\t7 responses\n  [502]\t3 responses\n";
        assert_eq!(hey_status_counts(mixed), vec![(200, 7), (502, 3)]);
        let failed = "Status code distribution:\n\nError distribution:\n  \
                      [5]\tGet \"http://127.0.0.1:1/\": connection refused\n";
        assert_eq!(hey_status_counts(failed), vec![]);
        for bad in [mixed, failed] {
            let caught = std::panic::catch_unwind(|| assert_hey_all_ok(bad));
            assert!(caught.is_err(), "accepted:\n{bad}");
        }
    }

    #[test]
    fn the_seeded_stream_does_not_depend_on_chunking() {
        let mut whole = vec![0u8; 1000];
        SeededStream::new(7).fill(&mut whole);
        let mut parts = vec![0u8; 1000];
        let mut g = SeededStream::new(7);
        for c in parts.chunks_mut(13) {
            g.fill(c);
        }
        assert_eq!(whole, parts);
        let mut other = vec![0u8; 1000];
        SeededStream::new(8).fill(&mut other);
        assert_ne!(whole, other);
    }
}
