//! Addresses and sockets: targets (`http://IP:PORT/path` or `IP:PORT`), source
//! address ranges, connecting from a chosen source and free loopback ports.
//! (The blocking GET for admin endpoints is [`crate::client`]'s.)

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// What a load run talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// HTTP/1.1 `GET path` to `addr`, with `Host: host`.
    Http {
        addr: SocketAddr,
        host: String,
        path: String,
    },
    /// Raw TCP: send bytes, read the echo.
    Tcp { addr: SocketAddr },
}

impl Target {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Target::Http { addr, .. } | Target::Tcp { addr } => *addr,
        }
    }

    /// Parses `http://HOST[:PORT][/path]` (HTTP) or `HOST:PORT` (TCP when
    /// `tcp`, else HTTP to `/`). HOST is an IP address or a name that resolves.
    pub fn parse(text: &str, tcp: bool) -> Result<Target> {
        let bad = |why: &str| Error::BadArgument(format!("target `{text}`: {why}"));
        if let Some(rest) = text.strip_prefix("http://") {
            if tcp {
                return Err(bad("--tcp takes IP:PORT, not a URL"));
            }
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let with_port = if authority.starts_with('[') {
                if authority.contains("]:") {
                    authority.to_owned()
                } else {
                    format!("{authority}:80")
                }
            } else if authority.contains(':') {
                authority.to_owned()
            } else {
                format!("{authority}:80")
            };
            let addr = resolve(&with_port).map_err(|e| bad(&e))?;
            return Ok(Target::Http {
                addr,
                host: authority.to_owned(),
                path: path.to_owned(),
            });
        }
        if text.contains("://") {
            return Err(bad("only http:// URLs are supported"));
        }
        let addr = resolve(text).map_err(|e| bad(&e))?;
        Ok(if tcp {
            Target::Tcp { addr }
        } else {
            Target::Http {
                addr,
                host: text.to_owned(),
                path: "/".to_owned(),
            }
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Http { addr, path, .. } => write!(f, "http://{addr}{path}"),
            Target::Tcp { addr } => write!(f, "tcp://{addr}"),
        }
    }
}

fn resolve(hostport: &str) -> std::result::Result<SocketAddr, String> {
    if let Ok(a) = hostport.parse() {
        return Ok(a);
    }
    hostport
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| "no IPv4 address".to_owned())
}

/// An inclusive IPv4 range, `127.0.0.2-127.0.0.200` (or one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl SourceRange {
    pub fn len(&self) -> u64 {
        u64::from(u32::from(self.last)) - u64::from(u32::from(self.first)) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `i`-th address, wrapping around.
    pub fn nth(&self, i: u64) -> Ipv4Addr {
        let offset = (i % self.len()) as u32;
        Ipv4Addr::from(u32::from(self.first) + offset)
    }

    pub fn iter(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (0..self.len()).map(|i| self.nth(i))
    }
}

impl FromStr for SourceRange {
    type Err = Error;

    fn from_str(s: &str) -> Result<SourceRange> {
        let bad = |why: String| Error::BadArgument(format!("source range `{s}`: {why}"));
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: Ipv4Addr = a.trim().parse().map_err(|e| bad(format!("{e}")))?;
        let last: Ipv4Addr = b.trim().parse().map_err(|e| bad(format!("{e}")))?;
        if u32::from(last) < u32::from(first) {
            return Err(bad("the last address is below the first".into()));
        }
        Ok(SourceRange { first, last })
    }
}

impl fmt::Display for SourceRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Hands out source addresses round-robin, one per new connection.
#[derive(Debug)]
pub struct SourcePicker {
    range: Option<SourceRange>,
    next: AtomicU64,
}

impl SourcePicker {
    pub fn new(range: Option<SourceRange>) -> SourcePicker {
        SourcePicker {
            range,
            next: AtomicU64::new(0),
        }
    }

    pub fn pick(&self) -> Option<Ipv4Addr> {
        self.range
            .map(|r| r.nth(self.next.fetch_add(1, Ordering::Relaxed)))
    }
}

