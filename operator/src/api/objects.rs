//! Response bodies of deployment objects, serialised once and shared.
//!
//! Deployment objects are immutable (the database refuses updates of their content), so
//! after a push every targeted agent can be answered from one buffer. Without this, a
//! herd of 10,000 agents fetching a 16 KiB object held 10,000 copies of the row and of
//! its JSON at once. Concurrent first requests for an object wait for one load.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use tokio::sync::OnceCell;
use uuid::Uuid;

/// A deployment object as the API answers it.
#[derive(Clone, Debug)]
pub struct CachedObject {
    pub stack_id: Uuid,
    /// The JSON response body.
    pub body: Bytes,
}

type Cell = Arc<OnceCell<CachedObject>>;

#[derive(Default)]
struct Objects {
    cells: HashMap<Uuid, Cell>,
    /// Loaded ids, oldest first: evicted in that order.
    loaded: VecDeque<Uuid>,
    bytes: usize,
}

pub struct ObjectCache {
    max_bytes: usize,
    inner: Mutex<Objects>,
}

impl ObjectCache {
    pub fn new(max_bytes: usize) -> ObjectCache {
        ObjectCache {
            max_bytes,
            inner: Mutex::new(Objects::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Objects> {
        super::lock(&self.inner)
    }

    /// The object `id`, from the cache or from `load` (run by one caller at a time).
    /// `None` when `load` finds nothing, which is not cached: a later request asks again.
    pub async fn get_or_load<F, Fut, E>(&self, id: Uuid, load: F) -> Result<Option<CachedObject>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<CachedObject>, E>>,
    {
        enum Unloaded<E> {
            Missing,
            Failed(E),
        }
        let cell = self.lock().cells.entry(id).or_default().clone();
        let mut loaded_here = false;
        let loaded = cell
            .get_or_try_init(|| async {
                let object = load().await.map_err(Unloaded::Failed)?;
                loaded_here = object.is_some();
                object.ok_or(Unloaded::Missing)
            })
            .await
            .cloned();
        match loaded {
            Ok(object) => {
                if loaded_here {
                    self.admit(id, object.body.len());
                }
                Ok(Some(object))
            }
            Err(unloaded) => {
                let mut objects = self.lock();
                if objects.cells.get(&id).is_some_and(|c| !c.initialized()) {
                    objects.cells.remove(&id);
                }
                match unloaded {
                    Unloaded::Missing => Ok(None),
                    Unloaded::Failed(err) => Err(err),
                }
            }
        }
    }

    fn admit(&self, id: Uuid, size: usize) {
        let mut objects = self.lock();
        objects.loaded.push_back(id);
        objects.bytes += size;
        while objects.bytes > self.max_bytes {
            let Some(oldest) = objects.loaded.pop_front() else {
                break;
            };
            if let Some(cell) = objects.cells.remove(&oldest) {
                objects.bytes -= cell.get().map_or(0, |o| o.body.len());
            }
        }
    }

    #[cfg(test)]
    fn cached_bytes(&self) -> usize {
        self.lock().bytes
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
