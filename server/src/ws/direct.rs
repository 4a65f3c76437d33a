//! Writing a broadcast straight into a ready socket from the document's actor.
//!
//! Relaying through the connection's queue costs, per recipient, a wake-up of its task, a poll
//! of its event loop and a copy into tungstenite's buffer before the one `send` that matters.
//! When the connection has nothing queued and is not writing, the actor can instead frame the
//! message itself and `send` it without blocking: the whole cost of a delivery is then that
//! syscall, as in the least work any server can do. Whenever that is not possible (something
//! queued or being written, a full socket, a big message, TLS, an embedded socket, a client
//! that sends pings) the message takes the queue as before, so order is kept.
//!
//! The session and the actor share one lock per connection: the session holds the socket
//! (`busy`) from before it writes anything until tungstenite has flushed it, and the actor
//! writes only while nothing is queued (`queued == written`) and the socket is not held. A
//! write the kernel takes only partly leaves its tail here, and a marker in the queue tells the
//! session to send the tail before anything else.

use std::cell::OnceCell;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, LazyLock, Mutex};

use actix_web::web::Bytes;

use crate::doc::messages::Outgoing;

/// Larger messages are fragmented by the session; they always take the queue.
const MAX_DIRECT: usize = 64 * 1024;

/// The queue marker "write the tail of a partial direct write now".
static TAIL: LazyLock<Outgoing> = LazyLock::new(|| Arc::new(Bytes::new()));

pub fn is_tail_marker(msg: &Outgoing) -> bool {
    Arc::ptr_eq(msg, &TAIL)
}

#[derive(Default)]
struct State {
    /// The session's socket. Cleared (under this lock) by the session before the socket is
    /// closed, and the actor writes only under this lock, so it can never write into a
    /// descriptor number the process has reused. Not a `dup`: that would cost every
    /// connection a second descriptor and keep the socket open past the session's close.
    fd: Option<RawFd>,
    /// The session is writing (or has given up the socket): the actor must queue.
    busy: bool,
    /// Messages put in the queue by the actor, and taken and written by the session.
    queued: u64,
    written: u64,
    tail: Option<Bytes>,
}

#[derive(Default)]
pub struct Direct {
    state: Mutex<State>,
}

/// What the actor does with a message after offering it.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Written whole: nothing to queue.
    Written,
    /// Written in part: queue the marker from [`Direct::tail_marker`].
    Partial,
    /// Queue the message itself (counted as queued already).
    Queue,
}

/// A message and its WebSocket frame, built on the first direct write and shared by every
/// socket of a broadcast: server frames are not masked, so one frame serves every recipient.
pub struct Framed {
    payload: Outgoing,
    frame: OnceCell<Vec<u8>>,
}

impl Framed {
    pub fn new(payload: Outgoing) -> Self {
        Framed {
            payload,
            frame: OnceCell::new(),
        }
    }

    /// The message itself, for a connection's queue.
    pub fn payload(&self) -> &Outgoing {
        &self.payload
    }

    fn frame(&self) -> &[u8] {
        self.frame.get_or_init(|| {
            let (head, head_len) = header(self.payload.len());
            let mut frame = Vec::with_capacity(head_len + self.payload.len());
            frame.extend_from_slice(&head[..head_len]);
            frame.extend_from_slice(&self.payload);
            frame
        })
    }
}

