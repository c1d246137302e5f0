//! AgentTarget → the `agent_targets` rows of its Stack. A Stack's target set is the
//! union of every AgentTarget naming it, so each reconcile recomputes that union.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use brokkr_crds::conditions::{new_condition, reasons, set_condition, types};
use brokkr_crds::{Agent, AgentTarget, AgentTargetStatus, Stack};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::ListParams;
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use tracing::{info, instrument};

use super::{
    Context, Error, Result, publish, resource_uid, spec_field_manager, with_finalizer, write_status,
};
use crate::status::{bounded_names, now};
use crate::store::audit::{self, AuditEntry, AuditResource};

#[instrument(skip_all, fields(agent_target = %target.name_any(), namespace = target.namespace().unwrap_or_default()))]
pub async fn reconcile(target: Arc<AgentTarget>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = target
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<AgentTarget> = Api::namespaced(ctx.client.clone(), &namespace);
    with_finalizer(
        &ctx,
        "agenttarget",
        api.clone(),
        target,
        |target| apply(target, &ctx, api.clone()),
        |target| cleanup(target, &ctx),
    )
    .await
}

/// Where AgentTargets deliver from: their hub namespace with its labels, and the
/// operator's own namespace (the only one an Agent without `spec.targetableFrom` accepts).
#[derive(Clone, Copy, Debug)]
pub struct Origin<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub operator_namespace: &'a str,
}

/// Whether AgentTargets in `origin`'s namespace may deliver to `agent`: pure.
///
/// Permitted when the Agent's `spec.targetableFrom.namespaces` lists the namespace or its
/// `namespaceSelector` matches the namespace's labels; an Agent without
/// `spec.targetableFrom` accepts only the operator's own namespace. A selector kube-core
/// refuses (the Agent's spec is invalid) admits no namespace.
pub fn permits(agent: &Agent, origin: &Origin<'_>) -> bool {
    let Some(from) = &agent.spec.targetable_from else {
        return origin.namespace == origin.operator_namespace;
    };
    from.namespaces.iter().any(|n| n == origin.namespace)
        || from
            .namespace_selector
            .clone()
            .map(Selector::try_from)
            .is_some_and(|selector| selector.is_ok_and(|s| s.matches(origin.labels)))
}

/// Which Agents one AgentTarget selects: pure.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expansion {
    /// Agent resource uids of the selected Agents that accept the AgentTarget's
    /// namespace, by Agent name.
    pub matched: BTreeMap<String, String>,
    /// Names in `spec.agents` with no such Agent.
    pub missing: Vec<String>,
    /// Names of the selected Agents that do not accept the AgentTarget's namespace, sorted.
    pub refused: Vec<String>,
}

pub fn expand(target: &AgentTarget, agents: &[Arc<Agent>], origin: &Origin<'_>) -> Expansion {
    let mut expansion = Expansion::default();
    let mut selected: BTreeMap<String, &Agent> = BTreeMap::new();
    for name in &target.spec.agents {
        match agents.iter().find(|a| &a.name_any() == name) {
            Some(agent) => {
                selected.insert(name.clone(), agent);
            }
            None => expansion.missing.push(name.clone()),
        }
    }
    // The spec is validated before it gets here; a selector kube-core still refuses
    // (an unknown operator, `In` without values) selects no Agent.
    if let Some(Ok(selector)) = target.spec.agent_selector.clone().map(Selector::try_from) {
        for agent in agents {
            if selector.matches(agent.labels()) {
                selected.insert(agent.name_any(), agent);
            }
        }
    }
    for (name, agent) in selected {
        if permits(agent, origin) {
            expansion
                .matched
                .insert(name, agent.uid().unwrap_or_default());
        } else {
            expansion.refused.push(name);
        }
    }
    expansion
}

/// Most Agent names one condition message or Event names; `status.refusedAgents` lists
/// up to 50 (an Event note must stay under 1 kB).
const MAX_NAMES_IN_MESSAGE: usize = 10;

