//! One WebSocket connection: decodes frames (off the document actor), forwards them to the
//! document, writes the document's output, keeps the heartbeat.

use std::sync::Arc;

use actix::Addr;
use actix_web::web::Bytes;
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Session};
use collab_crdt::{decode_frame, ProtocolError};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn, Instrument};
use uuid::Uuid;

use crate::doc_actor::{DocActor, Incoming, Join, JoinError, Kick, Leave};
use crate::registry::Registry;

fn reason(code: CloseCode, description: impl Into<String>) -> CloseReason {
    CloseReason {
        code,
        description: Some(description.into()),
    }
}

fn protocol_close(e: &ProtocolError) -> CloseReason {
    let code = if e.is_unsupported() {
        CloseCode::Unsupported
    } else {
        CloseCode::Protocol
    };
    reason(code, e.to_string())
}

/// Joins the document, retrying when it raced with the document unloading.
async fn join(
    registry: &Registry,
    name: &str,
    conn: Uuid,
    tx: mpsc::Sender<Bytes>,
    kick: Arc<Kick>,
) -> Result<Addr<DocActor>, CloseReason> {
    for _ in 0..5 {
        let addr = registry.get_or_start(name);
        let msg = Join {
            conn,
            tx: tx.clone(),
            kick: kick.clone(),
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

pub async fn run(
    mut session: Session,
    mut stream: AggregatedMessageStream,
    name: String,
    registry: Registry,
    mut shutdown: watch::Receiver<bool>,
) {
    let conn = Uuid::new_v4();
    let span = tracing::info_span!("conn", doc = %name, conn = %conn);
    async move {
        let config = registry.config().clone();
        let (tx, mut rx) = mpsc::channel::<Bytes>(config.outbound_queue.max(1));
        let kick = Arc::new(Kick::default());
        debug!("connected");
        let addr = match join(&registry, &name, conn, tx, kick.clone()).await {
            Ok(addr) => addr,
            Err(why) => {
                warn!(reason = ?why.description, "could not join document");
                let _ = session.close(Some(why)).await;
                return;
            }
        };
        let mut heartbeat = tokio::time::interval(config.heartbeat());
        heartbeat.tick().await;
        let mut awaiting_pong = false;

        let close: Option<CloseReason> = loop {
            if *shutdown.borrow() {
                break Some(reason(CloseCode::Away, "server shutting down"));
            }
            tokio::select! {
                _ = shutdown.changed() => {
                    break Some(reason(CloseCode::Away, "server shutting down"));
                }
                why = kick.kicked() => break Some(why),
                out = rx.recv() => match out {
                    Some(bytes) => {
                        if session.binary(bytes).await.is_err() {
                            break None;
                        }
                    }
                    None => break Some(kick.reason()),
                },
                msg = stream.recv() => match msg {
                    None => break None,
                    Some(Ok(AggregatedMessage::Binary(frame))) => {
                        let messages = match decode_frame(&frame) {
                            Ok(m) => m,
                            Err(e) => {
                                warn!(error = %e, len = frame.len(), "closing connection: bad frame");
                                break Some(protocol_close(&e));
                            }
                        };
                        match addr.send(Incoming { conn, messages }).await {
                            Ok(Ok(())) => {}
                            Ok(Err(v)) => {
                                warn!(error = %v, "closing connection: input refused");
                                break Some(v.close_reason());
                            }
                            Err(_) => break Some(kick.reason()),
                        }
                    }
                    Some(Ok(AggregatedMessage::Ping(p))) => {
                        if session.pong(&p).await.is_err() {
                            break None;
                        }
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => awaiting_pong = false,
                    Some(Ok(AggregatedMessage::Text(_))) => {
                        warn!("closing connection: text frame");
                        break Some(reason(CloseCode::Unsupported, "the protocol uses binary frames only"));
                    }
                    Some(Ok(AggregatedMessage::Close(_))) => break None,
                    Some(Err(e)) => {
                        warn!(error = %e, "closing connection: websocket error");
                        let why = match e {
                            actix_ws::ProtocolError::Overflow => {
                                reason(CloseCode::Size, "message exceeds the size limit")
                            }
                            other => reason(CloseCode::Protocol, other.to_string()),
                        };
                        break Some(why);
                    }
                },
                _ = heartbeat.tick() => {
                    if awaiting_pong {
                        info!("closing connection: no pong to the last ping");
                        break Some(reason(CloseCode::Away, "heartbeat timeout"));
                    }
                    awaiting_pong = true;
                    if session.ping(b"").await.is_err() {
                        break None;
                    }
                }
            }
        };
        addr.do_send(Leave { conn });
        debug!(close = ?close.as_ref().map(|c| c.code), "disconnected");
        let _ = session.close(close).await;
    }
    .instrument(span)
    .await
}
