//! What connections and the document actor say to each other.

use std::sync::{Arc, OnceLock};

use actix::prelude::*;
use actix_web::web::Bytes;
use collab_crdt::{ClientMessage, StateVector};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::ws::close::{CloseCode, CloseReason};

/// One outgoing message, shared by every recipient. An `Arc` rather than `Bytes` itself: a
/// queue slot is then 8 bytes instead of 32, and tokio allocates every queue's first 32 slots
/// up front, so this saves about 0.75 KiB per idle connection.
pub type Outgoing = Arc<Bytes>;

/// Lets the document close a connection whose outbound queue it can no longer use.
#[derive(Default)]
pub struct Kick {
    reason: OnceLock<CloseReason>,
    notify: Notify,
}

impl Kick {
    pub fn kick(&self, code: CloseCode, description: &str) {
        let _ = self.reason.set(CloseReason {
            code,
            description: Some(description.to_owned()),
        });
        self.notify.notify_one();
    }

    pub async fn kicked(&self) -> CloseReason {
        self.notify.notified().await;
        self.reason()
    }

    pub fn reason(&self) -> CloseReason {
        self.reason.get().cloned().unwrap_or(CloseReason {
            code: CloseCode::Error,
            description: Some("document closed".into()),
        })
    }
}

/// Why a connection's input was refused; each maps to the close code the client receives.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    #[error("update rejected: {0}")]
    UpdateRejected(String),
    #[error("connection announced more than {0} awareness clients")]
    TooManyAwarenessClients(usize),
    #[error("document unavailable: {0}")]
    Unavailable(String),
    #[error("the update would take the document past --max-document-bytes ({0} bytes)")]
    DocumentTooLarge(u64),
    #[error("an awareness state is over --max-awareness-bytes ({0} bytes)")]
    AwarenessTooLarge(usize),
}

impl Violation {
    pub fn close_reason(&self) -> CloseReason {
        let code = match self {
            Violation::UpdateRejected(_) => CloseCode::Protocol,
            Violation::TooManyAwarenessClients(_) => CloseCode::Policy,
            Violation::Unavailable(_) => CloseCode::Error,
            Violation::DocumentTooLarge(_) | Violation::AwarenessTooLarge(_) => CloseCode::Size,
        };
        CloseReason {
            code,
            description: Some(self.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("document is closing")]
    Closing,
    #[error("document unavailable: {0}")]
    Unavailable(String),
}

#[derive(Message, Clone)]
#[rtype(result = "Result<(), JoinError>")]
pub struct Join {
    pub conn: Uuid,
    pub tx: crate::doc::outbox::Sender<Outgoing>,
    pub kick: Arc<Kick>,
    /// Decided by the connection's token: the document refuses its writes.
    pub read_only: bool,
    /// Acknowledge each of its Update and SyncStep2 messages once durable (a Hocuspocus
    /// provider's SyncStatus), with [`ack_message`].
    pub acks: bool,
    /// The connection's socket, for broadcasts written straight into it when it is free.
    pub direct: Option<Arc<crate::ws::direct::Direct>>,
}

/// What the document sends a connection that asked for acknowledgements: the Hocuspocus
/// SyncStatus body (type 8, then 1 applied and durable, 0 refused). The Hocuspocus session
/// prefixes it with the document name like every other message.
pub fn ack_message(applied: bool) -> Outgoing {
    Arc::new(Bytes::from_static(if applied { &[8, 1] } else { &[8, 0] }))
}

/// Answered with the bytes of the sync answers queued for the sender, which count against its
/// rate limit.
#[derive(Message)]
#[rtype(result = "Result<usize, Violation>")]
pub struct Incoming {
    pub conn: Uuid,
    pub messages: Vec<ClientMessage>,
    /// Size of the frame they came in, an upper bound on what they can add to the document.
    pub bytes: usize,
    /// When the frame was read off the socket.
    pub received: std::time::Instant,
}

/// What the metrics endpoint samples from each document.
#[derive(Message)]
#[rtype(result = "DocStats")]
pub struct GetStats;

#[derive(Debug, Default, Clone)]
pub struct DocStats {
    pub connections: usize,
    /// Messages waiting in each connection's outbound queue.
    pub queue_depths: Vec<usize>,
}

/// Sent by the registry to an idle document when too many are loaded: unload now if still
/// idle.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Evict;

#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub conn: Uuid,
}

/// Why a document could not answer a backend's request (the HTTP API).
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("not a valid Yjs update: {0}")]
    InvalidUpdate(String),
    #[error("the update depends on changes the document does not have")]
    MissingDependencies,
    #[error("{0}")]
    TooLarge(String),
    #[error("the document is being deleted")]
    Deleting,
    /// The actor is unloading; the caller asks the registry again.
    #[error("document is closing")]
    Closing,
    #[error("document unavailable: {0}")]
    Unavailable(String),
}

/// A backend's update (`POST /api/docs/{name}/update`), applied, stored and broadcast exactly
/// like a client's. Answered once a flush covers it: a 200 means durable.
#[derive(Message)]
#[rtype(result = "Result<Applied, DocError>")]
pub struct ApplyUpdate {
    /// A Yjs v1 update, already checked to decode (the actor decodes it again rather than
    /// cloning a decoded one for retries).
    pub update: Bytes,
}

#[derive(Debug)]
pub struct Applied {
    /// False when the document already had all of it.
    pub changed: bool,
}

/// The document's content as a Yjs v1 update: all of it, or what `sv` lacks. Answered once
/// everything it reveals is durable.
#[derive(Message)]
#[rtype(result = "Result<Vec<u8>, DocError>")]
pub struct ReadState {
    pub sv: Option<StateVector>,
}

/// Deletes the document: its connections are closed with 4404, its storage (versions included)
/// is removed, and the actor carries on with an empty document, so a join racing the delete
/// waits and then sees the empty document rather than the old one.
#[derive(Message)]
#[rtype(result = "Result<(), DocError>")]
pub struct DeleteDoc;
