//! Simulated agents: lightweight clients that speak the real agent protocol over real
//! HTTP (long-poll or plain polling of the desired state, deployment-object fetches,
//! heartbeats, event batches) and apply nothing. One tokio task per agent (and one
//! for its heartbeats), sharing a few HTTP/1.1 keep-alive clients.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brokkr_agent::hub::AgentApi;
use brokkr_common::backoff;
use brokkr_crds::wire::{DesiredState, Health, Heartbeat, MAX_WAIT_SECONDS, StackSummary};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use uuid::Uuid;

use super::seed::SeededAgent;

/// Clients the agents share; each keeps its own connection pool.
const CLIENTS: usize = 4;
/// Most heartbeats in flight at once. Each agent's own requests are sequential, so a
/// fleet holds at most one connection per agent plus these: 10,000 agents fit the
/// 20,000 open files a process may have here. Heartbeats wait only when the hub is
/// already too slow to answer 2,000 of them at once.
pub const MAX_HEARTBEATS_IN_FLIGHT: usize = 2000;
/// Pause after a failed request before the agent tries again: the real agent's policy,
/// 1 s doubling to 60 s, half of it random.
fn retry_after(failures: u32) -> Duration {
    backoff::AGENT_HUB.jittered(failures)
}

/// The agent's own client of the hub's agent API, over the bench's transport: plain
/// HTTP/1.1 keep-alive, no proxy, shared by many simulated agents (each request carries its
/// agent's key). `base` is the hub's URL, e.g. `http://127.0.0.1:8080`.
pub fn hub_client(base: &str) -> AgentApi {
    let http = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .expect("a plain-HTTP client always builds");
    AgentApi::new(http, base)
}

/// How agents learn about new desired states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `GET desired?since=<cursor>&wait=60`, again as soon as it answers.
    LongPoll,
    /// `GET desired?since=<cursor>&wait=0` every interval, at a random phase.
    Poll(Duration),
}

