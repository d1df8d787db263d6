//! "Did you mean": the keys that would have been accepted where an unknown one was written, and
//! the closest of them.
//!
//! The accepted keys come from the raw structs themselves: serde hands every struct's field
//! names to `Deserializer::deserialize_struct`, so a [`Probe`] deserializer that walks the
//! unknown key's parent path through [`RawConfig`] reads them there. Nothing is listed twice, and
//! a field added to a raw struct is suggested without further work.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::raw::RawConfig;

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Key(String),
    Index(usize),
}

/// The message for the unknown key at `path` (its last step is the key): the closest accepted
/// key when one is near, else every accepted key.
pub(crate) fn unknown_key(path: &[Step]) -> String {
    let (Some(Step::Key(key)), parent) = (path.last(), &path[..path.len().saturating_sub(1)])
    else {
        return "unknown key".into();
    };
    match accepted_keys(parent) {
        Some(keys) => hint("unknown key", key, keys),
        None => "unknown key".into(),
    }
}

/// serde's `unknown field `x`, expected one of `a`, `b`` (from a `deny_unknown_fields` struct,
/// such as a registration) with the closest expected field added when one is near.
pub(crate) fn unknown_field(message: String) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message;
    };
    let Some((field, expected)) = rest.split_once('`') else {
        return message;
    };
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    match closest(field, &candidates) {
        Some(best) => format!("{message}; did you mean `{best}`?"),
        None => message,
    }
}

fn hint(what: &str, key: &str, keys: &[&str]) -> String {
    match closest(key, keys) {
        Some(best) => format!("{what}; did you mean \"{best}\"?"),
        None => format!("{what}; expected one of: {}", keys.join(", ")),
    }
}

/// The candidate nearest to `word` by edit distance, if near enough to be a typo: at most a
/// third of the word's length (at least 1), or `word` is a prefix or an extension of it
/// (`lease` for `lease_ttl`).
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= limit || (word.len() >= 3 && c.starts_with(word)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance counting insertions, deletions, substitutions and swaps of two neighbouring
/// characters (`prots` → `ports` is one edit), over chars: the optimal string alignment
/// distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: the distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The field names of the raw struct at `parent` (`[]`: the top level; `[proxy, http, 0]`: a
/// `[[proxy.http]]` entry), or `None` where the path leads to no struct (a map of any keys).
pub(crate) fn accepted_keys(parent: &[Step]) -> Option<&'static [&'static str]> {
    match RawConfig::deserialize(Probe { path: parent }) {
        Err(Found::Fields(fields)) => Some(fields),
        Err(Found::Nothing) | Ok(_) => None,
    }
}

/// How a probe ends: at the struct it was sent to, with its fields, or anywhere else.
#[derive(Debug)]
enum Found {
    Fields(&'static [&'static str]),
    Nothing,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for Found {}

impl de::Error for Found {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Found::Nothing
    }
}

/// A deserializer that follows `path` into the type deserialized from it and stops, with an
/// error carrying the field names, at the struct the path ends at. It holds no data: every other
/// request ends the probe.
struct Probe<'p> {
    path: &'p [Step],
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = Found;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
        Err(Found::Nothing)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Found> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Found> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Found> {
        match self.path.split_first() {
            None => Err(Found::Fields(fields)),
            Some((Step::Key(key), rest)) => visitor.visit_map(OneEntry {
                key: Some(key.clone()),
                value: Some(Probe { path: rest }),
            }),
            Some((Step::Index(_), _)) => Err(Found::Nothing),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Found> {
        match self.path.split_first() {
            Some((Step::Index(_), rest)) => visitor.visit_seq(OneElement {
                element: Some(Probe { path: rest }),
            }),
            _ => Err(Found::Nothing),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct tuple tuple_struct map enum identifier ignored_any
    }
}

/// The one key of a table on the probe's path, and the probe for its value.
struct OneEntry<'p> {
    key: Option<String>,
    value: Option<Probe<'p>>,
}

impl<'de> MapAccess<'de> for OneEntry<'_> {
    type Error = Found;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Found> {
        match self.key.take() {
            Some(key) => seed.deserialize(key.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Found> {
        match self.value.take() {
            Some(probe) => seed.deserialize(probe),
            None => Err(Found::Nothing),
        }
    }
}

/// The one element of an array on the probe's path.
struct OneElement<'p> {
    element: Option<Probe<'p>>,
}

impl<'de> SeqAccess<'de> for OneElement<'_> {
    type Error = Found;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Found> {
        match self.element.take() {
            Some(probe) => seed.deserialize(probe).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> Vec<Step> {
        text.split('.')
            .filter(|s| !s.is_empty())
            .map(|s| match s.parse() {
                Ok(i) => Step::Index(i),
                Err(_) => Step::Key(s.to_string()),
            })
            .collect()
    }

    #[test]
    fn the_accepted_keys_are_the_raw_structs_fields_at_any_depth() {
        let top = accepted_keys(&[]).unwrap();
        assert_eq!(
            top,
            ["admin", "dns", "proxy", "registry", "shutdown", "log", "consul", "xds"]
        );
        assert!(accepted_keys(&path("dns")).unwrap().contains(&"listen"));
        assert!(accepted_keys(&path("dns.rrl")).unwrap().contains(&"slip"));
        assert_eq!(
            accepted_keys(&path("proxy.http.0")).unwrap(),
            ["listen", "tls"]
        );
        assert!(accepted_keys(&path("proxy.tcp.3"))
            .unwrap()
            .contains(&"max_flows"));
        assert!(accepted_keys(&path("registry.etcd.tls"))
            .unwrap()
            .contains(&"cert"));
        // The TOML spelling (a renamed field), not Rust's.
        assert!(accepted_keys(&path("registry"))
            .unwrap()
            .contains(&"static"));
        // Maps take any key; an unknown table has no fields.
        assert_eq!(accepted_keys(&path("proxy.l7.balance_by_service")), None);
        assert_eq!(accepted_keys(&path("nosuch")), None);
    }

    #[test]
    fn a_typo_gets_the_closest_key_and_nonsense_gets_the_list() {
        assert_eq!(
            unknown_key(&path("dns.lisen")),
            "unknown key; did you mean \"listen\"?"
        );
        assert_eq!(
            unknown_key(&path("registry.etcd.tls.crt")),
            "unknown key; did you mean \"cert\"?"
        );
        assert_eq!(
            unknown_key(&path("registry.lease")),
            "unknown key; did you mean \"lease_ttl\"?"
        );
        assert_eq!(
            unknown_key(&path("shutdown.bogus")),
            "unknown key; expected one of: drain_timeout, readiness_grace"
        );
        assert_eq!(unknown_key(&path("nosuch.key")), "unknown key");
    }

    #[test]
    fn serde_unknown_field_messages_get_the_closest_field() {
        assert_eq!(
            unknown_field("unknown field `prots`, expected one of `ip`, `ports`, `tags`".into()),
            "unknown field `prots`, expected one of `ip`, `ports`, `tags`; did you mean `ports`?"
        );
        assert_eq!(
            unknown_field("unknown field `zzzzzz`, expected `ip` or `ports`".into()),
            "unknown field `zzzzzz`, expected `ip` or `ports`"
        );
        assert_eq!(unknown_field("invalid type".into()), "invalid type");
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("lisen", "listen"), 1);
        assert_eq!(edit_distance("crt", "cert"), 1);
        assert_eq!(edit_distance("prots", "ports"), 1);
        assert_eq!(edit_distance("ttl", "ltt"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
