//! Per-flow upstream sockets, and the epoll set that tells a worker which of
//! them have replies waiting.
//!
//! Each flow gets its own UDP socket, bound as a TCP connect would be (SNAT
//! to a node, the client's IP under `preserve` or `Local`: see
//! [`crate::target`]) and connected to its target. The backend therefore sees
//! a distinct source per client, and a reply arriving on the socket belongs
//! to that flow without a lookup.
//!
//! The sockets are not registered with tokio one by one: a worker's are all
//! in one epoll set of its own, tagged with their flow slot, and only that
//! set's descriptor is registered with the runtime. One readiness event then
//! yields every flow with replies, which are read and sent on to their
//! clients in one batch, with no task, lock or allocation per flow or per
//! datagram. A socket leaves the set when it is closed.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::warn;

use crate::config::{ClientAddress, FrontendConfig};

/// Opens a non-blocking UDP socket connected to `target`, bound first to
/// `bind` when the flow's source is not the kernel's choice.
pub fn open(target: SocketAddr, bind: Option<IpAddr>) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::DGRAM.nonblocking(),
        Some(Protocol::UDP),
    )?;
    if !crate::fds::data_plane_may_hold(socket.as_raw_fd()) {
        return Err(crate::fds::reserve_reached());
    }
    if let Some(ip) = bind {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket.connect(&target.into())?;
    Ok(socket.into())
}

/// Where the kernel keeps the range its ephemeral ports come from.
const PORT_RANGE_FILE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// How many ephemeral ports the kernel hands out (`ip_local_port_range`),
/// if it says.
pub fn ephemeral_ports() -> Option<usize> {
    parse_port_range(&std::fs::read_to_string(PORT_RANGE_FILE).ok()?)
}

/// `LOW HIGH` (as the kernel writes the range) → how many ports that is.
fn parse_port_range(text: &str) -> Option<usize> {
    let mut bounds = text.split_whitespace().map(str::parse::<u16>);
    let (low, high) = (bounds.next()?.ok()?, bounds.next()?.ok()?);
    (low <= high).then(|| usize::from(high - low) + 1)
}

/// Under SNAT every flow's upstream socket holds an ephemeral port of the
/// balancer's own address, so a UDP frontend holds at most `ports` flows,
/// whatever its `max_flows`; past that, new flows fail (counted
/// `upstream_error`). Says so when `max_flows` is larger (call once per
/// frontend, at startup); returns whether it did.
pub fn warn_if_ports_short(fe: &FrontendConfig, ports: usize) -> bool {
    let snat = fe.client_address == ClientAddress::Snat;
    if !fe.protocol.is_udp() || !snat || fe.max_flows <= ports {
        return false;
    }
    warn!(
        frontend = %fe.name,
        max_flows = fe.max_flows,
        ephemeral_ports = ports,
        "each UDP flow under SNAT holds an ephemeral port, so this frontend holds at most \
         {ports} flows (net.ipv4.ip_local_port_range), fewer than max_flows; new flows past \
         that fail (lb_udp_dropped_datagrams_total{{reason=\"upstream_error\"}}): widen the \
         range or lower max_flows"
    );
    true
}

/// An epoll set of upstream sockets, each tagged with its flow slot.
pub struct Poller {
    epoll: OwnedFd,
}

impl AsRawFd for Poller {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

/// Ready sockets read by one [`Poller::wait`]: their flow slots.
pub struct Ready {
    events: Box<[libc::epoll_event]>,
    len: usize,
}

impl Ready {
    pub fn new(capacity: usize) -> Self {
        Ready {
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)]
                .into_boxed_slice(),
            len: 0,
        }
    }

    /// The flow slots whose sockets are readable (or have an error to report).
    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.events[..self.len].iter().map(|e| e.u64 as usize)
    }

    /// The `k`th ready slot, below [`Self::len`].
    pub fn slot(&self, k: usize) -> usize {
        self.events[..self.len][k].u64 as usize
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Poller {
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 has no preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Poller { epoll })
    }

    /// Watches `socket` for replies, level-triggered: a socket left with
    /// datagrams after a bounded read is reported again on the next wait.
    pub fn add(&self, socket: RawFd, slot: usize) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: slot as u64,
        };
        // SAFETY: both descriptors are open; `event` is a valid epoll_event.
        let rc = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                socket,
                &mut event,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The sockets ready now, without waiting; `WouldBlock` when none is
    /// (which is when the runtime's readiness for the set may be cleared).
    pub fn wait(&self, ready: &mut Ready) -> io::Result<usize> {
        // SAFETY: the event buffer is valid for `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                ready.events.as_mut_ptr(),
                ready.events.len() as libc::c_int,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        ready.len = n as usize;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_range_is_read_as_the_kernel_writes_it() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(28_232));
        assert_eq!(parse_port_range("1024 1024"), Some(1));
        for bad in ["", "32768", "60999 32768", "a b", "1 70000"] {
            assert_eq!(parse_port_range(bad), None, "{bad:?}");
        }
        assert!(ephemeral_ports().is_some_and(|n| n > 0), "this Linux says");
    }

    /// Only a UDP frontend under SNAT whose bound exceeds the ports warns.
    #[test]
    fn max_flows_beyond_the_ephemeral_ports_warns_under_snat_only() {
        let fe = |protocol: &str, client_address: &str, max_flows: usize| {
            let text = format!(
                "[[frontends]]\nname = \"u\"\nlisten = \"127.0.0.1:8053\"\n\
                 protocol = \"{protocol}\"\nclient_address = \"{client_address}\"\n\
                 [[frontends.backends]]\nname = \"b\"\naddress = \"127.0.0.1:9053\"\n"
            );
            let mut config = crate::config::parse("u.toml", &text).unwrap();
            let mut fe = config.frontends.remove(0);
            fe.max_flows = max_flows;
            fe
        };
        assert!(warn_if_ports_short(&fe("udp", "snat", 65_536), 28_232));
        assert!(!warn_if_ports_short(&fe("udp", "snat", 28_232), 28_232));
        assert!(!warn_if_ports_short(&fe("udp", "preserve", 65_536), 28_232));
        assert!(!warn_if_ports_short(&fe("tcp", "snat", 65_536), 28_232));
    }

    /// A connected upstream reports readiness under its slot when its
    /// target replies, and leaves the set when closed.
    #[test]
    fn ready_sockets_come_back_tagged_with_their_slot() {
        let backend = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let poller = Poller::new().unwrap();
        let mut ready = Ready::new(8);
        let up = open(
            backend.local_addr().unwrap(),
            Some("127.0.0.7".parse().unwrap()),
        )
        .unwrap();
        poller.add(up.as_raw_fd(), 41).unwrap();
        assert_eq!(
            poller.wait(&mut ready).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        up.send(b"ping").unwrap();
        let mut buf = [0u8; 8];
        let (n, from) = backend.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(
            from.ip().to_string(),
            "127.0.0.7",
            "bound to the given source"
        );
        backend.send_to(b"pong", from).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while poller.wait(&mut ready).is_err() {
            assert!(std::time::Instant::now() < deadline, "no readiness");
            std::thread::yield_now();
        }
        assert_eq!(ready.slots().collect::<Vec<_>>(), vec![41]);
        drop(up);
        assert!(
            poller.wait(&mut ready).is_err(),
            "a closed socket leaves the set"
        );
    }
}