impl Mode {
    pub fn describe(self) -> String {
        match self {
            Mode::LongPoll => "long-poll".to_owned(),
            Mode::Poll(every) => format!("poll every {} s", every.as_secs_f64()),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct FleetConfig {
    pub mode: Mode,
    /// Heartbeat interval, at a random phase per agent; `None` sends none.
    pub heartbeat: Option<Duration>,
    /// Agents start at random times within this window (long-poll mode; polling
    /// agents start at a random phase of their interval).
    pub ramp: Duration,
}

/// An agent holds a deployment object: it got a desired set naming it and fetched it.
#[derive(Clone, Copy, Debug)]
pub struct Hold {
    pub agent: usize,
    pub object: Uuid,
    /// When the desired-state request that named the object was sent.
    pub asked: Instant,
    /// When the desired set naming the object arrived.
    pub announced: Instant,
    /// When the object itself arrived.
    pub at: Instant,
}

/// Request counts of a fleet, for the notes of a measurement.
#[derive(Debug, Default)]
pub struct Counters {
    pub desired: AtomicU64,
    pub objects: AtomicU64,
    pub heartbeats: AtomicU64,
    pub errors: AtomicU64,
    recording: AtomicBool,
    desired_latencies: Mutex<Vec<Duration>>,
}

impl Counters {
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

/// Running simulated agents.
pub struct Fleet {
    tasks: JoinSet<()>,
    holds: mpsc::UnboundedReceiver<Hold>,
    agents: usize,
    pub counters: Arc<Counters>,
}

/// Who got an object, and how long after it was committed.
#[derive(Clone, Debug, Default)]
pub struct Delivery {
    /// Commit to object held, per agent.
    pub latencies: Vec<Duration>,
    /// Commit to the desired set naming the object, per agent (the first half of the
    /// latency; the rest is the object's fetch).
    pub announced: Vec<Duration>,
    /// From sending the desired-state request that named the object to its answer, per
    /// agent: the hub's own part, without any wait for a push or a retry.
    pub answered_in: Vec<Duration>,
    /// Agents that did not hold it before the timeout.
    pub missing: usize,
}

impl Fleet {
    pub fn start(hub_url: &str, agents: &[SeededAgent], config: FleetConfig) -> Fleet {
        let clients: Vec<AgentApi> = (0..CLIENTS).map(|_| hub_client(hub_url)).collect();
        let (sender, holds) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let in_flight = Arc::new(Semaphore::new(MAX_HEARTBEATS_IN_FLIGHT));
        let mut tasks = JoinSet::new();
        for (index, agent) in agents.iter().enumerate() {
            let hub = clients[index % CLIENTS].clone();
            let key: Arc<str> = agent.key.clone().into();
            if let Some(every) = config.heartbeat {
                tasks.spawn(heartbeats(
                    hub.clone(),
                    key.clone(),
                    every,
                    in_flight.clone(),
                    counters.clone(),
                ));
            }
            tasks.spawn(
                SimAgent {
                    index,
                    key,
                    hub,
                    config,
                    holds: sender.clone(),
                    counters: counters.clone(),
                }
                .run(),
            );
        }
        Fleet {
            tasks,
            holds,
            agents: agents.len(),
            counters,
        }
    }

    /// Waits until every agent holds every object of `objects`; `since` is when they
    /// were committed. Holds of other objects are dropped.
    pub async fn await_holds(
        &mut self,
        objects: &[Uuid],
        since: Instant,
        timeout: Duration,
    ) -> Delivery {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut holders: HashMap<Uuid, HashSet<usize>> =
            objects.iter().map(|id| (*id, HashSet::new())).collect();
        let wanted = self.agents * objects.len();
        let mut delivery = Delivery::default();
        while delivery.latencies.len() < wanted {
            let hold = tokio::select! {
                hold = self.holds.recv() => hold,
                _ = tokio::time::sleep_until(deadline) => None,
            };
            let Some(hold) = hold else { break };
            if let Some(agents) = holders.get_mut(&hold.object)
                && agents.insert(hold.agent)
            {
                delivery
                    .latencies
                    .push(hold.at.saturating_duration_since(since));
                delivery
                    .announced
                    .push(hold.announced.saturating_duration_since(since));
                delivery
                    .answered_in
                    .push(hold.announced.saturating_duration_since(hold.asked));
            }
        }
        delivery.missing = wanted - delivery.latencies.len();
        delivery
    }

    /// Starts or stops recording the latency of every desired-state call.
    pub fn record_desired_latencies(&self, on: bool) {
        self.counters.recording.store(on, Ordering::Relaxed);
    }

    pub fn take_desired_latencies(&self) -> Vec<Duration> {
        std::mem::take(
            &mut self
                .counters
                .desired_latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Stops every agent, dropping requests in flight.
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }
}

struct SimAgent {
    index: usize,
    key: Arc<str>,
    hub: AgentApi,
    config: FleetConfig,
    holds: mpsc::UnboundedSender<Hold>,
    counters: Arc<Counters>,
}

impl SimAgent {
    async fn run(self) {
        let start_within = match self.config.mode {
            Mode::LongPoll => self.config.ramp,
            Mode::Poll(every) => every,
        };
        tokio::time::sleep(start_within.mul_f64(rand::random::<f64>())).await;
        let mut next_poll = tokio::time::Instant::now();
        let mut cursor: Option<String> = None;
        let mut held: HashSet<Uuid> = HashSet::new();
        let mut failures = 0;
        loop {
            let wait = match self.config.mode {
                Mode::LongPoll => MAX_WAIT_SECONDS,
                Mode::Poll(_) => 0,
            };
            let asked = Instant::now();
            let desired = self
                .hub
                .desired(&self.key, cursor.as_deref(), Duration::from_secs(wait))
                .await;
            let answered = Instant::now();
            self.counters.desired.fetch_add(1, Ordering::Relaxed);
            match desired {
                Ok(state) => {
                    if matches!(self.config.mode, Mode::Poll(_)) {
                        self.record_latency(answered - asked);
                    }
                    match self.fetch_new(&state, &held, asked, answered).await {
                        Some(now_held) => {
                            held = now_held;
                            cursor = Some(state.cursor);
                            failures = 0;
                        }
                        // A fetch failed: ask again with the old cursor.
                        None => {
                            tokio::time::sleep(retry_after(failures)).await;
                            failures += 1;
                        }
                    }
                }
                Err(_) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(retry_after(failures)).await;
                    failures += 1;
                }
            }
            if let Mode::Poll(every) = self.config.mode {
                next_poll += every;
                let now = tokio::time::Instant::now();
                if next_poll < now {
                    // Slower than the interval: poll again at once, then keep the pace.
                    next_poll = now;
                }
                tokio::time::sleep_until(next_poll).await;
            }
        }
    }

    /// Fetches the objects of `state` not held yet and reports each; the objects now
    /// held, or `None` when a fetch failed.
    async fn fetch_new(
        &self,
        state: &DesiredState,
        held: &HashSet<Uuid>,
        asked: Instant,
        announced: Instant,
    ) -> Option<HashSet<Uuid>> {
        let mut now_held = HashSet::with_capacity(state.stacks.len());
        for stack in &state.stacks {
            let id = stack.deployment_object_id;
            if !held.contains(&id) && !stack.deletion {
                // As the agent does: an object carried in the answer is not fetched.
                let inline = stack
                    .object
                    .as_ref()
                    .is_some_and(|o| o.id == id && o.checksum == stack.checksum);
                if !inline {
                    let fetched = self.hub.deployment_object(&self.key, id).await;
                    self.counters.objects.fetch_add(1, Ordering::Relaxed);
                    if fetched.is_err() {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                }
                let _ = self.holds.send(Hold {
                    agent: self.index,
                    object: id,
                    asked,
                    announced,
                    at: Instant::now(),
                });
            }
            now_held.insert(id);
        }
        Some(now_held)
    }

    fn record_latency(&self, latency: Duration) {
        if self.counters.recording.load(Ordering::Relaxed) {
            self.counters
                .desired_latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(latency);
        }
    }
}

/// An agent's heartbeats: every `every`, from a random phase on.
async fn heartbeats(
    hub: AgentApi,
    key: Arc<str>,
    every: Duration,
    in_flight: Arc<Semaphore>,
    counters: Arc<Counters>,
) {
    let beat = Heartbeat {
        version: "bench".to_owned(),
        state: "Ready".to_owned(),
        message: None,
        stacks: vec![StackSummary {
            stack_id: Uuid::nil(),
            deployment_object_id: Uuid::nil(),
            health: Health::Healthy,
            objects: 4,
            failed: 0,
        }],
    };
    let mut next = tokio::time::Instant::now() + every.mul_f64(rand::random::<f64>());
    loop {
        tokio::time::sleep_until(next).await;
        next += every;
        let Ok(_permit) = in_flight.acquire().await else {
            return;
        };
        counters.heartbeats.fetch_add(1, Ordering::Relaxed);
        if hub.heartbeat(&key, &beat).await.is_err() {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}
