//! A shared document: the yrs `Doc` with its awareness, and the rules for applying input to it.

use std::cell::OnceCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::Bytes;

use thiserror::Error;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::updates::decoder::Decode;
use yrs::{ClientID, Doc, ReadTxn, StateVector, Transact, Update};

use crate::awareness::{AwarenessStates, NULL};
use crate::dormant::{doc_from_state, Dormant};
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
    /// The update holds blocks past a hole in a client's clocks: it was built on changes this
    /// document does not have. Nothing was applied.
    #[error("update is out of order: it builds on changes the document does not have")]
    OutOfOrder,
    /// The part of the update that was new encodes to bytes yrs cannot decode again (an item of
    /// a content type yrs does not know, re-encoded as another type), so it could be neither
    /// stored nor broadcast. The document holds it in memory and must be rebuilt from storage.
    #[error("update integrates to a diff that does not decode")]
    DiffDoesNotDecode,
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
    /// The yrs document, built from `dormant` when something first needs it.
    live: OnceCell<Doc>,
    /// The content as bytes, for as long as they match `live` (or while there is no `live`).
    /// A yrs document costs several times its encoded size (about 600 bytes when empty, tens of
    /// bytes per item), so documents that are open but not edited keep only this.
    dormant: Option<Box<Dormant>>,
    awareness: AwarenessStates,
    /// Entries of removed awareness clients kept (for their clock) before they are forgotten.
    max_removed_awareness: usize,
}

/// Removed awareness clients remembered at most, by default. A removed client's entry only keeps
/// its clock, so that a stale state arriving after the removal is ignored; without a bound, a
/// client announcing and removing made-up ids would grow the server's memory forever.
pub const MAX_REMOVED_AWARENESS: usize = 1024;

impl Default for Document {
    fn default() -> Self {
        Self::new()
    }
}

impl Document {
    /// An empty document, dormant until its first change.
    pub fn new() -> Self {
        Document {
            live: OnceCell::new(),
            dormant: Some(Box::new(Dormant::empty())),
            awareness: AwarenessStates::default(),
            max_removed_awareness: MAX_REMOVED_AWARENESS,
        }
    }

    fn from_doc(doc: Doc) -> Self {
        Document {
            live: OnceCell::from(doc),
            dormant: None,
            awareness: AwarenessStates::default(),
            max_removed_awareness: MAX_REMOVED_AWARENESS,
        }
    }

    /// Rebuilds a document from a snapshot and the log entries written after it, in order.
    pub fn load<'a>(
        snapshot: Option<&[u8]>,
        log: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, DocumentError> {
        let mut log = log.into_iter().peekable();
        if snapshot.is_none() && log.peek().is_none() {
            // a new document: dormant until its first change
            return Ok(Document::new());
        }
        let doc = match snapshot {
            Some(snapshot) => doc_from_state(snapshot)?,
            None => Doc::new(),
        };
        {
            let mut txn = doc.transact_mut();
            for entry in log {
                let update =
                    Update::decode_v1(entry).map_err(|source| DocumentError::CorruptStored {
                        what: "log entry",
                        source,
                    })?;
                txn.apply_update(update)?;
            }
        }
        Ok(Document::from_doc(doc))
    }

    /// Takes over `other`'s content while keeping this document's awareness states, for
    /// rebuilding a document from storage under live connections.
    pub fn replace_content(&mut self, other: Document) {
        self.live = other.live;
        self.dormant = other.dormant;
    }

    /// The yrs document, built first if the document is dormant. For reading: a change made
    /// through it would not reach the dormant bytes (`apply_update` is the way to change it).
    pub fn doc(&self) -> &Doc {
        self.live.get_or_init(|| {
            let dormant = self
                .dormant
                .as_deref()
                .expect("a document is live or dormant");
            // `hibernate` built a document from these very bytes before keeping them.
            doc_from_state(dormant.state()).expect("a dormant document's state loads")
        })
    }

    /// Whether the document holds only its bytes (no yrs document in memory).
    pub fn is_dormant(&self) -> bool {
        self.live.get().is_none()
    }

