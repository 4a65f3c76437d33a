//! One WebSocket connection after the upgrade: decodes frames (off the document actor),
//! forwards them to the document, writes the document's output, and keeps the heartbeat, the
//! token's expiry and the connection's rate limit.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::Addr;
use collab_crdt::decode_frame;
use tokio::sync::watch;
use tokio::time::Instant as TokioInstant;
use tracing::{info, warn, Instrument};
use uuid::Uuid;

use super::close::{protocol_close, reason, token_expired, CloseCode, CloseReason};
use super::direct::{is_tail_marker, CloseOnDrop, Direct};
use super::limits::SlotGuard;
use super::rate::{RateLimit, Verdict};
use super::transport::{Ending, Inbound, InboundError, Transport};
use crate::auth::Access;
use crate::counters::count;
use crate::doc::actor::DocActor;
use crate::doc::messages::{Incoming, Join, JoinError, Kick, Leave, Outgoing};
use crate::doc::outbox;
use crate::doc::registry::{Registry, RegistryFull};
use crate::telemetry::{Kind, Refusal, METRICS};

/// Most messages written before one flush (one `send` syscall) when several are queued.
const WRITE_BATCH: usize = 64;

/// Tries to join a document that is unloading or being deleted (about half a second in all).
const JOIN_ATTEMPTS: u64 = 10;

/// What the upgrade decided about a connection.
pub struct Admitted {
    pub name: String,
    pub access: Access,
    pub peer: Option<std::net::SocketAddr>,
    /// Its place in the per-IP and per-document counts, given back when the session ends.
    pub slot: SlotGuard,
}

