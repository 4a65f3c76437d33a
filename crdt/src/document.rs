//! A shared document: the yrs `Doc` with its awareness, and the rules for applying input to it.

use std::panic::{catch_unwind, AssertUnwindSafe};

use thiserror::Error;
use yrs::sync::awareness::{Awareness, AwarenessUpdate, AwarenessUpdateEntry};
use yrs::updates::decoder::Decode;
use yrs::{ClientID, Doc, ReadTxn, StateVector, Transact, Update};

use crate::protocol;

#[derive(Debug, Error)]
pub enum DocumentError {
    #[error("stored {what} does not decode: {source}")]
    CorruptStored {
        what: &'static str,
        #[source]
        source: yrs::encoding::read::Error,
    },
    #[error("update rejected by the document: {0}")]
    Rejected(#[from] yrs::error::UpdateError),
    /// yrs panicked while integrating an update. The in-memory document may be inconsistent and
    /// must be rebuilt from durable storage before anyone is served from it again.
    #[error("document integration panicked")]
    Poisoned,
}

/// The outcome of an awareness update that changed something.
#[derive(Debug)]
pub struct AwarenessChange {
    /// Client ids whose state the sender set or renewed (they now belong to the sender).
    pub announced: Vec<ClientID>,
    /// Client ids the sender removed.
    pub removed: Vec<ClientID>,
}

pub struct Document {
    awareness: Awareness,
}

impl Default for Document {
    fn default() -> Self {
        Self::new()
    }
}

impl Document {
    pub fn new() -> Self {
        // gc stays on: tombstone content is dropped as in the reference server, which keeps the
        // memory of long-edited documents close to their visible size.
        Document {
            awareness: Awareness::new(Doc::new()),
        }
    }

    /// Rebuilds a document from a snapshot and the log entries written after it, in order.
    pub fn load<'a>(
        snapshot: Option<&[u8]>,
        log: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, DocumentError> {
        let doc = Document::new();
        {
            let mut txn = doc.awareness.doc().transact_mut();
            if let Some(snapshot) = snapshot {
                let update =
                    Update::decode_v1(snapshot).map_err(|source| DocumentError::CorruptStored {
                        what: "snapshot",
                        source,
                    })?;
                txn.apply_update(update)?;
            }
            for entry in log {
                let update =
                    Update::decode_v1(entry).map_err(|source| DocumentError::CorruptStored {
                        what: "log entry",
                        source,
                    })?;
                txn.apply_update(update)?;
            }
        }
        Ok(doc)
    }

    /// Takes over `other`'s content while keeping this document's awareness states, for
    /// rebuilding a document from storage under live connections.
    pub fn replace_content(&mut self, other: Document) {
        *self.awareness.doc_mut() = other.awareness.doc().clone();
    }

    pub fn doc(&self) -> &Doc {
        self.awareness.doc()
    }

    pub fn state_vector(&self) -> StateVector {
        self.doc().transact().state_vector()
    }

    /// The server's SyncStep1, sent to every connection when it opens.
    pub fn sync_step1_message(&self) -> Vec<u8> {
        protocol::encode_sync_step1(&self.state_vector())
    }

    /// The SyncStep2 answering a client's SyncStep1: everything the client lacks.
    pub fn sync_step2_message(&self, client_sv: &StateVector) -> Vec<u8> {
        let diff = self.doc().transact().encode_diff_v1(client_sv);
        protocol::encode_sync_step2(&diff)
    }