    /// Keeps the content as bytes only, freeing the yrs document; the next change or read that
    /// needs it builds it again from them. Returns whether the document is now dormant: one
    /// holding blocks that wait for missing predecessors stays live, as the bytes (like every
    /// diff and snapshot) would leave those out. Costs an encode and a load of the document, the
    /// load proving that the bytes give back the same document before it is let go.
    pub fn hibernate(&mut self) -> bool {
        let Some(doc) = self.live.get() else {
            return true;
        };
        if doc.transact().has_missing_updates() {
            return false;
        }
        let dormant = self
            .dormant
            .get_or_insert_with(|| Box::new(Dormant::of(doc)));
        if !dormant.verified {
            let same = doc_from_state(dormant.state())
                .is_ok_and(|copy| copy.transact().snapshot() == doc.transact().snapshot());
            if !same {
                return false;
            }
            dormant.verified = true;
        }
        self.live = OnceCell::new();
        true
    }

    /// The SyncStep2 for a client with an empty state vector (every new client): encoded once
    /// after each change and shared by every joiner until the next one.
    pub fn full_sync_step2(&mut self) -> Bytes {
        let dormant = match &mut self.dormant {
            Some(d) => d,
            slot @ None => {
                let live = self.live.get().expect("a document is live or dormant");
                slot.insert(Box::new(Dormant::of(live)))
            }
        };
        dormant.step2()
    }

    pub fn state_vector(&self) -> StateVector {
        if let Some(sv) = self.dormant.as_ref().and_then(|d| d.state_vector()) {
            return sv;
        }
        self.doc().transact().state_vector()
    }

    /// The document's bytes, when they are at hand and `sv` asks for everything.
    fn dormant_for(&self, sv: &StateVector) -> Option<&Dormant> {
        self.dormant
            .as_deref()
            .filter(|_| *sv == StateVector::default())
    }

    /// The server's SyncStep1, sent to every connection when it opens.
    pub fn sync_step1_message(&self) -> Vec<u8> {
        protocol::encode_sync_step1(&self.state_vector())
    }

    /// The SyncStep2 answering a client's SyncStep1: everything the client lacks.
    pub fn sync_step2_message(&self, client_sv: &StateVector) -> Vec<u8> {
        if let Some(d) = self.dormant_for(client_sv) {
            return d.step2().to_vec();
        }
        let diff = self.doc().transact().encode_diff_v1(client_sv);
        protocol::encode_sync_step2(&diff)
    }

    /// The whole document as one v1 update, for snapshots.
    ///
    /// Blocks yrs holds pending (waiting for a predecessor) are left out, as they are from every
    /// diff and so from the log: a snapshot holds what a replay of the log holds. yrs's
    /// `encode_state_as_update_v1` merges them in with an `unwrap`, which panicked on pending
    /// blocks whose encoding does not decode again (found by the fuzzer), and compaction calls
    /// this from the document actor.
    pub fn encode_state(&self) -> Vec<u8> {
        if let Some(d) = self.dormant_for(&StateVector::default()) {
            return d.state().to_vec();
        }
        self.doc()
            .transact()
            .encode_diff_v1(&StateVector::default())
    }

    /// What a peer holding `sv` lacks, as one v1 update.
    pub fn encode_diff(&self, sv: &StateVector) -> Vec<u8> {
        if let Some(d) = self.dormant_for(sv) {
            return d.state().to_vec();
        }
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
        if update.is_empty() && self.is_dormant() {
            // A joining client's SyncStep2 with nothing in it: no need to wake the document.
            return Ok(None);
        }
        let outcome = self.apply_to_live(update);
        if !matches!(outcome, Ok(None)) {
            self.dormant = None;
        }
        outcome
    }

