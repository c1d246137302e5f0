//! AlertRules, evaluated by the leader every few seconds against the Agents and Stacks it
//! watches: episodes fire and resolve in the database (with their notifications queued in
//! the same transaction), and each rule's status lists what fires.
//!
//! Periodic rather than per event: a condition must hold for its `for` anyway, time alone
//! makes it due, and one pass over the caches costs microseconds per subject.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use brokkr_crds::alerting::MAX_FIRING_IN_STATUS;
use brokkr_crds::conditions::{new_condition, reasons, set_condition, types};
use brokkr_crds::{Agent, AlertRule, AlertRuleStatus, FiringAlert, NotificationChannel, Stack};
use chrono::{DateTime, Utc};
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store as Cache;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};
use uuid::Uuid;

use super::agent_target::{Origin, permits};
use super::{Context, Listed, error_chain, publish, write_status};
use crate::alerts::evaluate::{fleet_counts, observe};
use crate::entity::alerts;
use crate::metrics::{AgentStatusLabels, AlertRuleLabels, StackConditionLabels};
use crate::status::{now, to_time};
use crate::store::alerts::{RuleChanges, RuleObservation};

/// Most Events about fired (or resolved) alerts one rule publishes per evaluation.
const EVENTS_PER_PASS: usize = 5;
/// How often resolved alerts older than the retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The caches the evaluation reads, and their first-list signals: nothing is evaluated
/// before every one of them is complete, or a restart would resolve (and then fire
/// again) every alert whose subject was not listed yet.
pub(super) struct Sources {
    pub rules: Cache<AlertRule>,
    pub channels: Cache<NotificationChannel>,
    pub listed: Vec<Listed>,
}

