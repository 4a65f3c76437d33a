//! One WebSocket connection: decodes frames (off the document actor), forwards them to the
//! document, writes the document's output, keeps the heartbeat.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::Addr;
use actix_web::web::Bytes;
use collab_crdt::decode_frame;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn, Instrument};
use uuid::Uuid;

use super::close::{
    close_frame, protocol_close, reason, token_expired, ws_error_close, CloseCode, CloseReason,
};
use crate::auth::Access;
use crate::doc::actor::DocActor;
use crate::doc::messages::{Incoming, Join, JoinError, Kick, Leave, Outgoing};
use crate::doc::registry::Registry;

/// Outgoing messages larger than this go out as continuation frames of this size, so the socket
/// buffer a connection keeps after sending a big document stays this small (and 150 joiners of
/// a 20 MB document do not each hold a 20 MB copy while their sockets drain).
const FRAGMENT: usize = 64 * 1024;

/// Most messages written before one flush (one `send` syscall) when several are queued.
const WRITE_BATCH: usize = 64;

/// Tries to join a document that is unloading or being deleted (about half a second in all).
const JOIN_ATTEMPTS: u64 = 10;

/// How long a closing connection waits for the client's close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a WebSocket runs over: a plain TCP stream, or TLS over one.
pub trait Io: AsyncRead + AsyncWrite + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + 'static> Io for T {}

type Ws<S> = WebSocketStream<S>;

/// Queues one binary message, fragmenting big ones. `feed` waits while tungstenite's buffer is
/// over its write threshold, so a slow socket bounds what this connection holds.
async fn feed_binary<S: Io>(ws: &mut Ws<S>, bytes: Bytes) -> Result<(), WsError> {
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

/// Joins the document, retrying when it raced with the document unloading.
async fn join(
    registry: &Registry,
    name: &str,
    conn: Uuid,
    tx: mpsc::Sender<Outgoing>,
    kick: Arc<Kick>,
    read_only: bool,
) -> Result<Addr<DocActor>, CloseReason> {
    for attempt in 0..JOIN_ATTEMPTS {
        if attempt > 0 {
            // The document is unloading or being deleted; both take milliseconds.
            tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
        }
        let addr = registry.get_or_start(name);
        let msg = Join {
            conn,
            tx: tx.clone(),
            kick: kick.clone(),
            read_only,
        };
        match addr.send(msg).await {
            Ok(Ok(())) => return Ok(addr),
            Ok(Err(JoinError::Unavailable(why))) => {
                return Err(reason(
                    CloseCode::Error,
                    format!("document unavailable: {why}"),
                ))
            }
            // The actor was unloading; the registry no longer maps to it.
            Ok(Err(JoinError::Closing)) | Err(_) => continue,
        }
    }
    Err(reason(CloseCode::Again, "document is restarting, retry"))
}

/// Time left until the token expires (zero if it already has). Far future without a token.
fn until_expiry(access: &Access) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    match access.expires_at {
        Some(at) => now + at.duration_since(SystemTime::now()).unwrap_or_default(),
        // Never polled: the select branch is disabled without an expiry.
        None => now + Duration::from_secs(365 * 24 * 3600),
    }
}

/// Sends the close frame and waits (bounded) for the client's, so the client sees the code.
async fn close<S: Io>(mut ws: Ws<S>, why: Option<CloseReason>) {
    let frame = why.map(close_frame);
    if ws.send(Message::Close(frame)).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

enum Event {
    Shutdown,
    Kicked(CloseReason),
    Out(Option<Outgoing>),
    In(Option<Result<Message, WsError>>),
    Heartbeat,
    Expired,
}

enum Step {
    Continue,
    /// Close with this reason; `None` when the socket is already gone.
    Close(Option<CloseReason>),
}

/// Writes `first` and everything already queued behind it with one flush: under load a reader
/// costs one syscall per batch, not one per message.
async fn write_queued<S: Io>(
    ws: &mut Ws<S>,
    rx: &mut mpsc::Receiver<Outgoing>,
    first: Outgoing,
) -> Step {
    let mut result = feed_binary(ws, (*first).clone()).await;
    let mut n = 1;
    while result.is_ok() && n < WRITE_BATCH {
        let Ok(more) = rx.try_recv() else { break };
        result = feed_binary(ws, (*more).clone()).await;
        n += 1;
    }
    if result.is_err() || ws.flush().await.is_err() {
        return Step::Close(None);
    }
    Step::Continue
}

async fn handle_input<S: Io>(
    msg: Option<Result<Message, WsError>>,
    ws: &mut Ws<S>,
    addr: &Addr<DocActor>,
    conn: Uuid,
    kick: &Kick,
    awaiting_pong: &mut bool,
) -> Step {
    match msg {
        None => Step::Close(None),
        Some(Ok(Message::Binary(frame))) => {
            let messages = match decode_frame(&frame) {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, len = frame.len(), "closing connection: bad frame");
                    return Step::Close(Some(protocol_close(&e)));
                }
            };
            match addr.send(Incoming { conn, messages }).await {
                Ok(Ok(())) => Step::Continue,
                Ok(Err(v)) => {
                    warn!(error = %v, "closing connection: input refused");
                    Step::Close(Some(v.close_reason()))
                }
                Err(_) => Step::Close(Some(kick.reason())),
            }
        }
        // tungstenite queues the pong itself; flushing sends it now.
        Some(Ok(Message::Ping(_))) => match ws.flush().await {
            Ok(()) => Step::Continue,
            Err(_) => Step::Close(None),
        },
        Some(Ok(Message::Pong(_))) => {
            *awaiting_pong = false;
            Step::Continue
        }
        Some(Ok(Message::Text(_))) => {
            warn!("closing connection: text frame");
            Step::Close(Some(reason(
                CloseCode::Unsupported,
                "the protocol uses binary frames only",
            )))
        }
        Some(Ok(Message::Close(_))) => Step::Close(None),
        Some(Ok(Message::Frame(_))) => Step::Continue,
        Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => Step::Close(None),
        Some(Err(WsError::Io(e))) => {
            debug!(error = %e, "connection lost");
            Step::Close(None)
        }
        Some(Err(e)) => {
            warn!(error = %e, "closing connection: websocket error");
            Step::Close(Some(ws_error_close(&e)))
        }
    }
}

