-- The demo's protected table (docker-compose.yml): ciphertext columns are
-- bytea, the wrapped data keys live in cmk_edek. cmk-proxy creates its own
-- `cmk` schema (key registry) at start.
CREATE TABLE IF NOT EXISTS patients (
    id serial PRIMARY KEY,
    tenant_id text NOT NULL,
    ssn bytea,
    ssn_bidx bytea,
    birth_date bytea,
    notes bytea,
    cmk_edek jsonb
);