/// Evaluates every AlertRule every `ctx.config.alerting.evaluate_every` until `stop`.
pub(super) async fn evaluate_until(
    ctx: Arc<Context>,
    sources: Sources,
    stop: impl std::future::Future<Output = ()>,
) {
    let run = async {
        for listed in &sources.listed {
            if listed.wait().await.is_err() {
                return;
            }
        }
        info!("evaluating alert rules");
        let mut ticker = tokio::time::interval(ctx.config.alerting.evaluate_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut evaluation = Evaluation::default();
        loop {
            ticker.tick().await;
            if let Err(err) = evaluation.run(&ctx, &sources, Utc::now()).await {
                warn!(error = %error_chain(&err), "failed to evaluate alert rules; retrying");
            }
        }
    };
    tokio::select! {
        () = run => {}
        () = stop => {}
    }
}

/// What one evaluation remembers for the next.
#[derive(Default)]
struct Evaluation {
    /// Rules with a firing-alerts gauge, to remove the gauges of deleted rules.
    gauged: BTreeSet<(String, String)>,
    pruned_at: Option<std::time::Instant>,
}

impl Evaluation {
    async fn run(
        &mut self,
        ctx: &Context,
        sources: &Sources,
        now: DateTime<Utc>,
    ) -> Result<(), crate::store::StoreError> {
        let agents = ctx.caches.agents.state();
        let agents: Vec<&Agent> = agents.iter().map(|a| &**a).collect();
        let stacks = ctx.caches.stacks.state();
        let stacks: Vec<&Stack> = stacks.iter().map(|s| &**s).collect();
        let rules = sources.rules.state();
        let channels = sources.channels.state();

        let mut firing: HashMap<Uuid, Vec<alerts::Model>> = HashMap::new();
        for alert in ctx.store.firing_alerts().await? {
            firing.entry(alert.rule_uid).or_default().push(alert);
        }
        let live: Vec<Uuid> = rules.iter().filter_map(|r| rule_uid(r)).collect();
        if firing.keys().any(|uid| !live.contains(uid)) {
            let resolved = ctx.store.resolve_alerts_of_deleted_rules(&live).await?;
            info!(
                alerts = resolved,
                "resolved the alerts of deleted alert rules"
            );
        }

        let mut gauged = BTreeSet::new();
        for rule in rules.iter() {
            let Some(uid) = rule_uid(rule) else { continue };
            let namespace = rule.namespace().unwrap_or_default();
            let rule_firing = firing.remove(&uid).unwrap_or_default();
            let count = match self
                .evaluate_rule(
                    ctx,
                    rule,
                    uid,
                    &agents,
                    &stacks,
                    &channels,
                    rule_firing,
                    now,
                )
                .await
            {
                Ok(count) => count,
                Err(err) => {
                    warn!(rule = %rule.name_any(), namespace = %namespace, error = %error_chain(&err), "failed to evaluate an alert rule");
                    continue;
                }
            };
            let labels = AlertRuleLabels {
                namespace: namespace.clone(),
                rule: rule.name_any(),
            };
            ctx.metrics
                .fleet
                .alerts_firing
                .get_or_create(&labels)
                .set(count as i64);
            gauged.insert((labels.namespace, labels.rule));
        }
        for (namespace, rule) in self.gauged.difference(&gauged) {
            ctx.metrics.fleet.alerts_firing.remove(&AlertRuleLabels {
                namespace: namespace.clone(),
                rule: rule.clone(),
            });
        }
        self.gauged = gauged;

        let (phases, conditions) = fleet_counts(&agents, &stacks);
        for (status, count) in phases {
            ctx.metrics
                .fleet
                .agents
                .get_or_create(&AgentStatusLabels { status })
                .set(count);
        }
        for ((condition, status), count) in conditions {
            ctx.metrics
                .fleet
                .stacks
                .get_or_create(&StackConditionLabels { condition, status })
                .set(count);
        }

        if self.pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            self.pruned_at = Some(std::time::Instant::now());
            let pruned = ctx
                .store
                .prune_resolved_alerts(ctx.config.alerting.resolved_retention)
                .await?;
            if pruned > 0 {
                info!(
                    alerts = pruned,
                    "deleted resolved alerts past their retention"
                );
            }
        }
        Ok(())
    }

    /// Evaluates one rule and writes its status; returns how many of its alerts fire.
    #[allow(clippy::too_many_arguments)]
    async fn evaluate_rule(
        &self,
        ctx: &Context,
        rule: &AlertRule,
        uid: Uuid,
        agents: &[&Agent],
        stacks: &[&Stack],
        channels: &[Arc<NotificationChannel>],
        firing: Vec<alerts::Model>,
        now_utc: DateTime<Utc>,
    ) -> super::Result<usize> {
        let namespace = rule.namespace().unwrap_or_default();
        let api: Api<AlertRule> = Api::namespaced(ctx.client.clone(), &namespace);
        let previous = rule.status.clone().unwrap_or_default();
        let mut status = previous.clone();
        status.observed_generation = rule.metadata.generation;

        let renotify = match rule
            .spec
            .validate()
            .and_then(|()| rule.spec.renotify_interval())
        {
            Ok(renotify) => renotify,
            Err(err) => {
                // Its alerts are left as they are: an edit that breaks the spec must not
                // resolve what fires.
                let message = format!("{err}; the rule is not evaluated until it is fixed");
                self.set_ready(
                    ctx,
                    rule,
                    &mut status,
                    false,
                    reasons::INVALID_SPEC,
                    message,
                )
                .await;
                write_status(&api, rule, Some(&previous), &status).await?;
                return Ok(firing.len());
            }
        };
        let existing: BTreeSet<&str> = channels
            .iter()
            .filter(|c| c.namespace().as_deref() == Some(namespace.as_str()))
            .map(|c| c.metadata.name.as_deref().unwrap_or_default())
            .collect();
        let (found, missing): (Vec<String>, Vec<String>) = rule
            .spec
            .channels
            .iter()
            .cloned()
            .partition(|name| existing.contains(name.as_str()));

        let namespace_labels = ctx
            .caches
            .namespaces
            .state()
            .iter()
            .find(|n| n.name_any() == namespace)
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        let origin = Origin {
            namespace: &namespace,
            labels: &namespace_labels,
            operator_namespace: &ctx.config.namespace,
        };
        let permitted: Vec<&Agent> = agents
            .iter()
            .copied()
            .filter(|agent| permits(agent, &origin))
            .collect();
        let active = observe(rule, &permitted, stacks, now_utc);
        let changes = ctx
            .store
            .apply_rule_observation(
                &RuleObservation {
                    rule_uid: uid,
                    rule_namespace: &namespace,
                    rule_name: &rule.name_any(),
                    severity: rule.spec.severity,
                    channels: &found,
                    renotify_interval: renotify,
                    active: &active,
                },
                &firing,
                now_utc,
            )
            .await?;
        announce(ctx, rule, &changes).await;

        let resolved: BTreeSet<Uuid> = changes.resolved.iter().map(|a| a.id).collect();
        let mut now_firing: Vec<alerts::Model> = firing
            .into_iter()
            .filter(|a| !resolved.contains(&a.id))
            .chain(changes.fired)
            .collect();
        now_firing.sort_by_key(|a| (a.started_at, a.id));
        status.firing_count = u32::try_from(now_firing.len()).unwrap_or(u32::MAX);
        status.firing = now_firing
            .iter()
            .take(MAX_FIRING_IN_STATUS)
            .map(firing_alert)
            .collect();

        if missing.is_empty() {
            let watched = count_watched(&active);
            let message = format!("evaluated; {watched}; notifies {}", found.join(", "));
            self.set_ready(ctx, rule, &mut status, true, reasons::RECONCILED, message)
                .await;
        } else {
            let message = format!(
                "NotificationChannel {} not found in namespace {namespace}; alerts go to the other channels only",
                missing.join(", ")
            );
            self.set_ready(
                ctx,
                rule,
                &mut status,
                false,
                reasons::CHANNEL_NOT_FOUND,
                message,
            )
            .await;
        }
        write_status(&api, rule, Some(&previous), &status).await?;
        Ok(now_firing.len())
    }

    /// Sets `Ready`, with a Warning Event when it turns False or its reason changes.
    async fn set_ready(
        &self,
        ctx: &Context,
        rule: &AlertRule,
        status: &mut AlertRuleStatus,
        ready: bool,
        reason: &str,
        message: String,
    ) {
        let was = brokkr_crds::conditions::find_condition(&status.conditions, types::READY)
            .map(|c| (c.status.clone(), c.reason.clone()));
        set_condition(
            &mut status.conditions,
            new_condition(
                types::READY,
                ready,
                reason,
                message.clone(),
                rule.metadata.generation,
                now(),
            ),
        );
        let turned_false = !ready
            && was.as_ref().is_none_or(|(status, was_reason)| {
                status != brokkr_crds::conditions::STATUS_FALSE || was_reason != reason
            });
        if turned_false {
            publish(
                ctx,
                &rule.object_ref(&()),
                EventType::Warning,
                reason,
                "Evaluate",
                message,
            )
            .await;
        }
    }
}

