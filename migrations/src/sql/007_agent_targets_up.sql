CREATE TABLE agent_targets (
    id       UUID PRIMARY KEY,
    agent_id UUID NOT NULL REFERENCES agents (id),
    stack_id UUID NOT NULL REFERENCES stacks (id),
    CONSTRAINT agent_targets_agent_stack_key UNIQUE (agent_id, stack_id)
);

CREATE INDEX agent_targets_stack_id_idx ON agent_targets (stack_id);
