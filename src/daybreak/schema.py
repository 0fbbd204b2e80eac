"""What a config section's fields say about themselves: their ranges, and registries whose keys are a key's choices.

A section's dataclass lives with the component that reads it; each field carries its own check in
its metadata (`ranged`, `seed_field`), so there is one schema, read once when a config loads
(`check_fields`). A key whose value names a builder (`data.source`, `text.kind`, ...) is typed
with the `Literal` of its `Registry`'s keys, so the choices are written once, in the registry.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal

from daybreak.errors import UserError

MAX_SEED = 2**32 - 1  # what every generator the run seeds (torch, numpy, Python) takes

Bound = tuple[float, str]  # (value, "[" or "(") for a lower bound, (value, "]" or ")") for an upper one


def check_range(key: str, value: float | None, lo: Bound | None, hi: Bound | None) -> None:
    """`value` within `lo`/`hi` (None: unbounded), or one line naming the key and the allowed range.
    None (an optional key left unset) always passes."""
    if value is None:
        return
    ok = math.isfinite(value) or (hi is None and value == math.inf)
    if lo is not None:
        ok = ok and (value >= lo[0] if lo[1] == "[" else value > lo[0])
    if hi is not None:
        ok = ok and (value <= hi[0] if hi[1] == "]" else value < hi[0])
    if not ok:
        if lo is not None and hi is not None:
            allowed = f"in {lo[1]}{lo[0]:g}, {hi[0]:g}{hi[1]}"
        elif lo is not None:
            allowed = f"{'>=' if lo[1] == '[' else '>'} {lo[0]:g}"
        else:
            allowed = f"{'<=' if hi[1] == ']' else '<'} {hi[0]:g}"
        raise UserError(f"config key '{key}' must be {allowed}, got {value!r}")


def check_seed(key: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"config key '{key}' must be a seed in [0, {MAX_SEED}], got {value}")


def _field(default: Any, default_factory: Any, check: Callable[[str, Any], None]) -> Any:
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"check": check})
    return dataclasses.field(default=default, metadata={"check": check})


def ranged(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A field whose value (each item of a list, each value of a mapping) lies within the given bounds."""
    lo = (ge, "[") if ge is not None else (gt, "(") if gt is not None else None
    hi = (le, "]") if le is not None else (lt, ")") if lt is not None else None

    def check(key: str, value: Any) -> None:
        check_range(key, value, lo, hi)

    check.bounds = (lo, hi)  # the CLI holds an option that stands for a key to its range
    return _field(default, default_factory, check)


def seed_field(default: int = 0) -> Any:
    """A seed field: what every generator takes (`MAX_SEED`)."""
    return _field(default, dataclasses.MISSING, check_seed)


def check_fields(section: Any, prefix: str) -> None:
    """Every field check of `section` (a dataclass instance) and of the sections and entries it holds;
    `prefix` is the section's dotted key with its trailing dot ("optim.")."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        check = f.metadata.get("check")
        if isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_fields(item, f"{key}[{i}].")
                elif check is not None:
                    check(f"{key}[{i}]", item)
        elif isinstance(value, dict):
            for k, v in value.items():
                if check is not None:
                    check(f"{key}.{k}", v)
        elif dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.")
        elif check is not None and value is not None:
            check(key, value)


class Registry(dict):
    """Builders by name, for the config key whose value picks one; an unknown name is a one-line error
    naming the key. `choices` is the `Literal` of its names, the type of that key in its section."""

    def __init__(self, key: str | None, entries: dict[str, Any], what: str = "") -> None:
        """`key`: the config key whose value picks an entry; None for a registry no key names directly,
        whose unknown names are then called a `what` ("feature extractor")."""
        super().__init__(entries)
        self.key, self.what = key, what

    def __missing__(self, name: Any) -> Any:
        if self.key is None:
            raise UserError(f"unknown {self.what} {name!r}; choose from {', '.join(self)}")
        raise UserError(f"config key '{self.key}' must be one of {', '.join(self)}; got '{name}'")

    @property
    def choices(self) -> Any:
        return Literal[tuple(self)]
