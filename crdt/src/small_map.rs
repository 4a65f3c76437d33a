//! A map for the per-document tables that usually hold a handful of entries (a document's
//! connections, its awareness clients): a list (`ThinVec`) searched in order, indexed by a hash
//! map only once it is large.
//!
//! Every open document has such tables, and a hash map's smallest table (four buckets) cost a
//! document more than its few entries did. Up to `EXACT_UP_TO` entries the list grows by exactly
//! one; past `INDEX_FROM` a map from key to position keeps lookups O(1) (the keys may come from
//! clients, so the index uses std's randomly seeded hasher). Iteration walks the list.

use std::collections::HashMap;
use std::hash::Hash;

use thin_vec::ThinVec;

/// Entries from which lookups go through the index; it is dropped again at half of this.
const INDEX_FROM: usize = 16;

/// Entries up to which the list grows by exactly one.
const EXACT_UP_TO: usize = 4;

pub struct SmallMap<K, V> {
    /// A `ThinVec`: its length and capacity live in the allocation, so an empty map is one
    /// pointer, and the map 16 bytes in every document.
    list: ThinVec<(K, V)>,
    /// Boxed: most maps never have one, and the map is part of every document.
    #[allow(
        clippy::box_collection,
        reason = "keeps the absent index at 8 bytes instead of a HashMap's 48"
    )]
    index: Option<Box<HashMap<K, usize>>>,
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap {
            list: ThinVec::new(),
            index: None,
        }
    }
}

impl<K: Copy + Eq + Hash, V> SmallMap<K, V> {
    fn position(&self, key: &K) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(key).copied(),
            None => self.list.iter().position(|(k, _)| k == key),
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.position(key).map(|i| &self.list[i].1)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.position(key).map(|i| &mut self.list[i].1)
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.position(key).is_some()
    }

    /// Adds an entry, replacing (and returning) one with the same key.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let Some(i) = self.position(&key) {
            return Some(std::mem::replace(&mut self.list[i].1, value));
        }
        if self.list.len() < EXACT_UP_TO {
            self.list.reserve_exact(1);
        }
        self.list.push((key, value));
        let last = self.list.len() - 1;
        match &mut self.index {
            Some(index) => {
                index.insert(key, last);
            }
            None if last >= INDEX_FROM => self.reindex(),
            None => {}
        }
        None
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let i = self.position(key)?;
        let (_, value) = self.list.swap_remove(i);
        if let Some(index) = &mut self.index {
            index.remove(key);
            if let Some((moved, _)) = self.list.get(i) {
                index.insert(*moved, i);
            }
        }
        self.settle();
        Some(value)
    }

    /// Keeps the entries `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        let before = self.list.len();
        self.list.retain_mut(|(k, v)| keep(k, v));
        if self.list.len() != before && self.index.is_some() {
            self.reindex();
        }
        self.settle();
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.list.iter().map(|(k, v)| (k, v))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.list.iter().map(|(_, v)| v)
    }

    /// Removes every entry, and gives the room back.
    pub fn take_all(&mut self) -> ThinVec<(K, V)> {
        self.index = None;
        std::mem::take(&mut self.list)
    }

    fn reindex(&mut self) {
        let index = self.list.iter().enumerate().map(|(i, (k, _))| (*k, i));
        self.index = Some(Box::new(index.collect()));
    }

    /// After removals: drops an index a small map no longer needs, and gives back room a burst
    /// left (a long-lived document must not keep its peak's table).
    fn settle(&mut self) {
        if self.list.len() <= INDEX_FROM / 2 {
            self.index = None;
        }
        if self.list.len() < self.list.capacity() / 4 {
            self.list.shrink_to_fit();
        }
        if let Some(index) = &mut self.index {
            if index.len() < index.capacity() / 4 {
                index.shrink_to(index.len() * 2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_stay_right_through_growth_swaps_retain_and_shrinking() {
        let mut map = SmallMap::default();
        for k in 0..100u64 {
            assert_eq!(map.insert(k, k * 10), None);
            if k < EXACT_UP_TO as u64 {
                assert_eq!(map.list.capacity(), k as usize + 1, "grows one at a time");
            }
        }
        assert!(map.index.is_some());
        // Every other one removed: each swap moves the last entry into the hole.
        for k in (0..100).step_by(2) {
            assert_eq!(map.remove(&k), Some(k * 10));
            assert_eq!(map.remove(&k), None);
        }
        for k in 0..100 {
            assert_eq!(
                map.get(&k).copied(),
                (k % 2 == 1).then_some(k * 10),
                "key {k}"
            );
        }
        // Retain keeps the index right while it is still in use.
        map.retain(|k, v| {
            *v += 1;
            *k < 60
        });
        assert_eq!(map.len(), 30);
        assert!(map.index.is_some());
        for k in 0..100 {
            assert_eq!(
                map.get(&k).copied(),
                (k % 2 == 1 && k < 60).then_some(k * 10 + 1)
            );
        }
        map.retain(|k, _| *k < 6);
        assert_eq!(map.len(), 3);
        assert!(map.index.is_none(), "a small map needs no index");
        assert!(map.list.capacity() < 16, "the burst's room was given back");
        for k in [1, 3, 5] {
            assert_eq!(map.get(&k).copied(), Some(k * 10 + 1));
        }
        // Replacing keeps one entry; taking all empties it.
        assert_eq!(map.insert(1, 7), Some(11));
        assert_eq!(map.len(), 3);
        assert_eq!(map.get_mut(&1).copied(), Some(7));
        assert_eq!(map.take_all().len(), 3);
        assert!(map.is_empty() && !map.contains_key(&1));
    }
}
