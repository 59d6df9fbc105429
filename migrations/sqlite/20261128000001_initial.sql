-- The initial schema. Times are Unix seconds (BIGINT), as in the API; JSON documents are TEXT.
-- Every table with listings has a monotonic `seq` for stable cursor pagination; `id` is the public id.

CREATE TABLE projects (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

-- The project that anonymous requests use when the server runs without keys on loopback.
INSERT INTO projects (id, name, created_at) VALUES ('proj-default', 'default', 0);

CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,
    project_id      TEXT NOT NULL REFERENCES projects (id),
    name            TEXT NOT NULL,
    display_prefix  TEXT NOT NULL,
    key_hash        TEXT NOT NULL UNIQUE,
    created_at      BIGINT NOT NULL,
    last_used_at    BIGINT,
    revoked_at      BIGINT
);

CREATE TABLE files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    project_id      TEXT NOT NULL REFERENCES projects (id),
    filename        TEXT NOT NULL,
    purpose         TEXT NOT NULL,
    bytes           BIGINT NOT NULL,
    status          TEXT NOT NULL,
    status_details  TEXT,
    format          TEXT,
    examples        BIGINT,
    storage_key     TEXT NOT NULL,
    created_at      BIGINT NOT NULL
);
CREATE INDEX files_by_project ON files (project_id, seq);

CREATE TABLE fine_tuning_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT NOT NULL UNIQUE,
    project_id          TEXT NOT NULL REFERENCES projects (id),
    model               TEXT NOT NULL,
    training_file       TEXT NOT NULL,
    validation_file     TEXT,
    status              TEXT NOT NULL,
    method              TEXT NOT NULL,
    hyperparameters     TEXT NOT NULL,
    suffix              TEXT,
    seed                BIGINT NOT NULL,
    metadata            TEXT,
    fine_tuned_model    TEXT,
    trained_tokens      BIGINT,
    error               TEXT,
    result_files        TEXT NOT NULL DEFAULT '[]',
    step                BIGINT NOT NULL DEFAULT 0,
    total_steps         BIGINT,
    epoch               REAL,
    estimated_finish    BIGINT,
    -- cancel or pause asked for while running; the executor acts on it at the next step
    requested_action    TEXT,
    lease_owner         TEXT,
    lease_expires_at    BIGINT,
    attempts            BIGINT NOT NULL DEFAULT 0,
    created_at          BIGINT NOT NULL,
    started_at          BIGINT,
    finished_at         BIGINT
);
CREATE INDEX jobs_by_project ON fine_tuning_jobs (project_id, seq);
CREATE INDEX jobs_by_status ON fine_tuning_jobs (status, seq);

CREATE TABLE job_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    job_id      TEXT NOT NULL REFERENCES fine_tuning_jobs (id) ON DELETE CASCADE,
    level       TEXT NOT NULL,
    type        TEXT NOT NULL,
    message     TEXT NOT NULL,
    data        TEXT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX job_events_by_job ON job_events (job_id, seq);

CREATE TABLE checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    job_id       TEXT NOT NULL REFERENCES fine_tuning_jobs (id) ON DELETE CASCADE,
    step_number  BIGINT NOT NULL,
    metrics      TEXT NOT NULL,
    storage_key  TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    UNIQUE (job_id, step_number)
);

CREATE TABLE models (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    project_id   TEXT NOT NULL REFERENCES projects (id),
    job_id       TEXT REFERENCES fine_tuning_jobs (id) ON DELETE SET NULL,
    base_model   TEXT NOT NULL,
    method       TEXT NOT NULL,
    storage_key  TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX models_by_project ON models (project_id, seq);
