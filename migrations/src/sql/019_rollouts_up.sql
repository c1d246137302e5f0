-- Pins and progressive rollouts: what a stack serves is no longer always its newest
-- revision.
--   pinned_object_id: spec.pinnedRevision, resolved; served to every targeted agent.
--   progressive:      spec.rollout is set; each agent is served its row of
--                     rollout_assignments (nothing until its wave is reached).
--   serving_stamp:    drawn from the deployment object sequence whenever the two above
--                     change, so that "what this stack serves" has a number that only
--                     grows (a pin may serve an older sequence); hub replicas use it to
--                     ignore notifications older than what they already hold.
ALTER TABLE stacks
    ADD COLUMN pinned_object_id UUID,
    ADD COLUMN progressive BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN serving_stamp BIGINT NOT NULL DEFAULT 0;

-- The revision each agent is assigned while a stack rolls out progressively. Only reports
-- made since `assigned_at` count for it; `health_clock_at` starts its health timeout (a
-- resumed rollout restarts it). `serving_stamp`, drawn from the same sequence on every
-- write, orders the assignments of one agent.
CREATE TABLE rollout_assignments (
    agent_id             UUID NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    stack_id             UUID NOT NULL REFERENCES stacks (id) ON DELETE CASCADE,
    deployment_object_id UUID NOT NULL,
    assigned_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    health_clock_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    serving_stamp        BIGINT NOT NULL DEFAULT nextval('deployment_objects_sequence_id_seq'),
    PRIMARY KEY (agent_id, stack_id)
);

CREATE INDEX rollout_assignments_stack_id_idx ON rollout_assignments (stack_id);

-- Stamps a row of `stacks` or `rollout_assignments` whose serving changes.
CREATE FUNCTION stamp_serving_change() RETURNS trigger AS $$
BEGIN
    NEW.serving_stamp := nextval('deployment_objects_sequence_id_seq');
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER stamp_stack_serving_change
    BEFORE UPDATE OF pinned_object_id, progressive ON stacks
    FOR EACH ROW
    WHEN (OLD.pinned_object_id IS DISTINCT FROM NEW.pinned_object_id
          OR OLD.progressive IS DISTINCT FROM NEW.progressive)
    EXECUTE FUNCTION stamp_serving_change();

CREATE FUNCTION notify_stack_serving_changed() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('brokkr_desired', 's:' || NEW.id);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER notify_stack_serving_changed
    AFTER UPDATE OF pinned_object_id, progressive ON stacks
    FOR EACH ROW
    WHEN (OLD.pinned_object_id IS DISTINCT FROM NEW.pinned_object_id
          OR OLD.progressive IS DISTINCT FROM NEW.progressive)
    EXECUTE FUNCTION notify_stack_serving_changed();

CREATE TRIGGER stamp_rollout_assignment
    BEFORE UPDATE ON rollout_assignments
    FOR EACH ROW EXECUTE FUNCTION stamp_serving_change();

-- One `s:<stack>` per stack and statement, by 009's function (which reads the changed rows
-- as the transition table `inserted`, whatever the statement).
CREATE TRIGGER notify_rollout_assignments_inserted
    AFTER INSERT ON rollout_assignments
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notify_deployment_objects_inserted();

CREATE TRIGGER notify_rollout_assignments_updated
    AFTER UPDATE ON rollout_assignments
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notify_deployment_objects_inserted();

CREATE TRIGGER notify_rollout_assignments_deleted
    AFTER DELETE ON rollout_assignments
    REFERENCING OLD TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notify_deployment_objects_inserted();
