-- cmk-proxy registry, version 2: tables in transition from legacy plaintext
-- (`cmk-proxy encrypt`, docs/ADOPTING.md). One row per table while it
-- converts; the proxy's catalog refresh reads it, `check-config --live`
-- reports it, `encrypt` resumes from it.

CREATE TABLE IF NOT EXISTS cmk.adoptions (
    table_name   text PRIMARY KEY,
    phase        text NOT NULL CHECK (phase IN ('prepared', 'converting')),
    view_oid     oid NOT NULL,
    base_oid     oid NOT NULL,
    base_name    text NOT NULL,
    resume_after text[],
    prepared_at  timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE cmk.adoptions IS 'cmk-proxy: legacy tables being encrypted in place (cmk-proxy encrypt)';