/// What the `NotPermitted` condition and Event say: which Agents, why, and what to
/// change: pure.
pub fn refusal_message(expansion: &Expansion, origin: &Origin<'_>) -> String {
    let refused = &expansion.refused;
    let mut names = refused
        .iter()
        .take(MAX_NAMES_IN_MESSAGE)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if refused.len() > MAX_NAMES_IN_MESSAGE {
        names.push_str(&format!(
            " and {} more (status.refusedAgents lists them)",
            refused.len() - MAX_NAMES_IN_MESSAGE
        ));
    }
    let namespace = origin.namespace;
    let mut message = format!(
        "{} selected Agent(s) do not accept targets from namespace {namespace}: {names}; \
         to permit it, add {namespace} to spec.targetableFrom.namespaces of each Agent, or \
         label namespace {namespace} to match its spec.targetableFrom.namespaceSelector \
         (an Agent without spec.targetableFrom accepts only the operator's namespace {})",
        refused.len(),
        origin.operator_namespace
    );
    if !expansion.matched.is_empty() {
        message.push_str(&format!(
            "; delivering to the {} permitted Agent(s)",
            expansion.matched.len()
        ));
    }
    if !expansion.missing.is_empty() {
        message.push_str(&format!(
            "; no Agent named {}",
            expansion.missing.join(", ")
        ));
    }
    message
}

/// The labels of hub namespace `namespace`: from the Namespace cache, or read from the
/// API server when `fresh` or when the cache does not hold it (yet). A namespace that
/// does not exist has no labels.
async fn namespace_labels(
    ctx: &Context,
    namespace: &str,
    fresh: bool,
) -> Result<BTreeMap<String, String>> {
    if !fresh
        && let Some(cached) = ctx
            .caches
            .namespaces
            .get(&kube::runtime::reflector::ObjectRef::new(namespace))
    {
        return Ok(cached.labels().clone());
    }
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    Ok(namespaces
        .get_opt(namespace)
        .await?
        .map(|n| n.labels().clone())
        .unwrap_or_default())
}

async fn apply(target: Arc<AgentTarget>, ctx: &Context, api: Api<AgentTarget>) -> Result<Action> {
    let previous = target.status.clone().unwrap_or_default();
    let mut status = previous.clone();
    status.observed_generation = target.metadata.generation;
    let generation = target.metadata.generation;

    if let Err(err) = target.spec.validate() {
        let message = err.to_string();
        status.matched_agents = 0;
        status.agent_names.clear();
        status.refused_agents.clear();
        let condition = new_condition(
            types::READY,
            false,
            reasons::INVALID_SPEC,
            message.clone(),
            generation,
            now(),
        );
        finish(
            ctx,
            &target,
            &api,
            &previous,
            status,
            condition,
            Some(message),
        )
        .await?;
        return Ok(Action::await_change());
    }

    ctx.caches.wait_until_complete().await?;
    let agents = ctx.caches.agents.state();
    let namespace = target.namespace().unwrap_or_default();
    let labels = namespace_labels(ctx, &namespace, false).await?;
    let origin = Origin {
        namespace: &namespace,
        labels: &labels,
        operator_namespace: &ctx.config.namespace,
    };
    let expansion = expand(&target, &agents, &origin);
    status.matched_agents = expansion.matched.len() as i32;
    status.agent_names = bounded_names(expansion.matched.keys().cloned().collect());
    status.refused_agents = bounded_names(expansion.refused.clone());
    // A refusal is told (audit log, Warning Event) when the set of refused Agents
    // changes, not on every resync. The audit row comes before the status, so that a
    // failed write is retried.
    let refusal = (!expansion.refused.is_empty()
        && previous.refused_agents != status.refused_agents)
        .then(|| refusal_message(&expansion, &origin));
    if refusal.is_some() {
        record_refusal(ctx, &target, &expansion.refused).await?;
    }

    let stack_name = &target.spec.stack_ref.name;
    let stacks: Api<Stack> = Api::namespaced(ctx.client.clone(), &namespace);
    let stack_row = match stacks.get_opt(stack_name).await? {
        Some(stack) => {
            ctx.store
                .find_live_stack_by_resource(resource_uid(&stack)?)
                .await?
        }
        None => None,
    };
    let Some(stack_row) = stack_row else {
        let message = format!("Stack {stack_name:?} not found in namespace {namespace}");
        let condition = new_condition(
            types::READY,
            false,
            reasons::STACK_NOT_FOUND,
            message.clone(),
            generation,
            now(),
        );
        finish(
            ctx,
            &target,
            &api,
            &previous,
            status,
            condition,
            Some(message),
        )
        .await?;
        announce_refusal(ctx, &target, refusal.as_deref()).await;
        // The Stack watch brings this back when the Stack appears.
        return Ok(Action::requeue(ctx.config.status_refresh));
    };

    sync_stack_targets(ctx, &namespace, stack_name, stack_row.id, None).await?;

    let (condition, warning) = if !expansion.refused.is_empty() {
        // The refusal has an Event of its own whenever the refused set changes.
        (
            new_condition(
                types::READY,
                false,
                reasons::NOT_PERMITTED,
                refusal_message(&expansion, &origin),
                generation,
                now(),
            ),
            None,
        )
    } else if !expansion.missing.is_empty() {
        let message = format!("no Agent named {}", expansion.missing.join(", "));
        (
            new_condition(
                types::READY,
                false,
                reasons::AGENT_NOT_FOUND,
                message.clone(),
                generation,
                now(),
            ),
            Some(message),
        )
    } else if expansion.matched.is_empty() {
        let message = "no Agent matches spec.agents or spec.agentSelector".to_owned();
        (
            new_condition(
                types::READY,
                false,
                reasons::NO_AGENTS_MATCHED,
                message.clone(),
                generation,
                now(),
            ),
            Some(message),
        )
    } else {
        (
            new_condition(
                types::READY,
                true,
                reasons::MATCHED,
                format!(
                    "targets {} agents at Stack {stack_name}",
                    expansion.matched.len()
                ),
                generation,
                now(),
            ),
            None,
        )
    };
    finish(ctx, &target, &api, &previous, status, condition, warning).await?;
    announce_refusal(ctx, &target, refusal.as_deref()).await;
    Ok(Action::requeue(ctx.config.status_refresh))
}

