//! A global budget for memory held by large messages being received.
//!
//! tungstenite reserves a frame's announced length and fills it as bytes arrive, so ten
//! clients each sending a 31 MiB message hold 310 MiB until they are done. `Metered` sits
//! under tungstenite, follows the frame headers of the byte stream, and before it reads the
//! payload of a message past [`FREE_BYTES`] takes that many bytes from a budget shared by every
//! connection. When the budget is spent the read waits (TCP pushes back on the sender); a
//! message that waits longer than [`BUDGET_WAIT`] fails the connection with 1013. The bytes are
//! given back when the message's last frame has been read.
//!
//! It also reads ahead inside a long payload. tungstenite reads at most its read buffer's size
//! per call, and that buffer is resident in every idle connection, so it is kept small; while a
//! payload longer than that is arriving, `Metered` reads up to [`READ_AHEAD`] of it per syscall
//! into a buffer of its own (never past the payload, so never into a frame not yet charged) and
//! hands it over in tungstenite's pieces. The buffer is freed as soon as it has been handed over.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::counters::count;

/// Messages up to this size never wait for the budget: edits and cursors are far smaller.
pub const FREE_BYTES: u64 = 64 * 1024;

/// How long one large message may wait for the budget.
pub const BUDGET_WAIT: Duration = Duration::from_secs(10);

/// Most payload bytes read from the socket at once when tungstenite asks for less.
const READ_AHEAD: u64 = 64 * 1024;

/// Budget unit: permits count KiB so that a 4 GiB budget fits a semaphore's u32 requests.
const UNIT: u64 = 1024;

/// The error a read fails with when a message waited too long for the budget.
#[derive(Debug, thiserror::Error)]
#[error("the server is receiving too many large messages; retry later")]
pub struct BudgetExhausted;

/// Bytes every connection together may hold in large messages being received.
#[derive(Clone)]
pub struct IncomingBudget {
    semaphore: Arc<Semaphore>,
    units: u32,
}