/// Lets the kernel choose the source port at connect time, from the whole
/// 4-tuple, instead of at bind time (IP_BIND_ADDRESS_NO_PORT): many
/// connections from one bound address do not run out of ports.
fn bind_no_port(fd: std::os::fd::RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a pointer to a live c_int of the given size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Connects (tokio) to `to`, from `source` when given.
pub async fn connect_from(
    source: Option<Ipv4Addr>,
    to: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let stream = match source {
        None => tokio::net::TcpStream::connect(to).await?,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            bind_no_port(socket.as_raw_fd());
            socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
            socket.connect(to).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects (blocking) to `to`, from `source` when given.
pub fn connect_std_from(
    source: Option<Ipv4Addr>,
    to: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect_timeout(&to, timeout)?,
        Some(ip) => {
            let socket = socket_v4()?;
            // Linux bounds a blocking connect(2) by the send timeout.
            socket.set_write_timeout(Some(timeout))?;
            bind_no_port(socket.as_raw_fd());
            let local = SocketAddr::new(IpAddr::V4(ip), 0);
            let local = sockaddr_in(local);
            // SAFETY: bind with a valid fd and a sockaddr_in of the given size.
            let rc = unsafe {
                libc::bind(
                    socket.as_raw_fd(),
                    (&local as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let remote = sockaddr_in(to);
            // SAFETY: connect with a valid fd and a sockaddr_in of the given size (blocking socket).
            let rc = unsafe {
                libc::connect(
                    socket.as_raw_fd(),
                    (&remote as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            socket
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn socket_v4() -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    Ok(unsafe { TcpStream::from_raw_fd(fd) })
}

fn sockaddr_in(addr: SocketAddr) -> libc::sockaddr_in {
    let (ip, port) = match addr {
        SocketAddr::V4(v4) => (*v4.ip(), v4.port()),
        SocketAddr::V6(_) => (Ipv4Addr::UNSPECIFIED, addr.port()),
    };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A port on `ip` that was free a moment ago (bound to port 0, then released).
pub fn free_port(ip: Ipv4Addr) -> Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0)).ctx(|| format!("bind {ip}:0"))?;
    Ok(l.local_addr().ctx(|| "local_addr".into())?.port())
}

/// Polls until a TCP connect to `addr` succeeds, or `timeout` passes.
pub fn wait_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// The blocking GETs live in `client`, shared with the end-to-end tests; these
// names stay for the callers that know them from here.
pub(crate) use crate::client::truncate;
pub use crate::client::{get as http_get, get_json};

/// The sum of every series of `name` in a Prometheus text body whose labels
/// include all of `labels`; `None` when none matches.
pub fn metric_sum(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in body.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let matches = labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|p| p == format!("{k}=\"{v}\"")));
        if matches {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("http://127.0.0.1:8080/x?y=1", false).unwrap(),
            Target::Http {
                addr: "127.0.0.1:8080".parse().unwrap(),
                host: "127.0.0.1:8080".into(),
                path: "/x?y=1".into()
            }
        );
        assert_eq!(
            Target::parse("http://127.0.0.1", false).unwrap().addr(),
            "127.0.0.1:80".parse().unwrap()
        );
        assert_eq!(
            Target::parse("127.0.0.1:9", true).unwrap(),
            Target::Tcp {
                addr: "127.0.0.1:9".parse().unwrap()
            }
        );
        assert!(Target::parse("https://127.0.0.1/", false).is_err());
        assert!(Target::parse("http://127.0.0.1/", true).is_err());
    }

    #[test]
    fn source_ranges() {
        let r: SourceRange = "127.0.0.2-127.0.0.200".parse().unwrap();
        assert_eq!(r.len(), 199);
        assert_eq!(r.nth(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(r.nth(198), Ipv4Addr::new(127, 0, 0, 200));
        assert_eq!(r.nth(199), Ipv4Addr::new(127, 0, 0, 2));
        let across: SourceRange = "127.0.0.255-127.0.1.1".parse().unwrap();
        assert_eq!(
            across.iter().collect::<Vec<_>>(),
            [
                Ipv4Addr::new(127, 0, 0, 255),
                Ipv4Addr::new(127, 0, 1, 0),
                Ipv4Addr::new(127, 0, 1, 1)
            ]
        );
        let one: SourceRange = "127.0.0.9".parse().unwrap();
        assert_eq!(one.len(), 1);
        assert!("127.0.0.9-127.0.0.1".parse::<SourceRange>().is_err());
        assert!("x".parse::<SourceRange>().is_err());
        let picker = SourcePicker::new(Some(across));
        let picked: Vec<_> = (0..4).map(|_| picker.pick().unwrap()).collect();
        assert_eq!(picked[3], picked[0]);
    }

    #[test]
    fn metrics_sum_by_labels() {
        let body = "# HELP x\nlb_backend_up{backend=\"a\",frontend=\"web\"} 1\nlb_backend_up{backend=\"b\",frontend=\"web\"} 0\nprocess_open_fds 12\n";
        assert_eq!(
            metric_sum(body, "lb_backend_up", &[("backend", "a")]),
            Some(1.0)
        );
        assert_eq!(
            metric_sum(body, "lb_backend_up", &[("frontend", "web")]),
            Some(1.0)
        );
        assert_eq!(metric_sum(body, "process_open_fds", &[]), Some(12.0));
        assert_eq!(metric_sum(body, "nope", &[]), None);
    }
}
