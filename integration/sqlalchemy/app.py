"""A small multi-tenant clinic app on SQLAlchemy 2 (ORM) + psycopg 3.

It knows nothing about cmk-proxy: the engine comes from DATABASE_URL, and
every ORM session belongs to one tenant, announced to the database with
`SET cmk.tenant_id = '<tenant>'` when the session's transaction begins (a
custom setting that plain PostgreSQL simply stores). Pointed directly at
PostgreSQL (schema_plain.sql) it works on plaintext columns; pointed at
cmk-proxy (schema_encrypted.sql) the same code writes and reads encrypted
columns.

What it avoids, because a proxy cannot evaluate it on ciphertext (and says
so with SQLSTATE KM003): conditions, ordering or functions on protected
columns (ssn, birth_date, notes, weight_kg, allergies, last_visit). It filters
and orders by id, tenant_id and name only. Bulk INSERTs keep SQLAlchemy's
default "insertmanyvalues" form, `INSERT ... SELECT p0::VARCHAR, ... FROM
(VALUES ...) AS imp_sen(...) ORDER BY sen_counter RETURNING ...`, which the
proxy plans like a VALUES list.
"""

from __future__ import annotations

import os
import re
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Optional

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Numeric,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    contains_eager,
    relationship,
    selectinload,
    sessionmaker,
)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    ssn: Mapped[str] = mapped_column(String(11))
    birth_date: Mapped[date]
    notes: Mapped[Optional[str]] = mapped_column(Text)
    weight_kg: Mapped[Optional[Decimal]] = mapped_column(Numeric(asdecimal=True))
    allergies: Mapped[Optional[Any]] = mapped_column(JSONB)
    last_visit: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    appointments: Mapped[list["Appointment"]] = relationship(
        back_populates="patient", order_by="Appointment.starts_at", cascade="all, delete-orphan"
    )


class Appointment(Base):
    __tablename__ = "appointments"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"))
    starts_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str] = mapped_column(Text)

    patient: Mapped[Patient] = relationship(back_populates="appointments")


# ---- engine and tenant-scoped sessions ---------------------------------------

TENANT_RE = re.compile(r"^[a-z0-9_-]{1,63}$")


def database_url(raw: Optional[str] = None) -> str:
    """DATABASE_URL (postgres://... or postgresql://...) for the psycopg 3 driver."""
    url = raw or os.environ["DATABASE_URL"]
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+psycopg://", url)


