-- Managed API keys. The secret itself is never stored: only its SHA-256
-- digest (keys are 256 random bits, so a plain digest cannot be reversed)
-- and its last four characters, to tell keys apart in a list.
--
-- NULL allowed_models / allowed_tiers: any. Budgets are stored and shown;
-- they are enforced once spend reservations exist (issue 21).

CREATE TABLE api_keys (
    id            text        PRIMARY KEY,
    name          text        NOT NULL CHECK (name <> ''),
    tenant        text        NOT NULL CHECK (tenant <> ''),
    digest        bytea       NOT NULL UNIQUE CHECK (length(digest) = 32),
    hint          text        NOT NULL,
    priority      smallint    CHECK (priority BETWEEN -100 AND 100),
    force_tier    boolean     NOT NULL DEFAULT false,
    allowed_models text[],
    allowed_tiers  text[],
    daily_usd     numeric(20, 9) CHECK (daily_usd >= 0),
    monthly_usd   numeric(20, 9) CHECK (monthly_usd >= 0),
    metadata      jsonb       NOT NULL DEFAULT '{}'::jsonb
                              CHECK (jsonb_typeof(metadata) = 'object'),
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    rotated_from  text        REFERENCES api_keys (id),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Each gateway polls for keys changed since its last look, so every change
-- must move updated_at: the trigger does it for any UPDATE, a hand-written
-- one included.
CREATE FUNCTION api_keys_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END
$$;
CREATE TRIGGER api_keys_touch BEFORE UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_touch();

CREATE INDEX api_keys_updated ON api_keys (updated_at);
CREATE INDEX api_keys_tenant ON api_keys (tenant, created_at);
