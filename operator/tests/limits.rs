//! The agent API's serving limits against a real PostgreSQL, over real sockets where
//! timing and connections matter: header-read and idle timeouts, the connection cap,
//! per-key rate limits, and unknown keys that must not each cost a database query.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use brokkr_crds::wire::DesiredState;
use brokkr_operator::api::{self, ApiConfig, ApiState, ChangeFeed, RateLimit, ServeLimits};
use brokkr_operator::keys::issue_key;
use brokkr_operator::metrics::Metrics;
use brokkr_operator::store::{AgentKey, AgentSync, Store};
use brokkr_testdb::TestDb;
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;
use uuid::Uuid;

mod common;
use common::{agent_with_key, generator_row, targeted_stack};

struct Fixture {
    _db: TestDb,
    store: Store,
    app: Router,
    metrics: Metrics,
    key: String,
}

impl Fixture {
    async fn new(config: ApiConfig) -> Fixture {
        let db = TestDb::new().await;
        let store = Store::new(db.conn().clone());
        let changes = ChangeFeed::default();
        tokio::spawn(changes.clone().listen(db.url().to_owned(), store.clone()));
        let (_, key) = agent_with_key(&store, "edge-1").await;
        let metrics = Metrics::default();
        let app = api::app(
            ApiState::new(store.clone(), changes, config).with_metrics(metrics.api.clone()),
        );
        // Give the notification listener a moment to subscribe.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Fixture {
            _db: db,
            store,
            app,
            metrics,
            key,
        }
    }

    /// Serves the app on 127.0.0.1 within `limits` until the test ends.
    async fn serve(&self, limits: ServeLimits) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(api::serve(
            listener,
            self.app.clone(),
            None,
            limits,
            self.metrics.api.clone(),
            std::future::pending(),
        ));
        addr
    }

    async fn call_as(&self, key: &str, uri: &str) -> (StatusCode, Option<String>, Value) {
        let request = Request::get(uri)
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, retry_after, body)
    }

    async fn cursor(&self) -> String {
        let (status, _, body) = self.call_as(&self.key, "/api/v1/agent/desired").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value::<DesiredState>(body).unwrap().cursor
    }

    /// A value of the hub's `/metrics`, by the start of its line.
    fn metric(&self, line: &str) -> f64 {
        self.metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

const LIMITS: ServeLimits = ServeLimits {
    header_read_timeout: Duration::from_secs(1),
    idle_timeout: Duration::from_secs(3),
    max_connections: 100,
    grace: Duration::from_secs(1),
};

#[tokio::test]
async fn a_stopping_hub_answers_its_parked_long_polls_at_once_instead_of_after_the_grace_period() {
    let f = Fixture::new(ApiConfig::default()).await;
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let changes = ChangeFeed::default();
    let app = api::app(
        ApiState::new(f.store.clone(), changes, ApiConfig::default()).with_shutdown(stopping),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut stopped = stop.subscribe();
    let server = tokio::spawn(api::serve(
        listener,
        app,
        None,
        ServeLimits {
            grace: Duration::from_secs(10),
            ..LIMITS
        },
        f.metrics.api.clone(),
        async move {
            let _ = stopped.wait_for(|stopped| *stopped).await;
        },
    ));
    let cursor = f.cursor().await;
    let mut parked = TcpStream::connect(addr).await.unwrap();
    let long_poll = format!("/api/v1/agent/desired?since={cursor}&wait=30");
    send_get(&mut parked, &long_poll, &f.key).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let stopping_at = Instant::now();
    stop.send(true).unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(2), read_response(&mut parked))
        .await
        .expect("answered at once")
        .expect("answered, not cut");
    assert_eq!(status, 200);
    let state: DesiredState = serde_json::from_str(&body).unwrap();
    assert_eq!(
        state.cursor, cursor,
        "nothing changed: the agent asks again"
    );
    tokio::time::timeout(Duration::from_secs(3), server)
        .await
        .expect("serve returns without waiting out the grace period")
        .unwrap();
    assert!(stopping_at.elapsed() < Duration::from_secs(3));
}

async fn send_get(stream: &mut TcpStream, path: &str, key: &str) {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {key}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
}

/// Reads one HTTP/1.1 response (with Content-Length): its status and body; `None` when
/// the connection closes first.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_string();
            let status = head.split(' ').nth(1)?.parse().ok()?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&buffer[end + 4..end + 4 + length]);
                return Some((status, body.to_string()));
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// How long until the server closes `stream`, reading (and discarding) what it sends;
/// `None` if it is still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

