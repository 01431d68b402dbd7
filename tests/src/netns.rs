//! The scale-out lab (issue 15) for the tests: network namespaces built by the
//! shipped `config/bgp/lab.sh`, BIRD in the router namespace, lb-proxy and
//! ExaBGP in each instance namespace (all from the shipped `config/bgp/` files,
//! templated only for addresses), three line backends in the backend namespace,
//! and flows from the client namespace.
//!
//! It owns:
//! - [`require_lab_tools`]: root and the daemons, or a failure naming what is missing.
//! - [`in_netns`]: running a closure on a thread that has entered a namespace
//!   (sockets stay in the namespace they were made in, so the test process can
//!   use them from any thread afterwards).
//! - [`Lab`]: the namespaces and every process and thread started in them; its
//!   `Drop` kills the processes and deletes the namespaces, after a failure
//!   or a panic too.
//!   `Lab::up` first deletes labs whose test process was killed before its
//!   `Drop` ran (`lbt<pid>-*` with no process `<pid>`).
//! - [`vip`] and the admin endpoint, read from the shipped lb-proxy.toml, and
//!   [`check_shipped_figures`]: the other shipped files repeat them (each
//!   tool has its own syntax), so the lab checks that they agree.
//! - [`Flow`]: one TCP connection from the client to VIP:80, and its exchange
//!   with the line backends (which answer with their name and the instance's
//!   address they saw, so every exchange says which instance and backend it
//!   reached).
//!
//! Addresses live only inside the lab's namespaces (10.77.0.0/16, see lab.sh),
//! so two labs at once differ only in their namespace names.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::{http_get, proxy_bin, read_line, wait_until, TempDir, READY_TIMEOUT};

/// The instance numbers lab.sh creates (namespaces NAME-i1 .. NAME-i3);
/// [`check_shipped_figures`] holds lab.sh's `INSTANCES` to it.
pub const INSTANCES: [u8; 3] = [1, 2, 3];

/// The frontend address every instance announces and listens on: the
/// shipped lb-proxy.toml's frontend `listen` (lab.sh, resilient-sync.sh and
/// exabgp.conf are checked against it by [`check_shipped_figures`]).
pub fn vip() -> SocketAddrV4 {
    static VIP: OnceLock<SocketAddrV4> = OnceLock::new();
    *VIP.get_or_init(|| {
        let listen = toml_value("lb-proxy.toml", "[[frontends]]", "listen");
        listen
            .parse()
            .unwrap_or_else(|e| panic!("lb-proxy.toml listen {listen:?}: {e}"))
    })
}

/// Each instance's admin endpoint, inside its own namespace: the shipped
/// lb-proxy.toml's `[admin] listen`.
fn admin() -> SocketAddr {
    static ADMIN: OnceLock<SocketAddr> = OnceLock::new();
    *ADMIN.get_or_init(|| {
        let listen = toml_value("lb-proxy.toml", "[admin]", "listen");
        listen
            .parse()
            .unwrap_or_else(|e| panic!("lb-proxy.toml [admin] listen {listen:?}: {e}"))
    })
}

/// The string value of `key = "..."` in `section` of shipped file `name` (a
/// line scan: the shipped files keep one key per line).
fn toml_value(name: &str, section: &str, key: &str) -> String {
    let text = bgp_config(name);
    let start = text
        .find(&format!("\n{section}\n"))
        .unwrap_or_else(|| panic!("{name} has no {section}"));
    text[start..]
        .lines()
        .skip(2)
        .take_while(|l| !l.starts_with('['))
        .find_map(|l| l.strip_prefix(key)?.trim_start().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("{name} {section} sets no {key}"))
}

/// The value of shell assignment `VAR=value` in shipped script `name`.
pub fn shell_value(name: &str, var: &str) -> String {
    let prefix = format!("{var}=");
    bgp_config(name)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("{name} sets no {var}="))
}

