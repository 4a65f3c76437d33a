//! The Hocuspocus provider protocol (`@hocuspocus/provider` v2 and v3, Tiptap's): one socket
//! carries many documents, every message prefixed with `varString(documentName)`. Types 0
//! (Sync), 1 (Awareness) and 3 (QueryAwareness) carry exactly the y-websocket messages, so each
//! document on the socket is an ordinary membership of that document's actor; this module
//! only routes, authenticates per document and acknowledges (SyncStatus, after the flush).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use actix::Addr;
use actix_web::web::Bytes;
use collab_crdt::decode_frame;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn, Instrument};
use uuid::Uuid;
use yrs::encoding::read::{Cursor, Read};
use yrs::encoding::write::Write;

use super::close::{protocol_close, reason, CloseCode, CloseReason};
use super::limits::SlotGuard;
use super::rate::RateLimit;
use super::session::{join, rate_step, OpenConnection, Step};
use super::transport::{Ending, Inbound, InboundError, Transport};
use super::upgrade::Upgrades;
use crate::auth::presented_token;
use crate::doc::actor::DocActor;
use crate::doc::messages::{Incoming, Join, Kick, Leave, Outgoing};
use crate::doc::outbox::outbox;
use crate::telemetry::{Kind, METRICS};

const SYNC: u32 = 0;
const AWARENESS: u32 = 1;
const AUTH: u32 = 2;
const QUERY_AWARENESS: u32 = 3;
const STATELESS: u32 = 5;
const CLOSE: u32 = 7;
const SYNC_STATUS: u32 = 8;

/// Documents one socket may open at once.
const MAX_DOCUMENTS: usize = 64;
/// Messages held for a document while its token is checked.
const MAX_HELD: usize = 64;

/// What the upgrade decided for the socket (documents are decided one by one later).
pub struct Admitted {
    pub peer: Option<std::net::SocketAddr>,
    /// A token from the URL (`?token=`, as v2 providers send their parameters), used for a
    /// document whose `Auth` message carries none.
    pub url_token: Option<String>,
    pub slot: SlotGuard,
}

enum State {
    /// Waiting for its token; these messages wait with it.
    Pending(Vec<Bytes>),
    Joined(Addr<DocActor>),
    Denied,
}

struct Member {
    conn: Uuid,
    state: State,
    _slot: Option<SlotGuard>,
}

fn var_string(out: &mut Vec<u8>, s: &str) {
    out.write_string(s);
}

/// `varString(name) ‖ body`: every message on a Hocuspocus socket.
fn framed(name: &str, body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(name.len() + body.len() + 4);
    var_string(&mut out, name);
    out.extend_from_slice(body);
    Bytes::from(out)
}

fn auth_answer(name: &str, granted: Result<&str, &str>) -> Bytes {
    let mut body = Vec::new();
    body.write_var(AUTH);
    match granted {
        Ok(scope) => {
            body.write_var(2u32);
            var_string(&mut body, scope);
        }
        Err(why) => {
            body.write_var(1u32);
            var_string(&mut body, why);
        }
    }
    framed(name, &body)
}

/// A parsed incoming message: the document, its type, and where the y-websocket message
/// (type and payload) starts in the frame.
fn parse(frame: &[u8]) -> Option<(String, u32, usize)> {
    let mut cursor = Cursor::new(frame);
    let name = cursor.read_string().ok()?.to_owned();
    let at = cursor.next;
    let kind: u32 = cursor.read_var().ok()?;
    Some((name, kind, at))
}

fn auth_token(frame: &[u8], at: usize) -> Option<String> {
    let mut cursor = Cursor::new(&frame[at..]);
    let _: u32 = cursor.read_var().ok()?;
    let sub: u32 = cursor.read_var().ok()?;
    if sub != 0 {
        return None;
    }
    Some(cursor.read_string().ok()?.to_owned())
}

struct Socket<'a> {
    up: &'a Upgrades,
    members: HashMap<String, Member>,
    /// Every document's actor output, tagged with the document.
    out_tx: mpsc::Sender<(Arc<str>, Outgoing)>,
    kick: Arc<Kick>,
    url_token: Option<String>,
    rate: RateLimit,
    /// The earliest expiry among the documents' tokens.
    expires_at: Option<SystemTime>,
}

