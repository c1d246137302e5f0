-- Alerts (the seed's `alerts` history, keyed to AlertRule resources instead of
-- `alert_configs` rows) and the notifications that carry them to NotificationChannels.
--
-- An alert is one episode of one rule's condition on one subject (an Agent or a Stack,
-- by its resource uid, so a re-created object is a new subject): `firing` from when the
-- condition had held for the rule's `for`, `resolved` once it cleared. At most one
-- episode per (rule, condition, subject) fires at a time; the unique index makes a second
-- evaluation (another replica, a restart) a no-op instead of a duplicate.
CREATE TABLE alerts (
    id                UUID PRIMARY KEY,
    rule_uid          UUID NOT NULL,
    rule_namespace    VARCHAR(253) NOT NULL,
    rule_name         VARCHAR(253) NOT NULL,
    condition         VARCHAR(32) NOT NULL,
    subject_kind      VARCHAR(16) NOT NULL CHECK (subject_kind IN ('Agent', 'Stack')),
    subject_uid       UUID NOT NULL,
    subject_namespace VARCHAR(253),
    subject_name      VARCHAR(253) NOT NULL,
    severity          VARCHAR(16) NOT NULL,
    state             VARCHAR(16) NOT NULL CHECK (state IN ('firing', 'resolved')),
    message           TEXT NOT NULL,
    -- When the condition began to hold (before `for` passed).
    started_at        TIMESTAMPTZ NOT NULL,
    fired_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    resolved_at       TIMESTAMPTZ,
    -- When a notification of this alert was last delivered, and how many delivery
    -- attempts its notifications took in all.
    last_notified_at  TIMESTAMPTZ,
    delivery_attempts INTEGER NOT NULL DEFAULT 0,
    -- When the last firing notification (first or reminder) was queued.
    reminded_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((state = 'resolved') = (resolved_at IS NOT NULL))
);

CREATE UNIQUE INDEX alerts_one_firing_episode
    ON alerts (rule_uid, condition, subject_uid) WHERE state = 'firing';
CREATE INDEX alerts_resolved_at_idx ON alerts (resolved_at) WHERE state = 'resolved';

-- One row per (notification, channel): the body is fixed when it is queued, so every
-- retry sends the same bytes with the same id. Only the leader sends; everything it needs
-- to resume after a restart or failover is here.
CREATE TABLE alert_notifications (
    id                UUID PRIMARY KEY,
    alert_id          UUID NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    channel_namespace VARCHAR(253) NOT NULL,
    channel_name      VARCHAR(253) NOT NULL,
    body              JSONB NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at      TIMESTAMPTZ,
    -- Given up on (the retry window passed): never sent again.
    abandoned_at      TIMESTAMPTZ,
    last_error        TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX alert_notifications_due_idx
    ON alert_notifications (next_attempt_at)
    WHERE delivered_at IS NULL AND abandoned_at IS NULL;
CREATE INDEX alert_notifications_alert_id_idx ON alert_notifications (alert_id);
