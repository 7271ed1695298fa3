"""Fast positional constructors for the frozen slots dataclasses built once per gateway event.

A frozen dataclass's `__init__` sets each field through `object.__setattr__(self, name, value)` (to get past
its own `__setattr__`), a generic attribute lookup per field; with three such objects per dispatch
(`GatewayPayload`, `Dispatch`, `OutboundEvent`) that was about a microsecond of the worker's ~9 per event. A
slot's member descriptor sets it directly. `slot_constructor(cls)` returns a function taking every field
positionally that builds the same object as `cls(...)` (equal, same type, still frozen) without `__init__`; so
it is only for dataclasses with no `__post_init__` and no `InitVar` or `init=False` field, which it checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["slot_constructor"]


def slot_constructor(cls: type[Any]) -> Callable[..., Any]:
    """A function `(field1, field2, ...) -> cls` that fills the slots of a new `cls` directly (module note).
    Give it a precise `Callable[[...], cls]` type where it is assigned."""
    params = getattr(cls, "__dataclass_params__", None)
    if not (
        dataclasses.is_dataclass(cls) and params is not None and params.frozen and "__slots__" in vars(cls)
    ):
        raise TypeError(f"{cls.__qualname__} is not a frozen slots dataclass")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__qualname__} has a __post_init__, which this would skip")
    names = [f.name for f in dataclasses.fields(cls)]
    if any(not f.init for f in dataclasses.fields(cls)) or list(getattr(cls, "__match_args__", ())) != names:
        raise TypeError(f"{cls.__qualname__} has fields outside __init__")
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    lines = [f"def new_{cls.__name__}({', '.join(names)}):", "    self = _new(_cls)"]
    for name in names:
        namespace[f"_set_{name}"] = getattr(cls, name).__set__
        lines.append(f"    _set_{name}(self, {name})")
    lines.append("    return self")
    exec("\n".join(lines), namespace)  # the source is made of the dataclass's own field names
    constructor: Callable[..., Any] = namespace[f"new_{cls.__name__}"]
    return constructor
