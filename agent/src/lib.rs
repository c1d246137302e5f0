//! brokkr-agent: the spoke-cluster agent of Brokkr.
//!
//! It long-polls the hub for the desired state of this cluster, fetches the deployment objects
//! that changed, applies them with server-side apply (field manager `brokkr.io/agent`, forced),
//! prunes what a stack no longer holds, corrects drift, and reports apply, delete and health
//! events plus heartbeats back to the hub.
//!
//! [`run`] is the whole binary's behaviour; [`start`] starts it against a given cluster
//! client and hands back an [`AgentHandle`] (tests use it).
//!
//! Decisions worth knowing:
//! - A namespaced object without `metadata.namespace` goes to `default`; cluster-scoped
//!   objects never get a namespace ([`manifest::prepare`]).
//! - Apply order: Namespaces, CRDs (then a bounded wait until they are `Established`), then
//!   the rest. Deletion runs the other way. One failing object does not stop the others.
//! - Ownership is decided by a persistent inventory per stack ([`inventory`]): a ConfigMap
//!   `brokkr-inventory-<stack id>` in the agent's namespace listing group/version/kind/
//!   namespace/name/uid of every object applied for the stack, written before applying
//!   (intent) and trimmed once objects are confirmed gone. Pruning, stack deletion,
//!   untargeting and the start-up sweep read it, so objects of every kind are found after a
//!   restart. An object is deleted only if the inventory lists it and its live uid matches;
//!   labels never authorise a deletion. A kind that did not resolve this round is not pruned
//!   this round.
//! - No silent adoption: an object that exists and is not in the stack's inventory is
//!   refused ("exists and is not managed by Brokkr; ...") unless the stack's policy has
//!   `adoptExisting`; an object another stack's inventory lists is never taken over.
//! - The stack's policy (adoption, `deletionPolicy: Delete | Orphan`) comes as the first line
//!   of the deployment object ([`brokkr_crds::policy`]). With `Orphan`, a deleted or
//!   untargeted stack's objects stay, without `brokkr.io/*` labels and annotations, and the
//!   inventory is deleted.
//! - A deletion marker is reported `Delete Success` only when everything the inventory
//!   listed is gone (or orphaned); else `Delete Failure` naming what is left, retried with
//!   backoff. A stack that leaves the desired set is removed without an event (there is no
//!   deployment object to report on); inventories of stacks the hub no longer lists are
//!   swept on the first desired state and on every resync.
//! - Nothing is ever deleted because the hub cannot be reached or refuses the key: only a
//!   successful answer from the hub changes the desired state.
//! - Events are reported when their outcome changes (not on every retry or resync); a stack's
//!   health is reported when it changes or the deployment object does. A stack with no applied
//!   objects is `unknown` ([`health`]).
//! - Drift: a watch on every applied kind, selected by the agent label, syncs a stack whose
//!   object was deleted or no longer holds what was applied (debounced), and a re-list
//!   after a watch gap counts objects it no longer finds as deleted. The sync finds the
//!   drift from the live objects it reads: `driftPolicy: Correct` re-applies it, `Detect`
//!   never writes for a version already applied and only reports it; either way one `Drift`
//!   event per episode. `ignoreDifferences` pointers are neither applied nor compared. The
//!   periodic resync syncs everything regardless.
//! - Scope ([`scope`]): `--allowed-namespaces` and `--allow-cluster-scoped=false` refuse an
//!   object outside them on its own (an Apply Failure naming it and the allowed namespaces),
//!   before any call about it; the stack's other objects still apply. With allowed
//!   namespaces the agent lists and watches only in them (drift watches per namespace, none
//!   for cluster-scoped kinds), so namespaced Roles are all it needs. A scope change never
//!   deletes anything: refused objects stay in place and in the inventory.

pub mod agent;
pub mod apply;
pub mod config;
pub mod health;
pub mod hub;
pub mod inventory;
pub mod key_rotation;
pub mod manifest;
pub mod metrics;
pub mod reporter;
pub mod scope;

pub use agent::{AgentError, AgentHandle, run, start};
pub use config::{AGENT_KEY_ENV, AgentKey, Args, Config, ConfigError};
