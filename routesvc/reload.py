"""Hot reload: watch the config file and swap in a new valid configuration without a restart.

Kubernetes updates a mounted ConfigMap by writing a new directory and swapping a symlink
(``..data``) atomically, so the file is compared by the identity and content of what its path
resolves to, polled every ``server.reload_interval_seconds``. An invalid new file is rejected
and logged; the running configuration keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from routesvc.config import Settings, load_settings
from routesvc.errors import RouteSvcError

log = structlog.get_logger("routesvc.reload")


def _fingerprint(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class ConfigWatcher:
    """Calls ``apply`` with the new settings each time the file at ``path`` changes validly."""

    def __init__(
        self,
        path: Path,
        interval: float,
        apply: Callable[[Settings], Awaitable[None]],
        *,
        current: str | None = None,
        outcome: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self._path = path
        self._interval = interval
        self._apply = apply
        # Told "applied" or "rejected" for every change seen (the server counts them in a metric,
        # so that a rejected file, which only the next restart would trip over, can be alerted on).
        self._outcome = outcome
        self._seen = current if current is not None else _fingerprint(path)
        self._unreadable = False  # said once while the file cannot be read; the old one keeps serving

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    async def check(self) -> bool:
        """Look once; returns whether a new configuration was applied."""
        fingerprint = await asyncio.to_thread(_fingerprint, self._path)
        if fingerprint is None:
            if not self._unreadable:
                # Deleted, or a ConfigMap mount gone: nothing changes, but say so once.
                log.warning("config_file_unreadable", path=str(self._path))
                self._unreadable = True
            return False
        if self._unreadable:
            log.info("config_file_readable", path=str(self._path))
            self._unreadable = False
        if fingerprint == self._seen:
            return False
        self._seen = fingerprint
        try:
            settings = await asyncio.to_thread(load_settings, self._path)
            # Some mistakes show only when the new router is built (a classifier's examples file
            # that is missing, an embedding stage's router folder): rejected the same way.
            await self._apply(settings)
        except RouteSvcError as error:
            log.error("config_reload_rejected", path=str(self._path), error=error.message)
            self._outcome("rejected")
            return False
        except Exception:
            # Our bug: the old configuration keeps serving and the watcher keeps watching.
            log.exception("config_reload_failed", path=str(self._path))
            self._outcome("rejected")
            return False
        log.info("config_reloaded", path=str(self._path), models=len(settings.catalog))
        self._outcome("applied")
        return True
