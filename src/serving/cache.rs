//! A map of lazily loaded values: concurrent first requests for a key share one load, and after
//! each load the least recently used other values are dropped while the map is over its bound.
//! Whoever still holds a dropped value (a request in flight) keeps it alive until done.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use super::ServeError;

pub struct LruCells<T> {
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    clock: u64,
    entries: HashMap<String, Entry<T>>,
}

struct Entry<T> {
    cell: Arc<OnceCell<Arc<T>>>,
    used: u64,
}

impl<T> Default for LruCells<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> LruCells<T> {
    pub fn new() -> Self {
        Self { inner: Mutex::new(Inner { clock: 0, entries: HashMap::new() }) }
    }

    /// The value for `key`, loading it if needed; then evicts while `over(loaded values)`.
    pub async fn get_or_load<F, Fut>(
        &self,
        key: &str,
        load: F,
        over: impl Fn(&[&Arc<T>]) -> bool,
    ) -> Result<Arc<T>, ServeError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, ServeError>>,
    {
        let cell = {
            let mut inner = self.inner.lock().expect("cache lock");
            inner.clock += 1;
            let now = inner.clock;
            let entry = inner.entries.entry(key.to_string()).or_insert_with(|| Entry { cell: Arc::default(), used: 0 });
            entry.used = now;
            entry.cell.clone()
        };
        let value = cell.get_or_try_init(|| async move { load().await.map(Arc::new) }).await?.clone();
        let mut inner = self.inner.lock().expect("cache lock");
        loop {
            let loaded: Vec<&Arc<T>> = inner.entries.values().filter_map(|e| e.cell.get()).collect();
            if !over(&loaded) {
                break;
            }
            let victim = inner
                .entries
                .iter()
                .filter(|(k, e)| k.as_str() != key && e.cell.initialized())
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else { break };
            tracing::info!(key = %victim, "unloading the least recently used model");
            inner.entries.remove(&victim);
        }
        Ok(value)
    }

    /// How many values are loaded.
    pub fn loaded(&self) -> usize {
        self.inner.lock().expect("cache lock").entries.values().filter(|e| e.cell.initialized()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loads_once_and_evicts_the_least_recently_used() {
        let cache: LruCells<usize> = LruCells::new();
        let loads = std::sync::atomic::AtomicUsize::new(0);
        let get = |key: &'static str, size: usize| {
            let loads = &loads;
            let cache = &cache;
            async move {
                cache
                    .get_or_load(
                        key,
                        || async move {
                            loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            Ok(size)
                        },
                        |values| values.iter().map(|v| ***v).sum::<usize>() > 10,
                    )
                    .await
                    .unwrap()
            }
        };
        let (a, b) = tokio::join!(get("a", 4), get("a", 4));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1, "concurrent first uses share one load");
        get("b", 4).await;
        get("a", 4).await; // a is now more recent than b
        get("c", 4).await; // 12 > 10: b goes
        assert_eq!(cache.loaded(), 2);
        get("a", 4).await;
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 3, "a stayed loaded");
        get("b", 4).await;
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 4, "b was evicted and loads again");
        let big = get("huge", 100).await;
        assert_eq!(*big, 100, "a value over the budget by itself is still served");
    }
}
