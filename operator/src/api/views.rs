//! Each agent's desired state, held in memory and kept current by the change feed.
//!
//! A push to a stack targeted at 10,000 agents used to wake 10,000 long-polls, each of
//! which re-ran the desired-state query for one changed row. Now the change feed asks
//! the database once per change ([`Store::stack_heads`]) and patches every affected
//! agent's view here; only the agents whose view changed are woken, and they answer
//! without a query. Re-parked long-polls and renewals read the same views.
//!
//! A deleted stack's deletion marker is state, not an edge: it stays in an agent's view,
//! whatever the agent's cursor, until that agent reports the removal (a `Delete`
//! `Success` event for the marker, which notifies `a:<agent id>` and so drops the view).
//! A busy or restarted agent therefore cannot miss it.
//!
//! A view is only ever stored if no change concerning its agent was applied while its
//! query ran (the per-agent `generation` check), so a view never misses a change:
//! either the change was applied after the view was stored (and patched it), or it was
//! visible to the query. The check is per agent because a global one, at 10,000 agents
//! polling, let every push void the thousands of queries in flight, which then ran again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use brokkr_crds::wire::DesiredStack;
use tokio::sync::watch;
use uuid::Uuid;

use crate::store::{DesiredEntry, StackHead};

/// Beyond this many agents without a waiting request, views are dropped (and queried
/// again when asked for), bounding memory on a hub that has seen many agents come and go.
const MAX_IDLE_AGENTS: usize = 100_000;

/// What one agent should hold, as the desired-state query returned it. It serves every
/// cursor: nothing in it depends on what the agent has seen.
#[derive(Debug)]
pub struct AgentView {
    /// Ordered by stack id.
    entries: Vec<DesiredEntry>,
}

impl AgentView {
    /// `_since`, the cursor the query was made for, no longer matters (deletion markers
    /// stay until reported); kept so callers need not change.
    pub fn new(_since: i64, mut entries: Vec<DesiredEntry>) -> AgentView {
        entries.sort_by_key(|e| e.stack_id);
        AgentView { entries }
    }

    /// The answer for an agent whose cursor is at `since`: its stacks, and the highest
    /// sequence among them (or `since`, if higher).
    pub fn answer(&self, since: i64) -> (Vec<DesiredStack>, i64) {
        let stacks: Vec<DesiredStack> = self
            .entries
            .iter()
            .filter(|e| !e.stack_deleted || e.is_deletion_marker)
            .map(|e| DesiredStack {
                stack_id: e.stack_id,
                stack_name: e.stack_name.clone(),
                deployment_object_id: e.deployment_object_id,
                sequence: e.sequence_id,
                checksum: e.yaml_checksum.clone(),
                deletion: e.is_deletion_marker,
                // Spliced in by the answer, from the shared object bodies (`super::inline`).
                object: None,
            })
            .collect();
        let max_sequence = stacks.iter().map(|s| s.sequence).fold(since, i64::max);
        (stacks, max_sequence)
    }

    pub fn holds(&self, stack_id: Uuid) -> bool {
        self.position(stack_id).is_ok()
    }

