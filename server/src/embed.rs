//! Mounting collab in an existing actix-web application, with its own middleware in front.
//!
//! ```no_run
//! use actix_web::{App, HttpServer};
//! use clap::Parser;
//! use collab_server::embed::Collab;
//!
//! #[actix_web::main]
//! async fn main() -> anyhow::Result<()> {
//!     let cli = collab_server::config::Cli::parse_from(["app", "--data-dir", "./collab-data"]);
//!     let secrets = cli.config.secrets()?;
//!     let collab = Collab::start(cli.config, secrets)?;
//!     let mounted = collab.clone();
//!     HttpServer::new(move || App::new().service(mounted.service("/collab")))
//!         .bind("127.0.0.1:8090")?
//!         .run()
//!         .await?;
//!     collab.shutdown().await?;
//!     Ok(())
//! }
//! ```
//!
//! The socket is actix-ws's; everything after the upgrade (the session, the documents, storage,
//! limits, tokens) is the standalone server's own code. What the embedded path does not have:
//! the standalone listener's handshake deadline and incoming-memory shim (the app's actix-web
//! server owns the socket and its buffering), and the lingering close for oversized messages.

use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::HttpServiceFactory;
use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, Session};

use crate::config::{Config, Secrets};
use crate::core::Core;
use crate::ws::close::{reason, CloseCode, CloseReason};
use crate::ws::session;
use crate::ws::transport::{Ending, Gone, Inbound, InboundError, Transport};
use crate::ws::upgrade::{admit, doc_name, Candidate};
use crate::ServerError;

/// How long closing may wait on a client that does not take the close frame.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

/// collab inside an actix-web app: one per process, shared by every worker.
#[derive(Clone)]
pub struct Collab {
    core: Arc<Core>,
}

impl Collab {
    /// Opens storage and starts the documents. Call it on the app's actix runtime (inside
    /// `#[actix_web::main]`). `secrets` are the token secret and admin key, as
    /// `Config::secrets` reads them from the flags and files.
    pub fn start(config: Config, secrets: Secrets) -> Result<Collab, ServerError> {
        Ok(Collab {
            core: Arc::new(Core::open(config, &secrets)?),
        })
    }

    /// The WebSocket endpoint, `GET {prefix}/{document name}`: `new WebsocketProvider('ws://host
    /// /collab', name, doc)` connects to it with `prefix` `/collab`. Put the app's own
    /// middleware (its session check, its logging) in front of it as for any service.
    pub fn service(&self, prefix: &str) -> impl HttpServiceFactory {
        let prefix = prefix.trim_end_matches('/').to_owned();
        let mounted = Mounted {
            collab: self.clone(),
            prefix: prefix.clone(),
        };
        web::resource(format!("{prefix}/{{doc:.*}}"))
            .app_data(web::Data::new(mounted))
            .route(web::get().to(websocket))
    }

    /// Closes every WebSocket with 1001 and flushes storage; call it when the app stops.
    pub async fn shutdown(&self) -> Result<(), ServerError> {
        self.core.close_connections().await;
        self.core.final_flush().await
    }
}

struct Mounted {
    collab: Collab,
    prefix: String,
}

fn header_str(req: &HttpRequest, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The actix-web handler: the standalone server's checks, then a session over actix-ws.
async fn websocket(
    req: HttpRequest,
    body: web::Payload,
    mounted: web::Data<Mounted>,
) -> Result<HttpResponse, actix_web::Error> {
    let up = &mounted.collab.core.upgrades;
    // The name as it travels on the wire (undecoded), exactly as the standalone server takes it.
    let raw = req.uri().path();
    let name = raw
        .strip_prefix(mounted.prefix.as_str())
        .filter(|rest| rest.starts_with('/'))
        .and_then(doc_name);
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    let candidate = Candidate {
        origin,
        name,
        query: req.query_string(),
        authorization: header_str(&req, header::AUTHORIZATION),
        forwarded_for: header_str(&req, header::HeaderName::from_static("x-forwarded-for")),
        peer: req.peer_addr(),
    };
    let admitted = match admit(up, candidate) {
        Ok(a) => a,
        Err(refusal) => {
            refusal.report(req.peer_addr(), raw);
            return Ok(HttpResponse::build(refusal.status)
                .content_type("text/plain; charset=utf-8")
                .body(refusal.text));
        }
    };
    let (response, ws_session, stream) = actix_ws::handle(&req, body)?;
    let max = up.registry.config().max_message_size;
    let transport = ActixWs {
        session: ws_session,
        stream: stream
            .max_frame_size(max)
            .aggregate_continuations()
            .max_continuation_size(max),
    };
    let run = session::run(
        transport,
        admitted,
        up.registry.clone(),
        up.shutdown.clone(),
    );
    actix_web::rt::spawn(up.connections.track_future(run));
    Ok(response)
}

/// The second adapter of `ws::transport::Transport`: an actix-ws session.
struct ActixWs {
    session: Session,
    stream: AggregatedMessageStream,
}

fn actix_reason(why: &CloseReason) -> actix_ws::CloseReason {
    actix_ws::CloseReason {
        code: actix_ws::CloseCode::from(u16::from(why.code)),
        description: why.description.clone(),
    }
}

impl Transport for ActixWs {
    async fn recv(&mut self) -> Option<Result<Inbound, InboundError>> {
        Some(match self.stream.recv().await? {
            Ok(AggregatedMessage::Binary(b)) => Ok(Inbound::Binary(b)),
            Ok(AggregatedMessage::Text(_)) => Ok(Inbound::Text),
            Ok(AggregatedMessage::Ping(p)) => Ok(Inbound::Ping(p)),
            Ok(AggregatedMessage::Pong(_)) => Ok(Inbound::Pong),
            Ok(AggregatedMessage::Close(_)) => Ok(Inbound::Close),
            Err(actix_ws::ProtocolError::Overflow) => Err(InboundError::TooLarge(reason(
                CloseCode::Size,
                "message exceeds the size limit",
            ))),
            Err(e) => Err(InboundError::Refused(reason(
                CloseCode::Protocol,
                e.to_string(),
            ))),
        })
    }

    async fn feed(&mut self, message: Bytes) -> Result<(), Gone> {
        // actix-ws queues each message in a bounded channel that its response body drains.
        self.session.binary(message).await.map_err(|_| Gone)
    }

    async fn flush(&mut self) -> Result<(), Gone> {
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), Gone> {
        self.session.ping(b"").await.map_err(|_| Gone)
    }

    async fn pong(&mut self, payload: Bytes) -> Result<(), Gone> {
        self.session.pong(&payload).await.map_err(|_| Gone)
    }

    async fn close(self, ending: Ending) {
        let why = ending.reason().map(actix_reason);
        let _ = tokio::time::timeout(CLOSE_DEADLINE, self.session.close(why)).await;
    }
}
