"""docs/reference/configuration.md, rendered from the settings classes' fields: each variable
with its type, constraints, default and the field's ``description``."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from coupon_devtools.docs.markdown import link_docs_pages
from worker.config import DEFAULT_HEARTBEAT_DIR, Settings
from worker.entrypoints.console.config import ConsoleSettings

#: Defaults that depend on the machine, written as what they mean rather than as one host's value.
MACHINE_DEFAULTS: dict[object, str] = {
    DEFAULT_HEARTBEAT_DIR: "`coupon-worker` in the system's temporary directory",
}

HEADER = """\
# Configuration

<!-- Generated from worker/config_fields.py and worker/entrypoints/console/config.py by
`make docs-reference`: edit a field's description there, not this page. -->

Every setting is an environment variable, validated when a process starts: a bad value stops it
with a message that names the variable. This page is generated from the settings classes, so it
lists every variable they read, and only those.

**Where they are read from.** The worker's settings (the first section) come from the
environment or from a `.env` file in the working directory; `COUPONS_ENV_FILE` names another
file (empty: none). The environment wins over the file. The console's settings
(`COUPONS_CONSOLE_*`, the second section) are read from the same two places.
`COUPONS_LOG_LEVEL` and `COUPONS_LOG_FORMAT` for the command line's own log lines are read
from the environment only (`coupon-worker worker` and `coupon-worker prune` read them as
settings, from both).
"""

FOOTER = """\
## Read outside the settings

A few variables are read by one command or library, not by the settings classes:

- `COUPONS_ENV_FILE`: the dotenv file the worker's and the console's settings are read from
  (default `.env`; empty for none).
- `COUPONS_DB_<JOB>_PASSWORD`, `COUPONS_DB_<JOB>_PASSWORD_FILE`: read by
  `coupon-worker db roles --apply` only: the password of role `<prefix>_<job>` (`JOB` is
  `OWNER`, `WORKER`, `CONSOLE` or `RETENTION`), or a file holding it; a role given none cannot
  log in with a password ([Security](../security.md)).
- `RABBITMQ_<COMPONENT>_PASSWORD`: read by the `rabbitmqctl` lines that
  `coupon-worker broker users` prints, when they run (`WORKER`, `PRODUCER`, `FLOWER`,
  `CONSOLE`).
- `FLOWER_BASIC_AUTH` (`user:password`) or `FLOWER_AUTH`: Flower's login, for
  `coupon-worker flower`, which refuses to listen on an address other than loopback without
  one (or Flower's `--basic-auth` / `--auth`). `FLOWER_BASIC_AUTH_FILE`,
  `FLOWER_COOKIE_SECRET_FILE` and `FLOWER_OAUTH2_SECRET_FILE` name files holding them
  ([Secrets from files](../secrets.md)).
- `OTEL_*`: OpenTelemetry's own variables (the OTLP endpoint, protocol and headers, the
  service name, the sampler), read by its SDK when traces are on
  ([Tracing](../tracing.md)).
- `REQUESTS_CA_BUNDLE`: the certificate authorities the Capillary client trusts (the sandbox's
  `sandbox-ca.pem` over HTTPS); a file that cannot be read opens the circuit
  (`client_config`).
- `PROMETHEUS_MULTIPROC_DIR`: set by the worker itself for its pool processes' metrics; leave
  it unset.
"""


def render_configuration(worker: type[BaseModel] = Settings,
                         console: type[BaseModel] = ConsoleSettings) -> str:
    """The whole page, as the file holds it, for these two settings classes."""
    sections = [
        HEADER,
        "## The worker's settings\n\nRead by every process of the runtime: the workers, the "
        "command line and the console.\n",
        *_entries(worker),
        "## The console's settings\n\nRead by `coupon-worker console` only "
        "([The support console](../console.md)).\n",
        *_entries(console),
        FOOTER,
    ]
    return "\n".join(sections)


def variables(model: type[BaseModel]) -> list[str]:
    """The environment variables a settings class reads, in field order."""
    return [variable(field) for field in model.model_fields.values()]


def undocumented(model: type[BaseModel]) -> list[str]:
    """The variables of a settings class whose field has no description."""
    return [variable(field) for field in model.model_fields.values()
            if not (field.description or "").strip()]


def variable(field: FieldInfo) -> str:
    alias = field.validation_alias
    if not isinstance(alias, str):
        raise TypeError(f"a setting without one environment variable: {field!r}")
    return alias


def _entries(model: type[BaseModel]) -> list[str]:
    from_file = set(getattr(model, "secret_file_fields", ()))
    return [_entry(field, from_file=name in from_file)
            for name, field in model.model_fields.items()]


def _entry(field: FieldInfo, *, from_file: bool = False) -> str:
    description = link_docs_pages((field.description or "").strip())
    if from_file:
        description += link_docs_pages(
            f" Also accepted as `{variable(field)}_FILE`, the path of a file holding it "
            "(docs/secrets.md).")
    facts = ", ".join([_type(field.annotation), *_constraints(field)])
    return (f"### `{variable(field)}`\n\n{description or '(no description)'}\n\n"
            f"*{facts}*; default: {_default(field)}\n")


def _type(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        kinds = [arg for arg in get_args(annotation) if arg is not type(None)]
        return " or ".join(_type(kind) for kind in kinds)
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in get_args(annotation))
    names = {str: "text", int: "integer", float: "number", bool: "`true` or `false`",
             SecretStr: "secret text (never logged)"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _constraints(field: FieldInfo) -> list[str]:
    said = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            said.append(f"at least {_number(item.ge)}")
        elif isinstance(item, annotated_types.Gt):
            said.append(f"above {_number(item.gt)}")
        elif isinstance(item, annotated_types.Le):
            said.append(f"at most {_number(item.le)}")
        elif isinstance(item, annotated_types.MinLen):
            said.append("not empty" if item.min_length == 1
                        else f"at least {item.min_length} characters")
        elif getattr(item, "pattern", None):
            said.append(f"matching `{item.pattern}`")
    return said


def _default(field: FieldInfo) -> str:
    value = field.default
    if value is PydanticUndefined:
        return "none, **required**"
    if value is None:
        return "unset"
    if value in MACHINE_DEFAULTS:
        return MACHINE_DEFAULTS[value]
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return f"`{_number(value)}`"
    return f"`{value}`"


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
