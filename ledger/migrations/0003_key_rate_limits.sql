-- A managed key's own rate limits, enforced across every gateway beside its
-- tenant's (issue 21). NULL: no limit of that kind for the key.

ALTER TABLE api_keys
    ADD COLUMN requests_per_minute integer CHECK (requests_per_minute > 0),
    ADD COLUMN tokens_per_minute   integer CHECK (tokens_per_minute > 0);
