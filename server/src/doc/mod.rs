//! Documents: one actor per open document, the name → actor registry, and group commit.

pub mod actor;
pub mod flusher;
pub mod messages;
pub mod outbox;
pub mod registry;
