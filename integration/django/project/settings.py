"""Settings of the Django test project: one database from DATABASE_URL
(psycopg 3 backend), and a second alias `acme` on the same database whose
connections start with the session tenant acme (`-c cmk.tenant_id=acme`)."""

import os
from urllib.parse import parse_qsl, unquote, urlsplit

SECRET_KEY = "cmk-proxy integration test, not secret"
INSTALLED_APPS = ["clinic"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"


def database(url, options=None):
    """A DATABASES entry from a postgres:// URL (sslmode and friends kept)."""
    parts = urlsplit(url)
    extra = dict(parse_qsl(parts.query))
    if options:
        extra["options"] = options
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/"),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname,
        "PORT": parts.port or 5432,
        "OPTIONS": extra,
    }


DATABASES = {
    "default": database(os.environ["DATABASE_URL"]),
    "acme": database(os.environ["DATABASE_URL"], "-c cmk.tenant_id=acme"),
}
