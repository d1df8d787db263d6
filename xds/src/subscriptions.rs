//! Subscriptions shared between streams.
//!
//! The clients of one fleet ask for the same names: every Envoy subscribes by name to the
//! ClusterLoadAssignments of every cluster it got over CDS. A list of 1,000 names is 16 KB of
//! pointers; 1,000 streams holding it would hold 16 MB of identical lists. A stream's list is
//! looked up here when its subscription changes (never per push or per ACK), so equal lists are
//! one allocation.
//!
//! The table holds only `Weak` references: a list lives as long as a stream holds it. A dead
//! entry still pins its slice's memory until it is dropped here, so dead entries are cleared
//! from a bucket whenever it is visited, and from the whole table whenever it has doubled since
//! the last sweep (a client that keeps changing its subscription cannot grow it).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};

/// A sorted, duplicate-free list of subscribed names.
pub type NameList = Arc<[Arc<str>]>;

#[derive(Default)]
pub struct SubscriptionLists {
    /// Hash of the names → the live lists with that hash. A plain mutex: taken only when a
    /// stream's subscription changes, for a hash and a compare.
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    lists: HashMap<u64, Vec<Weak<[Arc<str>]>>>,
    /// Entries after the last full sweep; the next sweep comes at twice this (at least 64).
    swept_at: usize,
}

fn hash_of(names: &[String]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    names.hash(&mut hasher);
    hasher.finish()
}

impl SubscriptionLists {
    /// The shared list equal to `names` (sorted, no duplicates), made with `intern` if no
    /// stream holds one.
    pub fn get(&self, names: &[String], intern: impl Fn(&str) -> Arc<str>) -> NameList {
        if names.is_empty() {
            return NameList::default();
        }
        let hash = hash_of(names);
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = table.lists.entry(hash).or_default();
        bucket.retain(|w| w.strong_count() > 0);
        let same = |list: &NameList| {
            list.len() == names.len() && list.iter().zip(names).all(|(a, b)| **a == **b)
        };
        if let Some(list) = bucket.iter().filter_map(Weak::upgrade).find(same) {
            return list;
        }
        let list: NameList = names.iter().map(|n| intern(n)).collect();
        bucket.push(Arc::downgrade(&list));
        table.sweep_if_grown();
        list
    }

    /// Lists in the table (live or not yet swept).
    pub fn len(&self) -> usize {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.lists.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Table {
    fn sweep_if_grown(&mut self) {
        if self.lists.len() < (2 * self.swept_at).max(64) {
            return;
        }
        self.lists.retain(|_, bucket| {
            bucket.retain(|w| w.strong_count() > 0);
            !bucket.is_empty()
        });
        self.swept_at = self.lists.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        let mut v: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
        v.sort();
        v
    }

    #[test]
    fn equal_lists_are_one_allocation_and_different_ones_are_not() {
        let lists = SubscriptionLists::default();
        let a = lists.get(&names("s", 1000), |n: &str| Arc::from(n));
        let b = lists.get(&names("s", 1000), |n: &str| Arc::from(n));
        assert!(Arc::ptr_eq(&a, &b));
        let c = lists.get(&names("s", 999), |n: &str| Arc::from(n));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c.len(), 999);
        assert!(lists.get(&[], |n: &str| Arc::from(n)).is_empty());
    }

    #[test]
    fn lists_nobody_holds_are_swept_so_churning_subscriptions_stay_bounded() {
        let lists = SubscriptionLists::default();
        let kept = lists.get(&names("kept", 3), |n: &str| Arc::from(n));
        for i in 0..10_000 {
            // Each held only for a moment, as by a client changing its subscription.
            let list = lists.get(&names(&format!("c{i}-"), 2), |n: &str| Arc::from(n));
            assert_eq!(list.len(), 2);
        }
        assert!(lists.len() <= 130, "{} lists in the table", lists.len());
        assert!(Arc::ptr_eq(
            &kept,
            &lists.get(&names("kept", 3), |n: &str| Arc::from(n))
        ));
    }
}
