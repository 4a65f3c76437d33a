//! A document's content kept as bytes while nobody edits it (see `Document::hibernate`).

use bytes::Bytes;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

use crate::document::DocumentError;
use crate::protocol;

pub(crate) struct Dormant {
    /// The whole document as a SyncStep2 message (a v1 update behind the message prefix), the
    /// answer to every joiner, shared.
    step2: Bytes,
    /// Where the update starts in `step2`.
    update_at: u8,
    /// A document built from these bytes compared equal to the one they were encoded from.
    pub(crate) verified: bool,
    /// The state vector, v1-encoded.
    sv: Bytes,
}

/// A new document: SyncStep2 of an empty update, an empty state vector. Static: a new document
/// allocates nothing for them.
const EMPTY_STEP2: &[u8] = &[0, 1, 2, 0, 0];
const EMPTY_SV: &[u8] = &[0];

impl Dormant {
    pub(crate) fn empty() -> Self {
        Dormant {
            step2: Bytes::from_static(EMPTY_STEP2),
            update_at: 3,
            verified: true,
            sv: Bytes::from_static(EMPTY_SV),
        }
    }

    /// `doc`'s bytes, not yet verified.
    pub(crate) fn of(doc: &Doc) -> Self {
        let txn = doc.transact();
        let update = txn.encode_diff_v1(&StateVector::default());
        // Boxed first: a `Vec`'s spare capacity (about 1 KiB for a small document) would stay
        // allocated for as long as the bytes.
        let step2 = protocol::encode_sync_step2(&update).into_boxed_slice();
        Dormant {
            update_at: (step2.len() - update.len()) as u8,
            step2: Bytes::from(step2),
            verified: false,
            sv: Bytes::from(txn.state_vector().encode_v1().into_boxed_slice()),
        }
    }

    pub(crate) fn step2(&self) -> Bytes {
        self.step2.clone()
    }

    pub(crate) fn state(&self) -> &[u8] {
        &self.step2[usize::from(self.update_at)..]
    }

    pub(crate) fn state_vector(&self) -> Option<StateVector> {
        StateVector::decode_v1(&self.sv).ok()
    }
}