impl Socket<'_> {
    /// Checks a document's token and joins it, then replays what it held.
    async fn authenticate<T: Transport>(
        &mut self,
        ws: &mut T,
        name: &str,
        token: Option<String>,
    ) -> Step {
        if self.members.len() >= MAX_DOCUMENTS && !self.members.contains_key(name) {
            return send(
                ws,
                auth_answer(name, Err("too many documents on one connection")),
            )
            .await;
        }
        let token = token
            .filter(|t| !t.is_empty())
            .or_else(|| self.url_token.clone());
        let held = match self.members.remove(name) {
            Some(Member {
                state: State::Pending(held),
                ..
            }) => held,
            Some(other) => {
                self.members.insert(name.to_owned(), other);
                return Step::Continue;
            }
            None => Vec::new(),
        };
        let access = match self
            .up
            .auth
            .authorize(token.as_deref(), name, SystemTime::now())
        {
            Ok(a) => a,
            Err(e) => {
                info!(doc = %name, reason = %e, "hocuspocus document refused");
                return self.deny(ws, name, &e.to_string()).await;
            }
        };
        let slot = match self.up.slots.acquire(None, name) {
            Ok(s) => s,
            Err(_) => {
                return self
                    .deny(ws, name, "this document has too many connections")
                    .await
            }
        };
        let conn = Uuid::new_v4();
        let (tx, mut rx) = outbox::<Outgoing>(self.up.registry.config().outbound_queue);
        let member = Join {
            conn,
            tx,
            kick: self.kick.clone(),
            read_only: access.read_only,
            acks: true,
            // Messages are tagged with the document name on their way out: always queued.
            direct: None,
        };
        let joined = join(&self.up.registry, name, member).await;
        let addr = match joined {
            Ok(addr) => addr,
            Err(why) => {
                warn!(doc = %name, reason = ?why.description, "could not join document");
                let reason = why.description.unwrap_or_else(|| "unavailable".into());
                return self.deny(ws, name, &reason).await;
            }
        };
        // The actor's output for this document, tagged, into the socket's one queue.
        let out = self.out_tx.clone();
        let tag: Arc<str> = Arc::from(name);
        actix_web::rt::spawn(async move {
            while let Some(m) = rx.recv().await {
                if out.send((tag.clone(), m)).await.is_err() {
                    break;
                }
            }
        });
        if let Some(at) = access.expires_at {
            self.expires_at = Some(self.expires_at.map_or(at, |e| e.min(at)));
        }
        debug!(doc = %name, %conn, read_only = access.read_only, sub = access.sub.as_deref().unwrap_or(""), "hocuspocus document joined");
        self.members.insert(
            name.to_owned(),
            Member {
                conn,
                state: State::Joined(addr),
                _slot: Some(slot),
            },
        );
        let scope = if access.read_only {
            "readonly"
        } else {
            "read-write"
        };
        if let Step::End(e) = send(ws, auth_answer(name, Ok(scope))).await {
            return Step::End(e);
        }
        for frame in held {
            if let Step::End(e) = self.document_message(ws, &frame).await {
                return Step::End(e);
            }
        }
        Step::Continue
    }

    /// Refuses a document on this socket (PermissionDenied); its later messages are ignored.
    async fn deny<T: Transport>(&mut self, ws: &mut T, name: &str, reason: &str) -> Step {
        self.members.insert(
            name.to_owned(),
            Member {
                conn: Uuid::nil(),
                state: State::Denied,
                _slot: None,
            },
        );
        send(ws, auth_answer(name, Err(reason))).await
    }

    /// A Sync, Awareness or QueryAwareness message for a document.
    async fn document_message<T: Transport>(&mut self, ws: &mut T, frame: &Bytes) -> Step {
        let Some((name, _, at)) = parse(frame) else {
            return Step::Continue;
        };
        match self.members.get_mut(&name) {
            None if !self.up.auth.enabled() => {
                // A v2 provider without a token starts syncing at once; an open server admits it.
                self.members.insert(
                    name.clone(),
                    Member {
                        conn: Uuid::nil(),
                        state: State::Pending(vec![frame.clone()]),
                        _slot: None,
                    },
                );
                return Box::pin(self.authenticate(ws, &name, None)).await;
            }
            None => {
                self.members.insert(
                    name,
                    Member {
                        conn: Uuid::nil(),
                        state: State::Pending(vec![frame.clone()]),
                        _slot: None,
                    },
                );
                return Step::Continue;
            }
            Some(Member {
                state: State::Pending(held),
                ..
            }) => {
                if held.len() < MAX_HELD {
                    held.push(frame.clone());
                }
                return Step::Continue;
            }
            Some(Member {
                state: State::Denied,
                ..
            }) => return Step::Continue,
            Some(Member {
                state: State::Joined(_),
                ..
            }) => {}
        }
        let Some(Member {
            conn,
            state: State::Joined(addr),
            ..
        }) = self.members.get(&name)
        else {
            return Step::Continue;
        };
        let (conn, addr) = (*conn, addr.clone());
        let body = frame.slice(at..);
        let messages = match decode_frame(&body) {
            Ok(m) => m,
            Err(e) => {
                warn!(doc = %name, error = %e, "closing hocuspocus connection: bad message");
                return Step::End(Ending::Close(Some(protocol_close(&e))));
            }
        };
        let count_in = messages.len();
        for m in &messages {
            METRICS.messages_received.get(Kind::of(m)).inc();
        }
        let incoming = Incoming {
            conn,
            messages,
            bytes: body.len(),
            received: Instant::now(),
        };
        match addr.send(incoming).await {
            Ok(Ok(reply_bytes)) => rate_step(self.rate.spend(
                count_in,
                body.len() + reply_bytes,
                Instant::now(),
            )),
            Ok(Err(v)) => {
                warn!(doc = %name, error = %v, "closing hocuspocus connection: input refused");
                Step::End(Ending::Close(Some(v.close_reason())))
            }
            Err(_) => Step::End(Ending::Close(Some(self.kick.reason()))),
        }
    }

    fn leave(&mut self, name: &str) {
        if let Some(Member {
            conn,
            state: State::Joined(addr),
            ..
        }) = self.members.remove(name)
        {
            addr.do_send(Leave { conn });
        }
    }

    fn leave_all(&mut self) {
        let names: Vec<String> = self.members.keys().cloned().collect();
        for name in names {
            self.leave(&name);
        }
    }
}

