//! A webhook receiver on 127.0.0.1 for alert notifications: records every request (headers
//! and raw body) and answers 200. The hub runs as a local process in every setup (kubesim
//! or a real cluster), so it can reach it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bench::BenchError;
use crate::fleet::{FleetResult, wait_for};

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Delivery {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub struct WebhookReceiver {
    pub url: String,
    received: Arc<Mutex<Vec<Delivery>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start() -> FleetResult<WebhookReceiver> {
        let received: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let record = received.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let record = record.clone();
                    async move {
                        let headers = headers
                            .iter()
                            .map(|(name, value)| {
                                let value = value.to_str().unwrap_or_default().to_owned();
                                (name.as_str().to_owned(), value)
                            })
                            .collect();
                        lock(&record).push(Delivery {
                            headers,
                            body: body.to_vec(),
                        });
                        "ok"
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| BenchError::Io {
                what: "bind the webhook receiver".into(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| BenchError::Io {
            what: "read the webhook receiver's address".into(),
            source,
        })?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(WebhookReceiver {
            url: format!("http://{addr}/hook"),
            received,
            task,
        })
    }

    /// Every request so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        lock(&self.received).clone()
    }

    /// Waits until `count` requests arrived.
    pub async fn wait_for(&self, count: usize, within: Duration) -> FleetResult<Vec<Delivery>> {
        wait_for(
            within,
            &format!("{count} webhook notifications"),
            || async {
                let all = self.deliveries();
                (all.len() >= count).then_some(all)
            },
        )
        .await
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