/// Recomputes the Stack's target set from every AgentTarget naming it (but `leaving`,
/// which is being deleted) and writes it.
///
/// A wrong empty set deletes the stack from every spoke, so the set is computed only
/// from caches that hold a complete list, and a step that removes more than half of
/// the current targets is recomputed from a fresh list of the API server before it
/// is written. Which Agents accept the namespace is part of that: the recomputation
/// reads the namespace's labels afresh too.
async fn sync_stack_targets(
    ctx: &Context,
    namespace: &str,
    stack_name: &str,
    stack_id: uuid::Uuid,
    leaving: Option<&str>,
) -> Result<()> {
    ctx.caches.wait_until_complete().await?;
    let cached_targets = ctx.caches.agent_targets.state();
    let labels = namespace_labels(ctx, namespace, false).await?;
    let selected = selected_agent_uids(
        cached_targets.iter().map(|t| &**t),
        &ctx.caches.agents.state(),
        &Origin {
            namespace,
            labels: &labels,
            operator_namespace: &ctx.config.namespace,
        },
        stack_name,
        leaving,
    );
    let mut agent_ids = live_agent_ids(ctx, &selected).await?;
    let current = ctx.store.stack_target_agent_ids(stack_id).await?;
    if is_large_shrink(&current, &agent_ids) {
        let fresh_labels = namespace_labels(ctx, namespace, true).await?;
        let targets: Api<AgentTarget> = Api::namespaced(ctx.client.clone(), namespace);
        let fresh_targets = targets.list(&ListParams::default()).await?;
        let fresh_agents: Vec<Arc<Agent>> = ctx
            .config
            .agents_api(&ctx.client)
            .list(&ctx.config.agent_list_params())
            .await?
            .into_iter()
            .map(Arc::new)
            .collect();
        let selected = selected_agent_uids(
            fresh_targets.iter(),
            &fresh_agents,
            &Origin {
                namespace,
                labels: &fresh_labels,
                operator_namespace: &ctx.config.namespace,
            },
            stack_name,
            leaving,
        );
        agent_ids = live_agent_ids(ctx, &selected).await?;
        info!(
            stack = %format!("{namespace}/{stack_name}"),
            targets = current.len(),
            cached = selected.len(),
            confirmed = agent_ids.len(),
            "a large shrink of a stack's targets was recomputed from the API server"
        );
        ctx.metrics.target_shrinks_confirmed.inc();
    }
    ctx.store
        .replace_stack_targets(stack_id, &agent_ids)
        .await?;
    Ok(())
}

