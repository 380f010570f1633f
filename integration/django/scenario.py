"""A Django app's everyday ORM calls on a model with protected fields,
printed as a transcript (one JSON line per step). Run directly against
PostgreSQL with the plaintext schema and through cmk-proxy with the
encrypted one, the transcripts must be equal: the app needs no change.

Env: DATABASE_URL (and PGSSLROOTCERT when it asks for verify-full).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

import django  # noqa: E402

django.setup()

from clinic.models import Patient  # noqa: E402


steps = 0


def show(step, value):
    global steps
    steps += 1
    print(json.dumps({"step": step, "value": value}, sort_keys=True), flush=True)


def rows(queryset):
    return [list(r) for r in queryset.order_by("id").values_list("id", "tenant_id", "name", "ssn", "notes")]


# create
ada = Patient.objects.create(tenant_id="acme", name="Ada", ssn="123-45-6789", notes="allergic to penicillin")
bob = Patient.objects.create(tenant_id="acme", name="Bob", ssn="123-45-0000", notes=None)
grace = Patient.objects.create(tenant_id="globex", name="Grace", ssn="123-45-6789", notes="globex's")
show("create", [ada.id, bob.id, grace.id])

# get
p = Patient.objects.get(pk=ada.id)
show("get", [p.tenant_id, p.name, p.ssn, p.notes])

# filter by tenant
show("filter tenant", rows(Patient.objects.filter(tenant_id="acme")))

# save(): every field, the tenant column included
p.notes = "saved"
p.ssn = "123-45-6780"
p.save()
show("save", rows(Patient.objects.filter(pk=ada.id)))

# update()
show("update", Patient.objects.filter(tenant_id="acme", name="Bob").update(notes="updated"))
show("after update", rows(Patient.objects.filter(tenant_id="acme")))

# bulk_create, and its upsert form (ON CONFLICT ... DO UPDATE SET tenant_id = EXCLUDED.tenant_id, ...)
made = Patient.objects.bulk_create(
    [
        Patient(tenant_id="acme", name="Carol", ssn="555-55-5555", notes="bulk"),
        Patient(tenant_id="globex", name="Dan", ssn="666-66-6666", notes=None),
    ]
)
show("bulk_create", [m.id for m in made])
Patient.objects.bulk_create(
    [Patient(id=made[0].id, tenant_id="acme", name="Carol", ssn="555-55-5556", notes="upserted")],
    update_conflicts=True,
    unique_fields=["id"],
    update_fields=["tenant_id", "name", "ssn", "notes"],
)
show("upsert", rows(Patient.objects.filter(pk=made[0].id)))

# filter(ssn=...) on the searchable field: with the tenant in the filter,
# and with the session tenant of the `acme` connection
show("filter ssn", rows(Patient.objects.filter(tenant_id="acme", ssn="123-45-6780")))
show("filter ssn other tenant", rows(Patient.objects.filter(tenant_id="globex", ssn="123-45-6789")))
show("filter ssn none", rows(Patient.objects.filter(tenant_id="acme", ssn="123-45-6789")))
show("filter ssn__in", rows(Patient.objects.filter(tenant_id="acme", ssn__in=["555-55-5556", "123-45-0000"])))
show("filter ssn session tenant", rows(Patient.objects.using("acme").filter(ssn="555-55-5556")))
show("get ssn session tenant", Patient.objects.using("acme").get(ssn="123-45-0000").name)
show("exists", Patient.objects.filter(tenant_id="acme", ssn="123-45-0000").exists())

# delete: an instance, then a queryset
Patient.objects.get(pk=bob.id).delete()
show("delete", rows(Patient.objects.filter(tenant_id="acme")))
show("delete queryset", Patient.objects.filter(tenant_id="globex", name="Dan").delete()[0])
show("count", [Patient.objects.filter(tenant_id=t).count() for t in ("acme", "globex")])

print(f"django: {steps} passed, 0 failed, 0 skipped")