/// Joins the document, retrying when it raced with the document unloading. `acks`: the
/// connection wants a SyncStatus for each change (Hocuspocus).
pub(crate) async fn join(
    registry: &Registry,
    name: &str,
    member: Join,
) -> Result<Addr<DocActor>, CloseReason> {
    for attempt in 0..JOIN_ATTEMPTS {
        if attempt > 0 {
            // The document is unloading or being deleted; both take milliseconds.
            tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
        }
        let addr = match registry.get_or_start(name) {
            Ok(addr) => addr,
            Err(RegistryFull(limit)) => {
                count(|c| &c.loaded_documents_full);
                return Err(reason(
                    CloseCode::Again,
                    format!("{limit} documents are open and in use, retry later"),
                ));
            }
        };
        match addr.send(member.clone()).await {
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

/// The session's three deadlines, kept on one timer: a tokio timer is 112 bytes resident in
/// every connection's task (and an `Interval` boxes another), for deadlines that are far apart.
struct Deadlines {
    ping: TokioInstant,
    every: Duration,
    /// When the token expires; a connection without one never expires.
    expires: Option<TokioInstant>,
    /// When reading resumes after a rate-limit pause.
    resume: Option<TokioInstant>,
}

impl Deadlines {
    fn new(now: TokioInstant, every: Duration, expires_at: Option<SystemTime>) -> Self {
        Deadlines {
            ping: now + every,
            every,
            expires: expires_at
                .map(|at| now + at.duration_since(SystemTime::now()).unwrap_or_default()),
            resume: None,
        }
    }

    fn next(&self) -> TokioInstant {
        [self.expires, self.resume]
            .into_iter()
            .flatten()
            .fold(self.ping, TokioInstant::min)
    }

    /// What is due at `now`, most urgent first; the caller asks again until `None`.
    fn due(&mut self, now: TokioInstant) -> Option<Event> {
        if self.expires.is_some_and(|at| at <= now) {
            self.expires = None;
            return Some(Event::Expired);
        }
        if self.resume.is_some_and(|at| at <= now) {
            self.resume = None;
            return Some(Event::Resume);
        }
        if self.ping <= now {
            self.ping = now + self.every;
            return Some(Event::Heartbeat);
        }
        None
    }
}

enum Event {
    Shutdown,
    Kicked(CloseReason),
    Out(Option<Outgoing>),
    In(Option<Result<Inbound, InboundError>>),
    Heartbeat,
    Expired,
    Resume,
}

pub(crate) enum Step {
    Continue,
    /// Stop reading for this long: the connection is over its rate.
    Pause(Duration),
    End(Ending),
}

fn close_with(why: CloseReason) -> Step {
    Step::End(Ending::Close(Some(why)))
}

/// The socket is gone: nothing to send.
const GONE: Step = Step::End(Ending::Close(None));

/// Writes `first` and everything already queued behind it with one flush: under load a reader
/// costs one syscall per batch, not one per message.
/// With a direct socket, the session holds it for the whole write (see `ws::direct`).
async fn write_queued<T: Transport>(
    ws: &mut T,
    rx: &mut outbox::Receiver<Outgoing>,
    first: Outgoing,
    direct: Option<&Direct>,
) -> Step {
    if let Some(d) = direct {
        d.claim();
    }
    let mut result = write_one(ws, first, direct).await;
    let mut n = 1;
    while result.is_ok() && n < WRITE_BATCH {
        let Some(more) = rx.try_recv() else { break };
        result = write_one(ws, more, direct).await;
        n += 1;
    }
    if result.is_err() || ws.flush().await.is_err() {
        return GONE;
    }
    if let Some(d) = direct {
        d.release(n as u64);
    }
    Step::Continue
}

async fn write_one<T: Transport>(
    ws: &mut T,
    msg: Outgoing,
    direct: Option<&Direct>,
) -> Result<(), super::transport::Gone> {
    if is_tail_marker(&msg) {
        return match direct.and_then(Direct::take_tail) {
            Some(tail) => ws.write_raw(tail).await,
            None => Ok(()),
        };
    }
    ws.feed((*msg).clone()).await
}

/// Per-connection state the input path needs besides the socket.
struct Input<'a> {
    addr: &'a Addr<DocActor>,
    conn: Uuid,
    kick: &'a Kick,
    awaiting_pong: bool,
    /// The block's own, borrowed: moved into this struct it would be stored twice.
    rate: &'a mut RateLimit,
    direct: Option<Arc<Direct>>,
}

async fn handle_input<T: Transport>(
    msg: Option<Result<Inbound, InboundError>>,
    ws: &mut T,
    input: &mut Input<'_>,
) -> Step {
    match msg {
        None => GONE,
        Some(Ok(Inbound::Binary(frame))) => {
            let messages = match decode_frame(&frame) {
                Ok(m) => m,
                Err(e) => {
                    METRICS.update_refused(Refusal::Malformed);
                    warn!(error = %e, len = frame.len(), "closing connection: bad frame");
                    return close_with(protocol_close(&e));
                }
            };
            let (count_in, bytes_in) = (messages.len(), frame.len());
            for m in &messages {
                METRICS.messages_received.get(Kind::of(m)).inc();
            }
            if let Some(first) = messages.first() {
                METRICS
                    .bytes_received
                    .get(Kind::of(first))
                    .inc_by(bytes_in as u64);
            }
            let incoming = Incoming {
                conn: input.conn,
                messages,
                bytes: bytes_in,
                received: Instant::now(),
            };
            drop(frame);
            match input.addr.send(incoming).await {
                // Sync answers count against the requester, so a stream of small SyncStep1s
                // cannot make the server send gigabytes.
                Ok(Ok(reply_bytes)) => rate_step(input.rate.spend(
                    count_in,
                    bytes_in + reply_bytes,
                    Instant::now(),
                )),
                Ok(Err(v)) => {
                    warn!(error = %v, "closing connection: input refused");
                    close_with(v.close_reason())
                }
                Err(_) => close_with(input.kick.reason()),
            }
        }
        Some(Ok(Inbound::Ping(payload))) => {
            // tungstenite writes pongs on its own from then on, even while reading: the
            // document must stop writing into this socket.
            if let Some(d) = &input.direct {
                d.close();
            }
            match ws.pong(payload).await {
                Ok(()) => Step::Continue,
                Err(_) => GONE,
            }
        }
        Some(Ok(Inbound::Pong)) => {
            input.awaiting_pong = false;
            Step::Continue
        }
        Some(Ok(Inbound::Text)) => {
            warn!("closing connection: text frame");
            close_with(reason(
                CloseCode::Unsupported,
                "the protocol uses binary frames only",
            ))
        }
        Some(Ok(Inbound::Close)) | Some(Err(InboundError::Gone)) => GONE,
        Some(Err(InboundError::Busy)) => {
            warn!("closing connection: no room for another large incoming message");
            close_with(reason(
                CloseCode::Again,
                "the server is receiving too many large messages, retry later",
            ))
        }
        Some(Err(InboundError::TooLarge(why))) => {
            count(|c| &c.oversized_messages);
            warn!(reason = ?why.description, "closing connection: message too large");
            Step::End(Ending::Linger(why))
        }
        Some(Err(InboundError::Refused(why))) => {
            warn!(reason = ?why.description, "closing connection: websocket error");
            close_with(why)
        }
    }
}

pub(crate) fn rate_step(verdict: Verdict) -> Step {
    match verdict {
        Verdict::Go => Step::Continue,
        Verdict::Pause(d) => {
            count(|c| &c.rate_limit_pauses);
            Step::Pause(d)
        }
        Verdict::Close => {
            count(|c| &c.rate_limit_closes);
            warn!("closing connection: over its rate limit for too long");
            close_with(reason(CloseCode::Policy, "rate limit exceeded"))
        }
    }
}

/// Decrements the open-connections gauge when dropped.
pub(crate) struct OpenConnection;

impl Drop for OpenConnection {
    fn drop(&mut self) {
        METRICS.connections.dec();
    }
}

/// Serves one WebSocket until either side closes it.
///
/// Not an `async fn`: its arguments would be kept in the task beside the copies the body moves
/// them into, and the task stays resident for the connection's whole life (see the size test
/// below). Everything is unpacked here, and the body captures only what it uses.
pub fn run<T: Transport>(
    mut ws: T,
    admitted: Admitted,
    registry: Registry,
    mut shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> {
    let conn = Uuid::new_v4();
    let Admitted {
        name,
        access,
        peer,
        slot,
    } = admitted;
    let span = tracing::info_span!(
        "conn",
        doc = %name,
        conn = %conn,
        sub = %access.sub.as_deref().unwrap_or(""),
        read_only = access.read_only
    );
    let (read_only, expires_at) = (access.read_only, access.expires_at);
    let config = registry.config();
    let queue = config.outbound_queue;
    let heartbeat_every = config.heartbeat();
    let mut rate = RateLimit::for_connection(config);
    async move {
        let (tx, mut rx) = outbox::outbox::<Outgoing>(queue);
        let kick = Arc::new(Kick::default());
        let opened = Instant::now();
        info!(
            peer = %peer.map_or_else(String::new, |p| p.to_string()),
            "connection opened"
        );
        METRICS.connections_opened.inc();
        METRICS.connections.inc();
        // Counted down however the session ends, early returns included.
        let _open = OpenConnection;
        let direct = ws.direct();
        // The actor stops writing into the socket however the session ends: a local, so it is
        // dropped before `ws` (captured by this block) closes the socket, on cancel or panic too.
        let _direct = CloseOnDrop(direct.clone());
        let member = Join {
            conn,
            tx,
            kick: kick.clone(),
            read_only,
            acks: false,
            direct: direct.clone(),
        };
        let joined = join(&registry, &name, member);
        let addr = match Box::pin(joined).await {
            Ok(addr) => addr,
            Err(why) => {
                warn!(reason = ?why.description, "could not join document");
                Box::pin(ws.close(Ending::Close(Some(why)))).await;
                return;
            }
        };
        let mut deadlines = Deadlines::new(TokioInstant::now(), heartbeat_every, expires_at);
        let mut input = Input {
            addr: &addr,
            conn,
            kick: &kick,
            awaiting_pong: false,
            direct: direct.clone(),
            rate: &mut rate,
        };
        // Created once: re-creating it each turn would re-register with the Notify every time.
        let kicked = kick.kicked();
        tokio::pin!(kicked);
        let timer = tokio::time::sleep_until(deadlines.next());
        tokio::pin!(timer);

        let ending: Ending = loop {
            if *shutdown.borrow() {
                break Ending::Close(Some(reason(CloseCode::Away, "server shutting down")));
            }
            // The select only picks an event; handling it after the select has dropped its
            // futures keeps this task's state machine (resident per connection) small.
            let paused = deadlines.resume.is_some();
            let event = tokio::select! {
                _ = shutdown.changed() => Event::Shutdown,
                why = &mut kicked => Event::Kicked(why),
                out = rx.recv() => Event::Out(out),
                msg = ws.recv(), if !paused => Event::In(msg),
                _ = &mut timer => match deadlines.due(TokioInstant::now()) {
                    Some(due) => due,
                    // Nothing due yet: the timer is set again below.
                    None => Event::Resume,
                },
            };
            let step = match event {
                Event::Shutdown => close_with(reason(CloseCode::Away, "server shutting down")),
                Event::Kicked(why) => close_with(why),
                Event::Expired => {
                    info!("closing connection: token expired");
                    close_with(token_expired())
                }
                Event::Out(None) => close_with(kick.reason()),
                // A client that stopped reading blocks the write; the document then kicks it
                // (full queue), and the kick must win over the write that never finishes.
                Event::Out(Some(bytes)) => tokio::select! {
                    step = write_queued(&mut ws, &mut rx, bytes, direct.as_deref()) => step,
                    why = &mut kicked => close_with(why),
                },
                // Boxed: awaiting the actor's answer is the largest state and this task is resident.
                Event::In(msg) => Box::pin(handle_input(msg, &mut ws, &mut input)).await,
                Event::Resume => Step::Continue,
                Event::Heartbeat => {
                    if input.awaiting_pong {
                        info!("closing connection: no pong to the last ping");
                        close_with(reason(CloseCode::Away, "heartbeat timeout"))
                    } else {
                        input.awaiting_pong = true;
                        if let Some(d) = &direct {
                            d.claim();
                        }
                        match ws.ping().await {
                            Ok(()) => {
                                if let Some(d) = &direct {
                                    d.release(0);
                                }
                                Step::Continue
                            }
                            Err(_) => GONE,
                        }
                    }
                }
            };
            match step {
                Step::Continue => {}
                Step::Pause(d) => deadlines.resume = Some(TokioInstant::now() + d),
                Step::End(ending) => break ending,
            }
            let next = deadlines.next();
            // A fired timer stays elapsed until reset, even to the same deadline.
            if timer.is_elapsed() || timer.deadline() != next {
                timer.as_mut().reset(next);
            }
        };
        addr.do_send(Leave { conn });
        // The per-IP and per-document places are free once the document has let go; the
        // close handshake below may take seconds with a slow peer.
        drop(slot);
        let why = ending.reason();
        METRICS.connection_closed(why.map(|c| u16::from(c.code)));
        info!(
            // None: the client closed, or the socket was lost.
            close_code = ?why.map(|c| u16::from(c.code)),
            reason = why.and_then(|c| c.description.as_deref()).unwrap_or(""),
            duration_ms = opened.elapsed().as_millis() as u64,
            "connection closed"
        );
        if let Some(d) = &direct {
            d.close();
        }
        Box::pin(ws.close(ending)).await;
    }
    .instrument(span)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The size of the future `f` returns, without building its arguments.
    pub(crate) fn returned_size<A, B, C, D, F>(_: impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn deadlines_come_due_in_turn_on_one_timer() {
        let t0 = TokioInstant::now();
        let every = Duration::from_secs(30);
        let mut d = Deadlines::new(t0, every, Some(SystemTime::now() + Duration::from_secs(50)));
        assert_eq!(d.next(), t0 + every);
        assert!(d.due(t0).is_none());
        assert!(matches!(d.due(t0 + every), Some(Event::Heartbeat)));
        // The expiry (in about 50 s) comes before the next ping (60 s).
        let expiry = d.next();
        assert!(expiry > t0 + Duration::from_secs(49) && expiry <= t0 + Duration::from_secs(50));
        d.resume = Some(t0 + Duration::from_secs(31));
        assert_eq!(d.next(), t0 + Duration::from_secs(31));
        // Everything due at once comes out one by one, the expiry first.
        let late = t0 + Duration::from_secs(100);
        assert!(matches!(d.due(late), Some(Event::Expired)));
        assert!(matches!(d.due(late), Some(Event::Resume)));
        assert!(matches!(d.due(late), Some(Event::Heartbeat)));
        assert!(d.due(late).is_none());
        assert_eq!(d.next(), late + every);
        let never = Deadlines::new(t0, every, None);
        assert_eq!(never.next(), t0 + every);
    }

    /// A session's future is the task that stays resident for every open connection (10,000
    /// idle connections hold 10,000 of them), so its size is the bulk of the per-connection
    /// memory the server itself controls.
    #[test]
    fn a_session_task_stays_small() {
        let size = returned_size(run::<super::super::io::Ws<tokio::net::TcpStream>>);
        // 1,624 bytes now; 3,664 as an `async fn` holding a copy of the config. A new value
        // held across an `.await` shows up here: keep it out of the loop or box it.
        assert!(size <= 1700, "session future: {size} bytes");
    }
}
