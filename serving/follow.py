"""The service follows the registry: it watches the ``champion`` (and ``challenger``) aliases
and swaps the served models while it runs, without dropping or failing a request.

Every ``serve.model_watch_seconds`` a background thread asks the registry which versions hold
the aliases. When they differ from the served ones it loads the new versions completely
(MLflow download, unpickling, feature dictionary: seconds, off the request path) and only
then swaps them in with one assignment (``Runtime.swap``). A request in flight keeps the set
it started with; the next one gets the new set. A rollback therefore takes effect within
one interval plus the load time. If the new version cannot be loaded, the old one keeps
serving and the failure is logged and audited (once per version) and retried.

The primary worker also calls ``models.registry.reconcile``: alias changes made in the MLflow
UI or over its REST API are audited as such, and stale alias tags are cleared.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

logger = logging.getLogger(__name__)

ACTOR = "vitalrisk-serve"


class ModelFollower:
    def __init__(self, runtime: Any, name: str, interval: float, primary: bool = True) -> None:
        self.rt = runtime
        self.name = name
        self.interval = float(interval)
        self.primary = primary
        self.swaps = 0
        self._failed: set[tuple[str, str | None]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ModelFollower:
        self._thread = threading.Thread(target=self._run, name="vitalrisk-follow", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the registry may be unreachable for a while: keep serving
                logger.exception("checking the registry's aliases of %s failed", self.name)

    def wanted(self) -> tuple[str | None, str | None]:
        """Versions the registry's aliases name now: (champion, challenger for shadow)."""
        from models import tracking

        aliases = tracking.aliases(self.name)
        shadow = aliases.get(tracking.CHALLENGER) if self.rt.config.shadow_challenger else None
        return aliases.get(tracking.CHAMPION), shadow

    def check(self) -> bool:
        """One look at the registry; True when the served models were swapped."""
        if self.primary:
            from models.registry import reconcile

            reconcile(self.name, noticed_by=f"{ACTOR} (pid {os.getpid()})")
        champion, shadow = self.wanted()
        current = self.rt.models
        have = (
            current.champion.version,
            None if current.shadow is None else current.shadow.version,
        )
        if shadow == champion:
            shadow = None
        if champion is None:
            self._audit_once(
                "model_alias_missing", (None, None), have[0], "champion alias is not set"
            )
            return False
        if (champion, shadow) == have:
            return False
        return self._swap(champion, shadow, have)

    def _swap(self, champion: str, shadow: str | None, have: tuple[str, str | None]) -> bool:
        from serving.runtime import load_models

        try:
            models = load_models(self.rt.config, self.rt.vocab, self.name, champion, shadow)
        except Exception as exc:
            logger.exception(
                "could not load %s version %s; still serving %s", self.name, champion, have[0]
            )
            self._audit_once("model_load_failed", (champion, shadow), have[0], str(exc)[:500])
            return False
        self.rt.swap(models)
        self.swaps += 1
        self._failed.clear()
        logger.info(
            "now serving %s version %s (was %s)%s",
            self.name,
            champion,
            have[0],
            f", shadow version {models.shadow.version}" if models.shadow else "",
        )
        self._audit(
            "model_swap",
            champion,
            {
                "previous_version": have[0],
                "shadow_version": None if models.shadow is None else models.shadow.version,
                "previous_shadow_version": have[1],
                "pid": os.getpid(),
            },
        )
        return True

    def _audit_once(
        self, action: str, key: tuple[str | None, str | None], serving: str, why: str
    ) -> None:
        if (action, key[0]) in self._failed:
            return
        self._failed.add((action, key[0]))
        self._audit(action, key[0], {"serving_version": serving, "reason": why, "pid": os.getpid()})

    def _audit(self, action: str, version: str | None, details: dict[str, Any]) -> None:
        from models import tracking

        self.rt.audit.store.append(
            actor=ACTOR,
            action=action,
            resource=f"models:/{self.name}@{tracking.CHAMPION}",
            model_version=version,
            details=details,
        )
