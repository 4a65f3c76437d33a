//! A document's content as JSON, for backends that read what users wrote without speaking Yjs.
//!
//! A stored update does not say which kind of shared type each root is (Yjs keeps that only in
//! the code that calls `getText`/`getMap`), so the kind is read off the content: map entries
//! make a `Y.Map`; text chunks or embeds make a `Y.Text`; only XML nodes make a
//! `Y.XmlFragment`; anything else in the list is a `Y.Array`. A root with no visible content
//! cannot be told apart and renders as `null`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use serde_json::{Map, Value};
use thiserror::Error;
use yrs::branch::{Branch, BranchPtr};
use yrs::types::text::YChange;
use yrs::types::ToJson;
use yrs::updates::decoder::Decode;
use yrs::{
    Any, Array, ArrayRef, Doc, GetString, Map as _, MapRef, Out, ReadTxn, Text, TextRef, Transact,
    Update, XmlFragmentRef,
};

#[derive(Debug, Error)]
pub enum ContentError {
    #[error("not a Yjs v1 update: {0}")]
    Decode(#[from] yrs::encoding::read::Error),
    #[error("update rejected: {0}")]
    Rejected(#[from] yrs::error::UpdateError),
    #[error("content cannot be rendered: {0}")]
    Render(String),
    /// yrs panicked on this content; the caller's own state is untouched.
    #[error("yrs panicked while processing the content")]
    Panicked,
}

/// What a root shared type holds, as far as its content tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    Text,
    Map,
    Array,
    XmlFragment,
    /// No visible content: the kind cannot be told.
    Empty,
}

/// A fresh document holding `update` (a whole document state, as stored).
pub fn doc_from_update(update: &[u8], options: yrs::Options) -> Result<Doc, ContentError> {
    let doc = Doc::with_options(options);
    let update = Update::decode_v1(update)?;
    doc.transact_mut().apply_update(update)?;
    Ok(doc)
}

/// The kind of the root whose branch is `ptr`.
pub fn root_kind<T: ReadTxn>(txn: &T, ptr: BranchPtr) -> RootKind {
    if MapRef::from(ptr).len(txn) > 0 {
        return RootKind::Map;
    }
    // The text view lists text chunks, embeds and nested types, and skips plain array values.
    let diff = TextRef::from(ptr).diff(txn, YChange::identity);
    if diff.is_empty() {
        return if ArrayRef::from(ptr).len(txn) > 0 {
            RootKind::Array
        } else {
            RootKind::Empty
        };
    }
    let xml = diff
        .iter()
        .all(|d| matches!(d.insert, Out::YXmlElement(_) | Out::YXmlText(_)));
    if xml {
        return RootKind::XmlFragment;
    }
    let text = diff.iter().any(|d| matches!(d.insert, Out::Any(_)));
    if text {
        RootKind::Text
    } else {
        RootKind::Array
    }
}

/// Every root of `doc` with its kind, sorted by name.
pub fn roots(doc: &Doc) -> Vec<(String, BranchPtr, RootKind)> {
    let txn = doc.transact();
    let mut roots: Vec<_> = txn
        .root_refs()
        .filter_map(|(name, out)| branch_of(out).map(|ptr| (name.to_owned(), ptr)))
        .map(|(name, ptr)| {
            let kind = root_kind(&txn, ptr);
            (name, ptr, kind)
        })
        .collect();
    roots.sort_by(|a, b| a.0.cmp(&b.0));
    roots
}

fn branch_of(out: Out) -> Option<BranchPtr> {
    Some(match out {
        Out::UndefinedRef(ptr) => ptr,
        Out::YText(t) => branch(&t),
        Out::YArray(a) => branch(&a),
        Out::YMap(m) => branch(&m),
        Out::YXmlFragment(x) => branch(&x),
        Out::YXmlElement(x) => branch(&x),
        Out::YXmlText(x) => branch(&x),
        _ => return None,
    })
}

pub(crate) fn branch<T: AsRef<Branch>>(shared: &T) -> BranchPtr {
    BranchPtr::from(AsRef::<Branch>::as_ref(shared))
}

fn any_to_json(any: Any) -> Result<Value, ContentError> {
    serde_json::to_value(&any).map_err(|e| ContentError::Render(e.to_string()))
}

/// The content of a whole-document update as a JSON object: one member per root, `Y.Text` as
/// a string, `Y.Map` as an object, `Y.Array` as an array, `Y.XmlFragment` as XML text.
pub fn render_json(update: &[u8]) -> Result<Value, ContentError> {
    catch_unwind(AssertUnwindSafe(|| {
        let doc = doc_from_update(update, yrs::Options::default())?;
        let roots = roots(&doc);
        let txn = doc.transact();
        let mut out = Map::new();
        for (name, ptr, kind) in roots {
            let value = match kind {
                RootKind::Text => Value::String(TextRef::from(ptr).get_string(&txn)),
                RootKind::XmlFragment => Value::String(XmlFragmentRef::from(ptr).get_string(&txn)),
                RootKind::Map => any_to_json(MapRef::from(ptr).to_json(&txn))?,
                RootKind::Array => any_to_json(ArrayRef::from(ptr).to_json(&txn))?,
                RootKind::Empty => Value::Null,
            };
            out.insert(name, value);
        }
        Ok(Value::Object(out))
    }))
    .unwrap_or(Err(ContentError::Panicked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use yrs::types::xml::{XmlElementPrelim, XmlFragment, XmlTextPrelim};
    use yrs::{ArrayPrelim, MapPrelim, StateVector, WriteTxn};

    pub(crate) fn state(doc: &Doc) -> Vec<u8> {
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    #[test]
    fn every_root_type_renders() {
        let doc = Doc::new();
        {
            let mut txn = doc.transact_mut();
            let text = txn.get_or_insert_text("text");
            text.insert(&mut txn, 0, "hello world");
            text.remove_range(&mut txn, 5, 6);
            let map = txn.get_or_insert_map("map");
            map.insert(&mut txn, "n", 1);
            map.insert(&mut txn, "s", "x");
            map.insert(&mut txn, "nested", MapPrelim::from([("a", true)]));
            let array = txn.get_or_insert_array("array");
            array.insert_range(&mut txn, 0, [1, 2, 3]);
            array.push_back(&mut txn, ArrayPrelim::from(["in"]));
            let xml = txn.get_or_insert_xml_fragment("xml");
            let p = xml.push_back(&mut txn, XmlElementPrelim::empty("p"));
            p.push_back(&mut txn, XmlTextPrelim::new("hi"));
            let empty = txn.get_or_insert_text("empty");
            empty.insert(&mut txn, 0, "gone");
            empty.remove_range(&mut txn, 0, 4);
        }
        let json = render_json(&state(&doc)).unwrap();
        assert_eq!(
            json,
            json!({
                "text": "hello",
                "map": {"n": 1, "s": "x", "nested": {"a": true}},
                "array": [1, 2, 3, ["in"]],
                "xml": "<p>hi</p>",
                "empty": null,
            })
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(render_json(&[0xff, 0x01, 0x02]).is_err());
    }
}