/// The figures the shipped files repeat (each in the language of its tool)
/// agree with lb-proxy.toml and [`INSTANCES`]: the VIP in lab.sh,
/// resilient-sync.sh and exabgp.conf, the admin port in exabgp.conf's
/// healthcheck, and lab.sh's instance numbers.
pub fn check_shipped_figures() {
    let vip = vip().ip().to_string();
    assert_eq!(shell_value("lab.sh", "VIP"), vip, "lab.sh VIP");
    assert_eq!(
        shell_value("resilient-sync.sh", "VIP"),
        format!("{vip}/32"),
        "resilient-sync.sh VIP"
    );
    let exabgp = bgp_config("exabgp.conf");
    assert!(
        exabgp.contains(&format!("--ip {vip}/32")),
        "exabgp.conf announces {vip}/32"
    );
    let ready = format!("http://{}/ready", admin());
    assert!(exabgp.contains(&ready), "exabgp.conf polls {ready}");
    let instances: Vec<u8> = shell_value("lab.sh", "INSTANCES")
        .split_whitespace()
        .map(|i| i.parse().expect("lab.sh INSTANCES are numbers"))
        .collect();
    assert_eq!(instances, INSTANCES, "lab.sh INSTANCES");
}
/// The backends' port; their addresses are 10.77.100.N (lab.sh, lb-proxy.toml).
const BACKEND_PORT: u16 = 8000;
/// How long one exchange on a flow may take before it counts as broken.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the daemons get to come up (BIRD's socket, an ExaBGP session).
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// The programs the lab runs, and the Debian package each comes from.
const TOOLS: [(&str, &str); 6] = [
    ("ip", "iproute2"),
    ("bird", "bird2"),
    ("birdc", "bird2"),
    ("exabgp", "exabgp"),
    ("python3", "python3"),
    ("curl", "curl"),
];

/// Panics naming what is missing when the lab cannot be built here: root (for
/// `ip netns`) and the programs in [`TOOLS`]. The scale-out tests fail rather
/// than skip: CI has all of them.
pub fn require_lab_tools() {
    let mut missing = Vec::new();
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (the lab creates network namespaces)".to_owned());
    }
    for (tool, package) in TOOLS {
        if find_on_path(tool).is_none() {
            missing.push(format!("`{tool}` (Debian package {package})"));
        }
    }
    assert!(
        missing.is_empty(),
        "the scale-out lab needs: {}",
        missing.join(", ")
    );
}

fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The shipped `config/bgp/` directory.
pub fn bgp_config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/bgp")
}

/// The contents of shipped file `name` under `config/bgp/`.
pub fn bgp_config(name: &str) -> String {
    let path = bgp_config_dir().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The BGP hold time BIRD's shipped config sets (`hold time N;`): the bound on
/// how long a silent instance keeps its routes.
pub fn bgp_hold_time() -> Duration {
    let conf = bgp_config("bird.conf");
    let secs = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("hold time "))
        .and_then(|rest| rest.trim_end_matches(';').trim().parse().ok())
        .expect("bird.conf sets `hold time N;`");
    Duration::from_secs(secs)
}

/// The network namespaces that exist now (`ip netns list`).
pub fn netns_list() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Runs `f` on a new thread that has entered network namespace `ns` (by name,
/// as `ip netns` knows it) and returns its result.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter_netns(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns(2) on a valid fd; CLONE_NEWNET affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", io::Error::last_os_error());
}

/// How the router turns the instances' BGP routes into forwarding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// BIRD's merged multipath route in the main table (hash-threshold ECMP).
    Multipath,
    /// The same route mirrored into a resilient nexthop group by
    /// `config/bgp/resilient-sync.sh`.
    Resilient,
}

impl Routing {
    /// The shipped kernel-protocol file the router's bird.conf includes.
    fn bird_kernel_conf(self) -> &'static str {
        match self {
            Routing::Multipath => "bird-kernel.conf",
            Routing::Resilient => "bird-kernel-resilient.conf",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Routing::Multipath => "multipath",
            Routing::Resilient => "resilient",
        }
    }
}

/// A process started inside a namespace; killed when the lab drops.
struct NsProcess {
    key: String,
    child: Child,
    log: PathBuf,
}

