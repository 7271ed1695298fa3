"""Hypothesis strategies and limits shared by the fuzz tests (bad input everywhere, issue 7 item 3).

Every fuzz test states one contract: for any input, the decoder returns a value or raises its module's
documented error, and never anything else, and never takes long. Examples are kept modest (`FUZZ`) so the
whole folder runs in well under a minute; `tests/conftest.py` makes them derandomized under CI.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Final

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

#: A generous bound per example: these are pure functions on inputs of at most a few MB; one that takes
#: seconds is a hang in the making (a quadratic loop, an unbounded expansion).
EXAMPLE_DEADLINE: Final = timedelta(seconds=5)

#: The settings every fuzz test starts from. Large inputs are the point here, so the health checks about
#: them are off.
FUZZ: Final = settings(
    max_examples=150,
    deadline=EXAMPLE_DEADLINE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

#: Values JSON can carry, nested a few levels.
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

#: Anything a wrong-typed field could hold, JSON or not.
odd_values: st.SearchStrategy[Any] = json_values | st.binary(max_size=16) | st.integers() | st.floats()


def nested_json(depth: int, *, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    """`[[[...]]]` `depth` levels deep (or with another pair of brackets)."""
    return opener * depth + closer * depth


def nested_object_json(depth: int) -> bytes:
    """`{"d":{"d":...}}` `depth` levels deep."""
    return b'{"d":' * depth + b"null" + b"}" * depth
