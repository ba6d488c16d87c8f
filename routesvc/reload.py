"""Hot reload: watch the config file, and the files it names that a reload reads again, and swap
in a new valid configuration without a restart.

Kubernetes updates a mounted ConfigMap or Secret by writing a new directory and swapping a symlink
(``..data``) atomically, so each file is compared by the content of what its path resolves to,
polled every ``server.reload_interval_seconds``. Besides the config file the watcher reads the files
a reload reads again: each tenant's ``api_keys_file`` (a key removed from it is revoked) and each
provider's ``api_key_file`` (a rotated key). An invalid version is rejected and logged once; the
running configuration keeps serving. A rejected version is tried again at once when anything
fingerprinted changes (a keys file that was not there is mounted: a Secret after the ConfigMap
naming it), and otherwise after a backoff, since it may have failed on a file not fingerprinted
(a classifier's examples, an embedding stage's router folder, a feedback_db locked by another
process): the next poll, then twice as long each time, up to ``MAX_RETRY_SECONDS``. Each try
builds the version's router (reading its model files), so a version left rejected is not rebuilt
at every poll. The watcher starts from what the serving settings were parsed from (their
``text_sha256`` and ``files_sha256``), not from the files when it starts: a change made while the
server was starting is applied at the first poll.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from routesvc.config import Settings, files_reread, parse_config_file, sha256_of
from routesvc.errors import RouteSvcError

log = structlog.get_logger("routesvc.reload")

MAX_RETRY_SECONDS = 60.0
"""The longest a rejected version waits to be tried again while nothing fingerprinted changes."""


def _fingerprint(config_sha256: str, files: Iterable[tuple[Path, str | None]]) -> str:
    """One digest of the config file's and of the named files' digests (None: not there)."""
    named = [(str(path), digest) for path, digest in files]
    return hashlib.sha256(json.dumps([config_sha256, named]).encode("utf-8")).hexdigest()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _parsed(text: bytes, source: str) -> Settings:
    """Settings from the config file's bytes as read (not read again: what is applied is what was
    fingerprinted)."""
    return parse_config_file(text, source)


@dataclass(frozen=True, slots=True)
class _Version:
    """What one poll read: the config file, and the fingerprint of it and of the files it names."""

    text: bytes
    fingerprint: str


class ConfigWatcher:
    """Calls ``apply`` with the new settings each time the file at ``path``, or a file it names
    that a reload reads again, changes to a valid configuration."""

    def __init__(
        self,
        path: Path,
        interval: float,
        apply: Callable[[Settings], Awaitable[None]],
        *,
        applied: Settings | None = None,
        outcome: Callable[[str], None] = lambda outcome: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``applied``: the settings serving, parsed from ``path``; the watcher starts from what
        they were parsed from, so a change made since is applied at the first poll. Without them,
        what the file holds now is taken as serving."""
        self._path = path
        self._interval = interval
        self._clock = clock
        self._apply = apply
        # Told "applied" or "rejected" once for every version seen (the server counts them in a
        # metric, so that a rejected file, which only the next restart would trip over, can be
        # alerted on).
        self._outcome = outcome
        # The files the config file names, and the digest of the config file that named them.
        self._files: tuple[Path, ...] = ()
        self._files_named_by: str | None = None
        self._applied: str | None
        if applied is not None and applied.text_sha256 is not None:
            # Not the files as they are now: a version written while the server was starting
            # (seconds: its router was being built) was taken as serving, never parsed nor applied.
            self._files = tuple(path for path, _ in applied.files_sha256)
            self._files_named_by = applied.text_sha256
            self._applied = _fingerprint(applied.text_sha256, applied.files_sha256)
        else:
            version = self._look()
            self._applied = version.fingerprint if version else None
        self._rejected: str | None = None  # said once; tried again after a backoff until it changes
        self._retry_delay = 0.0  # how long the rejected version waits after its latest try
        self._retry_at = 0.0  # the clock's time of its next try
        self._unreadable = False  # said once while the file cannot be read; the old one keeps serving

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    def _look(self) -> _Version | None:
        """Read the config file and the files it names; None when the config file cannot be read."""
        text = _read(self._path)
        if text is None:
            return None
        config_digest = hashlib.sha256(text).hexdigest()
        if config_digest != self._files_named_by:
            # Which files matter changes only with the config file: parsed for them only then.
            try:
                self._files = files_reread(_parsed(text, str(self._path)).config)
            except Exception:
                # Invalid (or our bug): the apply below reports it and rejects it whatever the
                # files hold; the watcher must not die here.
                self._files = ()
            self._files_named_by = config_digest
        files = [(path, sha256_of(_read(path))) for path in self._files]  # None: not there (yet)
        return _Version(text, _fingerprint(config_digest, files))

    async def check(self) -> bool:
        """Look once; returns whether a new configuration was applied."""
        version = await asyncio.to_thread(self._look)
        if version is None:
            if not self._unreadable:
                # Deleted, or a ConfigMap mount gone: nothing changes, but say so once.
                log.warning("config_file_unreadable", path=str(self._path))
                self._unreadable = True
            return False
        if self._unreadable:
            log.info("config_file_readable", path=str(self._path))
            self._unreadable = False
        if version.fingerprint == self._applied:
            self._rejected = None  # back to what serves: a rejected version that returns is said again
            return False
        # A version rejected before is tried again (it may have failed on something not
        # fingerprinted), but said only once, and only once its backoff is over.
        first_try = version.fingerprint != self._rejected
        if not first_try and self._clock() < self._retry_at:
            return False
        try:
            settings = await asyncio.to_thread(_parsed, version.text, str(self._path))
            # Some mistakes show only when the new router is built (a classifier's examples file
            # that is missing, an embedding stage's router folder, a tenant's API keys file): rejected
            # the same way.
            await self._apply(settings)
        except RouteSvcError as error:
            if first_try:
                log.error("config_reload_rejected", path=str(self._path), error=error.message)
                self._outcome("rejected")
            self._reject(version, first_try)
            return False
        except Exception:
            # Our bug: the old configuration keeps serving and the watcher keeps watching.
            if first_try:
                log.exception("config_reload_failed", path=str(self._path))
                self._outcome("rejected")
            self._reject(version, first_try)
            return False
        # What was parsed, when a file it names changed again since this poll read it (the next
        # poll applies that change).
        parsed = settings.text_sha256
        self._applied = version.fingerprint if parsed is None else _fingerprint(parsed, settings.files_sha256)
        self._rejected = None
        log.info("config_reloaded", path=str(self._path), models=len(settings.catalog))
        self._outcome("applied")
        return True

    def _reject(self, version: _Version, first_try: bool) -> None:
        """Note ``version`` rejected: tried again at the next poll after its first rejection, then
        after twice the wait of the try before, up to ``MAX_RETRY_SECONDS``."""
        self._rejected = version.fingerprint
        if first_try:
            self._retry_delay = self._interval
        else:
            self._retry_delay = min(2 * self._retry_delay, max(MAX_RETRY_SECONDS, self._interval))
        self._retry_at = self._clock() + self._retry_delay
