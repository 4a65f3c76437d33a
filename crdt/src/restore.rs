//! Restoring a stored version: the update that makes a document's content equal to a version's,
//! as new operations on top of the current history (nothing is rewritten, so every client,
//! online or offline, merges it like any other edit).
//!
//! This is the Yjs recipe for reverting to a version, run through yrs: a private document,
//! with garbage collection off so deleted content stays readable, starts from the version,
//! receives everything the live document has gained since (tracked by an undo manager), and
//! undoes it. The undo re-inserts what was deleted since the version and deletes what was
//! inserted since; what it produced beyond the live state vector is the restore update.

use std::panic::{catch_unwind, AssertUnwindSafe};

use yrs::undo::Options as UndoOptions;
use yrs::updates::decoder::Decode;
use yrs::{Options, Origin, ReadTxn, StateVector, Transact, UndoManager, Update};

use yrs::branch::BranchPtr;

use crate::render::{branch, doc_from_update, roots, ContentError, RootKind};

/// The update that turns `current` (a whole-document state) into content equal to `version`
/// (a whole-document state of the same document, taken earlier). `None` when the document has
/// not changed since the version.
pub fn restore_update(current: &[u8], version: &[u8]) -> Result<Option<Vec<u8>>, ContentError> {
    catch_unwind(AssertUnwindSafe(|| restore(current, version)))
        .unwrap_or(Err(ContentError::Panicked))
}

fn restore(current: &[u8], version: &[u8]) -> Result<Option<Vec<u8>>, ContentError> {
    let live = doc_from_update(current, Options::default())?;
    let restoring = doc_from_update(
        version,
        Options {
            skip_gc: true,
            ..Options::default()
        },
    )?;
    let live_sv = live.transact().state_vector();
    let version_sv = restoring.transact().state_vector();
    let since = live.transact().encode_diff_v1(&version_sv);

    // Every root either document has is in the undo scope, with a type: yrs reports changes
    // (and so the undo manager sees them) only for typed roots, and a root's type does not
    // travel in updates. The kind is read off the content, the version's first.
    let mut kinds: Vec<(String, RootKind)> = Vec::new();
    for (name, _, kind) in roots(&restoring).into_iter().chain(roots(&live)) {
        match kinds.iter_mut().find(|(n, _)| *n == name) {
            Some((_, k)) if *k == RootKind::Empty => *k = kind,
            Some(_) => {}
            None => kinds.push((name, kind)),
        }
    }
    let mut scope: Vec<BranchPtr> = Vec::with_capacity(kinds.len());
    for (name, kind) in &kinds {
        let name = name.as_str();
        scope.push(match kind {
            RootKind::Text => branch(&restoring.get_or_insert_text(name)),
            RootKind::Map => branch(&restoring.get_or_insert_map(name)),
            RootKind::XmlFragment => branch(&restoring.get_or_insert_xml_fragment(name)),
            RootKind::Array | RootKind::Empty => branch(&restoring.get_or_insert_array(name)),
        });
    }
    let origin = Origin::from("collab-restore");
    let mut undo = UndoManager::with_options(UndoOptions {
        // One transaction is tracked; it must stay one undo step.
        capture_timeout_millis: u64::MAX / 2,
        ..UndoOptions::default()
    });
    for ptr in &scope {
        undo.expand_scope(&restoring, ptr);
    }
    undo.include_origin(origin.clone());
    {
        let mut txn = restoring.transact_mut_with(origin);
        txn.apply_update(Update::decode_v1(&since)?)?;
    }
    undo.undo_blocking();
    drop(undo);
    let restore = restoring.transact().encode_diff_v1(&live_sv);
    // An update with no blocks and no deletions is two zero bytes.
    let empty = Update::decode_v1(&restore)
        .map(|u| u.state_vector() == StateVector::default() && u.delete_set().is_empty())
        .unwrap_or(false);
    Ok((!empty).then_some(restore))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::render_json;
    use yrs::types::xml::{XmlElementPrelim, XmlFragment, XmlTextPrelim};
    use yrs::Doc;
    use yrs::{Array, Map, MapPrelim, Text, WriteTxn};

    fn state(doc: &Doc) -> Vec<u8> {
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    fn apply(doc: &Doc, update: &[u8]) {
        doc.transact_mut()
            .apply_update(Update::decode_v1(update).unwrap())
            .unwrap();
    }

    #[test]
    fn restore_brings_back_every_root_type() {
        let doc = Doc::new();
        {
            let mut txn = doc.transact_mut();
            let text = txn.get_or_insert_text("text");
            text.insert(&mut txn, 0, "version one");
            let map = txn.get_or_insert_map("map");
            map.insert(&mut txn, "k", "v1");
            map.insert(&mut txn, "nested", MapPrelim::from([("a", 1)]));
            let array = txn.get_or_insert_array("array");
            array.insert_range(&mut txn, 0, [1, 2, 3]);
            let xml = txn.get_or_insert_xml_fragment("xml");
            let p = xml.push_back(&mut txn, XmlElementPrelim::empty("p"));
            p.push_back(&mut txn, XmlTextPrelim::new("old"));
        }
        let version = state(&doc);
        let expected = render_json(&version).unwrap();
        {
            let mut txn = doc.transact_mut();
            let text = txn.get_or_insert_text("text");
            text.remove_range(&mut txn, 0, 7);
            text.insert(&mut txn, 0, "rewritten ");
            let map = txn.get_or_insert_map("map");
            map.insert(&mut txn, "k", "v2");
            map.remove(&mut txn, "nested");
            map.insert(&mut txn, "added", true);
            let array = txn.get_or_insert_array("array");
            array.remove(&mut txn, 0);
            array.push_back(&mut txn, 4);
            let xml = txn.get_or_insert_xml_fragment("xml");
            xml.remove_range(&mut txn, 0, 1);
            let later = txn.get_or_insert_text("later");
            later.insert(&mut txn, 0, "new root");
        }
        let current = state(&doc);
        assert_ne!(render_json(&current).unwrap(), expected);

        let restore = restore_update(&current, &version)
            .unwrap()
            .expect("a change");
        apply(&doc, &restore);
        let mut after = render_json(&state(&doc)).unwrap();
        // A root created after the version is emptied (its kind cannot be told any more).
        assert_eq!(after["later"], serde_json::Value::Null);
        after.as_object_mut().unwrap().remove("later");
        assert_eq!(after, expected);
        // Restoring again keeps the content (new copies of the same content, history kept).
        let again = restore_update(&state(&doc), &version)
            .unwrap()
            .expect("a change");
        apply(&doc, &again);
        let mut twice = render_json(&state(&doc)).unwrap();
        twice.as_object_mut().unwrap().remove("later");
        assert_eq!(twice, expected);
    }

    #[test]
    fn restoring_the_current_state_changes_nothing() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        text.insert(&mut doc.transact_mut(), 0, "same");
        assert!(restore_update(&state(&doc), &state(&doc))
            .unwrap()
            .is_none());
    }
}

