//! The awareness (presence) states a document relays, kept by the rules of y-protocols'
//! `applyAwarenessUpdate`.
//!
//! yrs's `Awareness` is not used for this: it allocates a `DashMap` with a shard per four cores
//! (about 1 KiB per document, even with no client announced), and carries a local state, clock
//! and observers a relaying server never uses. The wire format stays yrs's `AwarenessUpdate`.

use std::sync::Arc;

use crate::small_map::SmallMap;

use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::ClientID;

/// How a removal is spelled on the wire.
pub(crate) const NULL: &str = "null";

/// One client's entry: its last clock, and its state (`None` once removed; the entry stays for
/// the clock, so that a stale state arriving after the removal is ignored).
struct ClientState {
    clock: u32,
    json: Option<Arc<str>>,
}

impl ClientState {
    /// As it goes on the wire: the state, or a removal, with the clock.
    fn entry(&self) -> AwarenessUpdateEntry {
        AwarenessUpdateEntry {
            clock: self.clock,
            json: self.json.clone().unwrap_or_else(|| NULL.into()),
        }
    }
}

/// What an applied update changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// Clients announced for the first time, or again after their removal.
    pub added: Vec<ClientID>,
    /// Known clients whose state was renewed or changed.
    pub updated: Vec<ClientID>,
    pub removed: Vec<ClientID>,
}

#[derive(Default)]
pub(crate) struct AwarenessStates {
    /// A document usually has a few clients: see `SmallMap`.
    states: SmallMap<ClientID, ClientState>,
}

impl AwarenessStates {
    /// The clock of a client with an entry (announced or removed).
    pub fn clock(&self, client: ClientID) -> Option<u32> {
        self.states.get(&client).map(|s| s.clock)
    }

