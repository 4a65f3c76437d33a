//! The WebSocket upgrade: every check a request meets before it gets its socket, in order
//! (handshake, origin, document name, token, connection limit), then the 101 and the session.
//! A refused request gets a status and a one-line plain-text reason; no document is loaded.

use std::sync::Arc;
use std::time::SystemTime;

use actix_codec::Framed;
use actix_http::body::BodySize;
use actix_http::{h1, ws, Request, Response, StatusCode};
use actix_web::http::header;
use actix_web::web::{Bytes, BytesMut};
use actix_web::HttpMessage;
use futures_util::SinkExt;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::hocuspocus;
use super::home;
use super::io::Io;
use super::limits::{client_ip, SlotRefusal, Slots};
use super::metered::{IncomingBudget, Metered};
use super::session::{self, Admitted};
use crate::auth::{presented_token, Auth, Origins};
use crate::config::MAX_DOC_NAME_LEN;
use crate::counters::count;
use crate::doc::registry::Registry;
use crate::telemetry::METRICS;

/// What the upgrade service needs; cloned into every worker.
#[derive(Clone)]
pub struct Upgrades {
    pub registry: Registry,
    pub shutdown: watch::Receiver<bool>,
    pub connections: TaskTracker,
    pub auth: Arc<Auth>,
    pub origins: Arc<Origins>,
    pub slots: Arc<Slots>,
    pub budget: IncomingBudget,
    /// `--max-connections`, or less when the open-file limit is lower.
    pub max_connections: usize,
}

/// The document name of a WebSocket request: the raw path without its leading `/` (the query
/// string is not part of the path), exactly as the reference server derives its room name.
pub fn doc_name(path: &str) -> Option<&str> {
    let name = path.strip_prefix('/').unwrap_or(path);
    (!name.is_empty() && name.len() <= MAX_DOC_NAME_LEN).then_some(name)
}

/// An upgrade the checks turned down: its status and one-line reason.
pub struct Refusal {
    pub status: StatusCode,
    pub text: String,
}

impl Refusal {
    fn new(status: StatusCode, text: impl Into<String>) -> Self {
        Refusal {
            status,
            text: text.into(),
        }
    }

    /// Counts and logs the refusal (peer and path, never a token).
    pub fn report(&self, peer: Option<std::net::SocketAddr>, path: &str) {
        METRICS
            .upgrades_refused
            .with_label_values(&[self.status.as_str()])
            .inc();
        let peer = peer.map(|a| a.to_string()).unwrap_or_default();
        if matches!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        ) {
            warn!(%peer, %path, status = self.status.as_u16(), reason = %self.text, "upgrade refused");
        } else {
            info!(%peer, %path, status = self.status.as_u16(), reason = %self.text, "upgrade refused");
        }
    }
}

/// What the checks look at, wherever the request came from (the standalone server's upgrade
/// service or an embedding app's actix-web handler).
pub struct Candidate<'a> {
    /// The `Origin` header; a value that is not text is passed as `Some("\0")`.
    pub origin: Option<&'a str>,
    /// The document name; `None` when the path does not name one.
    pub name: Option<&'a str>,
    pub query: &'a str,
    pub authorization: Option<&'a str>,
    pub forwarded_for: Option<&'a str>,
    pub peer: Option<std::net::SocketAddr>,
}

