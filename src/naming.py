"""Experiment names: a readable part plus a short hash of the settings that differ from the defaults."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from typing import Any

HASH_CHARS = 6  # 16.7 M values: two of a competitor's few hundred experiments sharing one is vanishingly rare


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"aug": {"hflip": 0.5}} -> {"aug.hflip": 0.5}; tuples become lists, as they are in a JSON run record."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def as_trained(values: dict[str, Any], defaults: dict[str, Any], absent: dict[str, Any]) -> dict[str, Any]:
    """`values` flattened over every key of `defaults`. A key it lacks (a record saved before the key existed) counts
    as `absent[key]`, what such runs trained with, where given, else as its default."""
    flat = flatten(values)
    return {key: flat.get(key, absent.get(key, default)) for key, default in flatten(defaults).items()}


def changed_keys(values: dict[str, Any], defaults: dict[str, Any], skip: Collection[str]) -> dict[str, Any]:
    """Dotted keys of `values` that differ from `defaults`, leaving out those whose top-level name is in `skip`.
    A key `values` lacks counts as its default (as_trained first, for records that predate a changed default)."""
    flat, base = flatten(values), flatten(defaults)
    return {key: flat.get(key, default) for key, default in sorted(base.items())
            if key.split(".")[0] not in skip and flat.get(key, default) != default}


def derived_name(readable: str, overrides: dict[str, Any]) -> str:
    """`readable` alone for the defaults (the names runs had before hashing), else `readable-<hash>`."""
    if not overrides:
        return readable
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()
    return f"{readable}-{digest[:HASH_CHARS]}"


def describe(overrides: dict[str, Any]) -> str:
    """`lr=0.0003 aug.hflip=0` for tables and messages."""
    return " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in overrides.items())
