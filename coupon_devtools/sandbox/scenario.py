"""Scenarios: series, customers, configuration and faults loaded from one JSON file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from coupon_devtools.sandbox.config import SandboxConfig, SeriesSettings
from coupon_devtools.sandbox.inputs import SandboxInputError, as_object, reject_unknown


@dataclass(frozen=True, slots=True)
class Scenario:
    """A validated scenario: series settings, unknown customers and config overrides."""

    series: Mapping[int, SeriesSettings] = field(default_factory=dict)
    unknown_customers: frozenset[str] = frozenset()
    config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Scenario:
        """Validate the scenario JSON shape (see :class:`SandboxOptions`)."""
        if data is None:
            return cls()
        data = as_object("scenario", data)
        reject_unknown("scenario", data, ("series", "unknownCustomers", "config"))
        series: dict[int, SeriesSettings] = {}
        for raw_id, fields in as_object("series", data.get("series", {})).items():
            try:
                series_id = int(raw_id)
            except ValueError as exc:
                raise SandboxInputError(f"series id must be an integer, got {raw_id!r}") from exc
            series[series_id] = SeriesSettings().updated(as_object(f"series {raw_id}", fields))
        unknown = data.get("unknownCustomers", [])
        if not isinstance(unknown, list):
            raise SandboxInputError("unknownCustomers must be a list of customer ids")
        config = as_object("config", data.get("config", {}))
        SandboxConfig().updated(config)
        return cls(
            series=series,
            unknown_customers=frozenset(str(c) for c in unknown),
            config=dict(config),
        )


def load_scenario(path: str | Path) -> dict[str, Any]:
    """Read and validate a scenario JSON file; returns the dict for ``SandboxOptions.scenario``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SandboxInputError(f"scenario {path} is not valid JSON: {exc}") from exc
    Scenario.from_json(as_object("scenario", data))
    return cast(dict[str, Any], data)