    fn apply_to_live(&self, update: Update) -> Result<Option<Vec<u8>>, DocumentError> {
        let doc = self.doc();
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut txn = doc.transact_mut();
            // yrs integrates blocks that follow a hole in their client's clocks (when they
            // depend on nothing missing) behind a skip, below the state vector: the diff, encoded
            // from state vectors, leaves them out, and so do snapshots, so the document served
            // joiners content no store or subscriber had, and compaction lost it (found by the
            // fuzzer). Yjs keeps such blocks pending; here the update is refused before anything
            // is applied. A client only sends one when the server lacks what it built on, and
            // the resync that follows the close sends the missing part first.
            if may_leave_gap(&update, &txn.state_vector()) {
                return Err(DocumentError::OutOfOrder);
            }
            txn.apply_update(update)?;
            if integrated_past_state(&txn) {
                // Blocks held pending from an earlier update landed behind a hole: the document
                // must be rebuilt from storage, which never had them.
                return Err(DocumentError::Poisoned);
            }
            let changed = !txn.insert_set().is_empty() || !txn.delete_set().is_empty();
            if !changed {
                return Ok(None);
            }
            let diff = txn.encode_update_v1();
            // A diff that does not decode would be stored, then fail every later load of the
            // document, and break every client it is broadcast to (found by the fuzzer).
            if Update::decode_v1(&diff).is_err() {
                return Err(DocumentError::DiffDoesNotDecode);
            }
            Ok(Some(diff))
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
    pub fn apply_awareness(&mut self, mut update: AwarenessUpdate) -> Option<AwarenessChange> {
        // A removal of a client never seen changes nothing and is not relayed, but would leave
        // its clock behind: removals of made-up ids grew memory without bound (found by the
        // fuzzer's awareness invariant).
        update
            .clients
            .retain(|id, entry| &*entry.json != NULL || self.awareness.clock(*id).is_some());
        if update.clients.is_empty() {
            return None;
        }
        let applied = self.awareness.apply(update);
        if applied.added.is_empty() && applied.updated.is_empty() && applied.removed.is_empty() {
            return None;
        }
        let mut announced = applied.added;
        announced.extend(applied.updated);
        self.forget_removed(&applied.removed);
        // The relay message is encoded by the caller, which may merge several changes into one.
        Some(AwarenessChange {
            announced,
            removed: applied.removed,
        })
    }

    /// Forgets removed clients once more than `max_removed_awareness` are remembered, except
    /// `just_removed`, whose removal the caller still relays. Runs only after a removal, so the
    /// count (one pass over the entries) stays off the path of cursor moves.
    fn forget_removed(&mut self, just_removed: &[ClientID]) {
        if !just_removed.is_empty() && self.awareness.removed_count() > self.max_removed_awareness {
            self.awareness.forget_removed_except(just_removed);
        }
    }

    /// Lowers the number of removed awareness clients remembered (for tests and fuzzing).
    #[doc(hidden)]
    pub fn set_max_removed_awareness(&mut self, max: usize) {
        self.max_removed_awareness = max;
    }

    /// Marks the given clients as gone; returns the removal message to broadcast, if any of them
    /// still had a state.
    ///
    /// The removal keeps each client's clock, as y-protocols' `removeAwarenessStates` does for
    /// remote clients. Bumping it (as yrs's `remove_state` does) would make every peer ignore a
    /// client that reconnects with the same id until its clock passes the bumped one (up to two
    /// 15 s renewals without presence).
    pub fn remove_awareness(&mut self, clients: &[ClientID]) -> Option<Vec<u8>> {
        let removed = self.awareness.remove(clients);
        if removed.is_empty() {
            return None;
        }
        let msg = self.awareness_message_for(removed.iter().copied());
        self.forget_removed(&removed);
        msg
    }

    /// How many clients the awareness keeps an entry for, removed ones (kept for their clock)
    /// included. For the fuzzing invariants.
    #[doc(hidden)]
    pub fn awareness_entries(&self) -> usize {
        self.awareness.len()
    }

    /// All current awareness states, or `None` when nobody has announced one.
    pub fn awareness_message(&self) -> Option<Vec<u8>> {
        let update = self.awareness.current();
        if update.clients.is_empty() {
            return None;
        }
        Some(protocol::encode_awareness(&update))
    }

    /// The current awareness entries (state or removal, with clock) of `clients`, as one
    /// message; clients no longer remembered are left out, `None` when none is.
    pub fn awareness_message_for(
        &self,
        clients: impl IntoIterator<Item = ClientID>,
    ) -> Option<Vec<u8>> {
        let update = self.awareness.entries_of(clients);
        if update.clients.is_empty() {
            return None;
        }
        Some(protocol::encode_awareness(&update))
    }
}

/// Whether `update` holds blocks past a hole in a client's clocks, counted from `sv`.
fn may_leave_gap(update: &Update, sv: &StateVector) -> bool {
    update.insertions(true).iter().any(|(client, ranges)| {
        let mut ranges: Vec<std::ops::Range<u32>> = ranges.iter().cloned().collect();
        ranges.sort_by_key(|r| r.start);
        let mut next = sv.get(client);
        ranges.into_iter().any(|r| {
            let gap = r.start > next;
            next = next.max(r.end);
            gap
        })
    })
}

/// Whether the transaction integrated blocks beyond its clients' contiguous state (which is
/// what the store's state vector counts; the transaction's `after_state` counts them).
fn integrated_past_state(txn: &yrs::TransactionMut) -> bool {
    let after = txn.state_vector();
    txn.insert_set()
        .iter()
        .any(|(client, ranges)| ranges.iter().any(|r| r.end > after.get(client)))
}

#[cfg(test)]
mod tests;
