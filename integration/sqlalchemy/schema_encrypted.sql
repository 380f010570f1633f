-- The same app behind cmk-proxy: the protected columns of patients are
-- stored as bytea (envelopes), with the blind index of ssn and the EDEK
-- column the proxy manages. The app's code does not change: through the
-- proxy these columns still read and write as text/date/numeric/jsonb/
-- timestamptz. Policy (tables.public.patients.columns): ssn text (search:
-- equality), birth_date date, notes text, weight_kg numeric, allergies jsonb,
-- last_visit timestamptz.
CREATE TABLE patients (
    id          serial PRIMARY KEY,
    tenant_id   text NOT NULL,
    name        text NOT NULL,
    ssn         bytea NOT NULL,
    ssn_bidx    bytea,
    birth_date  bytea NOT NULL,
    notes       bytea,
    weight_kg   bytea,
    allergies   bytea,
    last_visit  bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    cmk_edek    jsonb,
    -- Every ssn has its blind index: lookups by ssn are answered (docs/SEARCH.md).
    CONSTRAINT cmk_bidx_ssn CHECK ((ssn IS NULL) = (ssn_bidx IS NULL))
);
CREATE INDEX patients_ssn_lookup ON patients (tenant_id, ssn_bidx);

CREATE TABLE appointments (
    id          serial PRIMARY KEY,
    tenant_id   text NOT NULL,
    patient_id  int NOT NULL REFERENCES patients (id) ON DELETE CASCADE,
    starts_at   timestamptz NOT NULL,
    reason      text NOT NULL
);
