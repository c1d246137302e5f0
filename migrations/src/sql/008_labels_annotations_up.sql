-- Labels are `key=value` strings used for selection; annotations are key/value metadata.
-- They belong to their stack or agent entirely, so they go when it is hard-deleted.
CREATE TABLE stack_labels (
    id       UUID PRIMARY KEY,
    stack_id UUID NOT NULL REFERENCES stacks (id) ON DELETE CASCADE,
    label    VARCHAR(64) NOT NULL,
    CONSTRAINT stack_labels_stack_label_key UNIQUE (stack_id, label)
);
CREATE INDEX stack_labels_label_idx ON stack_labels (label);

CREATE TABLE stack_annotations (
    id       UUID PRIMARY KEY,
    stack_id UUID NOT NULL REFERENCES stacks (id) ON DELETE CASCADE,
    key      VARCHAR(64) NOT NULL,
    value    VARCHAR(64) NOT NULL,
    CONSTRAINT stack_annotations_stack_key_key UNIQUE (stack_id, key)
);

CREATE TABLE agent_labels (
    id       UUID PRIMARY KEY,
    agent_id UUID NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    label    VARCHAR(64) NOT NULL,
    CONSTRAINT agent_labels_agent_label_key UNIQUE (agent_id, label)
);
CREATE INDEX agent_labels_label_idx ON agent_labels (label);

CREATE TABLE agent_annotations (
    id       UUID PRIMARY KEY,
    agent_id UUID NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    key      VARCHAR(64) NOT NULL,
    value    VARCHAR(64) NOT NULL,
    CONSTRAINT agent_annotations_agent_key_key UNIQUE (agent_id, key)
);