fn header_str(req: &Request, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Decides whether a WebSocket may open, and with what access: origin, name, token,
/// connection cap, per-IP and per-document places, in that order.
pub fn admit(up: &Upgrades, c: Candidate<'_>) -> Result<Admitted, Refusal> {
    // Before anything else is read: a page on another site must not learn anything, not even
    // whether a token would have worked.
    allowed_origin(up, c.origin)?;
    let name = c.name.ok_or_else(|| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the document name (the URL path) must be 1 to {MAX_DOC_NAME_LEN} bytes"),
        )
    })?;
    let token = presented_token(c.query, c.authorization);
    let access = up
        .auth
        .authorize(token.as_deref(), name, SystemTime::now())
        .map_err(|e| {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            Refusal::new(status, e.to_string())
        })?;
    within_cap(up)?;
    if let Some(cluster) = up.registry.cluster() {
        if !cluster.is_up() {
            count(|c| &c.refused_redis_down);
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Redis is unavailable, retry later",
            ));
        }
    }
    let config = up.registry.config();
    let ip = client_ip(c.peer, c.forwarded_for, &config.trusted_proxies);
    let slot = up
        .slots
        .acquire(ip, name)
        .map_err(|refusal| match refusal {
            SlotRefusal::PerIp(n) => {
                count(|c| &c.refused_per_ip);
                Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("this address already holds {n} connections"),
                )
            }
            SlotRefusal::PerDoc(n) => {
                count(|c| &c.refused_per_doc);
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("this document already has {n} connections, retry later"),
                )
            }
        })?;
    Ok(Admitted {
        name: name.to_owned(),
        access,
        peer: c.peer,
        slot,
    })
}

/// A valid WebSocket handshake, and its `Origin` header (a value that is not text as "\0").
fn handshake_origin(req: &Request) -> Result<Option<&str>, Refusal> {
    ws::verify_handshake(req.head())
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(req
        .headers()
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{0}")))
}

/// Cross-site WebSocket hijacking: a browser page from another site gets 403.
fn allowed_origin(up: &Upgrades, origin: Option<&str>) -> Result<(), Refusal> {
    if up.origins.allows(origin) {
        Ok(())
    } else {
        Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "this origin may not open WebSockets here",
        ))
    }
}

/// Room for one more connection under `--max-connections` (and the open-file limit).
fn within_cap(up: &Upgrades) -> Result<(), Refusal> {
    if up.connections.len() >= up.max_connections {
        count(|c| &c.refused_connection_cap);
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached, retry later",
        ));
    }
    Ok(())
}

/// The standalone server's request, checked.
fn check(up: &Upgrades, req: &Request) -> Result<Admitted, Refusal> {
    let origin = handshake_origin(req)?;
    admit(
        up,
        Candidate {
            origin,
            name: doc_name(req.path()),
            query: req.uri().query().unwrap_or(""),
            authorization: header_str(req, header::AUTHORIZATION),
            forwarded_for: header_str(req, header::HeaderName::from_static("x-forwarded-for")),
            peer: req.peer_addr(),
        },
    )
}

async fn refuse<T: Io>(
    framed: &mut Framed<T, h1::Codec>,
    refusal: Refusal,
) -> Result<(), actix_web::Error> {
    let mut res = Response::with_body(refusal.status, ());
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let body = Bytes::from(refusal.text);
    framed
        .send(h1::Message::Item((res, BodySize::Sized(body.len() as u64))))
        .await?;
    framed.send(h1::Message::Chunk(Some(body))).await?;
    framed.send(h1::Message::Chunk(None)).await?;
    Ok(())
}

/// Every HTTP/1 upgrade request lands here with its socket. An accepted one gets its 101 and
/// a session task that owns the socket from then on; the HTTP dispatcher, with its buffers,
/// is gone once this returns.
pub async fn upgrade<T: Io>(
    up: Upgrades,
    req: Request,
    mut framed: Framed<T, h1::Codec>,
) -> Result<(), actix_web::Error> {
    let hocuspocus = is_hocuspocus(&up, req.path());
    let admitted = match if hocuspocus {
        check_hocuspocus(&up, &req).map(Admission::Hocuspocus)
    } else {
        check(&up, &req).map(Admission::Document)
    } {
        Ok(ok) => ok,
        Err(refusal) => {
            refusal.report(req.peer_addr(), req.path());
            return refuse(&mut framed, refusal).await;
        }
    };
    let res = ws::handshake_response(req.head()).finish().drop_body();
    framed
        .send(h1::Message::Item((res, BodySize::None)))
        .await?;
    let parts = framed.into_parts();
    match admitted {
        Admission::Document(admitted) => {
            // Moved to the document's thread, or started here.
            if let Some((admitted, io, read_buf)) =
                home::send_home(&up, admitted, parts.io, parts.read_buf)
            {
                start_document(up, io, read_buf, admitted).await;
            }
        }
        Admission::Hocuspocus(admitted) => {
            let socket = websocket(&up, parts.io, &parts.read_buf).await;
            let shutdown = up.shutdown.clone();
            let tracker = up.connections.clone();
            let session = hocuspocus::run(socket, admitted, up, shutdown);
            actix_web::rt::spawn(tracker.track_future(session));
        }
    }
    Ok(())
}

