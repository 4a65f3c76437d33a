//! What a session needs from a WebSocket, whatever library carries it: the standalone server's
//! tokio-tungstenite socket (`ws::io`) or an embedding app's actix-ws session (`embed`). The
//! protocol logic in `ws::session` is written once against this trait; the adapters only map
//! messages and errors.

use std::sync::Arc;

use actix_web::web::Bytes;

use super::close::CloseReason;
use super::direct::Direct;

/// A message read from the client.
pub enum Inbound {
    Binary(Bytes),
    Text,
    Ping(Bytes),
    Pong,
    Close,
}

/// Why reading failed, in the terms the session answers it.
pub enum InboundError {
    /// The peer is gone: nothing more can be sent.
    Gone,
    /// A message over the size limit: closed with this reason (1009), lingering where the
    /// adapter can so the client reads it.
    TooLarge(CloseReason),
    /// No room for another large incoming message right now (1013).
    Busy,
    /// Any other protocol violation, closed with this reason.
    Refused(CloseReason),
}

/// The socket is gone.
#[derive(Debug)]
pub struct Gone;

/// How the socket ends.
pub enum Ending {
    /// Send the close frame (if any) and wait, bounded, for the client's.
    Close(Option<CloseReason>),
    /// The client is still sending a message that is too big: send the close frame, then
    /// read and discard (bounded) so it sees the code rather than a reset.
    Linger(CloseReason),
}

impl Ending {
    pub fn reason(&self) -> Option<&CloseReason> {
        match self {
            Ending::Close(why) => why.as_ref(),
            Ending::Linger(why) => Some(why),
        }
    }
}

#[allow(async_fn_in_trait)] // used only through generics, never as `dyn` or across threads
pub trait Transport {
    /// The next message; `None` once the stream has ended. Must be cancel-safe: the session
    /// polls it inside `select!`.
    async fn recv(&mut self) -> Option<Result<Inbound, InboundError>>;
    /// Queues one binary message (an adapter may fragment it), waiting while its buffer is full.
    async fn feed(&mut self, message: Bytes) -> Result<(), Gone>;
    /// Sends what `feed` queued.
    async fn flush(&mut self) -> Result<(), Gone>;
    async fn ping(&mut self) -> Result<(), Gone>;
    /// Answers a client's ping.
    async fn pong(&mut self, payload: Bytes) -> Result<(), Gone>;
    /// Ends the connection within bounded time, whatever the client does.
    async fn close(self, ending: Ending);
    /// The socket, for the document to write broadcasts into directly (`ws::direct`); only
    /// where frames go unchanged onto a plain socket.
    fn direct(&self) -> Option<Arc<Direct>> {
        None
    }
    /// Sends bytes that are already framed (the tail of a direct write), after flushing what
    /// `feed` queued. Only called when `direct` gave a socket.
    async fn write_raw(&mut self, bytes: Bytes) -> Result<(), Gone> {
        let _ = bytes;
        Err(Gone)
    }
}
