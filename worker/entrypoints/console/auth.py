"""Who is asking: users and roles from a file (argon2 password hashes) or a trusted proxy's
header. The users file is re-read when it changes (``UserDirectory``)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from worker.domain.errors import ConfigurationError

log = logging.getLogger("worker.console")

_HASHER = PasswordHasher()
# Verified when the user is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _HASHER.hash("not a password of anyone")


class Role(IntEnum):
    """Each role may do what the ones below it may."""

    VIEWER = 1  # reads every page
    OPERATOR = 2  # replays, discards, resubmits, controls replay jobs
    ADMIN = 3  # everything, including the audit export

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ConfigurationError(
                f"unknown console role {name!r} (viewer, operator, admin)") from None


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    password_hash: str | None = None


def hash_password(password: str) -> str:
    """An argon2id hash for the users file."""
    return _HASHER.hash(password)


class UserDirectory:
    """The users: from inline JSON (fixed), or from a file that is re-read when it changes.

    A file is checked at most every ``check_every_s`` (its time, size and content digest): a
    change applies at once, without a restart. A file that no longer reads (bad
    JSON, an unknown role, gone) keeps the last good list and is logged as an error on every
    check until it is fixed: a typo must not log everyone out, nor let anyone in.
    """

    def __init__(self, users: list[User], *, path: Path | None = None,
                 check_every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._users = {u.name: u for u in users}
        self._path = path
        self._check_every_s = check_every_s
        self._clock = clock
        self._checked_at = clock()
        self._stamp = _stamp(path) if path is not None else None
        self._lock = threading.Lock()
        #: Called after a reload with the names whose entry changed or went (the console ends
        #: their sessions then, rather than at each one's next request).
        self.on_change: Callable[[set[str]], None] | None = None

    @classmethod
    def load(cls, source: str | None, *, check_every_s: float = 5.0,
             clock: Callable[[], float] = time.monotonic) -> UserDirectory:
        """From the JSON itself, or a JSON or TOML file's path (then re-read on change)."""
        if not source:
            return cls([])
        if source.lstrip().startswith("{"):
            return cls(_parse(source, ".json"))
        path = Path(source)
        try:
            stamp = _stamp(path)
            users = _parse(path.read_text(encoding="utf-8"), path.suffix)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"COUPONS_CONSOLE_USERS: cannot read the users: {exc}") \
                from exc
        directory = cls(users, path=path, check_every_s=check_every_s, clock=clock)
        directory._stamp = stamp
        return directory

    def refresh(self) -> None:
        """Re-read the file if it changed and the last check is ``check_every_s`` old."""
        if self._path is None or self._clock() - self._checked_at < self._check_every_s:
            return
        with self._lock:
            if self._clock() - self._checked_at < self._check_every_s:
                return
            self._checked_at = self._clock()
            try:
                stamp = _stamp(self._path)
                if stamp == self._stamp:
                    return
                users = _parse(self._path.read_text(encoding="utf-8"), self._path.suffix)
            except (OSError, ValueError, ConfigurationError) as exc:
                log.error("console.users_unreadable", extra={
                    "path": str(self._path), "error": str(exc),
                    "kept_users": len(self._users)})
                return
            self._stamp = stamp
            before, self._users = self._users, {u.name: u for u in users}
            changed = {name for name, user in before.items()
                       if name not in self._users
                       or _fingerprint(self._users[name]) != _fingerprint(user)}
            log.warning("console.users_reloaded", extra={"path": str(self._path),
                                                         "users": len(users),
                                                         "changed": len(changed)})
        if changed and self.on_change is not None:
            self.on_change(changed)

    def get(self, name: str) -> User | None:
        self.refresh()
        return self._users.get(name)

    def fingerprint(self, name: str) -> str | None:
        """A digest of ``name``'s entry (role, password hash), or None if it is not listed:
        a session keeps the one it began with and ends when today's differs."""
        user = self.get(name)
        return _fingerprint(user) if user is not None else None

    def authenticate(self, name: str, password: str) -> User | None:
        user = self.get(name)
        stored = user.password_hash if user is not None and user.password_hash else _DUMMY_HASH
        try:
            _HASHER.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        return user if user is not None and user.password_hash else None


def _stamp(path: Path) -> tuple[int, int, str]:
    """The file's modification time, size and content digest: an edit within the same
    second and of the same size still changes the digest."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size, hashlib.sha256(path.read_bytes()).hexdigest()


def _parse(text: str, suffix: str) -> list[User]:
    try:
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"COUPONS_CONSOLE_USERS: cannot read the users: {exc}") \
            from exc
    try:
        return [User(str(u["name"]), Role.parse(str(u.get("role", "viewer"))),
                     u.get("password_hash")) for u in data.get("users", [])]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigurationError(f"COUPONS_CONSOLE_USERS: a user entry is malformed: {exc!r}") \
            from exc


def _fingerprint(user: User) -> str:
    entry = json.dumps([user.name, user.role.name, user.password_hash or ""])
    return hashlib.sha256(entry.encode("utf-8", "surrogatepass")).hexdigest()