/// One lab: its namespaces (`NAME-client`, `NAME-router`, `NAME-i1..3`,
/// `NAME-backends`), the processes and backend threads in them, and a
/// directory for the rendered configs and logs.
pub struct Lab {
    name: String,
    dir: TempDir,
    processes: Vec<NsProcess>,
    backends: Vec<LineBackend>,
}

/// Makes every lab's name unique within this process (the pid makes it unique
/// between processes).
static LAB_COUNT: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Builds the namespaces (lab.sh up) and starts the three backends.
    pub fn up() -> Lab {
        require_lab_tools();
        check_shipped_figures();
        remove_dead_labs();
        let n = LAB_COUNT.fetch_add(1, Ordering::Relaxed);
        let name = format!("lbt{}-{n}", std::process::id());
        let mut lab = Lab {
            name,
            dir: tempfile::tempdir().expect("tempdir"),
            processes: Vec::new(),
            backends: Vec::new(),
        };
        lab.lab_sh("up");
        lab.start_backends();
        lab
    }

    /// Runs `config/bgp/lab.sh ACTION NAME`; panics with its output on failure.
    fn lab_sh(&self, action: &str) {
        let out = Command::new("sh")
            .arg(bgp_config_dir().join("lab.sh"))
            .args([action, &self.name])
            .output()
            .expect("run lab.sh");
        assert!(
            out.status.success(),
            "lab.sh {action} {}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The prefix of every namespace of this lab.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pids of the processes this lab started.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(|p| p.child.id()).collect()
    }

    /// The full name of namespace `role` (`client`, `router`, `backends`, `i1`..).
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.name)
    }

    fn instance_ns(&self, i: u8) -> String {
        self.ns(&format!("i{i}"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `program args` in namespace `ns` under `key` (for signals and
    /// logs); its stdout and stderr go to `<dir>/<key>.log`.
    fn spawn(&mut self, key: &str, ns: &str, program: &Path, args: &[&str]) {
        let log = self.dir().join(format!("{key}.log"));
        let out = fs::File::create(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {key}: {e}"));
        self.processes.push(NsProcess {
            key: key.to_owned(),
            child,
            log,
        });
    }

    fn process(&mut self, key: &str) -> &mut NsProcess {
        self.processes
            .iter_mut()
            .rev()
            .find(|p| p.key == key)
            .unwrap_or_else(|| panic!("no process {key} in the lab"))
    }

    /// What process `key` has logged so far.
    pub fn log(&self, key: &str) -> String {
        let p = self.processes.iter().rev().find(|p| p.key == key);
        p.and_then(|p| fs::read_to_string(&p.log).ok())
            .unwrap_or_default()
    }

    /// Sends `signal` to process `key` (`ip netns exec` execs it: same pid).
    pub fn signal(&mut self, key: &str, signal: i32) {
        let pid = self.process(key).child.id();
        crate::send_signal(pid, signal);
    }

    /// Whether process `key` has exited.
    pub fn exited(&mut self, key: &str) -> bool {
        matches!(self.process(key).child.try_wait(), Ok(Some(_)))
    }

    /// Starts BIRD in the router namespace with the shipped bird.conf and the
    /// variant's kernel protocol (and, for [`Routing::Resilient`], the
    /// resilient-sync.sh controller), and waits for its control socket.
    pub fn start_router(&mut self, routing: Routing) {
        let dir = self.dir().join("router");
        fs::create_dir_all(&dir).expect("router dir");
        fs::write(dir.join("bird.conf"), bgp_config("bird.conf")).expect("bird.conf");
        let kernel = bgp_config(routing.bird_kernel_conf());
        fs::write(dir.join("bird-kernel.conf"), kernel).expect("bird-kernel.conf");
        let (conf, ctl) = (dir.join("bird.conf"), dir.join("bird.ctl"));
        let router = self.ns("router");
        let args = ["-f", "-c", path_str(&conf), "-s", path_str(&ctl)];
        self.spawn("bird", &router, Path::new("bird"), &args);
        wait_until("BIRD's control socket", DAEMON_TIMEOUT, || {
            let status = Command::new("birdc")
                .args(["-s", path_str(&ctl), "show", "status"])
                .output()
                .ok()?;
            String::from_utf8_lossy(&status.stdout)
                .contains("Daemon is up")
                .then_some(())
        });
        if routing == Routing::Resilient {
            let sync = bgp_config_dir().join("resilient-sync.sh");
            self.spawn(
                "resilient-sync",
                &router,
                Path::new("sh"),
                &[path_str(&sync)],
            );
        }
    }

    /// Starts lb-proxy in instance `i`'s namespace on `config` (the shipped
    /// lb-proxy.toml unless a test says otherwise), as process `lb-proxy-I`,
    /// and waits for its ready file.
    pub fn start_proxy(&mut self, i: u8, config: &str) {
        let dir = self.dir().join(format!("i{i}"));
        fs::create_dir_all(&dir).expect("instance dir");
        let (conf, ready) = (dir.join("lb.toml"), dir.join("ready.json"));
        let _ = fs::remove_file(&ready);
        fs::write(&conf, config).expect("lb.toml");
        let ns = self.instance_ns(i);
        let key = format!("lb-proxy-{i}");
        let args = [
            "run",
            "--config",
            path_str(&conf),
            "--ready-file",
            path_str(&ready),
        ];
        self.spawn(&key, &ns, &proxy_bin(), &args);
        wait_until(&format!("{key}'s ready file"), READY_TIMEOUT, || {
            assert!(!self.exited(&key), "{key} exited: {}", self.log(&key));
            fs::read_to_string(&ready)
                .ok()
                .filter(|t| !t.trim().is_empty())
        });
    }

    /// Starts ExaBGP in instance `i`'s namespace (process `exabgp-I`) with the
    /// shipped exabgp.conf, its addresses filled in, and exabgp.env.
    pub fn start_speaker(&mut self, i: u8) {
        let conf = bgp_config("exabgp.conf")
            .replace("@SELF@", &format!("10.77.1{i}.2"))
            .replace("@ROUTER@", &format!("10.77.1{i}.1"));
        let path = self.dir().join(format!("exabgp-{i}.conf"));
        fs::write(&path, conf).expect("exabgp.conf");
        let env = bgp_config_dir().join("exabgp.env");
        let ns = self.instance_ns(i);
        let args = ["--env", path_str(&env), path_str(&path)];
        self.spawn(&format!("exabgp-{i}"), &ns, Path::new("exabgp"), &args);
    }

    /// The instances the router's VIP route points at now.
    pub fn vip_paths(&self) -> BTreeSet<u8> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns("router")])
            .args(["ip", "-4", "route", "show", &vip().ip().to_string()])
            .output()
            .expect("ip route show");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "via")
            .filter_map(|w| instance_of_router_gateway(w.parse().ok()?))
            .collect()
    }

    /// Waits until the router's VIP route points at exactly `want`.
    pub fn wait_paths(&self, want: &[u8], timeout: Duration) {
        let want: BTreeSet<u8> = want.iter().copied().collect();
        let what = format!("the router's VIP route to point at instances {want:?}");
        wait_until(&what, timeout, || (self.vip_paths() == want).then_some(()));
    }

    /// `GET path` on instance `i`'s admin endpoint: (status, body).
    pub fn admin_get(&self, i: u8, path: &str) -> (u16, String) {
        in_netns(&self.instance_ns(i), || {
            let (status, _, body) = http_get(admin(), path).expect("admin GET");
            (status, body)
        })
    }

    /// The backend `/explain` on instance `i` names for each client source
    /// port (all from the client's address, to VIP:80).
    pub fn explain_backends(&self, i: u8, src_ports: &[u16]) -> Vec<String> {
        in_netns(&self.instance_ns(i), || {
            src_ports
                .iter()
                .map(|port| {
                    let path = format!("/explain?frontend=web&src={CLIENT}:{port}");
                    let (status, _, body) = http_get(admin(), &path).expect("explain");
                    assert_eq!(status, 200, "{path}: {body}");
                    let v: serde_json::Value = serde_json::from_str(&body).expect("explain JSON");
                    v["backend"]["name"].as_str().unwrap_or("none").to_owned()
                })
                .collect()
        })
    }

    /// Whether a TCP connect to VIP:80 from inside instance `i`'s own
    /// namespace is refused (its listener is closed).
    pub fn listener_closed(&self, i: u8) -> bool {
        in_netns(&self.instance_ns(i), || {
            crate::connect_refused(SocketAddr::V4(vip()))
        })
    }

    /// Opens a flow from the client namespace and exchanges once on it.
    pub fn open_flow(&self) -> io::Result<Flow> {
        in_netns(&self.ns("client"), Flow::open)
    }

    /// Runs `f` `n` times on `parallel` threads in the client namespace
    /// (e.g. [`Flow::open`]), and returns the results.
    pub fn on_client_threads<T: Send>(
        &self,
        n: usize,
        parallel: usize,
        f: impl Fn() -> T + Sync,
    ) -> Vec<T> {
        let client = self.ns("client");
        let per = n.div_ceil(parallel);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..parallel)
                .map(|w| {
                    let count = per.min(n.saturating_sub(w * per));
                    let (client, f) = (&client, &f);
                    s.spawn(move || {
                        enter_netns(client);
                        (0..count).map(|_| f()).collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("client worker"))
                .collect()
        })
    }

    /// Binds the three line backends in the backend namespace.
    fn start_backends(&mut self) {
        let ns = self.ns("backends");
        let backends = in_netns(&ns, || {
            (1..=3u8)
                .map(|b| LineBackend::start(format!("backend-{b}"), Ipv4Addr::new(10, 77, 100, b)))
                .collect::<Vec<_>>()
        });
        self.backends = backends;
    }
}

