//! First-time lookups in batches. When a hub starts (or fails over) under 10,000
//! connected agents, every agent's first request finds nothing cached: one query per
//! agent for its key and one for its desired state queued 20,000 queries on the
//! connection pool, and the last agents waited seconds. A [`BatchLoader`] gathers the
//! keys asked for while its previous query ran and asks for all of them in one query, so
//! a burst costs a few queries and the pool stays free for everything else.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;

use super::ApiError;
use crate::store::StoreError;

/// Loads the values of many keys in one query; keys without a value are absent.
type LoadMany<K, V> =
    Box<dyn Fn(Vec<K>) -> BoxFuture<'static, Result<HashMap<K, V>, StoreError>> + Send + Sync>;

#[derive(Clone, Debug, thiserror::Error)]
pub enum BatchError {
    #[error("a batched lookup failed")]
    Failed(#[source] Arc<StoreError>),
    /// The task running the batch ended without answering (it panicked).
    #[error("a batched lookup was abandoned")]
    Abandoned,
}

impl From<BatchError> for ApiError {
    fn from(err: BatchError) -> ApiError {
        ApiError::Unavailable(Box::new(err))
    }
}

type Answer<V> = oneshot::Sender<Result<Option<V>, BatchError>>;

/// Coalesces lookups of single keys into queries for many: at most one query runs at a
/// time, for up to `max_batch` keys, and every caller waiting for a key gets its answer.
/// Clones share their batches.
pub struct BatchLoader<K, V>(Arc<Loader<K, V>>);

impl<K, V> Clone for BatchLoader<K, V> {
    fn clone(&self) -> Self {
        BatchLoader(self.0.clone())
    }
}

struct Loader<K, V> {
    load_many: LoadMany<K, V>,
    max_batch: usize,
    /// Counts the queries made.
    queries: Counter,
    pending: Mutex<Pending<K, V>>,
}

struct Pending<K, V> {
    waiting: HashMap<K, Vec<Answer<V>>>,
    /// Whether a task is draining `waiting`.
    draining: bool,
}

impl<K, V> BatchLoader<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    /// Loads with `load_many`, up to `max_batch` keys a query, counting each in `queries`.
    pub fn new<F, Fut>(max_batch: usize, queries: Counter, load_many: F) -> BatchLoader<K, V>
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, StoreError>> + Send + 'static,
    {
        BatchLoader(Arc::new(Loader {
            load_many: Box::new(move |keys| load_many(keys).boxed()),
            max_batch: max_batch.max(1),
            queries,
            pending: Mutex::new(Pending {
                waiting: HashMap::new(),
                draining: false,
            }),
        }))
    }

    /// The value of `key` (`None` when it has none), from the next batch. The batch runs
    /// on a task of its own, so a caller that gives up does not stall the others.
    pub async fn load(&self, key: K) -> Result<Option<V>, BatchError> {
        let (answer, answered) = oneshot::channel();
        let start_draining = {
            let mut pending = super::lock(&self.0.pending);
            pending.waiting.entry(key).or_default().push(answer);
            !std::mem::replace(&mut pending.draining, true)
        };
        if start_draining {
            tokio::spawn(self.0.clone().drain());
        }
        answered.await.unwrap_or(Err(BatchError::Abandoned))
    }

    #[cfg(test)]
    fn is_draining(&self) -> bool {
        super::lock(&self.0.pending).draining
    }
}

impl<K, V> Loader<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    async fn drain(self: Arc<Self>) {
        let mut guard = DrainGuard {
            loader: &self,
            finished: false,
        };
        loop {
            let batch = {
                let mut pending = super::lock(&self.pending);
                if pending.waiting.is_empty() {
                    pending.draining = false;
                    guard.finished = true;
                    return;
                }
                take_batch(&mut pending.waiting, self.max_batch)
            };
            let keys = batch.iter().map(|(key, _)| key.clone()).collect();
            self.queries.inc();
            match (self.load_many)(keys).await {
                Ok(mut found) => {
                    for (key, answers) in batch {
                        let value = found.remove(&key);
                        for answer in answers {
                            let _ = answer.send(Ok(value.clone()));
                        }
                    }
                }
                Err(err) => {
                    let err = BatchError::Failed(Arc::new(err));
                    for answer in batch.into_iter().flat_map(|(_, answers)| answers) {
                        let _ = answer.send(Err(err.clone()));
                    }
                }
            }
        }
    }
}