fn rule_uid(rule: &AlertRule) -> Option<Uuid> {
    rule.metadata
        .uid
        .as_deref()
        .and_then(|uid| Uuid::parse_str(uid).ok())
}

/// "nothing holds" or "2 conditions hold (1 firing)"-style summary; stable between
/// evaluations so the status is not rewritten every pass.
fn count_watched(active: &[crate::store::alerts::ActiveCondition]) -> String {
    match active.len() {
        0 => "no condition holds".to_owned(),
        1 => "1 condition holds".to_owned(),
        n => format!("{n} conditions hold"),
    }
}

fn firing_alert(alert: &alerts::Model) -> FiringAlert {
    FiringAlert {
        condition: alert.condition_type(),
        subject: alert.subject(),
        started_at: to_time(alert.started_at).unwrap_or_else(now),
        message: alert.message.clone(),
    }
}

/// A Warning Event on the rule for each alert that fired, a Normal one for each resolved,
/// and a log line for both (names only: messages can quote spoke objects).
async fn announce(ctx: &Context, rule: &AlertRule, changes: &RuleChanges) {
    let reference = rule.object_ref(&());
    for (kind, alerts) in [("fired", &changes.fired), ("resolved", &changes.resolved)] {
        if alerts.is_empty() {
            continue;
        }
        // A fleet-wide outage fires thousands of alerts at once: the log has them all,
        // the rule's Events the first few and a count.
        if alerts.len() > EVENTS_PER_PASS {
            let note = format!(
                "{} alerts {kind}; the first {EVENTS_PER_PASS} follow, the rest are in status.firing and the operator's log",
                alerts.len()
            );
            publish(
                ctx,
                &reference,
                EventType::Warning,
                "ManyAlerts",
                "Evaluate",
                note,
            )
            .await;
        }
        for (index, alert) in alerts.iter().enumerate() {
            let subject = alert.subject();
            info!(rule = %rule.name_any(), condition = %alert.condition, subject = %subject, "alert {kind}");
            if index >= EVENTS_PER_PASS {
                continue;
            }
            let (type_, reason, note) = if kind == "fired" {
                (
                    EventType::Warning,
                    "AlertFiring",
                    format!("{} fires for {subject}: {}", alert.condition, alert.message),
                )
            } else {
                (
                    EventType::Normal,
                    "AlertResolved",
                    format!("{} no longer holds for {subject}", alert.condition),
                )
            };
            publish(ctx, &reference, type_, reason, "Evaluate", note).await;
        }
    }
}
