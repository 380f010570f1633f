"""The clinic app's own tests. They only use the app's API and DATABASE_URL,
so they run unchanged directly against PostgreSQL (schema_plain.sql) and
through cmk-proxy (schema_encrypted.sql)."""

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from app import (
    find_by_name,
    find_by_ssn,
    find_by_ssns,
    get_patient,
    import_patient,
    list_patients,
    patient_with_appointments,
    record_visit,
    register_patient,
    register_patients,
    schedule_appointment,
    delete_patient,
    tenant_session,
    update_notes,
    upcoming_appointments,
)

IST = timezone(timedelta(hours=5, minutes=30))
EDT = timezone(timedelta(hours=-4))


def test_register_and_read_back_every_field(factory):
    visit = datetime(2024, 6, 1, 12, 34, 56, 789000, tzinfo=IST)
    with tenant_session(factory, "acme") as s, s.begin():
        p = register_patient(
            s,
            "Ada Lovelace",
            "123-45-6789",
            date(1815, 12, 10),
            notes="Allergic to penicillin — ünïcödé ✓ 🐘",
            weight_kg=Decimal("61.50"),
            allergies={"drugs": ["penicillin", "latex"], "severity": 3, "confirmed": True, "since": None},
        )
        record_visit(s, p.id, visit)
        pid = p.id
        assert isinstance(pid, int)
        assert p.created_at is not None
    with tenant_session(factory, "acme") as s, s.begin():
        got = get_patient(s, pid)
        assert got is not None
        assert (got.tenant_id, got.name, got.ssn, got.birth_date) == ("acme", "Ada Lovelace", "123-45-6789", date(1815, 12, 10))
        assert got.notes == "Allergic to penicillin — ünïcödé ✓ 🐘"
        assert got.weight_kg == Decimal("61.50") and str(got.weight_kg) == "61.50"
        assert got.allergies == {"drugs": ["penicillin", "latex"], "severity": 3, "confirmed": True, "since": None}
        assert got.last_visit == visit
        assert got.last_visit.utcoffset() is not None


def test_optional_fields_stay_none_and_long_notes_round_trip(factory):
    long_notes = "".join(chr(ord("a") + i % 26) for i in range(4000)) + " — end ✓"
    with tenant_session(factory, "acme") as s, s.begin():
        a = register_patient(s, "Grace Hopper", "123-45-0001", date(1906, 12, 9))
        b = register_patient(s, "Katherine Johnson", "123-45-0002", date(1918, 8, 26), notes=long_notes, weight_kg=Decimal("-0.001"), allergies=[])
        ids = (a.id, b.id)
    with tenant_session(factory, "acme") as s, s.begin():
        a, b = (get_patient(s, i) for i in ids)
        assert (a.notes, a.weight_kg, a.allergies, a.last_visit) == (None, None, None, None)
        assert b.notes == long_notes
        assert str(b.weight_kg) == "-0.001"
        assert b.allergies == []


def test_update_notes_and_visit(factory):
    with tenant_session(factory, "acme") as s, s.begin():
        pid = register_patient(s, "Alan Turing", "123-45-1954", date(1912, 6, 23), notes="first").id
    with tenant_session(factory, "acme") as s, s.begin():
        update_notes(s, pid, "second ✓")
        record_visit(s, pid, datetime(1954, 6, 7, 8, 0, tzinfo=EDT), weight_kg=Decimal("70.2"))
    with tenant_session(factory, "acme") as s, s.begin():
        got = get_patient(s, pid)
        assert (got.notes, got.weight_kg, got.last_visit) == ("second ✓", Decimal("70.2"), datetime(1954, 6, 7, 12, 0, tzinfo=timezone.utc))
        update_notes(s, pid, None)
    with tenant_session(factory, "acme") as s, s.begin():
        assert get_patient(s, pid).notes is None


def test_import_patient_upserts_by_id(factory):
    with tenant_session(factory, "globex") as s, s.begin():
        import_patient(s, 1000, name="Hedy Lamarr", ssn="123-45-1000", birth_date=date(1914, 11, 9), notes="imported")
        import_patient(s, 1000, name="Hedy Lamarr", ssn="123-45-1001", birth_date=date(1914, 11, 9), notes="re-imported ✓")
        import_patient(s, 1001, name="Mary Jackson", ssn="123-45-1002", birth_date=date(1921, 4, 9))
    with tenant_session(factory, "globex") as s, s.begin():
        got = [(p.id, p.ssn, p.notes, p.birth_date) for p in list_patients(s)]
        assert got == [
            (1000, "123-45-1001", "re-imported ✓", date(1914, 11, 9)),
            (1001, "123-45-1002", None, date(1921, 4, 9)),
        ]


