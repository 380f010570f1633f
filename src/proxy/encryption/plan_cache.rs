//! A bounded map of plans shared by every session (Parse plans by SQL,
//! simple-query plans by shape). An application with more statement shapes
//! than the bound keeps its hot plans: `quick_cache` evicts the cold ones
//! one at a time (CLOCK-Pro), where a map wiped whole at the bound made
//! every session plan everything again at once.

/// Plans keyed by SQL text, looked up by `&str` (a hit allocates nothing).
pub(super) struct PlanCache<V> {
    entries: quick_cache::sync::Cache<String, V>,
}

impl<V: Clone> PlanCache<V> {
    /// A cache of about `capacity` plans.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: quick_cache::sync::Cache::new(capacity),
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<V> {
        self.entries.get(key)
    }

    pub(super) fn insert(&self, key: String, value: V) {
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
        // Full, not started over.
        assert!(cache.len() >= 128, "{} plans kept", cache.len());
    }
}
