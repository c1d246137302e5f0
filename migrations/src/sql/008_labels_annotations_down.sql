DROP TABLE IF EXISTS agent_annotations;
DROP TABLE IF EXISTS agent_labels;
DROP TABLE IF EXISTS stack_annotations;
DROP TABLE IF EXISTS stack_labels;