/// Serves one WebSocket until either side closes it. `access` was decided at the upgrade.
pub async fn run<S: Io>(
    mut ws: Ws<S>,
    name: String,
    access: Access,
    peer: Option<std::net::SocketAddr>,
    registry: Registry,
    mut shutdown: watch::Receiver<bool>,
) {
    let conn = Uuid::new_v4();
    let span = tracing::info_span!(
        "conn",
        doc = %name,
        conn = %conn,
        sub = %access.sub.as_deref().unwrap_or(""),
        read_only = access.read_only
    );
    async move {
        let config = registry.config().clone();
        let (tx, mut rx) = mpsc::channel::<Outgoing>(config.outbound_queue.max(1));
        let kick = Arc::new(Kick::default());
        let opened = std::time::Instant::now();
        let peer = peer.map_or_else(String::new, |p| p.to_string());
        info!(%peer, "connection opened");
        let joined = join(&registry, &name, conn, tx, kick.clone(), access.read_only);
        let addr = match Box::pin(joined).await {
            Ok(addr) => addr,
            Err(why) => {
                warn!(reason = ?why.description, "could not join document");
                Box::pin(close(ws, Some(why))).await;
                return;
            }
        };
        let mut heartbeat = tokio::time::interval(config.heartbeat());
        heartbeat.tick().await;
        let mut awaiting_pong = false;
        // Created once: re-creating it each turn would re-register with the Notify every time.
        let kicked = kick.kicked();
        tokio::pin!(kicked);
        // The token's expiry, on the monotonic clock; a connection without one never expires.
        let expiry = tokio::time::sleep_until(until_expiry(&access));
        tokio::pin!(expiry);

        let why: Option<CloseReason> = loop {
            if *shutdown.borrow() {
                break Some(reason(CloseCode::Away, "server shutting down"));
            }
            // The select only picks an event; handling it after the select has dropped its
            // futures keeps this task's state machine (resident per connection) small.
            let event = tokio::select! {
                _ = shutdown.changed() => Event::Shutdown,
                why = &mut kicked => Event::Kicked(why),
                out = rx.recv() => Event::Out(out),
                msg = ws.next() => Event::In(msg),
                _ = heartbeat.tick() => Event::Heartbeat,
                _ = &mut expiry, if access.expires_at.is_some() => Event::Expired,
            };
            let step = match event {
                Event::Shutdown => {
                    Step::Close(Some(reason(CloseCode::Away, "server shutting down")))
                }
                Event::Kicked(why) => Step::Close(Some(why)),
                Event::Expired => {
                    info!("closing connection: token expired");
                    Step::Close(Some(token_expired()))
                }
                Event::Out(None) => Step::Close(Some(kick.reason())),
                Event::Out(Some(bytes)) => write_queued(&mut ws, &mut rx, bytes).await,
                Event::In(msg) => {
                    handle_input(msg, &mut ws, &addr, conn, &kick, &mut awaiting_pong).await
                }
                Event::Heartbeat => {
                    if awaiting_pong {
                        info!("closing connection: no pong to the last ping");
                        Step::Close(Some(reason(CloseCode::Away, "heartbeat timeout")))
                    } else {
                        awaiting_pong = true;
                        match ws.send(Message::Ping(Bytes::new())).await {
                            Ok(()) => Step::Continue,
                            Err(_) => Step::Close(None),
                        }
                    }
                }
            };
            if let Step::Close(why) = step {
                break why;
            }
        };
        addr.do_send(Leave { conn });
        info!(
            // None: the client closed, or the socket was lost.
            close_code = ?why.as_ref().map(|c| u16::from(c.code)),
            reason = why.as_ref().and_then(|c| c.description.as_deref()).unwrap_or(""),
            duration_ms = opened.elapsed().as_millis() as u64,
            "connection closed"
        );
        Box::pin(close(ws, why)).await;
    }
    .instrument(span)
    .await
}
