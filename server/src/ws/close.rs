//! Close codes the server sends and the reasons behind them.

use collab_crdt::ProtocolError;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;

pub use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The connection's token expired while it was open. In the 4400-4499 range, where stock
/// y-websocket clients stop reconnecting, so the application can fetch a fresh token first.
pub const TOKEN_EXPIRED: u16 = 4401;

/// The document was deleted over HTTP (`DELETE /api/docs/{name}`). Also in 4400-4499: a stock
/// client that reconnected would upload its copy and bring the document back.
pub const DOC_DELETED: u16 = 4404;

/// Why the server closes a connection: the code and text of the close frame it sends.
#[derive(Clone, Debug)]
pub struct CloseReason {
    pub code: CloseCode,
    pub description: Option<String>,
}

pub fn reason(code: CloseCode, description: impl Into<String>) -> CloseReason {
    CloseReason {
        code,
        description: Some(description.into()),
    }
}

pub fn token_expired() -> CloseReason {
    reason(CloseCode::from(TOKEN_EXPIRED), "token expired")
}

pub fn doc_deleted() -> CloseReason {
    reason(CloseCode::from(DOC_DELETED), "document deleted")
}

pub fn protocol_close(e: &ProtocolError) -> CloseReason {
    let code = if e.is_unsupported() {
        CloseCode::Unsupported
    } else {
        CloseCode::Protocol
    };
    reason(code, e.to_string())
}

pub fn ws_error_close(e: &WsError) -> CloseReason {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            reason(CloseCode::Size, "message exceeds the size limit")
        }
        WsError::Utf8(_) => reason(CloseCode::Invalid, "text frame is not UTF-8"),
        other => reason(CloseCode::Protocol, other.to_string()),
    }
}

/// A close frame's reason must fit in a control frame (123 bytes).
pub fn close_frame(why: CloseReason) -> CloseFrame {
    let mut text = why.description.unwrap_or_default();
    if text.len() > 123 {
        let mut cut = 123;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    CloseFrame {
        code: why.code,
        reason: text.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_expired_is_sent_as_4401() {
        assert_eq!(u16::from(token_expired().code), 4401);
        assert_eq!(u16::from(doc_deleted().code), 4404);
    }
}
