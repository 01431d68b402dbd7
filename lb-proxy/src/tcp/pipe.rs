//! splice(2) through a pipe, as both TCP engines move a bulk transfer: the
//! rule that starts and ends a bulk run, the pipe a run borrows (sized to
//! [`CHUNK`], within the data plane's fd reserve), and the non-blocking
//! splice call. Socket → pipe → socket: the bytes never cross into
//! userspace.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::copy::SCRATCH_LEN;

/// The most one splice moves, and the pipe's capacity: a bigger pipe means
/// fewer splice calls per megabyte.
pub const CHUNK: usize = 1 << 20;

/// A read of this much (the whole userspace buffer: the socket had at least
/// that much queued) starts a bulk run.
pub const BULK_STARTS_AT: usize = SCRATCH_LEN;

/// A splice read smaller than this ends a bulk run: back to the userspace
/// copy, which costs fewer syscalls per small message (no pipe hop).
pub const BULK_END_BELOW: usize = SCRATCH_LEN / 4;

/// A pipe's two ends.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A non-blocking, close-on-exec pipe of [`CHUNK`] bytes (or the
    /// kernel's default, where it refuses the size); refused where its fds
    /// would eat into the control plane's reserve.
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        if !crate::fds::data_plane_may_hold(read.as_raw_fd().max(write.as_raw_fd())) {
            return Err(crate::fds::reserve_reached());
        }
        // Failure just keeps the default size.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(Pipe { read, write })
    }

    pub fn read_end(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub fn write_end(&self) -> RawFd {
        self.write.as_raw_fd()
    }
}

/// Out of descriptors or memory: the bytes can still go through userspace.
pub fn is_fd_shortage(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
        || e.kind() == io::ErrorKind::OutOfMemory
}

/// Moves up to `len` bytes from `from` to `to` without blocking; `more`
/// says more bytes follow at once (`SPLICE_F_MORE`, as `MSG_MORE`).
pub fn splice(from: RawFd, to: RawFd, len: usize, more: bool) -> io::Result<usize> {
    let more = if more { libc::SPLICE_F_MORE } else { 0 };
    // SAFETY: plain descriptors and null offsets, as splice(2) allows for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK | more,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