fn header(len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    // FIN + binary; server frames are not masked.
    h[0] = 0x82;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= 0xFFFF {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

impl Direct {
    /// For a plain TCP socket owned by the session, which must call [`Direct::close`] (or drop
    /// a [`CloseOnDrop`]) before the socket is closed.
    pub fn new(socket: &impl AsRawFd) -> Option<Arc<Direct>> {
        Some(Arc::new(Direct {
            state: Mutex::new(State {
                fd: Some(socket.as_raw_fd()),
                ..State::default()
            }),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn tail_marker() -> Outgoing {
        TAIL.clone()
    }

    /// Actor side: writes `msg` now if the socket is free and takes it, else counts it queued.
    pub fn offer(&self, msg: &Framed) -> Offer {
        let mut s = self.lock();
        let free = !s.busy && s.queued == s.written && s.tail.is_none();
        let fd = match s.fd {
            Some(fd) if free && msg.payload.len() <= MAX_DIRECT => fd,
            _ => {
                s.queued += 1;
                return Offer::Queue;
            }
        };
        let frame = msg.frame();
        // SAFETY: `fd` is the session's open socket: the session clears it under this lock,
        // which is held here, before closing the socket.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        // One buffer: `send` rather than `sendmsg`, which costs the kernel a message header
        // and an iovec import per call (4-5 % of the server's CPU at 200 readers).
        let sent = socket2::SockRef::from(&fd)
            .send_with_flags(frame, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        match sent {
            Ok(n) if n == frame.len() => Offer::Written,
            Ok(n) if n > 0 => {
                s.tail = Some(Bytes::copy_from_slice(&frame[n..]));
                s.queued += 1;
                Offer::Partial
            }
            // Nothing written (a full socket, or an error the session will meet itself).
            _ => {
                s.queued += 1;
                Offer::Queue
            }
        }
    }

    /// Session side: holds the socket before writing anything.
    pub fn claim(&self) {
        self.lock().busy = true;
    }

    /// Session side: the tail of a partial direct write, to send before anything else.
    pub fn take_tail(&self) -> Option<Bytes> {
        self.lock().tail.take()
    }

    /// Session side: everything written is flushed; `messages` came from the queue.
    pub fn release(&self, messages: u64) {
        let mut s = self.lock();
        s.written += messages;
        s.busy = false;
    }

    /// Session side: from now on only the session writes (the socket closes, or the client
    /// pings and tungstenite will write pongs on its own).
    pub fn close(&self) {
        let mut s = self.lock();
        s.busy = true;
        s.fd = None;
    }
}

/// Gives the socket back to the session alone, however the session ends.
pub struct CloseOnDrop(pub Option<Arc<Direct>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            d.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_rfc_6455_lengths() {
        assert_eq!(&header(5).0[..2], &[0x82, 5]);
        assert_eq!(&header(126).0[..4], &[0x82, 126, 0, 126]);
        assert_eq!(
            &header(70_000).0[..10],
            &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]
        );
    }

    /// What a free socket receives is the frame, whole or as written part plus kept tail, and
    /// a broadcast frames its message once however many sockets it is written into.
    #[test]
    fn a_direct_write_sends_one_frame_and_keeps_what_the_kernel_left() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;

        let payload = Bytes::from((0..60_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let framed = Framed::new(Arc::new(payload.clone()));
        let mut expected = vec![0x82, 126];
        expected.extend_from_slice(&60_000u16.to_be_bytes());
        expected.extend_from_slice(&payload);

        // A roomy socket takes the frame whole.
        let (a, mut b) = UnixStream::pair().unwrap();
        socket2::SockRef::from(&a)
            .set_send_buffer_size(1 << 20)
            .unwrap();
        let d = Direct::new(&a).unwrap();
        assert_eq!(d.offer(&framed), Offer::Written);
        let mut got = vec![0; expected.len()];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, expected);
        let first = framed.frame().as_ptr();

        // A small one takes part; the rest is kept for the session, and what follows queues.
        let (a, mut b) = UnixStream::pair().unwrap();
        // A wrong split would leave this side waiting for bytes that never come.
        b.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        socket2::SockRef::from(&a)
            .set_send_buffer_size(4096)
            .unwrap();
        let d = Direct::new(&a).unwrap();
        assert_eq!(d.offer(&framed), Offer::Partial);
        assert_eq!(framed.frame().as_ptr(), first, "framed again");
        assert_eq!(d.offer(&framed), Offer::Queue);
        let tail = d.take_tail().unwrap();
        let written = expected.len() - tail.len();
        let mut got = vec![0; written];
        b.read_exact(&mut got).unwrap();
        got.extend_from_slice(&tail);
        assert_eq!(got, expected);
    }
}