/// Held while dead labs are swept, and by a test that builds a lab under a
/// dead pid on purpose: a sweep in a test running in parallel would
/// otherwise remove that lab while `lab.sh up` is still building it.
pub static LAB_SWEEP: Mutex<()> = Mutex::new(());

/// Deletes the namespaces of labs whose test process is gone (killed before
/// its `Drop` ran): `lbt<pid>-<n>-<role>` with no process `<pid>`, by
/// `lab.sh down lbt<pid>-<n>`. A live process's labs and every other
/// namespace are left alone.
fn remove_dead_labs() {
    let _sweeping = LAB_SWEEP.lock().unwrap_or_else(|e| e.into_inner());
    let dead: BTreeSet<String> = netns_list()
        .iter()
        .filter_map(|ns| dead_lab_name(ns))
        .collect();
    for lab in dead {
        let _ = Command::new("sh")
            .arg(bgp_config_dir().join("lab.sh"))
            .args(["down", &lab])
            .output();
    }
}

/// `lbt<pid>-<n>` when `ns` is `lbt<pid>-<n>-<role>` and no process `<pid>` exists.
fn dead_lab_name(ns: &str) -> Option<String> {
    let mut parts = ns.strip_prefix("lbt")?.splitn(3, '-');
    let (pid, n, _role) = (parts.next()?, parts.next()?, parts.next()?);
    let (pid, n): (u32, u32) = (pid.parse().ok()?, n.parse().ok()?);
    let alive = Path::new(&format!("/proc/{pid}")).exists();
    (!alive).then(|| format!("lbt{pid}-{n}"))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.processes {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if std::thread::panicking() {
            for p in &self.processes {
                let log = fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                eprintln!("--- {} (last lines) ---", p.key);
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        self.backends.clear();
        // lab.sh down also kills what is left in the namespaces (ExaBGP's
        // healthcheck children); never panic in drop.
        let _ = Command::new("sh")
            .arg(bgp_config_dir().join("lab.sh"))
            .args(["down", &self.name])
            .output();
    }
}

/// The client's address in the lab (lab.sh).
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

/// The instance whose router-side gateway is `gw` (10.77.1N.2 -> N).
fn instance_of_router_gateway(gw: Ipv4Addr) -> Option<u8> {
    let [a, b, c, d] = gw.octets();
    let i = c.checked_sub(10)?;
    ((a, b, d) == (10, 77, 2) && INSTANCES.contains(&i)).then_some(i)
}

/// The instance whose backend-side address is `src` (10.77.2N.2 -> N): what
/// a backend sees as the source of a flow lb-proxy instance N forwarded.
fn instance_of_backend_source(src: Ipv4Addr) -> Option<u8> {
    let [a, b, c, d] = src.octets();
    let i = c.checked_sub(20)?;
    ((a, b, d) == (10, 77, 2) && INSTANCES.contains(&i)).then_some(i)
}

// ---------------------------------------------------------------------------
// Flows.

/// One TCP connection from the client to VIP:80, with where its first
/// exchange went.
pub struct Flow {
    pub stream: TcpStream,
    pub src_port: u16,
    pub instance: u8,
    pub backend: String,
}

impl Flow {
    /// Connects (from the calling thread's namespace: see
    /// [`Lab::on_client_threads`]) and exchanges once.
    pub fn open() -> io::Result<Flow> {
        let stream = TcpStream::connect_timeout(&SocketAddr::V4(vip()), EXCHANGE_TIMEOUT)?;
        stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
        stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
        let src_port = stream.local_addr()?.port();
        let mut flow = Flow {
            stream,
            src_port,
            instance: 0,
            backend: String::new(),
        };
        let (instance, backend) = flow.exchange()?;
        (flow.instance, flow.backend) = (instance, backend);
        Ok(flow)
    }

    /// Sends a line and reads the backend's answer: (instance, backend name).
    /// An error (reset, EOF, timeout, an answer from elsewhere) means broken.
    pub fn exchange(&mut self) -> io::Result<(u8, String)> {
        self.stream.write_all(b"ping\n")?;
        let line = read_line(&mut self.stream)?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("answer {line:?}"));
        let (backend, seen) = line.split_once(' ').ok_or_else(bad)?;
        let instance = seen
            .parse()
            .ok()
            .and_then(instance_of_backend_source)
            .ok_or_else(bad)?;
        if self.instance != 0 && (instance, backend) != (self.instance, self.backend.as_str()) {
            return Err(bad());
        }
        Ok((instance, backend.to_owned()))
    }

    /// Ends the flow cleanly: our FIN, then the far side's EOF.
    pub fn finish(mut self) -> io::Result<()> {
        crate::finish(&mut self.stream).map(|_| ())
    }
}

/// A backend in the backend namespace: for each line a connection sends, it
/// answers `NAME SOURCE_IP\n` (the source is the lb-proxy instance that
/// forwarded the flow). Health probes connect and close; that ends their thread.
struct LineBackend {
    listener: Arc<TcpListener>,
}

impl LineBackend {
    /// Binds `ip:BACKEND_PORT` in the calling thread's namespace and serves it
    /// on a thread of its own.
    fn start(name: String, ip: Ipv4Addr) -> LineBackend {
        let listener = TcpListener::bind((ip, BACKEND_PORT))
            .unwrap_or_else(|e| panic!("bind backend {name} on {ip}: {e}"));
        let listener = Arc::new(listener);
        let serving = Arc::clone(&listener);
        std::thread::spawn(move || {
            // accept fails once Drop shuts the listener down: the loop ends.
            while let Ok((conn, peer)) = serving.accept() {
                let name = name.clone();
                std::thread::spawn(move || serve_lines(conn, &name, peer));
            }
        });
        LineBackend { listener }
    }
}

/// Answers every line on `conn` until EOF or an error.
fn serve_lines(mut conn: TcpStream, name: &str, peer: SocketAddr) {
    let answer = format!("{name} {}\n", peer.ip());
    while read_line(&mut conn).is_ok() {
        if conn.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

impl Drop for LineBackend {
    fn drop(&mut self) {
        // SAFETY: shutdown(2) on the listener's own open fd wakes its accept.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}
