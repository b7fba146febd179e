"""Allowed sets against plain boolean masks, by property; numpy is all they need."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from recsvc.model.allowed import AllowedSet


@given(st.lists(st.booleans(), min_size=1, max_size=70), st.lists(st.integers(-3, 80), max_size=20))
def test_allowed_set_matches_a_boolean_mask(mask: list[bool], remove: list[int]) -> None:
    m = np.array(mask)
    a = AllowedSet.from_mask(m).without(np.array(remove, dtype=np.int64))
    expected = m.copy()
    for r in remove:
        if 0 <= r < len(m):
            expected[r] = False
    assert a.count == expected.sum()
    np.testing.assert_array_equal(a.mask(), expected)
    np.testing.assert_array_equal(a.contains(np.arange(len(m))), expected)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.booleans(), min_size=1, max_size=300),
    st.integers(0, 40),
    st.lists(st.integers(-5, 320), max_size=30),
)
def test_first_matches_a_plain_filter(mask: list[bool], k: int, exclude: list[int]) -> None:
    m = np.array(mask)
    allowed = AllowedSet.from_mask(m)
    candidates = np.random.default_rng(len(mask)).permutation(len(m))
    ex = np.array(exclude, dtype=np.int64)
    got = allowed.first(candidates, k, ex)
    want = [c for c in candidates if m[c] and c not in set(exclude)][:k]
    assert got.tolist() == want


def test_the_rules_and_their_sets_need_no_faiss() -> None:
    code = "import sys, recsvc.model.rules; assert 'faiss' not in sys.modules, 'faiss imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