impl IncomingBudget {
    pub fn new(bytes: u64) -> Self {
        let units = u32::try_from((bytes / UNIT).max(1)).unwrap_or(u32::MAX);
        IncomingBudget {
            semaphore: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    /// Bytes not currently held.
    pub fn available(&self) -> u64 {
        self.semaphore.available_permits() as u64 * UNIT
    }
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// Where the reader is in the incoming byte stream.
#[derive(Debug)]
enum Frame {
    /// Collecting a frame header (2 to 14 bytes).
    Header {
        buf: [u8; 14],
        have: usize,
    },
    Payload {
        left: u64,
        last_of_message: bool,
    },
}

pub struct Metered<S> {
    inner: S,
    budget: IncomingBudget,
    frame: Frame,
    /// Payload bytes of the data message being received so far.
    message_bytes: u64,
    /// Budget units the next read must hold first.
    need: u32,
    held: Option<OwnedSemaphorePermit>,
    waiting: Option<(Acquire, Pin<Box<Sleep>>)>,
    /// Lingering close: bytes are read and thrown away, without the budget.
    draining: bool,
    /// Payload bytes read from the socket and not yet handed to the reader, from `ahead_at`.
    ahead: Vec<u8>,
    ahead_at: usize,
}

fn header_len(first_two: &[u8]) -> usize {
    let masked = first_two[1] & 0x80 != 0;
    let ext = match first_two[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if masked { 4 } else { 0 }
}

fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u16::from_be_bytes([header[2], header[3]]) as u64,
        127 => u64::from_be_bytes(header[2..10].try_into().expect("8 bytes")),
        n => n as u64,
    }
}

impl<S> Metered<S> {
    /// `already_read`: bytes the HTTP layer read past the upgrade request, handed to
    /// tungstenite directly; they are followed here so the frame boundaries stay known.
    pub fn new(inner: S, budget: IncomingBudget, already_read: &[u8]) -> Self {
        let mut m = Metered {
            inner,
            budget,
            frame: Frame::Header {
                buf: [0; 14],
                have: 0,
            },
            message_bytes: 0,
            need: 0,
            held: None,
            waiting: None,
            draining: false,
            ahead: Vec::new(),
            ahead_at: 0,
        };
        m.follow(already_read);
        m
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// From now on bytes are only discarded (after a close frame was sent for an oversized
    /// message): nothing more is taken from the budget.
    pub fn start_draining(&mut self) {
        self.draining = true;
        self.need = 0;
        self.waiting = None;
        self.held = None;
    }

    /// Advances the frame state over bytes that were just read.
    fn follow(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.frame {
                Frame::Header { buf, have } => {
                    let want = if *have < 2 { 2 } else { header_len(&buf[..2]) };
                    let take = (want - *have).min(bytes.len());
                    buf[*have..*have + take].copy_from_slice(&bytes[..take]);
                    *have += take;
                    bytes = &bytes[take..];
                    if *have >= 2 && *have == header_len(&buf[..2]) {
                        let header = *buf;
                        self.header_done(&header);
                    }
                }
                Frame::Payload {
                    left,
                    last_of_message,
                } => {
                    let take = (*left).min(bytes.len() as u64);
                    *left -= take;
                    bytes = &bytes[take as usize..];
                    if *left == 0 {
                        let last = *last_of_message;
                        self.payload_done(last);
                    }
                }
            }
        }
    }

    fn header_done(&mut self, header: &[u8; 14]) {
        let fin = header[0] & 0x80 != 0;
        let opcode = header[0] & 0x0f;
        let len = payload_len(header);
        let data = opcode <= 2;
        if data {
            if opcode != 0 {
                self.message_bytes = 0;
            }
            let before = self.message_bytes;
            self.message_bytes = self.message_bytes.saturating_add(len);
            if self.message_bytes > FREE_BYTES && !self.draining {
                // Only what goes past the free allowance is charged.
                let charged = self.message_bytes - before.max(FREE_BYTES);
                let units = charged.div_ceil(UNIT).min(self.budget.units as u64) as u32;
                self.need = self.need.saturating_add(units).min(self.budget.units);
            }
        }
        self.frame = Frame::Payload {
            left: len,
            last_of_message: data && fin,
        };
        if len == 0 {
            self.payload_done(data && fin);
        }
    }

    fn payload_done(&mut self, last_of_message: bool) {
        self.frame = Frame::Header {
            buf: [0; 14],
            have: 0,
        };
        if last_of_message {
            self.message_bytes = 0;
            self.held = None;
        }
    }

    /// Takes `need` units from the budget before more bytes are read.
    fn poll_budget(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.need == 0 || self.draining {
            return Poll::Ready(Ok(()));
        }
        if self.waiting.is_none() {
            match self
                .budget
                .semaphore
                .clone()
                .try_acquire_many_owned(self.need)
            {
                Ok(permit) => {
                    self.hold(permit);
                    return Poll::Ready(Ok(()));
                }
                Err(_) => {
                    count(|c| &c.incoming_budget_waits);
                    let acquire = self.budget.semaphore.clone().acquire_many_owned(self.need);
                    self.waiting =
                        Some((Box::pin(acquire), Box::pin(tokio::time::sleep(BUDGET_WAIT))));
                }
            }
        }
        let (acquire, deadline) = self.waiting.as_mut().expect("waiting");
        if let Poll::Ready(result) = acquire.as_mut().poll(cx) {
            self.waiting = None;
            return match result {
                Ok(permit) => {
                    self.hold(permit);
                    Poll::Ready(Ok(()))
                }
                Err(_) => Poll::Ready(Err(io::Error::other(BudgetExhausted))),
            };
        }
        if deadline.as_mut().poll(cx).is_ready() {
            self.waiting = None;
            count(|c| &c.incoming_budget_refusals);
            return Poll::Ready(Err(io::Error::other(BudgetExhausted)));
        }
        Poll::Pending
    }

    fn hold(&mut self, permit: OwnedSemaphorePermit) {
        self.need = 0;
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ahead_at < this.ahead.len() {
            this.hand_over(buf);
            return Poll::Ready(Ok(()));
        }
        if let Err(e) = std::task::ready!(this.poll_budget(cx)) {
            return Poll::Ready(Err(e));
        }
        let payload_left = match this.frame {
            Frame::Payload { left, .. } if !this.draining => left,
            _ => 0,
        };
        if payload_left > buf.remaining() as u64 {
            // The buffer is kept while the payload lasts, a read that would block included, so
            // a slow sender costs one allocation per payload rather than one per wake-up.
            let mut chunk = std::mem::take(&mut this.ahead);
            chunk.resize(payload_left.min(READ_AHEAD) as usize, 0);
            let mut into = ReadBuf::new(&mut chunk);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut into);
            let n = into.filled().len();
            chunk.truncate(n);
            this.ahead = chunk;
            this.ahead_at = 0;
            std::task::ready!(polled)?;
            this.hand_over(buf);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.follow(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<S> Metered<S> {
    /// Moves read-ahead bytes into `buf` (none at the end of the stream), and frees the
    /// read-ahead buffer once the payload it belongs to has been handed over.
    fn hand_over(&mut self, buf: &mut ReadBuf<'_>) {
        let mut ahead = std::mem::take(&mut self.ahead);
        let n = buf.remaining().min(ahead.len() - self.ahead_at);
        let part = &ahead[self.ahead_at..self.ahead_at + n];
        buf.put_slice(part);
        self.follow(part);
        self.ahead_at += n;
        if self.ahead_at == ahead.len() {
            self.ahead_at = 0;
            ahead.clear();
        }
        if !ahead.is_empty() || matches!(self.frame, Frame::Payload { .. }) {
            self.ahead = ahead;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Whether a read error is the budget refusing a message.
pub fn is_budget_exhausted(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<BudgetExhausted>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, fin: bool, len: usize) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        if len < 126 {
            f.push(0x80 | len as u8);
        } else if len < 65536 {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(0u8, len));
        f
    }

    #[test]
    fn small_messages_are_free_and_large_ones_are_charged_until_done() {
        let budget = IncomingBudget::new(1024 * 1024);
        let mut m = Metered::new((), budget.clone(), &[]);
        m.follow(&frame(2, true, 100));
        m.follow(&frame(9, true, 4));
        assert_eq!(m.need, 0);
        // A 200 KiB message in two fragments: the part past 64 KiB is charged.
        let first = frame(2, false, 100 * 1024);
        m.follow(&first[..20]);
        assert_eq!(
            m.need, 36,
            "charged from the header, before the payload is read"
        );
        m.hold(budget.semaphore.clone().try_acquire_many_owned(36).unwrap());
        m.follow(&first[20..]);
        m.follow(&frame(0, true, 100 * 1024)[..20]);
        assert_eq!(m.need, 100);
        m.hold(
            budget
                .semaphore
                .clone()
                .try_acquire_many_owned(100)
                .unwrap(),
        );
        assert_eq!(budget.available(), 1024 * 1024 - 136 * 1024);
        m.follow(&vec![0u8; 100 * 1024 - 6]);
        assert_eq!(
            budget.available(),
            1024 * 1024,
            "given back when the message ends"
        );
    }

    /// A socket that has `data` ready and counts the reads.
    struct Socket {
        data: Vec<u8>,
        at: usize,
        reads: usize,
    }

    impl AsyncRead for Socket {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = buf.remaining().min(self.data.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            self.reads += 1;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_long_payload_is_read_ahead_in_few_syscalls_and_the_buffer_is_freed() {
        use tokio::io::AsyncReadExt;
        let mut stream = frame(2, true, 300 * 1024);
        let big = stream.len();
        stream.extend(frame(2, true, 10));
        let socket = Socket {
            data: stream.clone(),
            at: 0,
            reads: 0,
        };
        let mut m = Metered::new(socket, IncomingBudget::new(1 << 30), &[]);
        // tungstenite's pieces: 256 bytes at most.
        let mut got = Vec::new();
        let mut piece = [0u8; 256];
        while got.len() < big {
            let n = m.read(&mut piece).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&piece[..n]);
        }
        assert!(got == stream[..big], "bytes not handed over in order");
        assert!(m.get_ref().reads <= 10, "{} reads", m.get_ref().reads);
        assert_eq!(m.ahead.capacity(), 0, "read-ahead buffer kept");
        assert_eq!(m.get_ref().at, big, "read past the payload");
        assert!(m.held.is_none(), "budget still held after the message");
        let n = m.read(&mut piece).await.unwrap();
        assert_eq!(&piece[..n], &stream[big..]);
        assert_eq!(m.read(&mut piece).await.unwrap(), 0, "end of stream");
    }

    #[test]
    fn a_message_larger_than_the_budget_asks_for_all_of_it_not_more() {
        let budget = IncomingBudget::new(256 * 1024);
        let mut m = Metered::new((), budget, &[]);
        m.follow(&frame(2, true, 10 * 1024 * 1024)[..14]);
        assert_eq!(m.need, 256);
    }
}