    fn position(&self, stack_id: Uuid) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&stack_id, |e| e.stack_id)
    }

    /// This view after `head` (the stack's state now), or `None` if it is unchanged.
    fn patched(&self, agent_id: Uuid, head: &StackHead) -> Option<AgentView> {
        let served = match &head.assigned {
            Some(assigned) => assigned.get(&agent_id),
            None => head.head.as_ref(),
        };
        let wanted = served
            .filter(|_| head.agents.contains(&agent_id))
            .filter(|h| {
                !head.stack_deleted
                    || (h.is_deletion_marker && !head.removal_reported.contains(&agent_id))
            })
            .map(|h| DesiredEntry {
                stack_id: head.stack_id,
                stack_name: head.stack_name.clone(),
                deployment_object_id: h.deployment_object_id,
                sequence_id: h.sequence_id,
                yaml_checksum: h.yaml_checksum.clone(),
                is_deletion_marker: h.is_deletion_marker,
                stack_deleted: head.stack_deleted,
                stamp: h.stamp,
            });
        let mut entries = self.entries.clone();
        match (self.position(head.stack_id), wanted) {
            // Stamps only grow (the served sequence may not: a pin goes back); an older
            // stamp is a notification that arrived after a query had seen a newer state.
            (Ok(at), Some(wanted)) if entries[at] != wanted => {
                if entries[at].stamp > wanted.stamp {
                    return None;
                }
                entries[at] = wanted;
            }
            (Ok(at), None) => {
                if entries[at].stamp > head.stamp && head.agents.contains(&agent_id) {
                    return None;
                }
                entries.remove(at);
            }
            (Err(at), Some(wanted)) => entries.insert(at, wanted),
            (Ok(_), Some(_)) | (Err(_), None) => return None,
        }
        Some(AgentView { entries })
    }
}

struct Slot {
    view: Option<Arc<AgentView>>,
    /// Counts the changes applied to this agent.
    generation: u64,
    wake: watch::Sender<()>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            view: None,
            generation: 0,
            wake: watch::Sender::new(()),
        }
    }

    fn set(&mut self, view: Option<Arc<AgentView>>) {
        self.view = view;
        self.wake.send_replace(());
    }
}

#[derive(Default)]
struct Views {
    agents: HashMap<Uuid, Slot>,
}

/// The views of the agents this replica has served.
#[derive(Default)]
pub struct DesiredViews {
    inner: Mutex<Views>,
}

