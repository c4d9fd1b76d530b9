"""Who is asking: users and roles from a file (argon2 password hashes) or a trusted proxy's
header, and a limit on failed logins."""

from __future__ import annotations

import json
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from worker.domain.errors import ConfigurationError

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
    """The users file, read once at start."""

    def __init__(self, users: list[User]) -> None:
        self._users = {u.name: u for u in users}

    @classmethod
    def load(cls, source: str | None) -> UserDirectory:
        """From the JSON itself, or a JSON or TOML file's path."""
        if not source:
            return cls([])
        try:
            if source.lstrip().startswith("{"):
                data = json.loads(source)
            else:
                path = Path(source)
                text = path.read_text(encoding="utf-8")
                data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"COUPONS_CONSOLE_USERS: cannot read the users: {exc}") \
                from exc
        users = [User(str(u["name"]), Role.parse(str(u.get("role", "viewer"))),
                      u.get("password_hash")) for u in data.get("users", [])]
        return cls(users)

    def get(self, name: str) -> User | None:
        return self._users.get(name)

    def authenticate(self, name: str, password: str) -> User | None:
        user = self._users.get(name)
        stored = user.password_hash if user is not None and user.password_hash else _DUMMY_HASH
        try:
            _HASHER.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        return user if user is not None and user.password_hash else None


class LoginLimiter:
    """At most ``max_failures`` failed logins per user name and per client address within
    ``window_s``; in this process's memory (one console process per deployment).

    Keys whose failures have all left the window are forgotten now and then (when the keys
    tracked have doubled since the last sweep): a client trying a new user name each time
    would otherwise grow the console's memory without end.
    """

    #: The fewest keys tracked before a sweep is worth its pass over them.
    SWEEP_FLOOR = 1024
    #: The longest key kept as given: a longer one (a huge user name) is cut, which can only
    #: make the limit stricter for the names that share the cut.
    KEY_MAX_CHARS = 256

    def __init__(self, max_failures: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._sweep_at = self.SWEEP_FLOOR

    def __len__(self) -> int:
        """How many keys are tracked."""
        return len(self._failures)

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(key[:self.KEY_MAX_CHARS], deque())
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        return failures

    def blocked(self, *keys: str) -> bool:
        now = self.clock()
        with self._lock:
            return any(len(self._recent(k, now)) >= self.max_failures for k in keys)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)
            if len(self._failures) >= self._sweep_at:
                for key in list(self._failures):
                    if not self._recent(key, now):
                        del self._failures[key]
                self._sweep_at = max(self.SWEEP_FLOOR, 2 * len(self._failures))

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key[:self.KEY_MAX_CHARS], None)
