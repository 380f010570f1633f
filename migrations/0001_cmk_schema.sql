-- cmk-proxy registry, version 1: tenants and their wrapped data keys.
-- Applied by `cmk-proxy migrate` inside one transaction that holds
-- pg_advisory_xact_lock, so several replicas may run it at once.
-- Every statement is idempotent (IF NOT EXISTS) so a hand-run is safe too.

CREATE SCHEMA IF NOT EXISTS cmk;

CREATE TABLE IF NOT EXISTS cmk.tenants (
    tenant_id  text PRIMARY KEY,
    provider   text NOT NULL,
    key_ref    text NOT NULL,
    status     text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    audit_sink jsonb,
    created_at timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS cmk.data_keys (
    dek_id     uuid PRIMARY KEY,
    tenant_id  text REFERENCES cmk.tenants (tenant_id),
    provider   text,
    key_ref    text,
    edek       bytea NOT NULL,
    epoch      int NOT NULL,
    created_at timestamptz DEFAULT now(),
    retired_at timestamptz,
    UNIQUE (tenant_id, epoch)
);

COMMENT ON TABLE cmk.tenants IS 'cmk-proxy: one row per tenant and its customer-managed key';
COMMENT ON TABLE cmk.data_keys IS 'cmk-proxy: wrapped data keys (EDEKs), one per tenant and epoch';
