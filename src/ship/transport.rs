//! The TCP connection under every request, watched for a link that is slow
//! rather than stalled.
//!
//! Progress is seen as bytes handed to the socket. A body that fits in the
//! kernel's send buffer is handed over at once, and on a thin link the
//! kernel may still be sending it for many seconds while the agent waits for
//! the answer: a per-read `stall_timeout` alone would give up on a link that
//! is carrying the body, and the remote would store a batch the agent then
//! sends again. So while waiting for an answer, a send queue that is still
//! shrinking (`SIOCOUTQ`: bytes not yet acknowledged by the peer) counts as
//! progress, and the remote's `timeout` to answer runs from when the queue
//! stopped shrinking. A connection given up on is
//! closed with a reset (`SO_LINGER` 0), so that what the kernel still holds
//! of the abandoned body does not go on using the link beside the retry.
//!
//! Built on ureq's transport API, in place of its `TcpConnector` and TCP
//! transport (which do not let the socket be seen): connect, then per-write
//! and per-read socket timeouts as ureq sets them.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, ShutdownHandle,
    Transport,
};
use ureq::Error;

/// Connects like ureq's `TcpConnector`, and hands out a [`Watched`]
/// transport.
#[derive(Debug, Default)]
pub struct WatchedTcpConnector;

impl<In: Transport> Connector<In> for WatchedTcpConnector {
    type Out = Either<In, Watched>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, Error> {
        if chained.is_some() {
            return Ok(chained.map(Either::A));
        }
        let config = details.config;
        let started = Instant::now();
        let budget = details.timeout.not_zero().map(|d| *d);
        let mut last = None;
        let mut stream = None;
        let count = details.addrs.len();
        for (i, addr) in details.addrs.iter().enumerate() {
            // Half of what is left for each address but the last, so that
            // one that does not answer (IPv6 on a network without it) leaves
            // time for the next, as ureq's own connector does.
            let left = budget
                .map(|b| b.saturating_sub(started.elapsed()))
                .map(|l| if i + 1 < count { l / 2 } else { l });
            let attempt = match left {
                Some(left) if left.is_zero() => break,
                Some(left) => TcpStream::connect_timeout(addr, left),
                None => TcpStream::connect(addr),
            };
            match attempt {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = match (stream, last) {
            (Some(s), _) => s,
            (None, Some(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(Error::Timeout(ureq::Timeout::Connect))
            }
            (None, Some(e)) => return Err(e.into()),
            (None, None) => return Err(Error::Timeout(ureq::Timeout::Connect)),
        };
        if config.no_delay() {
            stream.set_nodelay(true)?;
        }
        let stream = Arc::new(stream);
        (details.register_shutdown)(Arc::downgrade(&stream) as Weak<dyn ShutdownHandle>)?;
        let buffers = LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size());
        Ok(Some(Either::B(Watched {
            stream,
            buffers,
            read_timeout: None,
            write_timeout: None,
        })))
    }
}

/// A TCP transport whose waits for input go on while the socket's send
/// queue shrinks.
pub struct Watched {
    /// Shared with the shutdown handle ureq keeps (weakly), which shuts the
    /// socket down to interrupt a request from another thread.
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
    /// The socket timeouts set last, to set them only when they change.
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").finish_non_exhaustive()
    }
}

/// Bytes in the socket's send queue not yet acknowledged by the peer.
fn unsent(s: &TcpStream) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for a socket) writes one int through the
    // pointer, which points at `n`; the fd is open for the borrow of `s`.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        u64::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// Makes the socket's close a reset: what it still holds is discarded.
fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: SO_LINGER reads one `linger` from the pointer, which points at
    // a live value of the size given; the fd is open for the borrow of `s`.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The timeout of one socket call: `None` never times out (ureq's "not
/// happening"); a zero budget is spent.
fn socket_timeout(t: &NextTimeout) -> Result<Option<Duration>, Error> {
    if t.after.is_not_happening() {
        return Ok(None);
    }
    if t.after.is_zero() {
        return Err(Error::Timeout(t.reason));
    }
    Ok(Some(*t.after))
}

impl Transport for Watched {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        let t = timeout.for_write();
        let d = socket_timeout(&t)?;
        if d != self.write_timeout {
            self.stream.set_write_timeout(d)?;
            self.write_timeout = d;
        }
        let output = &self.buffers.output()[..amount];
        match (&*self.stream).write_all(output) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                reset_on_close(&self.stream);
                Err(Error::Timeout(t.reason))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        // The request's own budget (`timeout`, for the answer) starts again
        // while the body is still on its way: the remote cannot answer a
        // body it has not received.
        let mut started = Instant::now();
        // The per-read timeout is `stall_timeout`: no byte received and the
        // send queue not shrinking for that long is a stall. It is checked
        // in slices, so that a link that stops after some progress is
        // caught a stall_timeout after it stopped, not up to twice that.
        let stall = timeout.per_read.map(|d| *d);
        let slice = stall.map(|s| (s / 4).max(Duration::from_millis(50)));
        let mut moved = Instant::now();
        let mut queued = unsent(&self.stream);
        loop {
            // What is left of the request's own budget (`timeout`).
            let mut t = timeout;
            t.per_read = None;
            if !t.after.is_not_happening() {
                t.after = (*t.after).saturating_sub(started.elapsed()).into();
            }
            if let Some(slice) = slice {
                if slice < *t.after {
                    t.after = slice.into();
                }
            }
            let d = match socket_timeout(&t) {
                Ok(d) => d,
                Err(e) => {
                    reset_on_close(&self.stream);
                    return Err(e);
                }
            };
            if d != self.read_timeout {
                self.stream.set_read_timeout(d)?;
                self.read_timeout = d;
            }
            let input = self.buffers.input_append_buf();
            match (&*self.stream).read(input) {
                Ok(n) => {
                    self.buffers.input_appended(n);
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    let now = unsent(&self.stream);
                    if now < queued {
                        // The link still carries the body: not a stall.
                        moved = Instant::now();
                        started = moved;
                    }
                    queued = now;
                    let overall_spent =
                        !timeout.after.is_not_happening() && started.elapsed() >= *timeout.after;
                    if overall_spent {
                        reset_on_close(&self.stream);
                        return Err(Error::Timeout(timeout.reason));
                    }
                    if stall.is_some_and(|s| moved.elapsed() >= s) {
                        reset_on_close(&self.stream);
                        return Err(Error::Timeout(ureq::Timeout::PerRead));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn is_open(&mut self) -> bool {
        // Open and idle: a read would block. Bytes nobody asked for, an
        // end of stream or an error mean the connection is not reusable.
        let mut probe = [0u8; 1];
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let open =
            matches!((&*self.stream).read(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock);
        open && self.stream.set_nonblocking(false).is_ok()
    }
}
