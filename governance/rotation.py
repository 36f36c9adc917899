"""Pseudonym key rotation: map old pseudonyms to new ones inside the secure enclave.

HMAC pseudonyms are one-way, so rotating ``VITALRISK_PSEUDONYM_KEY`` needs the raw source
identifiers, which only exist inside the enclave (``data/``). The procedure:

1. In the enclave, build the mapping with :func:`rotation_mapping` from the raw identifiers and
   both keys. The mapping links the two key generations: it is as sensitive as the keys, so it
   never leaves the enclave and is deleted once every consumer has migrated.
2. Re-run the pipeline with the new key (``dvc repro --force ingest``: DVC does not see an
   environment variable change) so every artifact is rebuilt with new pseudonyms.
3. Long-lived records keyed by old pseudonyms that cannot be rebuilt (prediction log, monitoring
   references) are rewritten with :func:`repseudonymise`. The audit log is NOT rewritten (that
   would break its chain): append a ``key_rotation`` entry with both key fingerprints instead,
   and answer later subject-access requests with the mapping for the older part of the log.
4. Retire the old key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import pandas as pd

from governance.pseudonym import is_pseudonym, pseudonymise

logger = logging.getLogger(__name__)


def rotation_mapping(source_ids: Iterable[str], old_key: bytes, new_key: bytes) -> dict[str, str]:
    """``{old_pseudonym: new_pseudonym}`` for each distinct raw identifier (enclave only)."""
    if old_key == new_key:
        raise ValueError("old and new pseudonym keys are identical: nothing to rotate")
    out: dict[str, str] = {}
    for sid in set(map(str, source_ids)):
        old, new = pseudonymise(sid, old_key), pseudonymise(sid, new_key)
        if old in out and out[old] != new:  # pragma: no cover - an 80-bit collision
            raise ValueError("pseudonym collision under the old key")
        out[old] = new
    return out


def repseudonymise(
    frame: pd.DataFrame, mapping: Mapping[str, str], columns: Iterable[str] = ("patient_id",)
) -> pd.DataFrame:
    """A copy of ``frame`` with old pseudonyms replaced. Unknown pseudonyms are an error (a
    silently kept old pseudonym would survive the key's retirement unlinkable)."""
    out = frame.copy()
    for col in columns:
        values = out[col].astype(str)
        unknown = ~values.isin(mapping.keys()) & values.map(is_pseudonym)
        if unknown.any():
            raise ValueError(
                f"column {col!r}: {int(unknown.sum())} pseudonyms are not in the rotation mapping"
            )
        out[col] = values.map(lambda v: mapping.get(v, v))
    return out