#[tokio::test]
async fn a_client_sending_its_headers_slowly_is_cut_after_the_header_timeout() {
    let f = Fixture::new(ApiConfig::default()).await;
    let addr = f.serve(LIMITS).await;

    // One header line every 300 ms: the head would take 3 s, the timeout is 1 s. The idle
    // timeout (3 s) must not be what applies to a request that has started.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /api/v1/agent/desired HTTP/1.1\r\n")
        .await
        .unwrap();
    let (mut reader, mut writer) = slow.split();
    let trickle = async {
        for i in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if writer
                .write_all(format!("X-Slow-{i}: x\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let started = Instant::now();
    let closed = async {
        let mut chunk = [0u8; 1024];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    };
    let (closed_after, ()) = tokio::join!(closed, trickle);
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_millis(2500),
        "a slow head was closed after {closed_after:?}, expected ~1 s"
    );

    // A connection that sends nothing at all owes its first head as well.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let closed_after = closed_within(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent connection is closed");
    assert!(
        closed_after < Duration::from_millis(2500),
        "{closed_after:?}"
    );
    assert_eq!(
        f.metric("brokkr_operator_api_connections_closed_total{reason=\"header_timeout\"}"),
        2.0
    );

    // A head larger than the connection's buffer is refused, not buffered.
    let mut huge = TcpStream::connect(addr).await.unwrap();
    let padding = "x".repeat(32 * 1024);
    let head =
        format!("GET /api/v1/agent/desired HTTP/1.1\r\nHost: hub\r\nX-Pad: {padding}\r\n\r\n");
    let _ = huge.write_all(head.as_bytes()).await;
    let (status, _) = read_response(&mut huge).await.expect("an answer");
    assert_eq!(status, 431);

    // A prompt client is served as ever.
    let mut prompt = TcpStream::connect(addr).await.unwrap();
    send_get(&mut prompt, "/api/v1/agent/desired", &f.key).await;
    let (status, body) = read_response(&mut prompt).await.expect("an answer");
    assert_eq!(status, 200, "{body}");

    // Bodies far larger than the connection's buffer still stream through.
    let big =
        serde_json::json!({"version": "1.0.0", "state": "Ready", "pad": "x".repeat(900 * 1024)});
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/agent/heartbeat"))
        .bearer_auth(&f.key)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
}

#[tokio::test]
async fn a_long_poll_outlasts_both_timeouts_and_an_idle_connection_is_closed_after_the_idle_timeout()
 {
    let f = Fixture::new(ApiConfig::default()).await;
    let addr = f.serve(LIMITS).await;
    let cursor = f.cursor().await;

    let mut stream = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    send_get(
        &mut stream,
        &format!("/api/v1/agent/desired?since={cursor}&wait=4"),
        &f.key,
    )
    .await;
    let (status, body) = read_response(&mut stream)
        .await
        .expect("the long-poll is answered, not cut");
    let answered = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(
        answered >= Duration::from_millis(3900),
        "the long-poll returned after {answered:?}, before its wait"
    );

    // Kept alive: a second request on the same connection is served...
    send_get(&mut stream, "/api/v1/agent/desired", &f.key).await;
    let (status, _) = read_response(&mut stream).await.expect("kept alive");
    assert_eq!(status, 200);
    // ...and then, with nothing more to do, it is closed after the idle timeout (3 s), not
    // after the header timeout (1 s).
    let closed_after = closed_within(&mut stream, Duration::from_secs(10))
        .await
        .expect("an idle connection is closed");
    assert!(
        closed_after >= Duration::from_millis(2500) && closed_after < Duration::from_secs(6),
        "an idle connection was closed after {closed_after:?}, expected ~3 s"
    );
    assert_eq!(
        f.metric("brokkr_operator_api_connections_closed_total{reason=\"idle_timeout\"}"),
        1.0
    );
    assert_eq!(
        f.metric("brokkr_operator_api_connections_closed_total{reason=\"header_timeout\"}"),
        0.0
    );
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let f = Fixture::new(ApiConfig::default()).await;
    let addr = f
        .serve(ServeLimits {
            max_connections: 2,
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(30),
            ..LIMITS
        })
        .await;
    let cursor = f.cursor().await;
    let long_poll = |wait: u64| format!("/api/v1/agent/desired?since={cursor}&wait={wait}");

    let started = Instant::now();
    let mut first = TcpStream::connect(addr).await.unwrap();
    send_get(&mut first, &long_poll(2), &f.key).await;
    let mut second = TcpStream::connect(addr).await.unwrap();
    send_get(&mut second, &long_poll(20), &f.key).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The third connection is accepted by the kernel, but the hub does not serve it while
    // two are open, although its request is a quick one.
    let mut third = TcpStream::connect(addr).await.unwrap();
    send_get(&mut third, "/api/v1/agent/desired", &f.key).await;
    let early = tokio::time::timeout(Duration::from_millis(1200), read_response(&mut third)).await;
    assert!(early.is_err(), "served past the cap: {early:?}");
    assert_eq!(f.metric("brokkr_operator_api_connections "), 2.0);
    assert!(f.metric("brokkr_operator_api_connection_cap_reached_total") >= 1.0);

    // The first long-poll ends; its client closes the connection, which frees a place.
    let (status, _) = read_response(&mut first).await.expect("first long-poll");
    assert_eq!(status, 200);
    drop(first);
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), read_response(&mut third))
        .await
        .expect("served once a place is free")
        .expect("an answer");
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    drop(second);
}

