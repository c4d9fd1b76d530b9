"""Secrets from files (``<NAME>_FILE``, the Docker and Kubernetes secrets convention) and
secrets that follow their file when it is rewritten, without a restart (docs/secrets.md).

Celery's worker restarts itself on SIGHUP, so no signal says "the file changed": a ``Secret``
looks at its file's metadata (one ``stat``) each time it is used, and reads the file again when
that changed, or at the latest every ``check_s`` seconds (a file system whose times are coarse).
Every process sees a rotation on its next call, so no call goes out with the old value once
another process acted on the new one. A file that cannot be read for a moment (a rotation that
removes and rewrites it) keeps the last value in use, with a warning, instead of failing calls.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from worker.domain.errors import ConfigurationError

log = logging.getLogger(__name__)

#: The suffix of the variable that names a secret's file instead of holding it.
FILE_SUFFIX = "_FILE"
#: How often a secret read from a file reads it again even though its metadata did not change.
DEFAULT_CHECK_S = 2.0


def read_secret_file(path: str | Path, *, variable: str) -> str:
    """A secret file's content without its trailing newline (what ``echo`` and editors add);
    ConfigurationError naming ``variable`` when it cannot be read or is empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{variable}: cannot read {path}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
    value = text.rstrip("\r\n")
    if not value:
        raise ConfigurationError(f"{variable}: the file {path} is empty")
    return value


def _alias(name: str, field: FieldInfo) -> str:
    alias = field.validation_alias
    return alias if isinstance(alias, str) else name


def secret_file_path(settings_cls: type[BaseSettings], field_name: str,
                     environ: Mapping[str, str] | None = None) -> str | None:
    """The file ``<NAME>_FILE`` names for a settings field, or None when it is not set."""
    environ = os.environ if environ is None else environ
    field = settings_cls.model_fields[field_name]
    return environ.get(_alias(field_name, field) + FILE_SUFFIX) or None


class SecretFilesSource(PydanticBaseSettingsSource):
    """Settings values from the files ``<NAME>_FILE`` variables name, for the fields listed
    in the settings class's ``secret_file_fields``. Setting both ``NAME`` and ``NAME_FILE``
    is an error that names both: which one wins would be a guess."""

    def __init__(self, settings_cls: type[BaseSettings],
                 *others: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._others = others

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Unused: __call__ reads every field at once.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        names: tuple[str, ...] = getattr(self.settings_cls, "secret_file_fields", ())
        values: dict[str, Any] = {}
        plain: dict[str, Any] | None = None
        for name in names:
            field = self.settings_cls.model_fields[name]
            alias = _alias(name, field)
            path = secret_file_path(self.settings_cls, name)
            if path is None:
                continue
            if plain is None:
                plain = {}
                for source in self._others:
                    plain.update(source())
            if plain.get(alias) is not None or plain.get(name) is not None:
                raise ConfigurationError(
                    f"invalid configuration: {alias} and {alias}{FILE_SUFFIX} are both set; "
                    "set one of them")
            values[alias] = read_secret_file(path, variable=alias + FILE_SUFFIX)
        return values


class Secret:
    """A secret's current value: fixed, or read again from its file when that changes.

    ``version`` grows by one each time the value changes, so users can tell that it did
    (an OAuth token to renew, a paused circuit to probe).
    """

    def __init__(self, value: str | SecretStr, *, path: str | Path | None = None,
                 variable: str = "secret", check_s: float = DEFAULT_CHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._value = value.get_secret_value() if isinstance(value, SecretStr) else value
        self._path = None if path is None else Path(path)
        self._variable = variable
        self._check_s = check_s
        self._clock = clock
        self._checked_at = clock()
        self._signature = self._stat()
        self._lock = threading.Lock()
        self.version = 0

    @classmethod
    def of(cls, settings: BaseSettings, field_name: str, *,
           check_s: float = DEFAULT_CHECK_S) -> Secret | None:
        """The secret behind a settings field: following its ``_FILE`` when one is set;
        None when the field is unset."""
        value = getattr(settings, field_name)
        if value is None:
            return None
        field = type(settings).model_fields[field_name]
        secret = cls(value, path=secret_file_path(type(settings), field_name),
                     variable=_alias(field_name, field) + FILE_SUFFIX, check_s=check_s)
        # The settings may be older than the file (built at start, the secret in a new
        # process): start from what the file says now.
        secret.refresh(force=True)
        return secret

    @property
    def from_file(self) -> bool:
        return self._path is not None

    def __repr__(self) -> str:
        return f"Secret({self._variable}, ***)"

    def _stat(self) -> tuple[int, ...] | None:
        """What changes when the file is rewritten or replaced (a Kubernetes volume swaps a
        symbolic link: the inode changes)."""
        if self._path is None:
            return None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def get(self) -> str:
        """The value now (reading the file again if ``check_s`` has passed)."""
        self.refresh()
        return self._value

    def refresh(self, *, force: bool = False) -> int:
        """Read the file again if it changed or ``check_s`` passed (or ``force``); the version
    after it."""
        if self._path is None:
            return self.version
        with self._lock:
            now = self._clock()
            signature = self._stat()
            if not force and signature == self._signature \
                    and now - self._checked_at < self._check_s:
                return self.version
            self._checked_at, self._signature = now, signature
            try:
                value = read_secret_file(self._path, variable=self._variable)
            except ConfigurationError as exc:
                log.warning("secret.unreadable", extra={"variable": self._variable,
                                                        "error": str(exc)})
                return self.version
            if value != self._value:
                self._value = value
                self.version += 1
                log.warning("secret.rotated", extra={"variable": self._variable,
                                                     "version": self.version})
            return self.version


def versions(*secrets: Secret | None) -> tuple[int, ...]:
    """The versions of several secrets, checking their files if due: compare two readings to
    tell whether any of them changed."""
    return tuple(s.refresh() for s in secrets if s is not None)


class ReadsSecretFiles(BaseSettings):
    """Settings whose ``secret_file_fields`` are also read from the files ``<NAME>_FILE``
    names, after the arguments and before the environment (``SecretFilesSource``)."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, SecretFilesSource(settings_cls, env_settings, dotenv_settings),
                env_settings, dotenv_settings, file_secret_settings)
