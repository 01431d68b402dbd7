//! PROXY protocol v1 and v2 as real receivers understand them: the balancer,
//! configured with `client_address = "proxy-protocol-v1"` / `"-v2"`, sits in
//! front of HAProxy (`bind ... accept-proxy`) and nginx (`listen ...
//! proxy_protocol`), clients connect from chosen addresses (127.0.4.x), and
//! both the receiver's answer and its access log must name exactly the
//! client's address and port.
//!
//! The receivers are the system's: `/usr/sbin/haproxy` and `/usr/sbin/nginx`
//! (CI installs both); a missing one fails the test with a clear message.

use std::ffi::OsStr;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lb_bench::client::get_close_after;
use lb_tests::{backend_toml, connect, wait_until, BoundClient, Proxy, TempDir};

const WAIT: Duration = Duration::from_secs(10);

/// A receiver binary, or a clear failure when it is not installed.
fn receiver_bin(name: &str) -> PathBuf {
    let candidates = [
        PathBuf::from(format!("/usr/sbin/{name}")),
        PathBuf::from(format!("/usr/bin/{name}")),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed (looked for /usr/sbin/{name} and /usr/bin/{name}): \
                 these tests need a real PROXY protocol receiver; install it, e.g. \
                 `apt-get install {name}` (.ci/run does so in CI)"
            )
        })
}

/// A port on `ip` that was free a moment ago, for a receiver that cannot be
/// told to pick its own and report it.
fn free_port(ip: Ipv4Addr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).expect("bind a probe port");
    l.local_addr().expect("local_addr")
}

/// Runs `bin ARGS` (the receiver's config check); panics with its output
/// when it refuses the config.
fn check_config(name: &str, bin: &Path, args: &[&OsStr]) {
    let check = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {name}'s config check: {e}"));
    assert!(
        check.status.success(),
        "{name} refused its config:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

/// Starts `bin ARGS` with stdout and stderr in `output`.
fn spawn_logged(name: &str, bin: &Path, args: &[&OsStr], output: &Path) -> Child {
    let out = fs::File::create(output).unwrap_or_else(|e| panic!("{name} output: {e}"));
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"))
}

/// A receiver process in its own directory, killed on drop.
struct Receiver {
    name: &'static str,
    child: Child,
    dir: TempDir,
    addr: SocketAddr,
    /// Where the receiver writes one line per request.
    access_log: PathBuf,
    /// The process's own output (HAProxy logs there too).
    output: PathBuf,
}

impl Receiver {
    /// HAProxy 2.x in `mode http`: `accept-proxy` takes v1 and v2 on one bind,
    /// the answer's body is the client address HAProxy believes (`src:src_port`),
    /// and every request is logged to stdout as `client=IP:PORT`.
    fn haproxy() -> Receiver {
        let bin = receiver_bin("haproxy");
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = free_port(Ipv4Addr::new(127, 0, 5, 1));
        let output = dir.path().join("haproxy.out");
        let cfg = dir.path().join("haproxy.cfg");
        fs::write(
            &cfg,
            format!(
                r#"global
    nbthread 1
    log stdout format raw local0 info

defaults
    mode http
    log global
    timeout connect 5s
    timeout client 10s
    timeout server 10s

frontend pp
    bind {addr} accept-proxy
    log-format "client=%ci:%cp status=%ST"
    http-request return status 200 content-type text/plain lf-string "%[src]:%[src_port]\n"
"#
            ),
        )
        .expect("write haproxy.cfg");
        let cfg = cfg.as_os_str();
        check_config("haproxy", &bin, &["-c".as_ref(), "-f".as_ref(), cfg]);
        let child = spawn_logged(
            "haproxy",
            &bin,
            &["-db".as_ref(), "-f".as_ref(), cfg],
            &output,
        );
        Receiver::ready("haproxy", child, dir, addr, output.clone(), output)
    }

    /// nginx with `listen ... proxy_protocol`: the answer's body is
    /// `$proxy_protocol_addr:$proxy_protocol_port`, and the access log line is
    /// `client=$proxy_protocol_addr:$proxy_protocol_port`.
    fn nginx() -> Receiver {
        let bin = receiver_bin("nginx");
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = free_port(Ipv4Addr::new(127, 0, 5, 2));
        let d = dir.path().display().to_string();
        let access_log = dir.path().join("access.log");
        let output = dir.path().join("nginx.out");
        let conf = dir.path().join("nginx.conf");
        fs::write(
            &conf,
            format!(
                r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;

events {{
    worker_connections 64;
}}

http {{
    log_format pp 'client=$proxy_protocol_addr:$proxy_protocol_port remote=$remote_addr:$remote_port status=$status';
    access_log {d}/access.log pp;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    server {{
        listen {addr} proxy_protocol;
        location / {{
            default_type text/plain;
            return 200 "$proxy_protocol_addr:$proxy_protocol_port\n";
        }}
    }}
}}
"#
            ),
        )
        .expect("write nginx.conf");
        let error_log = dir.path().join("error.log");
        let args: [&OsStr; 6] = [
            "-p".as_ref(),
            dir.path().as_os_str(),
            "-e".as_ref(),
            error_log.as_os_str(),
            "-c".as_ref(),
            conf.as_os_str(),
        ];
        check_config("nginx", &bin, &[&["-t".as_ref()], &args[..]].concat());
        let child = spawn_logged("nginx", &bin, &args, &output);
        Receiver::ready("nginx", child, dir, addr, access_log, output)
    }

    /// Waits until the receiver answers a request that carries a PROXY v1
    /// header written by the test itself (which also shows the receiver
    /// reports the announced address, not the connection's).
    fn ready(
        name: &'static str,
        mut child: Child,
        dir: TempDir,
        addr: SocketAddr,
        access_log: PathBuf,
        output: PathBuf,
    ) -> Receiver {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "{name} exited ({status}) at startup:\n{}{}",
                    fs::read_to_string(&output).unwrap_or_default(),
                    fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
                );
            }
            let header = format!(
                "PROXY TCP4 127.9.9.9 {} 1111 {}\r\n",
                addr.ip(),
                addr.port()
            );
            match request(None, addr, header.as_bytes()) {
                Ok(body) => {
                    assert_eq!(body.trim(), "127.9.9.9:1111", "{name}'s answer");
                    break;
                }
                Err(e) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{name} did not answer on {addr} within {WAIT:?} ({e}):\n{}",
                        fs::read_to_string(&output).unwrap_or_default()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        Receiver {
            name,
            child,
            dir,
            addr,
            access_log,
            output,
        }
    }

    /// The receiver's access log so far.
    fn log(&self) -> String {
        fs::read_to_string(&self.access_log).unwrap_or_default()
    }

    /// Waits until the access log names every one of `clients`.
    fn wait_logged(&self, clients: &[SocketAddr]) {
        wait_until(
            &format!("{} to log every client address", self.name),
            WAIT,
            || {
                let log = self.log();
                clients
                    .iter()
                    .all(|c| log.lines().any(|l| logged_client(l) == Some(c.to_string())))
                    .then_some(())
            },
        );
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} output ---\n{}\n--- {} access log ---\n{}\n--- error.log ---\n{}",
                self.name,
                fs::read_to_string(&self.output).unwrap_or_default(),
                self.name,
                self.log(),
                fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
            );
        }
    }
}