def make_engine(url: Optional[str] = None, echo: bool = False) -> Engine:
    return create_engine(
        database_url(url),
        echo=echo,
        pool_pre_ping=True,
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def tenant_session(factory: sessionmaker[Session], tenant_id: Optional[str]) -> Session:
    """A session whose transactions run as `tenant_id` (None: no tenant, e.g. admin jobs)."""
    if tenant_id is not None and not TENANT_RE.match(tenant_id):
        raise ValueError(f"invalid tenant id {tenant_id!r}")
    session = factory()
    session.info["tenant_id"] = tenant_id
    return session


@event.listens_for(Session, "after_begin")
def _set_tenant(session: Session, transaction: Any, connection: Any) -> None:
    # SET cannot take a bind parameter: the tenant id is validated above.
    tenant = session.info.get("tenant_id")
    if tenant is None:
        connection.exec_driver_sql("SET cmk.tenant_id TO DEFAULT")
    else:
        connection.exec_driver_sql(f"SET cmk.tenant_id = '{tenant}'")


# ---- services ----------------------------------------------------------------


def _tenant(session: Session) -> str:
    tenant = session.info.get("tenant_id")
    if tenant is None:
        raise RuntimeError("this operation needs a tenant session")
    return tenant


def register_patient(
    session: Session,
    name: str,
    ssn: str,
    birth_date: date,
    notes: Optional[str] = None,
    weight_kg: Optional[Decimal] = None,
    allergies: Any = None,
) -> Patient:
    patient = Patient(
        tenant_id=_tenant(session),
        name=name,
        ssn=ssn,
        birth_date=birth_date,
        notes=notes,
        weight_kg=weight_kg,
        allergies=allergies,
    )
    session.add(patient)
    session.flush()
    return patient


def register_patients(session: Session, rows: list[dict[str, Any]]) -> list[Patient]:
    """Bulk registration through the ORM (add_all + one flush)."""
    tenant = _tenant(session)
    patients = [Patient(tenant_id=tenant, **row) for row in rows]
    session.add_all(patients)
    session.flush()
    return patients


def get_patient(session: Session, patient_id: int) -> Optional[Patient]:
    return session.get(Patient, patient_id)


def list_patients(session: Session) -> list[Patient]:
    stmt = select(Patient).where(Patient.tenant_id == _tenant(session)).order_by(Patient.id)
    return list(session.scalars(stmt))


def find_by_name(session: Session, name: str) -> list[Patient]:
    stmt = (
        select(Patient)
        .where(Patient.tenant_id == _tenant(session), Patient.name == name)
        .order_by(Patient.id)
    )
    return list(session.scalars(stmt))


def find_by_ssn(session: Session, ssn: str) -> Optional[Patient]:
    """A lookup by a protected value: through cmk-proxy it runs on the
    blind index of ssn under the tenant's key (docs/SEARCH.md)."""
    return session.scalars(select(Patient).filter_by(tenant_id=_tenant(session), ssn=ssn)).one_or_none()


def find_by_ssns(session: Session, ssns: list[str]) -> list[Patient]:
    stmt = select(Patient).where(Patient.tenant_id == _tenant(session), Patient.ssn.in_(ssns)).order_by(Patient.id)
    return list(session.scalars(stmt))


def update_notes(session: Session, patient_id: int, notes: Optional[str]) -> Patient:
    patient = session.get(Patient, patient_id)
    if patient is None:
        raise LookupError(patient_id)
    patient.notes = notes
    session.flush()
    return patient


def record_visit(session: Session, patient_id: int, when: datetime, weight_kg: Optional[Decimal] = None) -> Patient:
    patient = session.get(Patient, patient_id)
    if patient is None:
        raise LookupError(patient_id)
    patient.last_visit = when
    if weight_kg is not None:
        patient.weight_kg = weight_kg
    session.flush()
    return patient


def import_patient(session: Session, patient_id: int, **fields: Any) -> None:
    """Upsert from an external system keyed by id (INSERT ... ON CONFLICT (id) DO UPDATE)."""
    values = {"id": patient_id, "tenant_id": _tenant(session), **fields}
    stmt = insert(Patient).values(**values)
    updatable = [k for k in fields if k not in ("id", "tenant_id")]
    stmt = stmt.on_conflict_do_update(
        index_elements=[Patient.id],
        set_={k: getattr(stmt.excluded, k) for k in updatable},
    )
    session.execute(stmt)


def schedule_appointment(session: Session, patient_id: int, starts_at: datetime, reason: str) -> Appointment:
    appointment = Appointment(
        tenant_id=_tenant(session), patient_id=patient_id, starts_at=starts_at, reason=reason
    )
    session.add(appointment)
    session.flush()
    return appointment


def patient_with_appointments(session: Session, patient_id: int) -> Optional[Patient]:
    stmt = select(Patient).where(Patient.id == patient_id).options(selectinload(Patient.appointments))
    return session.scalars(stmt).one_or_none()


def upcoming_appointments(session: Session) -> list[Appointment]:
    """Appointments with their patient (a JOIN that selects protected columns)."""
    stmt = (
        select(Appointment)
        .join(Appointment.patient)
        .options(contains_eager(Appointment.patient))
        .where(Appointment.tenant_id == _tenant(session))
        .order_by(Appointment.starts_at)
    )
    return list(session.scalars(stmt))


def delete_patient(session: Session, patient_id: int) -> None:
    patient = session.get(Patient, patient_id)
    if patient is not None:
        session.delete(patient)
        session.flush()
