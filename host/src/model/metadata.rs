//! [`Metadata`]: go-micro's `map[string]string`, stored compactly and shared between copies.
//!
//! Every node and service carries one, usually of a handful of pairs, and the cache holds
//! several copies of each node (its own state, the answers it publishes). A `BTreeMap` spends
//! a whole leaf (room for 11 pairs, over 500 bytes) even on one pair; this is a sorted slice
//! behind an `Arc`, so a copy costs a reference count and an empty map costs nothing. Lookups
//! binary-search the sorted keys; it serialises as a JSON object in key order, as the `BTreeMap`
//! did.

use std::fmt;
use std::ops::Index;
use std::sync::Arc;

use serde::{Serialize, Serializer};

/// One key and its value.
type Pair = (Box<str>, Box<str>);

/// A string map, sorted by key, immutable once shared; `insert` copies on write.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Metadata(Option<Arc<[Pair]>>);

impl Metadata {
    /// An empty map (allocates nothing).
    pub fn new() -> Self {
        Metadata(None)
    }

    /// The pairs, sorted by key.
    fn pairs(&self) -> &[Pair] {
        self.0.as_deref().unwrap_or(&[])
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.pairs().binary_search_by(|(k, _)| (**k).cmp(key))
    }

    /// The value of `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        let i = self.position(key).ok()?;
        Some(&self.pairs()[i].1)
    }

    /// Sets `key` to `value`, returning the value it replaces. Copies the pairs: metadata is
    /// decoded or built once and then only read.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        let mut pairs = self.pairs().to_vec();
        let old = match self.position(&key) {
            Ok(i) => Some(std::mem::replace(&mut pairs[i].1, value.into()).into()),
            Err(i) => {
                pairs.insert(i, (key.into(), value.into()));
                None
            }
        };
        self.0 = Some(pairs.into());
        old
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs().len()
    }

    /// Whether there is no pair.
    pub fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }

    /// The pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs().iter().map(|(k, v)| (&**k, &**v))
    }
}

/// Like a map's `collect`: for a repeated key, the last value wins.
impl FromIterator<(String, String)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut pairs: Vec<Pair> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        if pairs.is_empty() {
            return Metadata::new();
        }
        // Stable, so equal keys keep their order and the last of each run is the latest.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut unique: Vec<Pair> = Vec::with_capacity(pairs.len());
        for pair in pairs {
            match unique.last_mut() {
                Some(last) if last.0 == pair.0 => *last = pair,
                _ => unique.push(pair),
            }
        }
        Metadata(Some(unique.into()))
    }
}

impl<const N: usize> From<[(String, String); N]> for Metadata {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl Index<&str> for Metadata {
    type Output = str;

    /// The value of `key`; panics if there is none, like a map's index.
    fn index(&self, key: &str) -> &str {
        self.get(key)
            .unwrap_or_else(|| panic!("no metadata key {key:?}"))
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Metadata {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn collects_sorted_with_the_last_value_of_a_repeated_key() {
        let m = pairs(&[("zone", "a"), ("app", "x"), ("zone", "b")]);
        assert_eq!(m.iter().collect::<Vec<_>>(), [("app", "x"), ("zone", "b")]);
        assert_eq!(
            (m.get("zone"), m.get("nope"), m.len()),
            (Some("b"), None, 2)
        );
        assert_eq!(&m["app"], "x");
    }

    #[test]
    fn insert_replaces_or_adds_in_order_without_touching_copies() {
        let mut m = pairs(&[("b", "1")]);
        let copy = m.clone();
        assert_eq!(m.insert("b".into(), "2".into()), Some("1".into()));
        assert_eq!(m.insert("a".into(), "0".into()), None);
        assert_eq!(m.iter().collect::<Vec<_>>(), [("a", "0"), ("b", "2")]);
        assert_eq!(copy.get("b"), Some("1"));
    }

    #[test]
    fn serialises_as_a_json_object_in_key_order() {
        let m = pairs(&[("z", "1"), ("a", "2")]);
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"a":"2","z":"1"}"#);
        assert_eq!(serde_json::to_string(&Metadata::new()).unwrap(), "{}");
        assert!(Metadata::new().is_empty() && pairs(&[]) == Metadata::new());
    }
}
