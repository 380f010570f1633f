-- cmk-proxy registry, version 3: the way back out (`cmk-proxy decrypt`,
-- docs/ADOPTING.md) and recorded positions of resumable runs.
--
-- A table leaving the policy's format is first `leaving` (its transition
-- view made beside it, not yet swapped in), then `converting` like a table
-- being encrypted: the transition state is the same in both directions.

ALTER TABLE cmk.adoptions DROP CONSTRAINT IF EXISTS adoptions_phase_check;
ALTER TABLE cmk.adoptions ADD CONSTRAINT adoptions_phase_check
    CHECK (phase IN ('prepared', 'leaving', 'converting'));

-- Where a `decrypt` or `reencrypt` run stopped: the primary key (text form)
-- of the last row it committed, so a run started again after a kill goes on
-- from there. One row per task (`decrypt public.t`, `decrypt public.t
-- tenant acme`, `reencrypt public.t tenant acme`); deleted when it is done.
CREATE TABLE IF NOT EXISTS cmk.positions (
    task         text PRIMARY KEY,
    resume_after text[] NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE cmk.positions IS 'cmk-proxy: where a resumable decrypt or reencrypt run stopped';
