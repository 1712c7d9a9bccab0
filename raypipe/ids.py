"""Pseudonymous identifiers: keyed hashes (HMAC-SHA256) of source ids.

A hospital's patient id never leaves ingestion: every table carries
``pseudonym(secret, source_id)`` instead. The secret comes from the
environment variable named by ``privacy.secret_env`` (default
``RAYPIPE_ID_SECRET``). Only synthetic data (``raypipe demo`` and the tests)
may use the fixed public demo secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from raypipe.config import Config

#: Public, fixed secret for synthetic cohorts only. Ids made with it are NOT private.
DEMO_SECRET = b"raypipe-demo-secret-not-for-real-data"


class MissingSecretError(RuntimeError):
    """No id secret was configured for a run on real data."""


def pseudonym(secret: bytes, source_id: str, length: int = 24) -> str:
    """Keyed hash of ``source_id``: stable for one secret, unlinkable without it."""
    digest = hmac.new(secret, source_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:length]


def resolve_secret(cfg: Config) -> bytes:
    """The HMAC secret for this run, or a clear error saying how to set one."""
    value = os.environ.get(cfg.privacy.secret_env)
    if value:
        return value.encode("utf-8")
    if cfg.privacy.allow_demo_secret:
        return DEMO_SECRET
    raise MissingSecretError(
        f"no pseudonymisation secret: set the environment variable {cfg.privacy.secret_env} "
        f"to a long random string (e.g. `export {cfg.privacy.secret_env}=$(openssl rand -hex 32)`) "
        "and keep it safe; the same secret gives the same sample ids across runs. "
        "Synthetic data only: --set privacy.allow_demo_secret=true"
    )