/// Resource uids of the Agents that the AgentTargets naming the Stack (in `origin`'s
/// namespace) select and may deliver to: pure.
pub fn selected_agent_uids<'a>(
    targets: impl IntoIterator<Item = &'a AgentTarget>,
    agents: &[Arc<Agent>],
    origin: &Origin<'_>,
    stack_name: &str,
    leaving: Option<&str>,
) -> BTreeSet<uuid::Uuid> {
    let mut resource_uids = BTreeSet::new();
    for target in targets {
        let names_stack = target.namespace().as_deref() == Some(origin.namespace)
            && target.spec.stack_ref.name == stack_name
            && target.metadata.deletion_timestamp.is_none()
            && leaving != target.uid().as_deref();
        if !names_stack || target.spec.validate().is_err() {
            continue;
        }
        for uid in expand(target, agents, origin).matched.into_values() {
            if let Ok(uid) = uuid::Uuid::parse_str(&uid) {
                resource_uids.insert(uid);
            }
        }
    }
    resource_uids
}

/// Whether going from `current` to `next` removes more than half of the targets: pure.
pub fn is_large_shrink(current: &BTreeSet<uuid::Uuid>, next: &BTreeSet<uuid::Uuid>) -> bool {
    let removed = current.difference(next).count();
    removed * 2 > current.len()
}

async fn live_agent_ids(
    ctx: &Context,
    resource_uids: &BTreeSet<uuid::Uuid>,
) -> Result<BTreeSet<uuid::Uuid>> {
    Ok(ctx
        .store
        .live_agents_by_resources(resource_uids)
        .await?
        .into_iter()
        .map(|row| row.id)
        .collect())
}

async fn finish(
    ctx: &Context,
    target: &AgentTarget,
    api: &Api<AgentTarget>,
    previous: &AgentTargetStatus,
    mut status: AgentTargetStatus,
    condition: brokkr_crds::Condition,
    warning: Option<String>,
) -> Result<()> {
    let reason = condition.reason.clone();
    let changed = set_condition(&mut status.conditions, condition);
    if changed && let Some(message) = warning {
        publish(
            ctx,
            &target.object_ref(&()),
            EventType::Warning,
            &reason,
            "Target",
            message,
        )
        .await;
    }
    write_status(api, target, Some(previous), &status).await
}

/// Records in the audit log that the AgentTarget may not deliver to the `refused` Agents
/// (its author as the actor: the field manager that last changed its spec).
async fn record_refusal(ctx: &Context, target: &AgentTarget, refused: &[String]) -> Result<()> {
    let namespace = target.namespace();
    let entry = AuditEntry {
        actor: spec_field_manager(target).unwrap_or_else(|| audit::OPERATOR_ACTOR.to_owned()),
        action: audit::actions::TARGETING_REFUSED,
        resource: AuditResource {
            kind: "AgentTarget",
            namespace: namespace.clone(),
            name: target.name_any(),
            id: target
                .uid()
                .and_then(|uid| uuid::Uuid::parse_str(&uid).ok()),
        },
        details: serde_json::json!({
            "namespace": namespace,
            "stack": target.spec.stack_ref.name,
            "refused": audit::bounded_list(refused),
        }),
    };
    ctx.store.record_audit(&[entry]).await?;
    Ok(())
}

/// A Warning Event `NotPermitted` saying `refusal`, when there is one to tell.
async fn announce_refusal(ctx: &Context, target: &AgentTarget, refusal: Option<&str>) {
    if let Some(message) = refusal {
        publish(
            ctx,
            &target.object_ref(&()),
            EventType::Warning,
            reasons::NOT_PERMITTED,
            "Target",
            message.to_owned(),
        )
        .await;
    }
}