impl DesiredViews {
    fn lock(&self) -> MutexGuard<'_, Views> {
        super::lock(&self.inner)
    }

    /// Wakes when `agent_id`'s view changes or is dropped. Subscribe before reading the
    /// view, so that a change in between is not missed.
    pub fn subscribe(&self, agent_id: Uuid) -> watch::Receiver<()> {
        let mut views = self.lock();
        if views.agents.len() >= MAX_IDLE_AGENTS && !views.agents.contains_key(&agent_id) {
            views
                .agents
                .retain(|_, slot| slot.wake.receiver_count() > 0);
        }
        views
            .agents
            .entry(agent_id)
            .or_insert_with(Slot::new)
            .wake
            .subscribe()
    }

    /// The stored view of `agent_id` (it serves any cursor, `_since` included).
    pub fn get(&self, agent_id: Uuid, _since: i64) -> Option<Arc<AgentView>> {
        self.lock().agents.get(&agent_id)?.view.clone()
    }

    /// Stamp to pass to [`DesiredViews::remember`]; take it after subscribing and
    /// before querying.
    pub fn generation(&self, agent_id: Uuid) -> Option<u64> {
        Some(self.lock().agents.get(&agent_id)?.generation)
    }

    /// Stores a view queried after [`DesiredViews::generation`] returned `generation`,
    /// unless a change concerning the agent was applied since (the view might predate it).
    pub fn remember(&self, agent_id: Uuid, generation: Option<u64>, view: Arc<AgentView>) {
        let mut views = self.lock();
        if let Some(slot) = views.agents.get_mut(&agent_id)
            && Some(slot.generation) == generation
        {
            // No wake-up: whoever queried is about to answer from this view.
            slot.view = Some(view);
        }
    }

    /// Whether `agent_id`'s stored view holds `stack_id` (`false` when unknown).
    pub fn holds(&self, agent_id: Uuid, stack_id: Uuid) -> bool {
        self.lock()
            .agents
            .get(&agent_id)
            .and_then(|slot| slot.view.as_ref())
            .is_some_and(|view| view.holds(stack_id))
    }

    /// Applies stacks' new heads to the views of the agents they target.
    pub fn apply_heads(&self, heads: &[StackHead]) {
        let mut views = self.lock();
        for head in heads {
            for agent_id in &head.agents {
                let Some(slot) = views.agents.get_mut(agent_id) else {
                    continue;
                };
                slot.generation += 1;
                match &slot.view {
                    Some(view) => {
                        if let Some(patched) = view.patched(*agent_id, head) {
                            slot.set(Some(Arc::new(patched)));
                        }
                    }
                    // A waiter whose view was not stored queries again.
                    None => slot.set(None),
                }
            }
        }
    }

    /// Drops `agent_id`'s view (its targets changed): its waiters query again.
    pub fn forget(&self, agent_id: Uuid) {
        if let Some(slot) = self.lock().agents.get_mut(&agent_id) {
            slot.generation += 1;
            slot.set(None);
        }
    }

    /// The agents whose stored views the periodic re-validation compares with PostgreSQL,
    /// each with the stamp to pass to [`DesiredViews::revalidate`]. Views of agents with no
    /// waiting request are dropped instead (they are queried again when asked for), so the
    /// re-validation's cost follows the connected agents.
    pub fn revalidation_candidates(&self) -> Vec<(Uuid, u64)> {
        let mut views = self.lock();
        views
            .agents
            .retain(|_, slot| slot.wake.receiver_count() > 0);
        views
            .agents
            .iter()
            .filter(|(_, slot)| slot.view.is_some())
            .map(|(agent_id, slot)| (*agent_id, slot.generation))
            .collect()
    }

    /// Replaces `agent_id`'s stored view with `view` (queried after
    /// [`DesiredViews::revalidation_candidates`] returned `generation`) when they differ and no
    /// change concerning the agent was applied since, waking its waiters. Returns whether
    /// the stored view was stale.
    pub fn revalidate(&self, agent_id: Uuid, generation: u64, view: AgentView) -> bool {
        let mut views = self.lock();
        let Some(slot) = views.agents.get_mut(&agent_id) else {
            return false;
        };
        if slot.generation != generation {
            return false;
        }
        match &slot.view {
            Some(stored) if stored.entries != view.entries => {
                slot.generation += 1;
                slot.set(Some(Arc::new(view)));
                true
            }
            _ => false,
        }
    }

    /// Drops every view (notifications may have been missed).
    pub fn forget_all(&self) {
        let mut views = self.lock();
        views
            .agents
            .retain(|_, slot| slot.wake.receiver_count() > 0);
        for slot in views.agents.values_mut() {
            slot.generation += 1;
            slot.set(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::store::HeadObject;

    fn entry(stack: Uuid, sequence: i64) -> DesiredEntry {
        DesiredEntry {
            stack_id: stack,
            stack_name: "ns/app".into(),
            deployment_object_id: Uuid::from_u128(sequence as u128),
            sequence_id: sequence,
            yaml_checksum: format!("sum-{sequence}"),
            is_deletion_marker: false,
            stack_deleted: false,
            stamp: sequence,
        }
    }

    fn head(stack: Uuid, sequence: i64, agents: &[Uuid]) -> StackHead {
        StackHead {
            stack_id: stack,
            stack_name: "ns/app".into(),
            stack_deleted: false,
            head: Some(HeadObject {
                deployment_object_id: Uuid::from_u128(sequence as u128),
                sequence_id: sequence,
                yaml_checksum: format!("sum-{sequence}"),
                is_deletion_marker: false,
                stamp: sequence,
            }),
            stamp: sequence,
            assigned: None,
            agents: agents.iter().copied().collect::<HashSet<_>>(),
            removal_reported: HashSet::new(),
        }
    }

    fn sequences(view: &AgentView) -> Vec<i64> {
        view.answer(0).0.iter().map(|s| s.sequence).collect()
    }

    #[test]
    fn a_new_head_replaces_the_entry_and_an_old_one_is_ignored() {
        let (agent, stack) = (Uuid::now_v7(), Uuid::now_v7());
        let view = AgentView::new(0, vec![entry(stack, 5)]);
        let patched = view.patched(agent, &head(stack, 7, &[agent])).unwrap();
        assert_eq!(sequences(&patched), [7]);
        assert!(patched.patched(agent, &head(stack, 6, &[agent])).is_none());
        assert!(patched.patched(agent, &head(stack, 7, &[agent])).is_none());
    }

    #[test]
    fn a_pin_to_an_older_sequence_applies_by_its_stamp_and_a_stale_head_does_not() {
        let (agent, stack) = (Uuid::now_v7(), Uuid::now_v7());
        let view = AgentView::new(0, vec![entry(stack, 7)]);
        let mut pinned = head(stack, 3, &[agent]);
        pinned.stamp = 9;
        pinned.head.as_mut().unwrap().stamp = 9;
        let rolled_back = view.patched(agent, &pinned).unwrap();
        assert_eq!(sequences(&rolled_back), [3]);
        // The head of before the pin (sequence 7, stamp 7) arrives late: ignored.
        assert!(
            rolled_back
                .patched(agent, &head(stack, 7, &[agent]))
                .is_none()
        );
    }

    #[test]
    fn a_progressive_head_serves_each_agent_its_assignment() {
        let (canary, other, stack) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut progressive = head(stack, 5, &[canary, other]);
        let mut assigned = HashMap::new();
        assigned.insert(canary, head(stack, 6, &[]).head.unwrap());
        assigned.insert(other, head(stack, 5, &[]).head.unwrap());
        progressive.assigned = Some(assigned);
        let canary_view = AgentView::new(0, vec![entry(stack, 5)]);
        assert_eq!(
            sequences(&canary_view.patched(canary, &progressive).unwrap()),
            [6]
        );
        let other_view = AgentView::new(0, vec![entry(stack, 5)]);
        assert!(other_view.patched(other, &progressive).is_none());
        // Not assigned yet (a new target): nothing is added; a removal older than the
        // entry is ignored.
        progressive.assigned.as_mut().unwrap().remove(&other);
        let empty = AgentView::new(0, vec![]);
        assert!(empty.patched(other, &progressive).is_none());
        let mut newer = entry(stack, 5);
        newer.stamp = 8;
        assert!(
            AgentView::new(0, vec![newer])
                .patched(other, &progressive)
                .is_none()
        );
    }

    #[test]
    fn a_newly_targeted_stack_is_added_in_order_and_an_untargeted_one_removed() {
        let agent = Uuid::now_v7();
        let (first, second) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let view = AgentView::new(0, vec![entry(second, 3)]);
        let added = view.patched(agent, &head(first, 4, &[agent])).unwrap();
        assert_eq!(sequences(&added), [4, 3]);
        let removed = added.patched(agent, &head(first, 5, &[])).unwrap();
        assert_eq!(sequences(&removed), [3]);
    }

    #[test]
    fn a_deletion_marker_stays_whatever_the_cursor_until_the_agent_reports_the_removal() {
        let (agent, other, stack) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let view = AgentView::new(0, vec![entry(stack, 5)]);
        let mut deleted = head(stack, 9, &[agent, other]);
        deleted.stack_deleted = true;
        deleted.head.as_mut().unwrap().is_deletion_marker = true;
        let patched = view.patched(agent, &deleted).unwrap();
        for cursor in [5, 9, 100] {
            let (stacks, max) = patched.answer(cursor);
            assert_eq!(stacks.len(), 1, "cursor {cursor}");
            assert!(stacks[0].deletion);
            assert_eq!(max, cursor.max(9));
        }
        // Once the agent has reported the removal, the marker leaves its view only.
        deleted.removal_reported.insert(agent);
        let reported = patched.patched(agent, &deleted).unwrap();
        assert!(reported.answer(0).0.is_empty());
        let other_view = AgentView::new(0, vec![entry(stack, 5)]);
        assert_eq!(
            sequences(&other_view.patched(other, &deleted).unwrap()),
            [9]
        );
    }

    #[test]
    fn only_affected_waiters_wake_and_views_queried_before_a_change_are_not_kept() {
        let views = DesiredViews::default();
        let (agent, other, stack) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut wake = views.subscribe(agent);
        let mut other_wake = views.subscribe(other);
        views.remember(
            agent,
            views.generation(agent),
            Arc::new(AgentView::new(0, vec![entry(stack, 1)])),
        );
        let before_unrelated_change = views.generation(other);
        let mut without_content = head(Uuid::now_v7(), 1, &[agent]);
        without_content.head = None;
        views.apply_heads(&[without_content]);
        views.remember(
            other,
            before_unrelated_change,
            Arc::new(AgentView::new(0, vec![])),
        );
        assert!(
            views.get(other, 0).is_some(),
            "another agent's change does not void a query"
        );
        wake.mark_unchanged();
        assert!(views.holds(agent, stack));

        views.apply_heads(&[head(stack, 2, &[agent])]);
        assert!(wake.has_changed().unwrap());
        assert!(!other_wake.has_changed().unwrap());
        wake.mark_unchanged();
        assert_eq!(sequences(&views.get(agent, 0).unwrap()), [2]);
        // A view queried for cursor 0 serves every later cursor.
        assert!(views.get(agent, 10).is_some());

        let stale = views.generation(agent);
        views.forget(agent);
        assert!(wake.has_changed().unwrap());
        views.remember(agent, stale, Arc::new(AgentView::new(0, vec![])));
        assert!(
            views.get(agent, 0).is_none(),
            "a view older than a change is not kept"
        );
        other_wake.mark_unchanged();
        views.forget_all();
        assert!(other_wake.has_changed().unwrap());
        assert!(views.get(other, 0).is_none());
    }

    #[test]
    fn revalidation_replaces_only_stale_views_unchanged_since_and_drops_idle_ones() {
        let views = DesiredViews::default();
        let (agent, busy, idle, stack) = (
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        let mut wake = views.subscribe(agent);
        let _busy_wake = views.subscribe(busy);
        drop(views.subscribe(idle));
        for id in [agent, busy, idle] {
            views.remember(
                id,
                views.generation(id),
                Arc::new(AgentView::new(0, vec![entry(stack, 1)])),
            );
        }
        let mut candidates = views.revalidation_candidates();
        candidates.sort();
        let mut expected = vec![
            (agent, views.generation(agent).unwrap()),
            (busy, views.generation(busy).unwrap()),
        ];
        expected.sort();
        assert_eq!(candidates, expected, "the idle agent's view is dropped");
        assert!(views.get(idle, 0).is_none());

        let stamp = |id| candidates.iter().find(|(a, _)| *a == id).unwrap().1;
        wake.mark_unchanged();
        assert!(!views.revalidate(
            agent,
            stamp(agent),
            AgentView::new(0, vec![entry(stack, 1)])
        ));
        assert!(
            !wake.has_changed().unwrap(),
            "an unchanged view wakes no one"
        );
        assert!(views.revalidate(
            agent,
            stamp(agent),
            AgentView::new(0, vec![entry(stack, 2)])
        ));
        assert!(wake.has_changed().unwrap());
        assert_eq!(sequences(&views.get(agent, 0).unwrap()), [2]);

        // A change applied while the re-validation queried wins over it.
        views.apply_heads(&[head(stack, 3, &[busy])]);
        assert!(!views.revalidate(busy, stamp(busy), AgentView::new(0, vec![entry(stack, 2)])));
        assert_eq!(sequences(&views.get(busy, 0).unwrap()), [3]);
    }

    #[test]
    fn a_view_serves_every_cursor() {
        let views = DesiredViews::default();
        let agent = Uuid::now_v7();
        let _wake = views.subscribe(agent);
        views.remember(
            agent,
            views.generation(agent),
            Arc::new(AgentView::new(8, vec![])),
        );
        assert!(views.get(agent, 8).is_some());
        assert!(views.get(agent, 3).is_some());
    }
}
