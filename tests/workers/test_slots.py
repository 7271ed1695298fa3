"""workers.slots: a slot constructor builds the same frozen object as the dataclass's own __init__."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field

import pytest

from workers.protocol import Dispatch, GatewayPayload, decode_payload
from workers.publish.base import OutboundEvent, new_outbound_event
from workers.slots import slot_constructor


def test_same_object_as_init() -> None:
    made = new_outbound_event(1, "session", 2, "MESSAGE_CREATE", b"{}", 3.5)
    assert type(made) is OutboundEvent
    assert made == OutboundEvent(1, "session", 2, "MESSAGE_CREATE", b"{}", 3.5)
    assert hash(made) == hash(OutboundEvent(1, "session", 2, "MESSAGE_CREATE", b"{}", 3.5))
    assert pickle.loads(pickle.dumps(made)) == made
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.seq = 3  # type: ignore[misc]
    payload = decode_payload(b'{"t":"X","s":5,"op":0,"d":{"a":1}}')
    assert type(payload) is GatewayPayload
    assert (payload, payload.key_count) == (GatewayPayload(0, {"a": 1}, 5, "X"), 4)
    assert slot_constructor(Dispatch)("X", None) == Dispatch("X", None)


def test_refuses_what_it_would_get_wrong() -> None:
    @dataclass(slots=True)
    class Mutable:
        a: int

    @dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class NotInInit:
        a: int
        b: int = field(default=0, init=False)

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    for cls in (Mutable, PostInit, NotInInit, NoSlots):
        with pytest.raises(TypeError):
            slot_constructor(cls)
