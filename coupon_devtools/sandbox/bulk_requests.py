"""The bulk-issue request body, validated field by field with the precise reason."""

from __future__ import annotations

from typing import cast

from coupon_devtools.sandbox.inputs import (
    CUSTOMER_IDENTIFIERS,
    METADATA_LIMITS,
    JsonDict,
    SandboxInputError,
)


def parse_series_ids(raw: object) -> tuple[int, ...]:
    """``seriesIds``: a non-empty array of integers, duplicates dropped, order kept."""
    if raw is None:
        raise SandboxInputError("seriesIds is required")
    if not isinstance(raw, list) or not raw:
        raise SandboxInputError("seriesIds must be a non-empty array of integers")
    for index, item in enumerate(raw):
        if isinstance(item, bool) or not isinstance(item, int):
            raise SandboxInputError(f"seriesIds[{index}] must be an integer, got {item!r}")
    # dict.fromkeys keeps the first occurrence's position.
    return tuple(dict.fromkeys(cast(list[int], raw)))

def parse_customer(raw: object) -> tuple[str, str, JsonDict]:
    """``customer``: the first identifier it carries (kind, value) and the object itself."""
    if raw is None:
        raise SandboxInputError("customer is required")
    if not isinstance(raw, dict):
        raise SandboxInputError("customer must be a JSON object")
    for kind in CUSTOMER_IDENTIFIERS:
        value = raw.get(kind)
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise SandboxInputError(f"customer.{kind} must be a string, got {value!r}")
        return kind, str(value), dict(raw)
    raise SandboxInputError("customer must carry one of: " + ", ".join(CUSTOMER_IDENTIFIERS))

def parse_metadata(raw: object) -> JsonDict | None:
    """``metadata``: optional; its known string fields within Capillary's lengths."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SandboxInputError("metadata must be a JSON object")
    for key, limit in METADATA_LIMITS.items():
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise SandboxInputError(f"metadata.{key} must be a string, got {value!r}")
        if len(value) > limit:
            raise SandboxInputError(
                f"metadata.{key} exceeds {limit} characters (got {len(value)})"
            )
    return dict(raw)
