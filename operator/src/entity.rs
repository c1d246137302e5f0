//! SeaORM entities, one module per table of the schema in `brokkr-migrations`.

pub mod agent_annotations;
pub mod agent_events;
pub mod agent_labels;
pub mod agent_targets;
pub mod agents;
pub mod alerts;
pub mod api_keys;
pub mod deployment_objects;
pub mod generators;
pub mod stack_annotations;
pub mod stack_labels;
pub mod stacks;