/// Up to `max` waiting keys with their callers, taken out of `waiting`.
fn take_batch<K: Eq + Hash + Clone, A>(
    waiting: &mut HashMap<K, Vec<A>>,
    max: usize,
) -> Vec<(K, Vec<A>)> {
    if waiting.len() <= max {
        return waiting.drain().collect();
    }
    let keys: Vec<K> = waiting.keys().take(max).cloned().collect();
    keys.into_iter()
        .filter_map(|key| waiting.remove_entry(&key))
        .collect()
}

/// Should the draining task end without finishing (a panic in a query), its callers are
/// answered [`BatchError::Abandoned`] (their senders drop) and the next caller starts a
/// new task, instead of every later lookup waiting for a task that is gone.
struct DrainGuard<'a, K, V> {
    loader: &'a Loader<K, V>,
    finished: bool,
}

impl<K, V> Drop for DrainGuard<'_, K, V> {
    fn drop(&mut self) {
        if !self.finished {
            let mut pending = super::lock(&self.loader.pending);
            pending.waiting.clear();
            pending.draining = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A loader that knows even numbers, records each batch it was asked, and takes
    /// `delay` per query.
    fn evens(delay: Duration, batches: Arc<Mutex<Vec<Vec<u32>>>>) -> BatchLoader<u32, u32> {
        BatchLoader::new(3, Counter::default(), move |keys: Vec<u32>| {
            let batches = batches.clone();
            async move {
                tokio::time::sleep(delay).await;
                let mut sorted = keys.clone();
                sorted.sort_unstable();
                batches.lock().unwrap().push(sorted);
                if keys.contains(&13) {
                    return Err(StoreError::not_found("13"));
                }
                Ok(keys
                    .into_iter()
                    .filter(|k| k % 2 == 0)
                    .map(|k| (k, k * 10))
                    .collect())
            }
        })
    }

    #[tokio::test]
    async fn a_burst_is_answered_by_few_queries_each_caller_with_its_own_value() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let loader = evens(Duration::from_millis(50), batches.clone());
        let first = tokio::spawn({
            let loader = loader.clone();
            async move { loader.load(2).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Asked while the first query runs: gathered into the next ones, three at a time;
        // 4 twice is one key.
        let keys = [1, 4, 4, 6, 8];
        let answers = futures::future::join_all(keys.iter().map(|key| loader.load(*key))).await;
        assert_eq!(first.await.unwrap().unwrap(), Some(20));
        let answers: Vec<Option<u32>> = answers.into_iter().map(Result::unwrap).collect();
        assert_eq!(answers, [None, Some(40), Some(40), Some(60), Some(80)]);
        let batches = batches.lock().unwrap().clone();
        assert_eq!(batches[0], [2]);
        assert_eq!(batches.len(), 3, "{batches:?}");
        assert_eq!(batches[1].len() + batches[2].len(), 4, "{batches:?}");
        assert!(!loader.is_draining());
    }

    #[tokio::test]
    async fn a_failed_query_fails_its_batch_only_and_the_next_caller_is_served() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let loader = evens(Duration::ZERO, batches);
        assert!(matches!(loader.load(13).await, Err(BatchError::Failed(_))));
        assert_eq!(loader.load(2).await.unwrap(), Some(20));
    }

    #[tokio::test]
    async fn a_panicking_query_abandons_its_callers_without_stalling_later_ones() {
        let calls = Arc::new(AtomicUsize::new(0));
        let queries = Counter::default();
        let loader = BatchLoader::<u32, u32>::new(10, queries.clone(), {
            let calls = calls.clone();
            move |keys: Vec<u32>| {
                let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    assert!(!first, "the first query fails hard");
                    Ok(keys.into_iter().map(|k| (k, k)).collect())
                }
            }
        });
        assert!(matches!(loader.load(1).await, Err(BatchError::Abandoned)));
        assert_eq!(loader.load(1).await.unwrap(), Some(1));
        assert_eq!(queries.get(), 2);
    }
}
