"""The fragmentation formulas: known values, closed forms, and the four parts summing to 1."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedkv import InvalidArgument
from pagedkv import metrics


def test_request_breakdown_by_hand():
    # L: stored, A: allocated, F: final. Request 0: 3 stored, 8 allocated, will reach 5;
    # request 1: 10 stored in a region of 10 that will reach 12 (it will have to grow).
    bd = metrics.request_breakdown([3, 10], [8, 10], [5, 12], num_slots=40)
    assert bd == metrics.Breakdown(13 / 40, (2 + 0) / 40, 3 / 40, 22 / 40)
    assert bd.as_percent()["token_states"] == pytest.approx(32.5)


@st.composite
def requests(draw):
    n = draw(st.integers(0, 20))
    L = draw(st.lists(st.integers(1, 500), min_size=n, max_size=n))
    A = [x + draw(st.integers(0, 300)) for x in L]
    F = [x + draw(st.integers(0, 300)) for x in L]
    C = sum(A) + draw(st.integers(1, 1000))
    return L, A, F, C


@given(requests())
def test_the_four_parts_sum_to_one_and_match_the_definitions(case):
    L, A, F, C = case
    bd = metrics.request_breakdown(L, A, F, C)
    assert math.isclose(sum(bd), 1.0)
    assert all(part >= 0 for part in bd)
    assert bd.reserved * C == pytest.approx(sum(min(a, f) - l for l, a, f in zip(L, A, F)))
    assert bd.internal * C == pytest.approx(sum(max(0, a - f) for a, f in zip(A, F)))


def test_breakdown_rejects_inconsistent_sums():
    with pytest.raises(InvalidArgument, match="total_slots"):
        metrics.breakdown(0, 0, 0, 0)
    with pytest.raises(InvalidArgument, match="allocated_slots"):
        metrics.breakdown(10, 5, 0, 100)  # more tokens than allocated slots
    with pytest.raises(InvalidArgument, match="allocated_slots"):
        metrics.breakdown(1, 200, 0, 100)
    with pytest.raises(InvalidArgument, match="allocated"):
        metrics.request_breakdown([5], [4], [5], 10)
    with pytest.raises(InvalidArgument, match="final"):
        metrics.request_breakdown([5], [5], [4], 10)


@pytest.mark.parametrize("page_size", [1, 2, 16, 64, 256])
def test_page_tail_waste_closed_form(page_size):
    # Final lengths covering every residue modulo the page size equally often.
    F = np.arange(1, 5 * page_size + 1)
    tails = -(-F // page_size) * page_size - F
    stats = metrics.tail_waste(tails)
    assert stats.mean == metrics.expected_page_tail(page_size) == (page_size - 1) / 2
    assert stats.count == F.size and stats.p50 == pytest.approx(np.median(tails))


def test_tail_waste_percentiles_and_empty():
    stats = metrics.tail_waste(list(range(101)))
    assert (stats.mean, stats.p50, stats.p99) == (50.0, 50.0, 99.0)
    assert metrics.tail_waste([]) == metrics.TailWaste(0.0, 0.0, 0.0, 0)


def test_small_formulas():
    assert metrics.utilisation(30, 40) == 0.75 and metrics.utilisation(0, 0) == 1.0
    assert metrics.usage(25, 100) == 0.25
    assert metrics.largest_hole_index(10, 40) == 0.75
    assert metrics.largest_hole_index(40, 40) == 0.0 and metrics.largest_hole_index(0, 0) == 0.0
    assert metrics.sharing_saving(48, 80) == 48 / 128 and metrics.sharing_saving(0, 0) == 0.0
