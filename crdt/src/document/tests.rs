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
fn an_update_past_a_hole_is_refused() {
    // Found by the fuzzer: yrs integrated an update sent ahead of its predecessor behind a
    // skip, while the diff (and any snapshot) left it out, so joiners saw content that no
    // store or subscriber had, and compaction dropped it.
    let client = Doc::new();
    let first = edit(&client, 0, "ab");
    let second = {
        let array = client.get_or_insert_array("a");
        let mut txn = client.transact_mut();
        yrs::Array::push_back(&array, &mut txn, 1);
        Update::decode_v1(&txn.encode_update_v1()).unwrap()
    };
    let second_bytes = second.encode_v1();
    let mut server = Document::new();
    assert!(matches!(
        server.apply_update(second),
        Err(DocumentError::OutOfOrder)
    ));
    assert_eq!(server.encode_state(), Document::new().encode_state());
    // In order, both apply, and the diffs rebuild the same document.
    let d1 = server.apply_update(first).unwrap().unwrap();
    let d2 = server
        .apply_update(Update::decode_v1(&second_bytes).unwrap())
        .unwrap()
        .unwrap();
    let stored = Document::load(None, [d1.as_slice(), d2.as_slice()]).unwrap();
    assert_eq!(stored.encode_state(), server.encode_state());
    assert_eq!(text_of(&stored), "ab");
}

#[test]
fn a_known_or_pending_update_is_no_change() {
    let a = Doc::new();
    let first = edit(&a, 0, "a");
    let b = Doc::new();
    b.transact_mut()
        .apply_update(Update::decode_v1(&first.encode_v1()).unwrap())
        .unwrap();
    // B's edit builds on A's, which the server does not have yet: it waits (pending), and
    // there is nothing to store yet.
    let second = edit(&b, 1, "b");
    let bytes = second.encode_v1();
    let mut server = Document::new();
    assert_eq!(server.apply_update(second).unwrap(), None);
    let diff = server.apply_update(first).unwrap().unwrap();
    assert_eq!(text_of(&server), "ab");
    assert_eq!(
        text_of(&Document::load(None, [diff.as_slice()]).unwrap()),
        "ab"
    );
    assert_eq!(
        server
            .apply_update(Update::decode_v1(&bytes).unwrap())
            .unwrap(),
        None
    );
}

#[test]
fn an_update_whose_diff_does_not_decode_is_refused() {
    // Found by the fuzzer: content type 18 is unknown; yrs decodes it, but its diff encodes
    // the item as JSON content that does not decode, which would have been stored and
    // would then have failed every load of the document.
    let frame = [
        0x00, 0x02, 0x0f, 0x01, 0x01, 0x01, 0x00, 0x32, 0x01, 0x01, 0x74, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00,
    ];
    let Ok([ClientMessage::Update(u)]) =
        <[ClientMessage; 1]>::try_from(decode_frame(&frame).unwrap())
    else {
        panic!("not an update");
    };
    let mut server = Document::new();
    assert!(matches!(
        server.apply_update(u),
        Err(DocumentError::DiffDoesNotDecode)
    ));
}
