"""The console's login limits in PostgreSQL, shared by every console process.

An attempt *reserves* its failure before the password is checked: one ``INSERT ... ON CONFLICT
DO UPDATE ... RETURNING`` per attempt counts it under each of its keys (the user name, the
client address) unless a key is in its backoff, in which case that key returns no row and the
attempt is refused. The row lock serialises concurrent attempts on a key, so thirty guesses
sent at once get exactly as many checks as the limit allows, not thirty. A success gives its
reservation back (the name's count is cleared; the address's only loses this one attempt, so a
success under one name does not clear what was tried under others).

Past ``max_failures`` each further failure doubles the wait before the next attempt under that
key (``base_s``, ``2 x base_s``, ... up to ``cap_s``): a delay, not a lockout, and attempts made
during it are refused without being counted. Counts are forgotten ``window_s`` after the last
wait ended.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Engine, text

Kind = Literal["user", "address"]

# EXCLUDED.last_at is the statement's clock. ``prior`` is the count the row holds, or 0 when
# its window has passed; written out in each place because SET cannot read its own results.
_PRIOR = ("(CASE WHEN a.next_allowed_at + make_interval(secs => :window_s) <= EXCLUDED.last_at "
          "THEN 0 ELSE a.failures END)")
_RESERVE = f"""
    WITH t AS (SELECT clock_timestamp() AS now)
    INSERT INTO login_attempts AS a (key_hash, kind, failures, last_at, next_allowed_at)
    SELECT k.key_hash, k.kind, 1, t.now,
           CASE WHEN 1 >= :max_failures THEN t.now + make_interval(secs => :base_s)
                ELSE t.now END
      FROM t, unnest(CAST(:keys AS text[]), CAST(:kinds AS text[])) AS k(key_hash, kind)
     ORDER BY k.key_hash
    ON CONFLICT (key_hash) DO UPDATE SET
        failures = {_PRIOR} + 1,
        last_at = EXCLUDED.last_at,
        next_allowed_at = CASE
            WHEN {_PRIOR} + 1 >= :max_failures
            THEN EXCLUDED.last_at + make_interval(secs => LEAST(
                CAST(:cap_s AS double precision),
                :base_s * power(2, {_PRIOR} + 1 - :max_failures)))
            ELSE EXCLUDED.last_at END
     WHERE a.failures < :max_failures OR a.next_allowed_at <= EXCLUDED.last_at
    RETURNING a.key_hash
    """  # noqa: S608 (only the constant above is interpolated; values are bound parameters)
_WAIT = """
    SELECT COALESCE(MAX(EXTRACT(EPOCH FROM next_allowed_at - clock_timestamp())), 0)
      FROM login_attempts WHERE key_hash = ANY(CAST(:keys AS text[]))
    """
_GIVE_BACK = """
    UPDATE login_attempts SET failures = GREATEST(failures - 1, 0)
     WHERE key_hash = ANY(CAST(:keys AS text[]))
    """
_CLEAR = "DELETE FROM login_attempts WHERE key_hash = ANY(CAST(:keys AS text[]))"
_PRUNE = """
    DELETE FROM login_attempts
     WHERE next_allowed_at + make_interval(secs => :window_s) <= clock_timestamp()
    """


def key_hash(kind: Kind, value: str) -> str:
    """The stored key: a digest, since a typed name may hold any bytes (a NUL, megabytes)."""
    return hashlib.sha256(f"{kind}:{value}".encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Admission:
    """Whether an attempt may check its password; if not, how long until one may."""

    allowed: bool
    retry_after_s: float = 0.0


class LoginLimits:
    """Per user name and per client address: ``admit`` before checking a password,
    ``succeeded`` after a right one."""

    def __init__(self, engine: Engine, *, max_failures: int, window_s: float, base_s: float,
                 cap_s: float) -> None:
        self.engine = engine
        self.params = {"max_failures": max_failures, "window_s": window_s, "base_s": base_s,
                       "cap_s": cap_s}

    @staticmethod
    def _keys(user: str, address: str) -> tuple[str, str]:
        return key_hash("user", user), key_hash("address", address)

    def admit(self, user: str, address: str) -> Admission:
        """Count this attempt under both keys, or refuse it if either is waiting."""
        keys = self._keys(user, address)
        with self.engine.begin() as conn:
            counted = {row[0] for row in conn.execute(text(_RESERVE), {
                **self.params, "keys": list(keys), "kinds": ["user", "address"]})}
        if len(counted) == len(keys):
            return Admission(True)
        with self.engine.begin() as conn:
            # The keys that were not waiting counted an attempt that was never made.
            if counted:
                conn.execute(text(_GIVE_BACK), {"keys": list(counted)})
            wait = float(conn.execute(text(_WAIT), {"keys": list(keys)}).scalar_one())
        return Admission(False, max(wait, 0.0))

    def succeeded(self, user: str, address: str) -> None:
        """A right password: the name's count is cleared, the address's attempt given back;
        and counters whose window has passed are forgotten (logins are rare, the table small)."""
        user_key, address_key = self._keys(user, address)
        with self.engine.begin() as conn:
            conn.execute(text(_CLEAR), {"keys": [user_key]})
            conn.execute(text(_GIVE_BACK), {"keys": [address_key]})
            conn.execute(text(_PRUNE), {"window_s": self.params["window_s"]})

    def prune(self) -> int:
        """Forget counters whose window has passed; how many."""
        with self.engine.begin() as conn:
            return int(conn.execute(text(_PRUNE), {"window_s": self.params["window_s"]})
                       .rowcount)
