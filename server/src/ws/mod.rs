//! WebSocket connections: the checks at the upgrade, the session that follows, the socket
//! under it, and the limits on all three.

pub mod close;
pub mod direct;
pub mod hocuspocus;
mod home;
pub mod io;
pub mod limits;
pub mod metered;
pub mod rate;
pub mod session;
pub mod transport;
pub mod upgrade;
