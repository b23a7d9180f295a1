"""The binary body of serving requests (`fleet.worker.wire`): values round-trip exactly,
arrays travel as raw bytes, and a damaged body is refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.worker import wire

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)


@given(st.lists(st.text() | st.binary() | st.none() | json_values, max_size=20))
def test_values_round_trip(values) -> None:
    assert wire.decode(wire.encode(values)) == values


def test_arrays_round_trip_as_raw_bytes() -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    matrix = np.arange(12, dtype=np.int64).reshape(3, 4)
    scalar = np.float64(2.5)
    body = wire.encode([vector, matrix, scalar, np.asfortranarray(matrix)])
    assert len(body) < 384 * 4 + 3 * 4 * 8 * 2 + 8 + 200  # no text encoding of the numbers
    out = wire.decode(body)
    assert out[0].dtype == np.float32 and np.array_equal(out[0], vector)
    assert out[1].shape == (3, 4) and np.array_equal(out[1], matrix)
    assert out[2] == 2.5 and np.array_equal(out[3], matrix)


def test_item_errors_travel_in_place() -> None:
    out = wire.decode(wire.encode(["ok", wire.ItemError("infer: ValueError: bad")]))
    assert out[0] == "ok" and isinstance(out[1], wire.ItemError) and out[1].message == "infer: ValueError: bad"


@pytest.mark.parametrize("body", [b"", b"JSON[1,2]", wire.encode(["abc"])[:-1], wire.encode(["abc"]) + b"x"])
def test_damaged_bodies_are_refused(body) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(body)


def test_object_arrays_are_refused() -> None:
    with pytest.raises(wire.WireError, match="Python objects"):
        wire.encode([np.array([object()])])
