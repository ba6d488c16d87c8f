"""Authentication: API keys sent as ``authorization: Bearer KEY`` map to tenants.

Keys are never stored: the config holds their SHA-256 digests, and a presented key's digest is
compared against every known digest in constant time. The client's credentials are used here
and nowhere else (they are never forwarded upstream or logged).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from routesvc.config import Config, TenantConfig
from routesvc.errors import ConfigError, Unauthenticated


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the authenticated tenant, or None when authentication is off."""

    tenant: str | None
    config: TenantConfig | None = None


def key_digest(key: str) -> str:
    """The hex SHA-256 digest of an API key, as written in the config."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


_DIGEST = re.compile(r"[0-9a-f]{64}")


def _file_digests(field: str, path: Path) -> list[tuple[str, str]]:
    """The digests in an API keys file, one per line (blank lines skipped), each with where it is
    ("FIELD: line N of PATH"); raises ``ConfigError`` naming the line of anything else, never
    quoting it (it may be a key pasted by mistake)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{field}: cannot read {path}") from exc
    digests: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        digest = line.strip().lower()
        if not digest:
            continue
        where = f"{field}: line {number} of {path}"
        if not _DIGEST.fullmatch(digest):
            raise ConfigError(f"{where} is not a hex SHA-256 digest (64 characters)")
        digests.append((where, digest))
    return digests


class Authenticator:
    """Maps bearer keys to tenants; a no-op when ``auth.enabled`` is false."""

    def __init__(self, config: Config) -> None:
        self._enabled = config.auth.enabled
        self._cert_tenants = dict(config.server.tls.client_tenants) if config.server.tls else {}
        self._tenants = dict(config.tenants)
        self._digests: list[tuple[bytes, str]] = []
        owners: dict[str, tuple[str, str]] = {}  # digest -> the tenant it authenticates, and where it is
        for name, tenant in config.tenants.items():
            digests = [
                (f"tenants.{name}.api_key_sha256[{i}]", digest) for i, digest in enumerate(tenant.api_key_sha256)
            ]
            if tenant.api_keys_file is not None:
                digests.extend(_file_digests(f"tenants.{name}.api_keys_file", tenant.api_keys_file))
            for where, digest in digests:
                # A key of two tenants authenticated as the first, silently.
                owner, first = owners.setdefault(digest, (name, where))
                if owner != name:
                    raise ConfigError(
                        f"{where}: the same key digest as {first}, a key of tenant {owner!r};"
                        " a key belongs to one tenant"
                    )
                self._digests.append((bytes.fromhex(digest), name))

    @property
    def enabled(self) -> bool:
        """Whether calls need a key."""
        return self._enabled

    @property
    def uses_certificates(self) -> bool:
        """Whether a client certificate can name the tenant (so the caller's should be read)."""
        return self._enabled and bool(self._cert_tenants)

    def authenticate(self, metadata: Mapping[str, str], peer_common_names: Sequence[str] = ()) -> Principal:
        """The principal of a call: a verified client certificate whose common name maps to a
        tenant (mutual TLS), else its bearer key; raises ``Unauthenticated``."""
        if not self._enabled:
            return Principal(None)
        for common_name in peer_common_names:
            by_certificate = self._cert_tenants.get(common_name)
            if by_certificate is not None:
                return Principal(by_certificate, self._tenants[by_certificate])
        header = metadata.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("missing 'authorization: Bearer <key>' metadata")
        presented = hashlib.sha256(key.strip().encode("utf-8")).digest()
        tenant: str | None = None
        # Compare with every digest, so the time taken does not depend on which one matches.
        for digest, name in self._digests:
            if hmac.compare_digest(presented, digest) and tenant is None:
                tenant = name
        if tenant is None:
            raise Unauthenticated("the API key is not valid")
        return Principal(tenant, self._tenants[tenant])