def test_bulk_registration_assigns_ids_in_order(factory):
    rows = [
        {"name": f"Bulk {i}", "ssn": f"123-45-20{i:02d}", "birth_date": date(1990, 1, 1 + i), "notes": f"bulk note {i}",
         "allergies": {"n": i}}
        for i in range(5)
    ]
    with tenant_session(factory, "acme") as s, s.begin():
        patients = register_patients(s, rows)
        ids = [p.id for p in patients]
        assert all(isinstance(i, int) for i in ids) and ids == sorted(ids)
    with tenant_session(factory, "acme") as s, s.begin():
        got = [(p.id, p.name, p.ssn, p.birth_date, p.notes, p.allergies) for p in list_patients(s)]
        assert got == [(i, r["name"], r["ssn"], r["birth_date"], r["notes"], r["allergies"]) for i, r in zip(ids, rows)]


def test_appointments_and_relationships(factory):
    t0 = datetime(2025, 3, 1, 9, 30, tzinfo=timezone.utc)
    with tenant_session(factory, "acme") as s, s.begin():
        pid = register_patient(s, "Barbara Liskov", "123-45-3000", date(1939, 11, 7), notes="substitution").id
        schedule_appointment(s, pid, t0 + timedelta(days=7), "follow-up")
        schedule_appointment(s, pid, t0, "check-up")
    with tenant_session(factory, "acme") as s, s.begin():
        p = patient_with_appointments(s, pid)
        assert [(a.reason, a.starts_at) for a in p.appointments] == [("check-up", t0), ("follow-up", t0 + timedelta(days=7))]
        upcoming = upcoming_appointments(s)
        assert [(a.reason, a.patient.ssn, a.patient.birth_date, a.patient.notes) for a in upcoming] == [
            ("check-up", "123-45-3000", date(1939, 11, 7), "substitution"),
            ("follow-up", "123-45-3000", date(1939, 11, 7), "substitution"),
        ]


def test_failed_transaction_leaves_nothing_behind(factory):
    with pytest.raises(RuntimeError):
        with tenant_session(factory, "acme") as s, s.begin():
            register_patient(s, "Ghost", "123-45-9999", date(2000, 1, 1), notes="never stored")
            raise RuntimeError("abort")
    with tenant_session(factory, "acme") as s, s.begin():
        assert find_by_name(s, "Ghost") == []


def test_delete_patient_cascades(factory):
    with tenant_session(factory, "acme") as s, s.begin():
        pid = register_patient(s, "Temp", "123-45-4000", date(1980, 5, 5)).id
        schedule_appointment(s, pid, datetime(2025, 1, 1, tzinfo=timezone.utc), "once")
    with tenant_session(factory, "acme") as s, s.begin():
        delete_patient(s, pid)
    with tenant_session(factory, "acme") as s, s.begin():
        assert get_patient(s, pid) is None
        assert upcoming_appointments(s) == []


def test_invalid_tenant_ids_are_rejected(factory):
    with pytest.raises(ValueError):
        tenant_session(factory, "acme'; DROP TABLE patients; --")


def test_find_patients_by_ssn(factory):
    with tenant_session(factory, "acme") as s, s.begin():
        register_patient(s, "Ada Lovelace", "123-45-6789", date(1815, 12, 10))
        register_patient(s, "Charles Babbage", "123-45-6790", date(1791, 12, 26))
    with tenant_session(factory, "globex") as s, s.begin():
        register_patient(s, "Grace Hopper", "123-45-6789", date(1906, 12, 9))
    with tenant_session(factory, "acme") as s, s.begin():
        assert find_by_ssn(s, "123-45-6789").name == "Ada Lovelace"
        assert find_by_ssn(s, "000-00-0000") is None
        assert [p.name for p in find_by_ssns(s, ["123-45-6790", "123-45-6789", "555"])] == ["Ada Lovelace", "Charles Babbage"]
    with tenant_session(factory, "globex") as s, s.begin():
        assert find_by_ssn(s, "123-45-6789").name == "Grace Hopper"
        assert find_by_ssn(s, "123-45-6790") is None


def test_tenants_see_only_their_patients(factory):
    # Last test on purpose: its rows stay behind for the harness's at-rest check.
    with tenant_session(factory, "acme") as s, s.begin():
        register_patient(s, "Ada Lovelace", "123-45-6789", date(1815, 12, 10), notes="allergic to penicillin")
        register_patient(s, "Charles Babbage", "123-45-6790", date(1791, 12, 26), allergies={"dust": True})
    with tenant_session(factory, "globex") as s, s.begin():
        register_patient(s, "Ada Lovelace", "987-65-4321", date(1815, 12, 10), notes="globex's Ada")
    with tenant_session(factory, "acme") as s, s.begin():
        assert [(p.name, p.ssn) for p in list_patients(s)] == [("Ada Lovelace", "123-45-6789"), ("Charles Babbage", "123-45-6790")]
        assert [p.notes for p in find_by_name(s, "Ada Lovelace")] == ["allergic to penicillin"]
    with tenant_session(factory, "globex") as s, s.begin():
        assert [(p.name, p.ssn, p.notes) for p in list_patients(s)] == [("Ada Lovelace", "987-65-4321", "globex's Ada")]