/// A yrs document holding `state`: a snapshot loaded, or a dormant document woken.
pub(crate) fn doc_from_state(state: &[u8]) -> Result<Doc, DocumentError> {
    // gc stays on: tombstone content is dropped as in the reference server, which keeps the
    // memory of long-edited documents close to their visible size.
    let doc = Doc::new();
    let update = Update::decode_v1(state).map_err(|source| DocumentError::CorruptStored {
        what: "snapshot",
        source,
    })?;
    doc.transact_mut().apply_update(update)?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use crate::protocol::{decode_frame, ClientMessage};
    use crate::Document;
    use yrs::updates::decoder::Decode;
    use yrs::updates::encoder::Encode;
    use yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};

    fn edit(doc: &Doc, f: impl FnOnce(&yrs::TextRef, &mut yrs::TransactionMut)) -> Update {
        let text = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        f(&text, &mut txn);
        Update::decode_v1(&txn.encode_update_v1()).unwrap()
    }

    fn text_of(doc: &Document) -> String {
        let t = doc.doc().get_or_insert_text("t");
        t.get_string(&doc.doc().transact())
    }

    fn sync_answer(doc: &Document, sv: &StateVector) -> Update {
        let msg = doc.sync_step2_message(sv);
        match decode_frame(&msg).unwrap().pop() {
            Some(ClientMessage::SyncStep2(u)) => u,
            _ => panic!("not a SyncStep2"),
        }
    }

    #[test]
    fn the_static_bytes_of_a_new_document_are_those_of_an_empty_one() {
        let (empty, encoded) = (super::Dormant::empty(), super::Dormant::of(&Doc::new()));
        assert_eq!(empty.step2, encoded.step2);
        assert_eq!(empty.state(), encoded.state());
        assert_eq!(empty.sv, encoded.sv);
    }

    #[test]
    fn the_full_sync_answer_is_encoded_once_per_change_and_shared() {
        let client = Doc::new();
        let mut doc = Document::new();
        doc.apply_update(edit(&client, |t, txn| t.insert(txn, 0, "a")))
            .unwrap();
        let first = doc.full_sync_step2();
        assert_eq!(
            doc.full_sync_step2().as_ptr(),
            first.as_ptr(),
            "encoded again"
        );
        doc.apply_update(edit(&client, |t, txn| t.insert(txn, 1, "b")))
            .unwrap();
        let after = doc.full_sync_step2();
        assert_ne!(after, first, "a change left the old answer");
        let Some(ClientMessage::SyncStep2(u)) = decode_frame(&after).unwrap().pop() else {
            panic!("not a SyncStep2");
        };
        let mut joiner = Document::new();
        joiner.apply_update(u).unwrap();
        assert_eq!(text_of(&joiner), "ab");
    }

    #[test]
    fn a_new_document_is_dormant_through_a_joiners_handshake() {
        let mut doc = Document::new();
        assert!(doc.is_dormant());
        assert_eq!(doc.state_vector(), StateVector::default());
        let _ = doc.sync_step1_message();
        assert!(sync_answer(&doc, &StateVector::default()).is_empty());
        // the joiner's own SyncStep2, empty
        assert_eq!(doc.apply_update(Update::new()).unwrap(), None);
        assert!(doc.is_dormant(), "the handshake built a yrs document");
    }

    #[test]
    fn a_quiet_document_keeps_its_bytes_and_wakes_into_the_same_content() {
        let client = Doc::new();
        let mut doc = Document::new();
        doc.apply_update(edit(&client, |t, txn| t.insert(txn, 0, "hello world")))
            .unwrap();
        doc.apply_update(edit(&client, |t, txn| t.remove_range(txn, 5, 6)))
            .unwrap();
        assert!(!doc.is_dormant());
        let (sv, snapshot) = (doc.state_vector(), doc.doc().transact().snapshot());

        assert!(doc.hibernate());
        assert!(doc.is_dormant());
        // answered from the bytes: state vector, full state, a joiner's sync
        assert_eq!(doc.state_vector(), sv);
        let joiner = Doc::new();
        joiner
            .transact_mut()
            .apply_update(sync_answer(&doc, &StateVector::default()))
            .unwrap();
        assert_eq!(
            joiner.transact().snapshot(),
            snapshot,
            "joiner of a dormant document"
        );
        let reloaded = Document::load(Some(&doc.encode_state()), []).unwrap();
        assert_eq!(reloaded.doc().transact().snapshot(), snapshot);
        assert!(doc.is_dormant());

        // a client that has part of it needs a diff: that wakes the document
        let partial = Doc::new();
        partial
            .transact_mut()
            .apply_update(edit(&Doc::new(), |t, txn| t.insert(txn, 0, "other")))
            .unwrap();
        let diff = sync_answer(&doc, &partial.transact().state_vector());
        assert!(!doc.is_dormant());
        assert!(!diff.is_empty());

        // a change lands on the woken document, and a later hibernation keeps it
        let change = doc
            .apply_update(edit(&client, |t, txn| t.insert(txn, 5, "!")))
            .unwrap();
        assert!(change.is_some());
        assert_eq!(text_of(&doc), "hello!");
        assert!(doc.hibernate());
        assert_eq!(text_of(&doc), "hello!");
        assert_eq!(
            Document::load(Some(&doc.encode_state()), [])
                .map(|d| text_of(&d))
                .unwrap(),
            "hello!"
        );
    }

    #[test]
    fn a_document_holding_pending_blocks_stays_live() {
        let a = Doc::new();
        let first = edit(&a, |t, txn| t.insert(txn, 0, "a"));
        let b = Doc::new();
        b.transact_mut()
            .apply_update(Update::decode_v1(&first.encode_v1()).unwrap())
            .unwrap();
        // b's insertion builds on a's, which the server has not seen yet
        let second = edit(&b, |t, txn| t.insert(txn, 1, "b"));
        let mut doc = Document::new();
        assert_eq!(doc.apply_update(second).unwrap(), None);
        assert!(!doc.hibernate(), "hibernating would drop the parked blocks");
        assert!(!doc.is_dormant());
        assert!(doc.apply_update(first).unwrap().is_some());
        assert!(doc.hibernate());
        assert_eq!(text_of(&doc), "ab");
    }
}
