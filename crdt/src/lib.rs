//! Protocol and document logic of collab, free of I/O.
//!
//! [`protocol`] turns untrusted WebSocket frames into validated messages and encodes the
//! messages the server sends (one per frame). [`document`] owns a yrs document and its awareness
//! and reports, for every input, exactly what changed so the caller can persist and broadcast it.

mod awareness;
pub mod document;
mod dormant;
#[doc(hidden)]
pub mod fuzzing;
pub mod protocol;
pub mod render;
pub mod restore;
pub mod small_map;

pub use document::{AwarenessChange, Document, DocumentError};
pub use protocol::{decode_frame, ClientMessage, ProtocolError};
pub use render::{render_json, ContentError};
pub use restore::restore_update;
pub use small_map::SmallMap;
pub use yrs::sync::awareness::AwarenessUpdate;
pub use yrs::{ClientID, StateVector, Update};
