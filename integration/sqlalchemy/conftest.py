"""pytest wiring: the engine from DATABASE_URL (SQL_ECHO=1 logs every
statement), a session factory, and a summary line like the other client
programs print ("sqlalchemy: N passed, M failed, K skipped")."""

import os

import pytest

import app


@pytest.fixture(scope="session")
def engine():
    engine = app.make_engine(echo=os.environ.get("SQL_ECHO") == "1")
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def factory(engine):
    return app.make_sessionmaker(engine)


@pytest.fixture(autouse=True)
def clean(factory):
    """Each test starts from empty tables (and leaves its rows behind, so the
    last test's rows can be inspected afterwards)."""
    from sqlalchemy import delete

    with app.tenant_session(factory, None) as s, s.begin():
        s.execute(delete(app.Appointment))
        s.execute(delete(app.Patient))


def pytest_terminal_summary(terminalreporter):
    stats = terminalreporter.stats
    passed = len(stats.get("passed", []))
    failed = len(stats.get("failed", [])) + len(stats.get("error", []))
    skipped = len(stats.get("skipped", []))
    terminalreporter.write_line(f"sqlalchemy: {passed} passed, {failed} failed, {skipped} skipped")
