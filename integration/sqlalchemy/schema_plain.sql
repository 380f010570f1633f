-- The app's own schema: plaintext columns, as it runs directly on PostgreSQL.
CREATE TABLE patients (
    id          serial PRIMARY KEY,
    tenant_id   text NOT NULL,
    name        text NOT NULL,
    ssn         text NOT NULL,
    birth_date  date NOT NULL,
    notes       text,
    weight_kg   numeric,
    allergies   jsonb,
    last_visit  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE appointments (
    id          serial PRIMARY KEY,
    tenant_id   text NOT NULL,
    patient_id  int NOT NULL REFERENCES patients (id) ON DELETE CASCADE,
    starts_at   timestamptz NOT NULL,
    reason      text NOT NULL
);
