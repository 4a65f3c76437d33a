//! The socket under a session: plain TCP or TLS, metered, and how it is closed (a deadline on
//! the close frame, an abort after it, and a lingering close after an oversized message).

use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::close::{close_frame, CloseReason};
use super::metered::Metered;
use crate::counters::count;

/// Outgoing messages larger than this go out as continuation frames of this size, so the socket
/// buffer a connection keeps after sending a big document stays this small (and 150 joiners of
/// a 20 MB document do not each hold a 20 MB copy while their sockets drain).
const FRAGMENT: usize = 64 * 1024;

/// How long a closing connection waits for the client's close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long writing the close frame may take. A client that never reads has a full socket
/// buffer, so the write would wait forever and hold the socket open; after this it is aborted.
const CLOSE_WRITE_DEADLINE: Duration = Duration::from_secs(5);

/// Lingering close after an oversized message: how long and how much is read and thrown away
/// so the client, still sending, reads the 1009 instead of a connection reset.
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: u64 = 256 * 1024 * 1024;

/// What a WebSocket runs over: a plain TCP stream, or TLS over one.
pub trait Io: AsyncRead + AsyncWrite + Unpin + 'static {
    /// Drops the connection with a reset, discarding whatever is unsent: for a peer that
    /// stopped reading.
    fn abort(&self);
}

impl Io for TcpStream {
    fn abort(&self) {
        // Linger 0: close() sends RST at once instead of keeping the unsent data (and the
        // socket) around for the kernel to retry.
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }
}

impl Io for actix_tls::accept::rustls_0_23::TlsStream<TcpStream> {
    fn abort(&self) {
        self.get_ref().0.abort();
    }
}

impl<S: Io> Io for Metered<S> {
    fn abort(&self) {
        self.get_ref().abort();
    }
}

pub type Ws<S> = WebSocketStream<Metered<S>>;

/// Queues one binary message, fragmenting big ones. `feed` waits while tungstenite's buffer is
/// over its write threshold, so a slow socket bounds what this connection holds.
pub async fn feed_binary<S: Io>(ws: &mut Ws<S>, bytes: Bytes) -> Result<(), WsError> {
    if bytes.len() <= FRAGMENT {
        return ws.feed(Message::Binary(bytes)).await;
    }
    let mut offset = 0;
    while offset < bytes.len() {
        let end = (offset + FRAGMENT).min(bytes.len());
        let opcode = if offset == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(bytes.slice(offset..end), opcode, end == bytes.len());
        ws.feed(Message::Frame(frame)).await?;
        offset = end;
    }
    Ok(())
}

/// How the socket ends.
pub enum Ending {
    /// Send the close frame (if any) and wait, bounded, for the client's.
    Close(Option<CloseReason>),
    /// The client is still sending a message that is too big: send the close frame, then
    /// read and discard (bounded) so it sees the code rather than a reset.
    Linger(CloseReason),
}

/// Closes the socket so the client sees the code, within bounded time whatever it does.
pub async fn close<S: Io>(mut ws: Ws<S>, ending: Ending) {
    let (why, linger) = match ending {
        Ending::Close(why) => (why, false),
        Ending::Linger(why) => (Some(why), true),
    };
    if linger {
        ws.get_mut().start_draining();
    }
    let frame = why.map(close_frame);
    match tokio::time::timeout(CLOSE_WRITE_DEADLINE, ws.send(Message::Close(frame))).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return,
        Err(_) => {
            count(|c| &c.close_write_timeouts);
            debug!("the close frame could not be written in time; aborting the socket");
            ws.get_ref().abort();
            return;
        }
    }
    if linger {
        drain(ws.get_mut()).await;
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Reads and discards until the client closes, or the time or byte bound is reached.
async fn drain<S: Io>(socket: &mut Metered<S>) {
    let deadline = Instant::now() + LINGER_TIME;
    let mut scratch = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    while total < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, socket.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => total += n as u64,
            _ => break,
        }
    }
}