    /// Entries kept, removed clients included.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn removed_count(&self) -> usize {
        self.states.values().filter(|s| s.json.is_none()).count()
    }

    /// Applies `update` as y-protocols does: an entry wins with a higher clock, and a removal
    /// also wins at an equal clock. A removal of a client never seen still leaves its clock.
    pub fn apply(&mut self, update: AwarenessUpdate) -> Applied {
        let mut applied = Applied::default();
        for (client, AwarenessUpdateEntry { clock, json }) in update.clients {
            let new = (&*json != NULL).then_some(json);
            match self.states.get_mut(&client) {
                Some(state) => {
                    let removal = state.clock == clock && new.is_none() && state.json.is_some();
                    if state.clock >= clock && !removal {
                        continue;
                    }
                    match (&state.json, &new) {
                        (_, None) => applied.removed.push(client),
                        (None, Some(_)) => applied.added.push(client),
                        (Some(_), Some(_)) => applied.updated.push(client),
                    }
                    state.clock = clock;
                    state.json = new;
                }
                None => {
                    if new.is_some() {
                        applied.added.push(client);
                    }
                    self.states.insert(client, ClientState { clock, json: new });
                }
            }
        }
        applied
    }

    /// Marks `clients` removed, keeping their clocks (as y-protocols' `removeAwarenessStates`
    /// does for remote clients); returns those that had a state.
    pub fn remove(&mut self, clients: &[ClientID]) -> Vec<ClientID> {
        let mut removed = Vec::new();
        for client in clients {
            if let Some(state) = self.states.get_mut(client) {
                if state.json.take().is_some() {
                    removed.push(*client);
                }
            }
        }
        removed
    }

    /// The entries (state or removal, with clock) of `clients`, leaving out unknown ones.
    pub fn entries_of(&self, clients: impl IntoIterator<Item = ClientID>) -> AwarenessUpdate {
        let clients = clients
            .into_iter()
            .filter_map(|c| Some((c, self.states.get(&c)?.entry())));
        AwarenessUpdate {
            clients: clients.collect(),
        }
    }

    /// Every client with a state (removed ones left out).
    pub fn current(&self) -> AwarenessUpdate {
        let live = self.states.iter().filter(|(_, s)| s.json.is_some());
        AwarenessUpdate {
            clients: live.map(|(c, s)| (*c, s.entry())).collect(),
        }
    }

    /// Drops the entries of removed clients except `keep` (`SmallMap` gives the spare room
    /// back: a burst of clients must not leave a large table behind in a long-lived document).
    pub fn forget_removed_except(&mut self, keep: &[ClientID]) {
        self.states
            .retain(|id, s| s.json.is_some() || keep.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(entries: &[(u64, u32, &str)]) -> AwarenessUpdate {
        AwarenessUpdate {
            clients: entries
                .iter()
                .map(|&(id, clock, json)| {
                    (
                        ClientID::new(id),
                        AwarenessUpdateEntry {
                            clock,
                            json: json.into(),
                        },
                    )
                })
                .collect(),
        }
    }

    fn ids(ids: &[u64]) -> Vec<ClientID> {
        ids.iter().map(|&i| ClientID::new(i)).collect()
    }

    #[test]
    fn clocks_decide_as_in_y_protocols() {
        let mut s = AwarenessStates::default();
        let applied = s.apply(update(&[(1, 1, "{}"), (2, 5, "null")]));
        // A removal of an unknown client changes nothing but keeps its clock.
        assert_eq!(applied.added, ids(&[1]));
        assert!(applied.removed.is_empty());
        assert_eq!(s.clock(ClientID::new(2)), Some(5));
        // Stale or equal clocks lose; a renewal with the same state is an update.
        assert_eq!(s.apply(update(&[(1, 1, r#"{"a":1}"#)])), Applied::default());
        assert_eq!(s.apply(update(&[(1, 2, "{}")])).updated, ids(&[1]));
        // A removal wins at an equal clock, once.
        assert_eq!(s.apply(update(&[(1, 2, "null")])).removed, ids(&[1]));
        assert_eq!(s.apply(update(&[(1, 2, "null")])), Applied::default());
        // A stale state after the removal is ignored; a newer one announces the client again.
        assert_eq!(s.apply(update(&[(1, 2, "{}")])), Applied::default());
        assert_eq!(s.apply(update(&[(1, 3, "{}")])).added, ids(&[1]));
        assert_eq!(s.apply(update(&[(2, 5, "{}")])), Applied::default());
        assert_eq!(s.apply(update(&[(2, 6, "{}")])).added, ids(&[2]));
    }

    #[test]
    fn entries_carry_states_and_removals_and_skip_the_unknown() {
        let mut s = AwarenessStates::default();
        s.apply(update(&[(1, 4, r#"{"u":"a"}"#), (2, 1, "{}")]));
        s.apply(update(&[(2, 2, "null")]));
        let e = s.entries_of(ids(&[1, 2, 3]));
        assert_eq!(e.clients.len(), 2);
        assert_eq!(&*e.clients[&ClientID::new(1)].json, r#"{"u":"a"}"#);
        assert_eq!(e.clients[&ClientID::new(1)].clock, 4);
        assert_eq!(&*e.clients[&ClientID::new(2)].json, "null");
        let current = s.current();
        assert_eq!(current.clients.len(), 1);
        assert!(current.clients.contains_key(&ClientID::new(1)));
        assert_eq!(s.removed_count(), 1);
    }

    #[test]
    fn forgetting_keeps_live_states_and_the_named_removals() {
        let mut s = AwarenessStates::default();
        for id in 0..1000 {
            s.apply(update(&[(id, 1, "{}")]));
            s.apply(update(&[(id, 1, "null")]));
        }
        s.apply(update(&[(5000, 1, "{}")]));
        s.forget_removed_except(&ids(&[7]));
        assert_eq!(s.len(), 2);
        assert_eq!(s.clock(ClientID::new(7)), Some(1));
        assert_eq!(s.clock(ClientID::new(5000)), Some(1));
    }
}

/// The awareness rules as `Document` applies them to what clients send.
#[cfg(test)]
mod document_rules {
    use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
    use yrs::ClientID;

    use crate::protocol::{decode_frame, ClientMessage};
    use crate::Document;

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

    fn entry(id: u64, clock: u32, json: &str) -> AwarenessUpdate {
        let mut update = AwarenessUpdate {
            clients: Default::default(),
        };
        update.clients.insert(
            ClientID::new(id),
            AwarenessUpdateEntry {
                clock,
                json: json.into(),
            },
        );
        update
    }

    #[test]
    fn removals_of_unknown_awareness_clients_are_not_remembered() {
        // Found by the fuzzer's awareness invariant: each removal of a made-up id left an entry.
        let mut server = Document::new();
        for id in 0..1000 {
            assert!(server.apply_awareness(entry(id, 1, "null")).is_none());
        }
        assert_eq!(server.awareness_entries(), 0);
    }

    #[test]
    fn removed_awareness_clients_are_forgotten_beyond_the_bound() {
        let mut server = Document::new();
        server.set_max_removed_awareness(4);
        for id in 0..100 {
            assert!(server.apply_awareness(entry(id, 1, "{}")).is_some());
            let change = server.apply_awareness(entry(id, 2, "null")).unwrap();
            assert_eq!(change.removed, vec![ClientID::new(id)]);
            // The removal the caller relays still carries its clock.
            let msg = server.awareness_message_for(change.removed).unwrap();
            let Ok([ClientMessage::Awareness(a)]) =
                <[ClientMessage; 1]>::try_from(decode_frame(&msg).unwrap())
            else {
                panic!("not awareness");
            };
            assert_eq!(a.clients[&ClientID::new(id)].clock, 2);
            assert!(server.awareness_entries() <= 5);
        }
        // Live states survive forgetting; a batch naming forgotten clients relays the rest.
        assert!(server.apply_awareness(entry(500, 1, "{}")).is_some());
        for id in 1000..1010 {
            server.apply_awareness(entry(id, 1, "{}"));
            server.remove_awareness(&[ClientID::new(id)]).unwrap();
        }
        assert!(server.awareness_message().is_some());
        let ids = [ClientID::new(0), ClientID::new(500)];
        let msg = server.awareness_message_for(ids).unwrap();
        let Ok([ClientMessage::Awareness(a)]) =
            <[ClientMessage; 1]>::try_from(decode_frame(&msg).unwrap())
        else {
            panic!("not awareness");
        };
        assert_eq!(a.clients.len(), 1);
        assert!(server.awareness_message_for([ClientID::new(0)]).is_none());
    }

    #[test]
    fn the_documents_own_awareness_id_is_an_ordinary_client() {
        // The server announces no presence of its own, so a client using the id of the server's
        // doc is announced and removed like any other (yrs's Awareness refused it, and a state
        // under that id outlived its connection).
        let mut server = Document::new();
        let own = server.doc().client_id();
        assert!(server.apply_awareness(entry(own.get(), 1, "{}")).is_some());
        assert!(server.awareness_message().is_some());
        assert!(server.remove_awareness(&[own]).is_some());
        assert!(server.awareness_message().is_none());
    }
}
