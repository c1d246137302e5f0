//! Response bodies of deployment objects, serialised once and shared.
//!
//! Deployment objects are immutable (the database refuses updates of their content), so
//! after a push every targeted agent can be answered from one buffer. Without this, a
//! herd of 10,000 agents fetching a 16 KiB object held 10,000 copies of the row and of
//! its JSON at once. Concurrent first requests for an object wait for one load.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use moka::future::Cache;
use moka::policy::EvictionPolicy;
use uuid::Uuid;

/// A deployment object as the API answers it.
#[derive(Clone, Debug)]
pub struct CachedObject {
    pub stack_id: Uuid,
    /// The JSON response body.
    pub body: Bytes,
}

/// Deployment objects by id, bounded by the bytes of their bodies; the least recently
/// used go first.
pub struct ObjectCache {
    objects: Cache<Uuid, CachedObject>,
}

/// Why a load left nothing in the cache.
enum Unloaded<E> {
    Missing,
    Failed(Arc<E>),
}

impl ObjectCache {
    pub fn new(max_bytes: usize) -> ObjectCache {
        let objects = Cache::builder()
            .max_capacity(u64::try_from(max_bytes).unwrap_or(u64::MAX))
            .weigher(|_: &Uuid, object: &CachedObject| {
                u32::try_from(object.body.len()).unwrap_or(u32::MAX)
            })
            .eviction_policy(EvictionPolicy::lru())
            .build();
        ObjectCache { objects }
    }

    /// The object `id`, from the cache or from `load` (run once for concurrent callers,
    /// who all get its result). `None` when `load` finds nothing, which is not cached: a
    /// later request asks again. A failed load is not cached either.
    pub async fn get_or_load<F, Fut, E>(
        &self,
        id: Uuid,
        load: F,
    ) -> Result<Option<CachedObject>, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<CachedObject>, E>>,
        E: Send + Sync + 'static,
    {
        let mut loaded_here = false;
        let loaded = self
            .objects
            .try_get_with(id, async {
                match load().await {
                    Ok(Some(object)) => {
                        loaded_here = true;
                        Ok(object)
                    }
                    Ok(None) => Err(Unloaded::Missing),
                    Err(err) => Err(Unloaded::Failed(Arc::new(err))),
                }
            })
            .await;
        if loaded_here {
            // Evict now rather than on a later request, so the bound holds at once.
            self.objects.run_pending_tasks().await;
        }
        match loaded {
            Ok(object) => Ok(Some(object)),
            // Every caller that waited for the load gets its outcome.
            Err(unloaded) => match &*unloaded {
                Unloaded::Missing => Ok(None),
                Unloaded::Failed(err) => Err(err.clone()),
            },
        }
    }

    #[cfg(test)]
    fn cached_bytes(&self) -> usize {
        usize::try_from(self.objects.weighted_size()).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Debug, PartialEq)]
    struct LoadFailed;

    fn object(size: usize) -> CachedObject {
        CachedObject {
            stack_id: Uuid::nil(),
            body: Bytes::from(vec![b'x'; size]),
        }
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_load_and_missing_objects_are_asked_again() {
        let cache = ObjectCache::new(1 << 20);
        let loads = AtomicUsize::new(0);
        let id = Uuid::now_v7();
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok::<_, LoadFailed>(Some(object(10)))
        };
        let results = futures::future::join_all((0..50).map(|_| cache.get_or_load(id, load))).await;
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().unwrap().as_ref().unwrap().body.len() == 10)
        );
        assert_eq!(loads.load(Ordering::SeqCst), 1);

        let missing = Uuid::now_v7();
        for _ in 0..2 {
            let found = cache
                .get_or_load(missing, || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, LoadFailed>(None)
                })
                .await;
            assert!(found.unwrap().is_none());
        }
        assert_eq!(loads.load(Ordering::SeqCst), 3);
        let failed = cache
            .get_or_load(missing, || async {
                Err::<Option<CachedObject>, _>(LoadFailed)
            })
            .await;
        assert!(failed.is_err(), "a failed load is reported, not cached");
    }

    #[tokio::test]
    async fn the_oldest_objects_are_evicted_beyond_the_size_bound() {
        let cache = ObjectCache::new(100);
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            cache
                .get_or_load(*id, || async { Ok::<_, LoadFailed>(Some(object(40))) })
                .await
                .unwrap();
        }
        assert_eq!(cache.cached_bytes(), 80);
        let loads = AtomicUsize::new(0);
        let reload = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, LoadFailed>(Some(object(40)))
        };
        cache.get_or_load(ids[4], reload).await.unwrap();
        assert_eq!(
            loads.load(Ordering::SeqCst),
            0,
            "the newest is still cached"
        );
        cache.get_or_load(ids[0], reload).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 1, "the oldest was evicted");
    }
}