#[cfg(test)]
mod server_tests {
    use super::*;
    use crate::document::Document;
    use crate::render::render_json;
    use yrs::{Doc, Map, Text, WriteTxn};

    /// As on the server: a client's edits reach a gc-on `Document` as updates, and no root was
    /// ever given a type there.
    #[test]
    fn restores_a_document_built_from_client_updates() {
        let client = Doc::new();
        let mut server = Document::new();
        let edit = |server: &mut Document, f: &dyn Fn(&mut yrs::TransactionMut)| {
            let mut txn = client.transact_mut();
            f(&mut txn);
            let u = txn.encode_update_v1();
            drop(txn);
            server.apply_update(Update::decode_v1(&u).unwrap()).unwrap();
        };
        edit(&mut server, &|txn| {
            let t = txn.get_or_insert_text("t");
            t.insert(txn, 0, "draft one");
            txn.get_or_insert_map("m").insert(txn, "k", "v1");
        });
        let version = server.encode_state();
        edit(&mut server, &|txn| {
            let t = txn.get_or_insert_text("t");
            t.remove_range(txn, 0, 5);
            t.insert(txn, 0, "final");
            txn.get_or_insert_map("m").insert(txn, "k", "v2");
        });
        let restore = restore_update(&server.encode_state(), &version)
            .unwrap()
            .expect("a change");
        let diff = server
            .apply_update(Update::decode_v1(&restore).unwrap())
            .unwrap();
        assert!(diff.is_some());
        assert_eq!(
            render_json(&server.encode_state()).unwrap(),
            render_json(&version).unwrap()
        );
    }
}
