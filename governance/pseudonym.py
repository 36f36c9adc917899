"""Keyed pseudonyms: HMAC-SHA256 of the source identifier with a secret from the environment.

The same key gives the same pseudonym across runs and sources, so data from a ward export and
a wearable feed join on the pseudonym without the raw identifier ever being stored.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable

logger = logging.getLogger(__name__)

KEY_ENV = "VITALRISK_PSEUDONYM_KEY"
MODE_ENV = "VITALRISK_MODE"
#: Clearly labelled, public demo key: used only outside production mode when no key is set.
DEMO_KEY = "vitalrisk-DEMO-pseudonym-key-NOT-FOR-PRODUCTION"
PREFIX = "p_"
DIGEST_CHARS = 20  # 80 bits: collision-free in practice for any realistic cohort


class PseudonymKeyError(RuntimeError):
    """No pseudonymisation key in production mode."""


def production_mode() -> bool:
    return os.environ.get(MODE_ENV, "").strip().lower() in {"prod", "production"}


def get_key() -> bytes:
    """The pseudonymisation key from ``VITALRISK_PSEUDONYM_KEY``.

    In production mode (``VITALRISK_MODE=production``) a missing key is an error; otherwise the
    public demo key is used and a warning says so.
    """
    key = os.environ.get(KEY_ENV, "")
    if key:
        return key.encode("utf-8")
    if production_mode():
        raise PseudonymKeyError(
            f"{KEY_ENV} is not set: production mode refuses to pseudonymise with the demo key"
        )
    logger.warning("%s not set: using the public DEMO key (not for real patient data)", KEY_ENV)
    return DEMO_KEY.encode("utf-8")


def is_pseudonym(value: str) -> bool:
    return (
        isinstance(value, str)
        and value.startswith(PREFIX)
        and len(value) == len(PREFIX) + DIGEST_CHARS
        and all(c in "0123456789abcdef" for c in value[len(PREFIX) :])
    )


def pseudonymise(source_id: str, key: bytes) -> str:
    """Pseudonym of one source identifier. Already-pseudonymised ids pass through unchanged."""
    sid = str(source_id).strip()
    if is_pseudonym(sid):
        return sid
    digest = hmac.new(key, sid.encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:DIGEST_CHARS]


def pseudonymise_many(source_ids: Iterable[str], key: bytes) -> dict[str, str]:
    """Mapping of each distinct source id to its pseudonym (compute once per distinct id)."""
    return {sid: pseudonymise(sid, key) for sid in set(map(str, source_ids))}


def key_fingerprint(key: bytes) -> str:
    """Short public fingerprint of a key (HMAC of a fixed label): lets reports and lineage say
    which key produced a set of pseudonyms without revealing anything usable about the key."""
    return "k_" + hmac.new(key, b"vitalrisk-key-fingerprint", hashlib.sha256).hexdigest()[:12]