    /// The whole document as one v1 update, for snapshots.
    pub fn encode_state(&self) -> Vec<u8> {
        self.doc()
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// What a peer holding `sv` lacks, as one v1 update.
    pub fn encode_diff(&self, sv: &StateVector) -> Vec<u8> {
        self.doc().transact().encode_diff_v1(sv)
    }

    /// Whether `update` starts past what the document holds for some client, so yrs could only
    /// park it until the missing changes arrive.
    pub fn lacks_dependencies_of(&self, update: &Update) -> bool {
        let ours = self.state_vector();
        update
            .state_vector_lower()
            .iter()
            .any(|(client, clock)| *clock > ours.get(client))
    }

    /// Applies a client's update. Returns the part of it that was new to the document, which is
    /// what gets persisted and broadcast; `None` when nothing changed (a duplicate, or blocks
    /// still waiting for missing predecessors), in which case the reference server sends nothing.
    pub fn apply_update(&mut self, update: Update) -> Result<Option<Vec<u8>>, DocumentError> {
        let doc = self.awareness.doc();
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut txn = doc.transact_mut();
            txn.apply_update(update)?;
            let changed = txn.before_state() != txn.after_state() || !txn.delete_set().is_empty();
            Ok(changed.then(|| txn.encode_update_v1()))
        }));
        match result {
            Ok(outcome) => outcome,
            Err(_) => Err(DocumentError::Poisoned),
        }
    }

    /// Whether `update` would change the document: blocks past what it holds, or deletions of
    /// items it does not already count as deleted. Used to tell a read-only client's harmless
    /// sync answer (which always repeats its whole delete set) from a refused write, without
    /// applying anything. Walks the document's delete set, so it is only for refused input.
    pub fn carries_new(&self, update: &Update) -> bool {
        let txn = self.doc().transact();
        let ours = txn.state_vector();
        let inserted = update.insertions(true);
        if inserted
            .iter()
            .any(|(client, ranges)| ranges.iter().any(|r| r.end > ours.get(client)))
        {
            return true;
        }
        let deletes = update.delete_set();
        if deletes.is_empty() {
            return false;
        }
        let deleted = txn.snapshot().delete_set;
        !deletes.diff(&deleted).is_empty()
    }

    /// Applies a client's awareness update and says what changed; `None` when it was stale.
    pub fn apply_awareness(&mut self, update: AwarenessUpdate) -> Option<AwarenessChange> {
        // Only errors on JSON serialization of local state, which the server never sets.
        let summary = self.awareness.apply_update_summary(update).ok()??;
        let mut announced = summary.added;
        announced.extend(summary.updated);
        // The relay message is encoded by the caller, which may merge several changes into one.
        Some(AwarenessChange {
            announced,
            removed: summary.removed,
        })
    }

    /// Marks the given clients as gone; returns the removal message to broadcast, if any of them
    /// still had a state.
    ///
    /// The removal keeps each client's clock, as y-protocols' `removeAwarenessStates` does for
    /// remote clients. yrs's `remove_state` bumps it, and then a client that reconnects with the
    /// same id is ignored by every peer until its clock passes the bumped one (up to two 15 s
    /// renewals without presence).
    pub fn remove_awareness(&mut self, clients: &[ClientID]) -> Option<Vec<u8>> {
        let mut update = AwarenessUpdate {
            clients: Default::default(),
        };
        for c in clients {
            if let Some((clock, _)) = self.awareness.meta(*c) {
                update.clients.insert(
                    *c,
                    AwarenessUpdateEntry {
                        clock,
                        json: "null".into(),
                    },
                );
            }
        }
        let summary = self.awareness.apply_update_summary(update).ok()??;
        if summary.removed.is_empty() {
            return None;
        }
        self.awareness_message_for(summary.removed)
    }

    /// All current awareness states, or `None` when nobody has announced one.
    pub fn awareness_message(&self) -> Option<Vec<u8>> {
        let update = self.awareness.update().ok()?;
        if update.clients.is_empty() {
            return None;
        }
        Some(protocol::encode_awareness(&update))
    }

    /// The current awareness entries (state or removal, with clock) of `clients`, as one
    /// message.
    pub fn awareness_message_for(
        &self,
        clients: impl IntoIterator<Item = ClientID>,
    ) -> Option<Vec<u8>> {
        let update = self.awareness.update_with_clients(clients).ok()?;
        Some(protocol::encode_awareness(&update))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_frame, ClientMessage};
    use yrs::updates::encoder::Encode;
    use yrs::{GetString, Text};

    fn edit(doc: &Doc, at: u32, s: &str) -> Update {
        let text = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, at, s);
        Update::decode_v1(&txn.encode_update_v1()).unwrap()
    }

    fn text_of(doc: &Document) -> String {
        let t = doc.doc().get_or_insert_text("t");
        t.get_string(&doc.doc().transact())
    }

    #[test]
    fn carries_new_tells_a_repeated_sync_answer_from_a_write() {
        let client = Doc::new();
        let mut server = Document::new();
        server.apply_update(edit(&client, 0, "abcdef")).unwrap();
        {
            let text = client.get_or_insert_text("t");
            let mut txn = client.transact_mut();
            text.remove_range(&mut txn, 1, 2);
        }
        let sync = |c: &Doc| {
            let bytes = c
                .transact()
                .encode_state_as_update_v1(&StateVector::default());
            Update::decode_v1(&bytes).unwrap()
        };
        // The deletion is new to the server, then known.
        assert!(server.carries_new(&sync(&client)));
        server.apply_update(sync(&client)).unwrap();
        assert!(!server.carries_new(&sync(&client)));
        assert!(!server.carries_new(&Update::new()));
        assert!(server.carries_new(&edit(&client, 0, "x")));
    }

    #[test]
    fn an_update_that_skips_ahead_lacks_dependencies() {
        let client = Doc::new();
        let mut server = Document::new();
        let first = edit(&client, 0, "a");
        let second = edit(&client, 1, "b");
        assert!(server.lacks_dependencies_of(&second));
        assert!(!server.lacks_dependencies_of(&first));
        server.apply_update(first).unwrap();
        assert!(!server.lacks_dependencies_of(&second));
    }

    #[test]
    fn applies_new_content_and_ignores_duplicates() {
        let client = Doc::new();
        let mut server = Document::new();
        let u = edit(&client, 0, "abc");
        let bytes = u.encode_v1();
        let diff = server.apply_update(u).unwrap();
        assert!(diff.is_some());
        assert_eq!(text_of(&server), "abc");
        let again = Update::decode_v1(&bytes).unwrap();
        assert_eq!(server.apply_update(again).unwrap(), None);
    }

    #[test]
    fn reload_from_snapshot_and_log_is_identical() {
        let client = Doc::new();
        let mut server = Document::new();
        let mut log = Vec::new();
        for i in 0..20 {
            let d = server.apply_update(edit(&client, i, "x")).unwrap().unwrap();
            log.push(d);
            if i == 9 {
                // Compaction point: snapshot now, keep only later log entries.
                let snap = server.encode_state();
                log.clear();
                log.push(snap);
            }
        }
        let (snap, rest) = log.split_first().unwrap();
        let reloaded = Document::load(Some(snap), rest.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(text_of(&reloaded), text_of(&server));
        assert_eq!(reloaded.state_vector(), server.state_vector());
    }

    #[test]
    fn corrupt_storage_is_an_error_not_an_empty_doc() {
        let err = Document::load(Some(&[0xff, 0xff, 0xff]), std::iter::empty());
        assert!(matches!(err, Err(DocumentError::CorruptStored { .. })));
    }

    #[test]
    fn sync_step2_carries_what_the_client_lacks() {
        let writer = Doc::new();
        let mut server = Document::new();
        server.apply_update(edit(&writer, 0, "hello")).unwrap();
        let msg = server.sync_step2_message(&StateVector::default());
        let Ok([ClientMessage::SyncStep2(u)]) =
            <[ClientMessage; 1]>::try_from(decode_frame(&msg).unwrap())
        else {
            panic!("not a SyncStep2");
        };
        let joiner = Doc::new();
        let t = joiner.get_or_insert_text("t");
        joiner.transact_mut().apply_update(u).unwrap();
        assert_eq!(t.get_string(&joiner.transact()), "hello");
    }

    #[test]
    fn awareness_announce_renew_and_remove() {
        let mut server = Document::new();
        assert!(server.awareness_message().is_none());
        let id = ClientID::new(7);
        let mut update = AwarenessUpdate {
            clients: Default::default(),
        };
        update.clients.insert(
            id,
            yrs::sync::awareness::AwarenessUpdateEntry {
                clock: 1,
                json: r#"{"user":"a"}"#.into(),
            },
        );
        let change = server.apply_awareness(update.clone()).unwrap();
        assert_eq!(change.announced, vec![id]);
        // A stale repeat changes nothing and must not be relayed.
        assert!(server.apply_awareness(update.clone()).is_none());
        // A renewal with a higher clock and the same state is relayed (it keeps idle tabs alive).
        update.clients.get_mut(&id).unwrap().clock = 2;
        assert!(server.apply_awareness(update).is_some());
        assert!(server.awareness_message().is_some());
        let removal = server.remove_awareness(&[id]).unwrap();
        let Ok([ClientMessage::Awareness(a)]) =
            <[ClientMessage; 1]>::try_from(decode_frame(&removal).unwrap())
        else {
            panic!("not awareness");
        };
        assert_eq!(&*a.clients[&id].json, "null");
        // Same clock as the last announcement (2), exactly as the reference server sends it.
        assert_eq!(a.clients[&id].clock, 2);
        assert!(server.remove_awareness(&[id]).is_none());
        assert!(server.awareness_message().is_none());
    }
}
