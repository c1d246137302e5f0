-- Who did what, when: every change of desired state, targeting, keys and access the hub
-- makes or refuses. Append-only (an UPDATE is refused); old rows are pruned in batches by
-- the leader after the retention period. Details never hold keys or manifest content.
CREATE TABLE audit_log (
    id                 BIGSERIAL PRIMARY KEY,
    at                 TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A Kubernetes field manager (`kubectl-client-side-apply`, `helm`), a generator, an
    -- agent (`agent/<name>`), or the operator itself (`brokkr.io/operator`).
    actor              VARCHAR(255) NOT NULL,
    action             VARCHAR(64)  NOT NULL,
    resource_kind      VARCHAR(64)  NOT NULL,
    resource_namespace VARCHAR(255),
    resource_name      VARCHAR(255) NOT NULL,
    -- The row id of the resource in this database (stack, agent, generator), when it has one.
    resource_id        UUID,
    details            JSONB NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX audit_log_at_idx ON audit_log (at);
CREATE INDEX audit_log_resource_idx
    ON audit_log (resource_kind, resource_namespace, resource_name, at);

CREATE FUNCTION refuse_audit_log_update() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_log rows are append-only';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER refuse_audit_log_update
    BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION refuse_audit_log_update();