#[tokio::test]
async fn one_key_over_its_rate_gets_429_with_retry_after_while_another_key_is_served() {
    let f = Fixture::new(ApiConfig {
        key_rate: RateLimit::new(0.5, 3),
        ..ApiConfig::default()
    })
    .await;
    let (_, other) = agent_with_key(&f.store, "edge-2").await;
    let uri = "/api/v1/agent/desired";

    // Someone knowing the public prefix, without the secret, cannot spend the budget.
    let prefix = brokkr_operator::keys::key_prefix(&f.key).unwrap();
    let forged = format!("brokkr_{prefix}_{}", "x".repeat(40));
    for _ in 0..10 {
        let (status, _, _) = f.call_as(&forged, uri).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    for _ in 0..3 {
        let (status, _, body) = f.call_as(&f.key, uri).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, retry_after, body) = f.call_as(&f.key, uri).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"], "too_many_requests");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    // One token per 2 s.
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");

    // Every endpoint shares the key's budget.
    let (status, _, _) = f
        .call_as(
            &f.key,
            &format!("/api/v1/agent/deployment-objects/{}", Uuid::nil()),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    let (status, _, body) = f.call_as(&other, uri).await;
    assert_eq!(status, StatusCode::OK, "another key is unaffected: {body}");
    assert_eq!(
        f.metric("brokkr_operator_api_requests_limited_total{reason=\"key_rate\"}"),
        2.0
    );
}

#[tokio::test]
async fn a_fleet_reconnecting_at_once_is_looked_up_in_a_few_queries_each_agent_getting_its_own_state()
 {
    let f = Fixture::new(ApiConfig::default()).await;
    let generator = generator_row(&f.store, "ns/ci").await;
    const AGENTS: usize = 200;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        agents.push(agent_with_key(&f.store, &format!("edge-{i:03}")).await);
    }
    // Stack i is targeted at every fourth agent from agent i.
    let mut stacks = Vec::new();
    for i in 0..4 {
        let yaml = format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app-{i}\n");
        let targets: BTreeSet<Uuid> = agents.iter().skip(i).step_by(4).map(|a| a.0).collect();
        let name = format!("ns/app-{i}");
        stacks.push(targeted_stack(&f.store, generator, &name, &yaml, &targets).await);
    }
    let metric = |lookup: &str| {
        f.metric(&format!(
            "brokkr_operator_api_lookup_queries_total{{lookup=\"{lookup}\"}}"
        ))
    };
    let before = (metric("keys"), metric("desired_states"));

    let uri = "/api/v1/agent/desired";
    let answers =
        futures::future::join_all(agents.iter().map(|(_, key)| f.call_as(key, uri))).await;
    for (i, (status, _, body)) in answers.into_iter().enumerate() {
        assert_eq!(status, StatusCode::OK, "agent {i}: {body}");
        let state: DesiredState = serde_json::from_value(body).unwrap();
        let held: Vec<Uuid> = state.stacks.iter().map(|s| s.stack_id).collect();
        assert_eq!(held, [stacks[i % 4]], "agent {i}");
    }
    let queries = (
        metric("keys") - before.0,
        metric("desired_states") - before.1,
    );
    // One query per agent each, before batching.
    assert!(
        queries.0 >= 1.0 && queries.0 <= 10.0 && queries.1 >= 1.0 && queries.1 <= 10.0,
        "{AGENTS} agents cost {} key and {} desired-state queries",
        queries.0,
        queries.1
    );
}

#[tokio::test]
async fn a_flood_of_unknown_keys_costs_a_bounded_number_of_queries_and_known_agents_are_served() {
    let f = Fixture::new(ApiConfig {
        unknown_key_rate: RateLimit::new(1.0, 5),
        ..ApiConfig::default()
    })
    .await;
    let uri = "/api/v1/agent/desired";
    // A known agent, cached before the flood.
    assert_eq!(f.call_as(&f.key, uri).await.0, StatusCode::OK);
    let queries_before = f.metric("brokkr_operator_api_lookup_queries_total{lookup=\"keys\"}");

    let started = Instant::now();
    let flood = (0..300).map(|_| {
        let made_up = issue_key().key;
        let f = &f;
        async move { f.call_as(&made_up, uri).await }
    });
    let answers = futures::future::join_all(flood).await;
    let elapsed = started.elapsed();
    let count = |code| answers.iter().filter(|a| a.0 == code).count();
    let (unauthorized, limited) = (
        count(StatusCode::UNAUTHORIZED),
        count(StatusCode::TOO_MANY_REQUESTS),
    );
    assert_eq!(unauthorized + limited, 300, "only 401 and 429");
    for (status, retry_after, body) in &answers {
        if *status == StatusCode::TOO_MANY_REQUESTS {
            assert!(retry_after.is_some(), "429 without Retry-After: {body}");
            assert_eq!(body["error"], "too_many_requests");
        }
    }
    // Queries: the unknown prefixes asked for before the first answers drained the bucket
    // share a batch or two; after that only the refill (1/s) reaches the database.
    let queries =
        f.metric("brokkr_operator_api_lookup_queries_total{lookup=\"keys\"}") - queries_before;
    let bound = 2.0 + elapsed.as_secs_f64().ceil() + 1.0;
    assert!(
        queries >= 1.0 && queries <= bound,
        "{queries} queries for 300 unknown keys in {elapsed:?}, expected at most {bound}"
    );
    let lookups = f.metric("brokkr_operator_api_key_lookups_total{result=\"unknown\"}");
    assert_eq!(unauthorized as f64, lookups);
    assert_eq!(
        f.metric("brokkr_operator_api_requests_limited_total{reason=\"unknown_keys\"}"),
        limited as f64
    );
    // The known agent is served throughout.
    assert_eq!(f.call_as(&f.key, uri).await.0, StatusCode::OK);

    // The same unknown key again and again is one query, then answered from the cache.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let made_up = issue_key().key;
    let before = f.metric("brokkr_operator_api_key_lookups_total{result=\"unknown\"}");
    for _ in 0..50 {
        assert_eq!(f.call_as(&made_up, uri).await.0, StatusCode::UNAUTHORIZED);
    }
    let after = f.metric("brokkr_operator_api_key_lookups_total{result=\"unknown\"}");
    assert_eq!(after - before, 1.0);
    assert_eq!(
        f.metric("brokkr_operator_api_unknown_keys_cached_total"),
        49.0
    );

    // A key issued after its prefix was cached as unknown works at once: any key change
    // drops those entries (they would otherwise last 30 s).
    let prefix = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let late_key = format!("brokkr_{prefix}_{}", "z".repeat(40));
    assert_eq!(f.call_as(&late_key, uri).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(f.call_as(&late_key, uri).await.0, StatusCode::UNAUTHORIZED);
    let late = f
        .store
        .sync_agent(&AgentSync {
            resource_uid: Uuid::new_v4(),
            name: "edge-late",
            cluster_name: "edge",
            is_suspended: false,
            labels: &[],
            annotations: &BTreeMap::new(),
        })
        .await
        .unwrap();
    f.store
        .set_agent_key(
            late.id,
            &AgentKey {
                prefix,
                hash: brokkr_operator::keys::hash_key(&late_key),
            },
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.call_as(&late_key, uri).await.0 != StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "a new key is still refused as unknown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn tls_is_served_within_the_same_limits() {
    let f = Fixture::new(ApiConfig::default()).await;
    let dir = std::env::temp_dir().join(format!("brokkr-tls-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl makes the test certificate");
    assert!(made.status.success(), "{made:?}");

    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(api::serve(
        listener,
        f.app.clone(),
        Some(config),
        LIMITS,
        f.metrics.api.clone(),
        std::future::pending(),
    ));

    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let response = client
        .get(format!(
            "https://127.0.0.1:{}/api/v1/agent/desired",
            addr.port()
        ))
        .bearer_auth(&f.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);

    // Only HTTP/1.1 is offered: a client that would prefer h2 gets HTTP/1.1, not a
    // protocol the server would then fail to speak.
    let handshake = tokio::process::Command::new("openssl")
        .args(["s_client", "-alpn", "h2,http/1.1", "-connect"])
        .arg(addr.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("openssl s_client");
    let printed = String::from_utf8_lossy(&handshake.stdout);
    assert!(
        printed.contains("ALPN protocol: http/1.1"),
        "{printed}\n{}",
        String::from_utf8_lossy(&handshake.stderr)
    );

    // A client that never completes the handshake is closed after the header timeout.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    let closed_after = closed_within(&mut stalled, Duration::from_secs(5))
        .await
        .expect("a stalled handshake is closed");
    assert!(
        closed_after < Duration::from_millis(2500),
        "{closed_after:?}"
    );
    assert_eq!(
        f.metric("brokkr_operator_api_connections_closed_total{reason=\"tls_handshake\"}"),
        1.0
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn with_the_default_limits_a_busy_fleet_is_never_limited_or_cut() {
    let f = Fixture::new(ApiConfig::default()).await;
    let addr = f.serve(ServeLimits::default()).await;
    let cursor = f.cursor().await;
    let mut keys = vec![f.key.clone()];
    for i in 1..40 {
        keys.push(agent_with_key(&f.store, &format!("fleet-{i}")).await.1);
    }
    // Each agent long-polls and sends a heartbeat every 250 ms: sixty times the heartbeats of
    // the default 15 s interval.
    let client = reqwest::Client::new();
    let base = format!("http://{addr}/api/v1/agent");
    let agents = keys.iter().map(|key| {
        let (client, base, cursor) = (client.clone(), base.clone(), cursor.clone());
        async move {
            let poll = client
                .get(format!("{base}/desired?since={cursor}&wait=3"))
                .bearer_auth(key)
                .send();
            let beats = async {
                let mut statuses = Vec::new();
                for _ in 0..12 {
                    let response = client
                        .post(format!("{base}/heartbeat"))
                        .bearer_auth(key)
                        .json(&serde_json::json!({"version": "1.0.0", "state": "Ready"}))
                        .send()
                        .await
                        .unwrap();
                    statuses.push(response.status().as_u16());
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                statuses
            };
            let (poll, mut statuses) = tokio::join!(poll, beats);
            statuses.push(poll.unwrap().status().as_u16());
            statuses
        }
    });
    let statuses: Vec<u16> = futures::future::join_all(agents)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(statuses.len(), 40 * 13);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let rendered = f.metrics.render();
    assert!(
        !rendered.contains("api_requests_limited_total{"),
        "{rendered}"
    );
    assert!(
        !rendered.contains("api_connections_closed_total{"),
        "{rendered}"
    );
}

#[tokio::test]
async fn on_shutdown_requests_in_flight_finish_within_the_grace_period_and_the_rest_are_closed() {
    let f = Fixture::new(ApiConfig::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(
        listener,
        f.app.clone(),
        None,
        ServeLimits {
            grace: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(60),
            ..LIMITS
        },
        f.metrics.api.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let cursor = f.cursor().await;
    let long_poll = |wait: u64| format!("/api/v1/agent/desired?since={cursor}&wait={wait}");

    // An idle keep-alive connection, a long-poll that ends within the grace period and one
    // that would not.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    send_get(&mut idle, "/api/v1/agent/desired", &f.key).await;
    assert_eq!(read_response(&mut idle).await.unwrap().0, 200);
    let mut short = TcpStream::connect(addr).await.unwrap();
    send_get(&mut short, &long_poll(2), &f.key).await;
    let mut long = TcpStream::connect(addr).await.unwrap();
    send_get(&mut long, &long_poll(30), &f.key).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let stopping = Instant::now();
    stop.send(()).unwrap();
    let idle_closed = closed_within(&mut idle, Duration::from_secs(2)).await;
    assert!(
        idle_closed.is_some(),
        "an idle connection is closed at once"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no new connections"
    );
    let (status, _) = read_response(&mut short)
        .await
        .expect("the short long-poll is answered");
    assert_eq!(status, 200);
    assert!(
        read_response(&mut long).await.is_none(),
        "cut at the end of the grace period"
    );
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns after the grace period")
        .unwrap();
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}
