//! A document's connections run on the thread of its actor.
//!
//! Each worker thread runs its own event loop, and a connection starts on whichever worker
//! accepted it. A session on another worker than its document's actor costs a cross-thread
//! wake-up for each frame it hands to the actor and for each answer: an `eventfd` write and a
//! context switch whenever the other thread is asleep, which at a few edits per second per
//! document is every time. On one thread the hand-over is a queue push. Measured in
//! rooms-2500x4 (`ROOMS=2500 bench/syscalls.sh`): eventfd writes per delivered edit 0.32 ->
//! 0.14, context switches 0.85 -> 0.69; server CPU 3 % lower over 4 alternating runs, which is
//! within this machine's noise.
//!
//! So when a document is already loaded on another worker, a new connection's socket is taken
//! off this worker's event loop and its session starts on the document's worker. Documents
//! still spread over the workers: each runs where its first connection (or API request)
//! loaded it. TLS sockets (their state lives in the TLS stream), Hocuspocus sockets (several
//! documents on one socket) and a document's first connection stay where they were accepted.

use std::any::Any;
use std::sync::{Arc, Mutex};

use actix_web::web::BytesMut;
use tokio::net::TcpStream;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::warn;

use super::io::Io;
use super::session::Admitted;
use super::upgrade::{start_document, Upgrades};
use crate::telemetry::METRICS;

/// A socket on its way to another worker.
struct Parcel {
    tcp: std::net::TcpStream,
    read_buf: BytesMut,
    admitted: Admitted,
    up: Upgrades,
    /// Keeps shutdown waiting for this connection while it is between threads.
    _in_transit: TaskTrackerToken,
}

impl Parcel {
    /// On the thread that runs the session: registers the socket with this event loop.
    fn start(self) {
        match TcpStream::from_std(self.tcp) {
            Ok(io) => {
                let tracker = self.up.connections.clone();
                let start = start_document(self.up, io, self.read_buf, self.admitted);
                actix_web::rt::spawn(tracker.track_future(start));
            }
            Err(e) => {
                warn!(doc = %self.admitted.name, error = %e, "cannot register a moved connection; dropped")
            }
        }
    }
}

fn take(parcel: &Mutex<Option<Parcel>>) -> Option<Parcel> {
    parcel.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Sends the connection to its document's worker when that is another thread (`None`: it is
/// on its way, or lost with a log line); otherwise gives everything back to start it here.
pub(super) fn send_home<T: Io>(
    up: &Upgrades,
    admitted: Admitted,
    io: T,
    read_buf: BytesMut,
) -> Option<(Admitted, T, BytesMut)> {
    let Some(home) = up.registry.home_elsewhere(&admitted.name) else {
        return Some((admitted, io, read_buf));
    };
    let tcp = match detach(io) {
        Err(io) => return Some((admitted, io, read_buf)),
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            warn!(doc = %admitted.name, error = %e, "cannot move a connection off this worker; dropped");
            return None;
        }
    };
    METRICS.connections_moved.inc();
    let parcel = Arc::new(Mutex::new(Some(Parcel {
        tcp,
        read_buf,
        admitted,
        up: up.clone(),
        _in_transit: up.connections.token(),
    })));
    let remote = parcel.clone();
    let sent = home.spawn_fn(move || {
        if let Some(p) = take(&remote) {
            p.start();
        }
    });
    // That worker has stopped (the server is shutting down): the session starts here.
    if !sent {
        if let Some(p) = take(&parcel) {
            p.start();
        }
    }
    None
}

/// A plain TCP socket taken off this thread's event loop (`Ok`); anything else, such as a TLS
/// stream, is given back (`Err`).
fn detach<T: Io>(io: T) -> Result<std::io::Result<std::net::TcpStream>, T> {
    let mut slot = Some(io);
    let tcp = (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<TcpStream>>()
        .and_then(Option::take);
    match (tcp, slot) {
        (Some(tcp), _) => Ok(tcp.into_std()),
        (None, Some(io)) => Err(io),
        (None, None) => unreachable!("only a TcpStream is taken out of the slot"),
    }
}
