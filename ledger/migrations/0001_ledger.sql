-- The usage ledger: one row per metered request, partitioned by month, and
-- the hourly sums the usage API reads, kept in the same transaction.
--
-- A row's primary key is (request_id, finished_at): the partition key must be
-- in it, and a row written twice (a batch replayed after a crash) has the same
-- finished_at, so it is stored once. Money is in whole nano-dollars and GPU
-- time in whole micro-GPU-seconds, exactly the response headers' figures.

CREATE TABLE usage_requests (
    finished_at        timestamptz NOT NULL,
    request_id         text        NOT NULL,
    tenant             text        NOT NULL,
    key_id             text        NOT NULL,
    tier               text        NOT NULL,
    model              text        NOT NULL,
    replica            text        NOT NULL,
    endpoint           text        NOT NULL,
    status             smallint    NOT NULL,
    error_type         text,
    cache              text        NOT NULL,
    prompt_tokens      integer     NOT NULL,
    completion_tokens  integer     NOT NULL,
    cached_tokens      integer     NOT NULL,
    gpu_us             bigint      NOT NULL,
    cost_nanos         bigint      NOT NULL,
    cost_loaded_nanos  bigint      NOT NULL,
    saved_nanos        bigint      NOT NULL,
    attempts           smallint    NOT NULL,
    route_score        real,
    fallback_from      text,
    duration_us        bigint      NOT NULL,
    ttft_us            bigint,
    PRIMARY KEY (request_id, finished_at)
) PARTITION BY RANGE (finished_at);

-- Finance's drill-down: one tenant's or one key's requests over a range, newest first.
CREATE INDEX usage_requests_tenant_time ON usage_requests (tenant, finished_at);
CREATE INDEX usage_requests_key_time ON usage_requests (key_id, finished_at);
CREATE INDEX usage_requests_time ON usage_requests (finished_at);

-- Sums per UTC hour: what GET /v1/usage reads. Updated only from the rows an
-- insert actually stored (a duplicate adds nothing), so they are exact.
CREATE TABLE usage_hourly (
    hour               timestamptz NOT NULL,
    tenant             text        NOT NULL,
    key_id             text        NOT NULL,
    tier               text        NOT NULL,
    model              text        NOT NULL,
    cache              text        NOT NULL,
    requests           bigint      NOT NULL,
    errors             bigint      NOT NULL,
    prompt_tokens      bigint      NOT NULL,
    completion_tokens  bigint      NOT NULL,
    cached_tokens      bigint      NOT NULL,
    gpu_us             bigint      NOT NULL,
    cost_nanos         bigint      NOT NULL,
    cost_loaded_nanos  bigint      NOT NULL,
    saved_nanos        bigint      NOT NULL,
    PRIMARY KEY (hour, tenant, key_id, tier, model, cache)
);
CREATE INDEX usage_hourly_tenant_hour ON usage_hourly (tenant, hour);