/// The WebSocket over an upgraded socket; `read_buf` holds what was read past the request.
async fn websocket<T: Io>(
    up: &Upgrades,
    io: T,
    read_buf: &BytesMut,
) -> WebSocketStream<Metered<T>> {
    let max = up.registry.config().max_message_size;
    // A small read buffer: tungstenite zero-fills its whole capacity, so its 128 KiB default
    // would be resident for every idle connection. An edit or a cursor fits in 256 bytes; a
    // longer payload is read 64 KiB per syscall by `Metered`'s read-ahead and handed over in
    // 256-byte pieces.
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(64 * 1024)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let io = Metered::new(io, up.budget.clone(), read_buf);
    WebSocketStream::from_partially_read(io, read_buf.to_vec(), Role::Server, Some(ws_config)).await
}

/// Starts a document's session on this thread.
pub(super) async fn start_document<T: Io>(
    up: Upgrades,
    io: T,
    read_buf: BytesMut,
    admitted: Admitted,
) {
    let socket = websocket(&up, io, &read_buf).await;
    let session = session::run(socket, admitted, up.registry.clone(), up.shutdown.clone());
    actix_web::rt::spawn(up.connections.track_future(session));
}

enum Admission {
    Document(Admitted),
    Hocuspocus(hocuspocus::Admitted),
}

/// The root path, and any `--hocuspocus-path`, speak the Hocuspocus protocol: a
/// `HocuspocusProvider` connects to the URL as given, with no document in the path.
fn is_hocuspocus(up: &Upgrades, path: &str) -> bool {
    path == "/"
        || up
            .registry
            .config()
            .hocuspocus_path
            .iter()
            .any(|p| p.trim_end_matches('/') == path.trim_end_matches('/'))
}

/// A Hocuspocus socket: the socket-wide checks (handshake, origin, connection cap, per-IP);
/// tokens and per-document places are checked per document as they are opened.
fn check_hocuspocus(up: &Upgrades, req: &Request) -> Result<hocuspocus::Admitted, Refusal> {
    let origin = handshake_origin(req)?;
    allowed_origin(up, origin)?;
    within_cap(up)?;
    let ip = client_ip(
        req.peer_addr(),
        header_str(req, header::HeaderName::from_static("x-forwarded-for")),
        &up.registry.config().trusted_proxies,
    );
    let slot = up.slots.acquire_ip(ip).map_err(|_| {
        count(|c| &c.refused_per_ip);
        Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "this address already holds too many connections",
        )
    })?;
    Ok(hocuspocus::Admitted {
        peer: req.peer_addr(),
        url_token: hocuspocus::url_token(
            req.uri().query().unwrap_or(""),
            header_str(req, header::AUTHORIZATION),
        ),
        slot,
    })
}

#[cfg(test)]
mod tests {
    use super::doc_name;

    #[test]
    fn document_names_follow_the_reference_server() {
        assert_eq!(doc_name("/my-doc"), Some("my-doc"));
        assert_eq!(doc_name("/a/b"), Some("a/b"));
        assert_eq!(doc_name("/"), None);
        assert_eq!(doc_name(&format!("/{}", "x".repeat(513))), None);
        assert!(doc_name(&format!("/{}", "x".repeat(512))).is_some());
    }
}