async fn cleanup(target: Arc<AgentTarget>, ctx: &Context) -> Result<Action> {
    let namespace = target.namespace().unwrap_or_default();
    let stack_name = &target.spec.stack_ref.name;
    let stacks: Api<Stack> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(stack) = stacks.get_opt(stack_name).await?
        && let Some(row) = ctx
            .store
            .find_live_stack_by_resource(resource_uid(&stack)?)
            .await?
    {
        let leaving = target.uid();
        sync_stack_targets(ctx, &namespace, stack_name, row.id, leaving.as_deref()).await?;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use brokkr_crds::{AgentSpec, AgentTargetSpec};

    fn agent(name: &str, labels: &[(&str, &str)]) -> Arc<Agent> {
        let mut agent = Agent::new(
            name,
            AgentSpec {
                cluster_name: "c".into(),
                ..Default::default()
            },
        );
        agent.metadata.uid = Some(format!("uid-{name}"));
        agent.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        Arc::new(agent)
    }

    fn target(yaml: &str) -> AgentTarget {
        let spec: AgentTargetSpec = serde_yaml::from_str(yaml).unwrap();
        AgentTarget::new("t", spec)
    }

    static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

    /// AgentTargets in the operator's own namespace, which Agents without
    /// `spec.targetableFrom` accept.
    const HOME: Origin<'static> = Origin {
        namespace: "brokkr-system",
        labels: &NO_LABELS,
        operator_namespace: "brokkr-system",
    };

    fn from(namespace: &'static str, labels: &'static BTreeMap<String, String>) -> Origin<'static> {
        Origin {
            namespace,
            labels,
            operator_namespace: "brokkr-system",
        }
    }

    fn targetable_from(name: &str, yaml: &str) -> Arc<Agent> {
        let mut agent = (*agent(name, &[("env", "prod")])).clone();
        agent.spec.targetable_from = Some(serde_yaml::from_str(yaml).unwrap());
        Arc::new(agent)
    }

    fn tenant_labels() -> &'static BTreeMap<String, String> {
        static LABELS: std::sync::OnceLock<BTreeMap<String, String>> = std::sync::OnceLock::new();
        LABELS.get_or_init(|| labels(&[("brokkr.io/tenant", "shop")]))
    }

    #[test]
    fn an_agent_without_targetable_from_accepts_only_the_operators_namespace() {
        let edge = agent("edge-1", &[]);
        assert!(permits(&edge, &HOME));
        assert!(!permits(&edge, &from("team-a", &NO_LABELS)));
        assert!(!permits(&edge, &from("team-a", tenant_labels())));
    }

    #[test]
    fn listed_namespaces_are_accepted_and_no_other_not_even_the_operators() {
        let edge = targetable_from("edge-1", "namespaces: [team-a, team-b]");
        assert!(permits(&edge, &from("team-a", &NO_LABELS)));
        assert!(permits(&edge, &from("team-b", &NO_LABELS)));
        assert!(!permits(&edge, &from("team-c", &NO_LABELS)));
        assert!(
            !permits(&edge, &from("team", &NO_LABELS)),
            "whole names only"
        );
        // Setting targetableFrom replaces the default: list the operator's namespace too
        // if it should keep delivering.
        assert!(!permits(&edge, &HOME));
    }

    #[test]
    fn a_namespace_selector_accepts_namespaces_by_their_labels() {
        let edge = targetable_from(
            "edge-1",
            "namespaceSelector: {matchLabels: {brokkr.io/tenant: shop}}",
        );
        assert!(permits(&edge, &from("team-a", tenant_labels())));
        assert!(!permits(&edge, &from("team-a", &NO_LABELS)));
        let both = targetable_from(
            "edge-2",
            "namespaces: [team-b]\nnamespaceSelector: {matchLabels: {brokkr.io/tenant: shop}}",
        );
        assert!(permits(&both, &from("team-a", tenant_labels())));
        assert!(permits(&both, &from("team-b", &NO_LABELS)));
        assert!(!permits(&both, &from("team-c", &NO_LABELS)));
        let everyone = targetable_from("edge-3", "namespaceSelector: {}");
        assert!(permits(&everyone, &from("team-c", &NO_LABELS)));
        // An invalid selector (the Agent's spec is refused) admits nobody.
        let invalid = targetable_from(
            "edge-4",
            "namespaceSelector: {matchExpressions: [{key: tier, operator: In}]}",
        );
        assert!(!permits(&invalid, &from("team-a", tenant_labels())));
    }

    #[test]
    fn selected_agents_that_refuse_the_namespace_are_refused_not_matched() {
        let agents = [
            agent("default-1", &[("env", "prod")]),
            targetable_from("open-1", "namespaces: [team-a]"),
            targetable_from("closed-1", "namespaces: [team-b]"),
        ];
        let t = target(
            "stackRef: {name: app}\nagents: [ghost]\nagentSelector: {matchLabels: {env: prod}}\n",
        );
        let expansion = expand(&t, &agents, &from("team-a", &NO_LABELS));
        assert_eq!(expansion.matched.keys().collect::<Vec<_>>(), vec!["open-1"]);
        assert_eq!(expansion.refused, vec!["closed-1", "default-1"]);
        assert_eq!(expansion.missing, vec!["ghost"]);
        let message = refusal_message(&expansion, &from("team-a", &NO_LABELS));
        for part in [
            "2 selected Agent(s) do not accept targets from namespace team-a: closed-1, default-1",
            "add team-a to spec.targetableFrom.namespaces",
            "spec.targetableFrom.namespaceSelector",
            "the operator's namespace brokkr-system",
            "delivering to the 1 permitted Agent(s)",
            "no Agent named ghost",
        ] {
            assert!(message.contains(part), "{part:?} not in {message:?}");
        }
        // From the operator's namespace the defaulted Agent is accepted and the others not.
        let expansion = expand(&t, &agents, &HOME);
        assert_eq!(
            expansion.matched.keys().collect::<Vec<_>>(),
            vec!["default-1"]
        );
        assert_eq!(expansion.refused, vec!["closed-1", "open-1"]);
    }

    #[test]
    fn a_refusal_names_at_most_ten_agents_and_counts_the_rest() {
        let agents: Vec<Arc<Agent>> = (0..25)
            .map(|n| agent(&format!("edge-{n:02}"), &[]))
            .collect();
        let t = target("stackRef: {name: app}\nagentSelector: {}\n");
        let expansion = expand(&t, &agents, &from("team-a", &NO_LABELS));
        assert_eq!(expansion.refused.len(), 25);
        assert!(expansion.matched.is_empty());
        let message = refusal_message(&expansion, &from("team-a", &NO_LABELS));
        assert!(
            message.contains("edge-09 and 15 more (status.refusedAgents lists them)"),
            "{message}"
        );
        assert!(!message.contains("edge-10"), "{message}");
        assert!(!message.contains("delivering"), "{message}");
        assert!(message.len() < 1024, "an Event note stays under 1 kB");
    }

    #[test]
    fn names_and_selector_are_unioned() {
        let agents = [
            agent("edge-1", &[("env", "prod")]),
            agent("edge-2", &[("env", "dev")]),
            agent("edge-3", &[("env", "prod")]),
        ];
        let t = target(
            "stackRef: {name: app}\nagents: [edge-2]\nagentSelector: {matchLabels: {env: prod}}\n",
        );
        let expansion = expand(&t, &agents, &HOME);
        assert_eq!(
            expansion.matched.keys().collect::<Vec<_>>(),
            vec!["edge-1", "edge-2", "edge-3"]
        );
        assert!(expansion.missing.is_empty());
    }

    #[test]
    fn unknown_agent_names_are_reported() {
        let agents = [agent("edge-1", &[])];
        let t = target("stackRef: {name: app}\nagents: [edge-1, ghost]\n");
        let expansion = expand(&t, &agents, &HOME);
        assert_eq!(expansion.missing, vec!["ghost".to_owned()]);
        assert_eq!(expansion.matched.len(), 1);
    }

    #[test]
    fn removing_more_than_half_of_the_targets_is_a_large_shrink() {
        let ids: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::new_v4()).collect();
        let set = |range: std::ops::Range<usize>| ids[range].iter().copied().collect();
        assert!(is_large_shrink(&set(0..4), &set(0..0)));
        assert!(is_large_shrink(&set(0..4), &set(0..1)));
        // Half is not more than half; replacing targets counts the removed ones.
        assert!(!is_large_shrink(&set(0..4), &set(0..2)));
        assert!(is_large_shrink(&set(0..4), &set(3..4)));
        assert!(!is_large_shrink(&set(0..0), &set(0..0)));
        assert!(!is_large_shrink(&set(0..2), &set(0..4)));
    }

    #[test]
    fn only_live_valid_targets_of_the_stack_select_agents() {
        let agents = [agent("edge-1", &[("env", "prod")]), agent("edge-2", &[])];
        let mut of_stack = target("stackRef: {name: app}\nagents: [edge-1]\n");
        of_stack.metadata.namespace = Some("ns".into());
        of_stack.metadata.uid = Some("t-1".into());
        let mut other_stack = target("stackRef: {name: db}\nagents: [edge-2]\n");
        other_stack.metadata.namespace = Some("ns".into());
        let mut other_namespace = target("stackRef: {name: app}\nagents: [edge-2]\n");
        other_namespace.metadata.namespace = Some("elsewhere".into());
        let all = [of_stack.clone(), other_stack, other_namespace];
        // Agent uids in these fixtures are not UUIDs; give them real ones.
        let agents: Vec<Arc<Agent>> = agents
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let mut a = (**a).clone();
                a.metadata.uid = Some(uuid::Uuid::from_u128(i as u128 + 1).to_string());
                Arc::new(a)
            })
            .collect();
        let ns = Origin {
            namespace: "ns",
            labels: &NO_LABELS,
            operator_namespace: "ns",
        };
        let selected = selected_agent_uids(all.iter(), &agents, &ns, "app", None);
        assert_eq!(selected, BTreeSet::from([uuid::Uuid::from_u128(1)]));
        // The AgentTarget being deleted selects nothing.
        assert!(selected_agent_uids(all.iter(), &agents, &ns, "app", Some("t-1")).is_empty());
        // Nor does one whose namespace the Agent does not accept.
        let elsewhere = Origin {
            operator_namespace: "brokkr-system",
            ..ns
        };
        assert!(selected_agent_uids(all.iter(), &agents, &elsewhere, "app", None).is_empty());
    }

    fn selector(yaml: &str) -> Selector {
        let selector: brokkr_crds::LabelSelector = serde_yaml::from_str(yaml).unwrap();
        Selector::try_from(selector).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn match_labels_need_every_pair() {
        let s = selector("matchLabels: {env: prod, region: eu}");
        assert!(s.matches(&labels(&[("env", "prod"), ("region", "eu"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("env", "prod")])));
        assert!(!s.matches(&labels(&[("env", "dev"), ("region", "eu")])));
    }

    #[test]
    fn expressions_follow_kubernetes_operators() {
        let s = selector(
            "matchExpressions:
  - {key: env, operator: In, values: [prod, staging]}
  - {key: tier, operator: NotIn, values: [legacy]}
  - {key: gpu, operator: Exists}
  - {key: quarantined, operator: DoesNotExist}",
        );
        assert!(s.matches(&labels(&[("env", "prod"), ("gpu", "a100")])));
        assert!(s.matches(&labels(&[("env", "staging"), ("gpu", ""), ("tier", "web")])));
        assert!(!s.matches(&labels(&[("env", "dev"), ("gpu", "x")])), "In");
        assert!(
            !s.matches(&labels(&[
                ("env", "prod"),
                ("gpu", "x"),
                ("tier", "legacy")
            ])),
            "NotIn"
        );
        assert!(!s.matches(&labels(&[("env", "prod")])), "Exists");
        assert!(
            !s.matches(&labels(&[
                ("env", "prod"),
                ("gpu", "x"),
                ("quarantined", "yes")
            ])),
            "DoesNotExist"
        );
    }

    #[test]
    fn an_empty_selector_matches_every_agent() {
        assert!(selector("{}").matches(&labels(&[])));
        assert!(selector("{}").matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn expressions_and_labels_are_both_required() {
        let agents = [
            agent("edge-1", &[("env", "prod"), ("gpu", "a100")]),
            agent("edge-2", &[("env", "prod")]),
        ];
        let t = target(
            "stackRef: {name: app}\nagentSelector:\n  matchLabels: {env: prod}\n  matchExpressions: [{key: gpu, operator: Exists}]\n",
        );
        assert_eq!(
            expand(&t, &agents, &HOME)
                .matched
                .keys()
                .collect::<Vec<_>>(),
            vec!["edge-1"]
        );
    }

    #[test]
    fn an_invalid_selector_selects_no_agent() {
        let agents = [agent("edge-1", &[("env", "prod")])];
        for expression in [
            "{key: env, operator: Matches, values: [prod]}",
            "{key: env, operator: NotIn}",
        ] {
            let t = target(&format!(
                "stackRef: {{name: app}}\nagentSelector: {{matchExpressions: [{expression}]}}\n"
            ));
            assert!(t.spec.validate().is_err(), "{expression}");
            assert!(
                expand(&t, &agents, &HOME).matched.is_empty(),
                "{expression}"
            );
        }
    }

    #[test]
    fn a_selector_matching_nothing_selects_nothing() {
        let agents = [agent("edge-1", &[("env", "dev")])];
        let t = target("stackRef: {name: app}\nagentSelector: {matchLabels: {env: prod}}\n");
        assert!(expand(&t, &agents, &HOME).matched.is_empty());
    }
}
