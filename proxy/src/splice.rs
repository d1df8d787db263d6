//! Zero-copy forwarding: socket → pipe → socket with splice(2), bytes never enter user space.
//!
//! All system calls go through nix's safe wrappers (`pipe2`, `splice`, `fcntl`), so this module
//! holds no `unsafe` at all. Readiness comes from tokio: wait until the socket is readable or
//! writable, then try the splice; `WouldBlock` clears the readiness and we wait again.
//!
//! A [`Pipe`] is a pair of kernel pipe ends; both close on drop (`OwnedFd`). Pipes are reused
//! across connections through a small per-thread pool, so a new connection usually costs no
//! `pipe2` call.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Kernel pipe capacity requested per pipe (the default is 64 KiB).
const PIPE_SIZE: i32 = 1 << 20;
/// Most bytes moved per splice call.
const CHUNK: usize = 1 << 20;
/// Pipes kept per thread for reuse.
const POOL: usize = 64;

pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe not yet spliced out. A pipe goes back to the pool only when empty.
    pending: usize,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    /// A pipe from this thread's pool, or a new one.
    pub fn get() -> io::Result<Pipe> {
        if let Some(pipe) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(pipe);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Larger pipes mean fewer splice calls per megabyte; the kernel may refuse (limits).
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Pipe {
            read,
            write,
            pending: 0,
        })
    }

    /// Returns an empty pipe to this thread's pool; a pipe still holding bytes is closed.
    pub fn put(self) {
        if self.pending == 0 {
            PIPES.with(|p| {
                let mut pool = p.borrow_mut();
                if pool.len() < POOL {
                    pool.push(self);
                }
            });
        }
    }
}

/// `from` reached EOF: shut down `to`'s write side so its peer sees the half-close — unless the
/// other direction is already done, when the connection is about to be closed and `close` sends
/// the FIN anyway (both receive buffers are drained, so no RST): one syscall less per connection.
/// `other_done` is shared by the two directions of one connection.
fn propagate_eof(to: &TcpStream, other_done: &AtomicBool) {
    if !other_done.swap(true, Ordering::AcqRel) {
        let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
    }
}

fn nix_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Moves bytes from `from` to `to` until `from` reaches EOF, then propagates the half-close (see
/// `propagate_eof`). Returns the bytes moved. `on_progress` is called after every
/// transfer (idle tracking, metrics).
///
/// Each splice is tried at once and only waits for readiness on `EAGAIN`: a fresh socket is
/// almost always writable and a client has usually sent its request before the upstream connect
/// finished, so the optimistic attempt saves an event-loop round trip per direction per
/// connection.
pub async fn forward(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &mut Pipe,
    other_done: &AtomicBool,
    mut on_progress: impl FnMut(usize),
) -> io::Result<u64> {
    let mut total = 0u64;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        if pipe.pending == 0 {
            let fill = || {
                splice(from.as_fd(), None, pipe.write.as_fd(), None, CHUNK, flags).map_err(nix_err)
            };
            let n = match fill() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    from.async_io(Interest::READABLE, fill).await?
                }
                other => other?,
            };
            if n == 0 {
                break;
            }
            pipe.pending = n;
        }
        while pipe.pending > 0 {
            let drain = || {
                splice(
                    pipe.read.as_fd(),
                    None,
                    to.as_fd(),
                    None,
                    pipe.pending,
                    flags,
                )
                .map_err(nix_err)
            };
            let n = match drain() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    to.async_io(Interest::WRITABLE, drain).await?
                }
                other => other?,
            };
            pipe.pending -= n;
            total += n as u64;
            on_progress(n);
        }
    }
    propagate_eof(to, other_done);
    Ok(total)
}

/// The portable path, with the same optimistic attempts: read into a buffer, write it out,
/// propagate EOF as a half-close.
pub async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    other_done: &AtomicBool,
    mut on_progress: impl FnMut(usize),
) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match nix::unistd::read(from.as_fd(), &mut buf[..]).map_err(nix_err) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                from.async_io(Interest::READABLE, || {
                    nix::unistd::read(from.as_fd(), &mut buf[..]).map_err(nix_err)
                })
                .await?
            }
            other => other?,
        };
        if n == 0 {
            break;
        }
        let mut sent = 0;
        while sent < n {
            let write = || nix::unistd::write(to.as_fd(), &buf[sent..n]).map_err(nix_err);
            sent += match write() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    to.async_io(Interest::WRITABLE, write).await?
                }
                other => other?,
            };
        }
        total += n as u64;
        on_progress(n);
    }
    propagate_eof(to, other_done);
    Ok(total)
}
