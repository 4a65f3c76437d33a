//! The socket under a session: plain TCP or TLS, metered, and how it is closed (a deadline on
//! the close frame, an abort after it, and a lingering close after an oversized message).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::close::{close_frame, ws_error_close};
use super::direct::Direct;
use super::metered::{is_budget_exhausted, Metered};
use super::transport::{Ending, Gone, Inbound, InboundError, Transport};
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
    /// The plain socket, where bytes written go to the peer unchanged (not under TLS).
    fn direct(&self) -> Option<Arc<Direct>> {
        None
    }
}

impl Io for TcpStream {
    fn direct(&self) -> Option<Arc<Direct>> {
        Direct::new(self)
    }

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
    fn direct(&self) -> Option<Arc<Direct>> {
        self.get_ref().direct()
    }
}

pub type Ws<S> = WebSocketStream<Metered<S>>;

/// Queues one binary message, fragmenting big ones. `feed` waits while tungstenite's buffer is
/// over its write threshold, so a slow socket bounds what this connection holds.
async fn feed_binary<S: Io>(ws: &mut Ws<S>, bytes: Bytes) -> Result<(), WsError> {
    if bytes.len() <= FRAGMENT {
        return SinkExt::feed(ws, Message::Binary(bytes)).await;
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
        SinkExt::feed(ws, Message::Frame(frame)).await?;
        offset = end;
    }
    Ok(())
}

/// Closes the socket so the client sees the code, within bounded time whatever it does.
async fn close<S: Io>(mut ws: Ws<S>, ending: Ending) {
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

impl<S: Io> Transport for Ws<S> {
    async fn recv(&mut self) -> Option<Result<Inbound, InboundError>> {
        let msg = match self.next().await? {
            Ok(msg) => msg,
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return None,
            Err(WsError::Io(e)) if is_budget_exhausted(&e) => return Some(Err(InboundError::Busy)),
            Err(WsError::Io(e)) => {
                debug!(error = %e, "connection lost");
                return Some(Err(InboundError::Gone));
            }
            Err(e @ WsError::Capacity(_)) => {
                return Some(Err(InboundError::TooLarge(ws_error_close(&e))))
            }
            Err(e) => return Some(Err(InboundError::Refused(ws_error_close(&e)))),
        };
        Some(Ok(match msg {
            Message::Binary(b) => Inbound::Binary(b),
            Message::Text(_) => Inbound::Text,
            Message::Ping(p) => Inbound::Ping(p),
            Message::Pong(_) => Inbound::Pong,
            Message::Close(_) => Inbound::Close,
            // Raw frames are never produced when reading.
            Message::Frame(_) => Inbound::Pong,
        }))
    }

    async fn feed(&mut self, message: Bytes) -> Result<(), Gone> {
        feed_binary(self, message).await.map_err(|_| Gone)
    }

    async fn flush(&mut self) -> Result<(), Gone> {
        SinkExt::flush(self).await.map_err(|_| Gone)
    }

    async fn ping(&mut self) -> Result<(), Gone> {
        self.send(Message::Ping(Bytes::new()))
            .await
            .map_err(|_| Gone)
    }

    async fn pong(&mut self, _: Bytes) -> Result<(), Gone> {
        // tungstenite queued the pong when it read the ping; flushing sends it now.
        SinkExt::flush(self).await.map_err(|_| Gone)
    }

    async fn close(self, ending: Ending) {
        close(self, ending).await
    }

    fn direct(&self) -> Option<Arc<Direct>> {
        self.get_ref().direct()
    }

    async fn write_raw(&mut self, bytes: Bytes) -> Result<(), Gone> {
        SinkExt::flush(self).await.map_err(|_| Gone)?;
        let socket = self.get_mut();
        socket.write_all(&bytes).await.map_err(|_| Gone)?;
        socket.flush().await.map_err(|_| Gone)
    }
}
