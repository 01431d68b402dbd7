//! The sockmap engine's system calls: the BPF map element commands (raw
//! `bpf(2)`, so the hot path needs no loader library), the socket facts the
//! engine reads (cookie, `TCP_INFO`, bytes given to a stream), and the kick
//! that runs the verdict over queued bytes.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

/// CLOCK_MONOTONIC in ns: the program's `bpf_ktime_get_ns`, and [`tokio::time::Instant`]'s clock.
pub(super) fn monotonic_ns() -> u64 {
    let mut ts = MaybeUninit::<libc::timespec>::zeroed();
    // SAFETY: clock_gettime writes a timespec into valid memory; CLOCK_MONOTONIC always exists.
    let ts = unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, ts.as_mut_ptr());
        ts.assume_init()
    };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---- sockets -------------------------------------------------------------

/// `getsockopt(SO_COOKIE)`: the key both maps use.
pub(super) fn cookie(stream: &impl AsRawFd) -> io::Result<u64> {
    getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE)
}

pub(crate) fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

fn getsockopt<T: Copy>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` has room for `len` bytes; the kernel writes at most that many.
    let rc = unsafe { libc::getsockopt(fd, level, name, value.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised plain data, partly or wholly overwritten by the kernel.
    Ok(unsafe { value.assume_init() })
}

/// Bytes given to the socket's stream so far, up to a constant: `write_seq`,
/// as bytes acked (`tcpi_bytes_acked`) plus bytes not yet acked
/// (`SIOCOUTQ`). An ACK landing between the reads changes the first, so it
/// is read again until it held still.
pub(super) fn written(stream: &impl AsRawFd) -> io::Result<u64> {
    let fd = stream.as_raw_fd();
    let mut acked = tcp_info(fd)?.tcpi_bytes_acked;
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int.
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let again = tcp_info(fd)?.tcpi_bytes_acked;
        if again == acked {
            return Ok(acked + queued.max(0) as u64);
        }
        acked = again;
    }
}

/// Whether the socket can still send: it has not sent its FIN, nor closed.
pub(super) fn can_send(stream: &impl AsRawFd) -> bool {
    const TCP_ESTABLISHED: u8 = 1;
    const TCP_CLOSE_WAIT: u8 = 8;
    tcp_info(stream.as_raw_fd())
        .is_ok_and(|i| matches!(i.tcpi_state, TCP_ESTABLISHED | TCP_CLOSE_WAIT))
}

/// Runs the verdict over whatever the socket has queued: the kernel's
/// sockmap recvmsg does that first (for bytes that arrived before the
/// socket joined the map). What it returns does not matter.
pub(super) fn kick(stream: &impl AsFd) {
    let _ = crate::tcp::syscall::peek(stream.as_fd());
}

// ---- bpf(2) map operations ------------------------------------------------

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
/// Update flag: create only.
pub(super) const BPF_NOEXIST: u64 = 1;

/// The `bpf_attr` layout of the map element commands.
#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn map_command(
    cmd: libc::c_long,
    map: &OwnedFd,
    key: *const u64,
    value: u64,
    flags: u64,
) -> io::Result<()> {
    let attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as u64,
        value,
        flags,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for the command; key and
    // value point to memory of the map's key and value sizes, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const MapElem,
            size_of::<MapElem>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(super) fn update<V>(map: &OwnedFd, key: &u64, value: &V, flags: u64) -> io::Result<()> {
    map_command(
        BPF_MAP_UPDATE_ELEM,
        map,
        key,
        value as *const V as u64,
        flags,
    )
}

pub(super) fn lookup(map: &OwnedFd, key: &u64) -> io::Result<super::FlowSide> {
    let mut value = super::FlowSide::default();
    map_command(
        BPF_MAP_LOOKUP_ELEM,
        map,
        key,
        &mut value as *mut super::FlowSide as u64,
        0,
    )?;
    Ok(value)
}

pub(super) fn delete(map: &OwnedFd, key: &u64) -> io::Result<()> {
    map_command(BPF_MAP_DELETE_ELEM, map, key, 0, 0)
}