/// `IP:PORT` from a `client=IP:PORT ...` log line.
fn logged_client(line: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("client="))
        .map(str::to_owned)
}

/// One `GET /` with `Connection: close`, from `from` (or any address), with
/// `preamble` written first; returns the body of a 200 answer.
fn request(from: Option<BoundClient>, to: SocketAddr, preamble: &[u8]) -> std::io::Result<String> {
    let mut s = match from {
        Some(c) => c.connect(to)?,
        None => connect(to)?,
    };
    let (status, head, body) = get_close_after(&mut s, preamble, "/")?;
    if status != 200 || !head.starts_with("HTTP/1.1 ") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a 200: {head:?}"),
        ));
    }
    Ok(body)
}

/// A balancer with two frontends in front of `receiver`: `pp-v1` announcing
/// clients with PROXY v1, `pp-v2` with v2. No active probes, so the receiver
/// only sees the test's flows.
fn balancer_for(receiver: &Receiver) -> Proxy {
    let frontend = |name: &str, mode: &str| {
        format!(
            "[[frontends]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nclient_address = \"{mode}\"\n\n[frontends.health]\nkind = \"none\"\n\n{}\n",
            backend_toml(receiver.name, receiver.addr)
        )
    };
    Proxy::run(&format!(
        "workers = 2\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{}\n{}",
        frontend("pp-v1", "proxy-protocol-v1"),
        frontend("pp-v2", "proxy-protocol-v2"),
    ))
}

/// Sends requests from 127.0.4.x through both frontends and checks that the
/// receiver answered, and logged, each client's exact address and port.
fn check_receiver(receiver: &Receiver) {
    let proxy = balancer_for(receiver);
    let mut clients = Vec::new();
    for (frontend, first) in [("pp-v1", 7u8), ("pp-v2", 17u8)] {
        let to = proxy.frontend(frontend);
        for k in first..first + 3 {
            let client = BoundClient::new(Ipv4Addr::new(127, 0, 4, k)).expect("bind client");
            let local = client.local;
            let body = request(Some(client), to, b"").unwrap_or_else(|e| {
                panic!(
                    "{} via {frontend} from {local}: {e}\n--- lb-proxy stderr ---\n{}",
                    receiver.name,
                    proxy.stderr()
                )
            });
            assert_eq!(
                body.trim(),
                local.to_string(),
                "{} via {frontend} believes the client is {}, not {local}",
                receiver.name,
                body.trim()
            );
            clients.push(local);
        }
    }
    receiver.wait_logged(&clients);
    let log = receiver.log();
    for c in &clients {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| logged_client(l) == Some(c.to_string()))
            .collect();
        assert_eq!(lines.len(), 1, "{c} in {}'s log:\n{log}", receiver.name);
        assert!(lines[0].contains("status=200"), "{}", lines[0]);
    }
    // Nothing reached the receiver without a header announcing a client.
    for l in log.lines() {
        let client = logged_client(l).unwrap_or_default();
        assert!(
            client.starts_with("127.0.4.") || client.starts_with("127.9.9.9:"),
            "unexpected request in {}'s log: {l}",
            receiver.name
        );
    }
    assert_eq!(
        proxy
            .metric("lb_frontend_no_backend_total", &[])
            .unwrap_or(0.0),
        0.0
    );
}

#[test]
fn haproxy_reads_the_client_address_from_proxy_v1_and_v2() {
    check_receiver(&Receiver::haproxy());
}

#[test]
fn nginx_reads_the_client_address_from_proxy_v1_and_v2() {
    check_receiver(&Receiver::nginx());
}
