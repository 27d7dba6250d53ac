-- Managed API keys. The secret itself is never stored: only its SHA-256
-- digest (keys are 256 random bits, so a plain digest cannot be reversed)
-- and its last four characters, to tell keys apart in a list.

CREATE TABLE api_keys (
    id            text        PRIMARY KEY,
    name          text        NOT NULL,
    tenant        text        NOT NULL,
    digest        bytea       NOT NULL UNIQUE,
    hint          text        NOT NULL,
    priority      smallint,
    force_tier    boolean     NOT NULL DEFAULT false,
    allowed_models text[],
    allowed_tiers  text[],
    daily_usd     numeric(20, 9),
    monthly_usd   numeric(20, 9),
    metadata      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    rotated_from  text        REFERENCES api_keys (id),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Each gateway polls for keys changed since its last look.
CREATE INDEX api_keys_updated ON api_keys (updated_at);
CREATE INDEX api_keys_tenant ON api_keys (tenant);
