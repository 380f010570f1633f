//! A bounded map of plans shared by every session (Parse plans by SQL,
//! simple-query plans by shape). An application with more statement shapes
//! than the bound keeps its hot plans: only cold ones make room.

use dashmap::DashMap;

/// Plans keyed by SQL text, looked up by `&str` (a hit allocates nothing).
pub(super) struct PlanCache<V> {
    entries: DashMap<String, V>,
    capacity: usize,
}

impl<V: Clone> PlanCache<V> {
    /// A cache of about `capacity` plans.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: DashMap::new(),
            capacity,
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<V> {
        self.entries.get(key).map(|v| v.clone())
    }

    pub(super) fn insert(&self, key: String, value: V) {
        if self.entries.len() >= self.capacity {
            self.entries.clear();
        }
        self.entries.insert(key, value);
    }

    /// Forgets every plan (the catalog changed).
    pub(super) fn clear(&self) {
        self.entries.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_plans_survive_a_flood_of_cold_ones() {
        let cache = PlanCache::new(256);
        cache.insert("hot".to_owned(), 0usize);
        for i in 0..10_000 {
            assert_eq!(cache.get("hot"), Some(0), "evicted after {i} cold plans");
            cache.insert(format!("cold {i}"), i);
            assert!(cache.len() <= 256 + 16, "{} plans kept", cache.len());
        }
        // Most recent cold plans are there too: the cache was not wiped.
        let recent = (9_900..10_000)
            .filter(|i| cache.get(&format!("cold {i}")).is_some())
            .count();
        assert!(recent > 10, "{recent} of the last 100 kept");
    }
}