async fn send<T: Transport>(ws: &mut T, message: Bytes) -> Step {
    if ws.feed(message).await.is_err() || ws.flush().await.is_err() {
        return Step::End(Ending::Close(None));
    }
    Step::Continue
}

enum Event {
    Shutdown,
    Kicked(CloseReason),
    Out(Option<(Arc<str>, Outgoing)>),
    In(Option<Result<Inbound, InboundError>>),
    Heartbeat,
    Expired,
}

/// Serves one Hocuspocus socket until either side closes it.
///
/// A plain `fn`, like `session::run`: the task is resident for the socket's whole life, and an
/// `async fn` would keep its arguments twice.
pub fn run<T: Transport>(
    mut ws: T,
    admitted: Admitted,
    up: Upgrades,
    mut shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> {
    let socket_id = Uuid::new_v4();
    let span = tracing::info_span!("hocuspocus", conn = %socket_id);
    let Admitted {
        peer,
        url_token,
        slot,
    } = admitted;
    let config = up.registry.config();
    let queue = config.outbound_queue.max(1);
    let heartbeat_every = config.heartbeat();
    let rate = RateLimit::for_connection(config);
    async move {
        info!(
            peer = %peer.map_or_else(String::new, |p| p.to_string()),
            "hocuspocus connection opened"
        );
        METRICS.connections_opened.inc();
        METRICS.connections.inc();
        let _open = OpenConnection;
        let opened = Instant::now();
        let (out_tx, mut out_rx) = mpsc::channel(queue);
        let kick = Arc::new(Kick::default());
        let mut socket = Socket {
            up: &up,
            members: HashMap::new(),
            out_tx,
            kick: kick.clone(),
            url_token,
            rate,
            expires_at: None,
        };
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        heartbeat.tick().await;
        let mut awaiting_pong = false;
        let kicked = kick.kicked();
        tokio::pin!(kicked);
        let expiry = tokio::time::sleep(std::time::Duration::from_secs(365 * 24 * 3600));
        tokio::pin!(expiry);
        let ending = loop {
            if *shutdown.borrow() {
                break Ending::Close(Some(reason(CloseCode::Away, "server shutting down")));
            }
            if let Some(at) = socket.expires_at {
                let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                expiry.as_mut().reset(tokio::time::Instant::now() + left);
            }
            let event = tokio::select! {
                _ = shutdown.changed() => Event::Shutdown,
                why = &mut kicked => Event::Kicked(why),
                out = out_rx.recv() => Event::Out(out),
                msg = ws.recv() => Event::In(msg),
                _ = heartbeat.tick() => Event::Heartbeat,
                _ = &mut expiry, if socket.expires_at.is_some() => Event::Expired,
            };
            let step = match event {
                Event::Shutdown => Step::End(Ending::Close(Some(reason(CloseCode::Away, "server shutting down")))),
                Event::Kicked(why) => Step::End(Ending::Close(Some(why))),
                Event::Expired => Step::End(Ending::Close(Some(super::close::token_expired()))),
                Event::Out(None) => Step::End(Ending::Close(Some(kick.reason()))),
                Event::Out(Some((name, message))) => send(&mut ws, framed(&name, &message)).await,
                Event::Heartbeat => {
                    if awaiting_pong {
                        Step::End(Ending::Close(Some(reason(CloseCode::Away, "heartbeat timeout"))))
                    } else {
                        awaiting_pong = true;
                        match ws.ping().await {
                            Ok(()) => Step::Continue,
                            Err(_) => Step::End(Ending::Close(None)),
                        }
                    }
                }
                Event::In(None) | Event::In(Some(Ok(Inbound::Close))) | Event::In(Some(Err(InboundError::Gone))) => Step::End(Ending::Close(None)),
                Event::In(Some(Ok(Inbound::Pong))) => {
                    awaiting_pong = false;
                    Step::Continue
                }
                Event::In(Some(Ok(Inbound::Ping(p)))) => match ws.pong(p).await {
                    Ok(()) => Step::Continue,
                    Err(_) => Step::End(Ending::Close(None)),
                },
                Event::In(Some(Ok(Inbound::Text))) => Step::End(Ending::Close(Some(reason(CloseCode::Unsupported, "the protocol uses binary frames only")))),
                Event::In(Some(Err(InboundError::TooLarge(why)))) => Step::End(Ending::Linger(why)),
                Event::In(Some(Err(InboundError::Busy))) => Step::End(Ending::Close(Some(reason(CloseCode::Again, "the server is receiving too many large messages, retry later")))),
                Event::In(Some(Err(InboundError::Refused(why)))) => Step::End(Ending::Close(Some(why))),
                Event::In(Some(Ok(Inbound::Binary(frame)))) => match parse(&frame) {
                    None => Step::End(Ending::Close(Some(reason(CloseCode::Protocol, "not a Hocuspocus message")))),
                    Some((name, AUTH, at)) => {
                        let token = auth_token(&frame, at);
                        socket.authenticate(&mut ws, &name, token).await
                    }
                    Some((_, SYNC | AWARENESS | QUERY_AWARENESS, _)) => socket.document_message(&mut ws, &frame).await,
                    Some((name, CLOSE, _)) => {
                        socket.leave(&name);
                        Step::Continue
                    }
                    // Stateless messages are accepted and not relayed (Hocuspocus without hooks).
                    Some((_, STATELESS | SYNC_STATUS, _)) => Step::Continue,
                    Some((_, other, _)) => {
                        debug!(kind = other, "ignoring a Hocuspocus message type");
                        Step::Continue
                    }
                },
            };
            match step {
                Step::Continue => {}
                // The socket's reads pause as a whole while it is over its rate.
                Step::Pause(d) => tokio::time::sleep(d).await,
                Step::End(ending) => break ending,
            }
        };
        socket.leave_all();
        drop(slot);
        let why = ending.reason();
        METRICS.connection_closed(why.map(|c| u16::from(c.code)));
        info!(close_code = ?why.map(|c| u16::from(c.code)), duration_ms = opened.elapsed().as_millis() as u64, "hocuspocus connection closed");
        Box::pin(ws.close(ending)).await;
    }
    .instrument(span)
}

/// The token the upgrade request carried in its URL or Authorization header, if any.
pub fn url_token(query: &str, authorization: Option<&str>) -> Option<String> {
    presented_token(query, authorization)
}

#[cfg(test)]
mod tests {
    use super::super::session::tests::returned_size;

    /// Resident for every open Hocuspocus socket, like a y-websocket session's task.
    #[test]
    fn a_socket_task_stays_small() {
        let size = returned_size(super::run::<super::super::io::Ws<tokio::net::TcpStream>>);
        // 2,272 bytes now; 3,648 as an `async fn` holding a copy of the config.
        assert!(size <= 2400, "hocuspocus socket future: {size} bytes");
    }
}
