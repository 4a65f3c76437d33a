//! WebSocket connections: the checks at the upgrade, the session that follows, close codes.

pub mod close;
pub mod session;
pub mod upgrade;
