"""The held-out split's invariants as hypothesis properties, and the divergence note on synthetic histories."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bwacal.split import DIVERGENCE_RATIO, divergence_note, holdout_split

FAST = settings(max_examples=80, deadline=None)

fractions = st.floats(0.0, 0.95, allow_nan=False)
seeds = st.integers(0, 2**32 - 1)


@st.composite
def sourced(draw):
    n = draw(st.integers(1, 200))
    k = draw(st.integers(1, min(n, 30)))
    ids = draw(st.lists(st.integers(0, 10**6), min_size=k, max_size=k, unique=True))
    sources = np.asarray(draw(st.lists(st.sampled_from(ids), min_size=n, max_size=n)), np.int64)
    return n, sources


def check_partition(n, train, held):
    assert train.dtype == np.int64 and held.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)
    assert np.intersect1d(train, held).size == 0
    np.testing.assert_array_equal(np.union1d(train, held), np.arange(n))


@FAST
@given(case=sourced(), fraction=fractions, seed=seeds)
def test_split_by_source(case, fraction, seed):
    n, sources = case
    train, held = holdout_split(n, fraction, seed, sources, mode="source")
    check_partition(n, train, held)
    assert np.intersect1d(sources[train], sources[held]).size == 0  # no source straddles
    target = round(n * fraction) if n > 1 else 0
    largest = np.bincount(np.unique(sources, return_inverse=True)[1]).max()
    assert abs(len(held) - target) <= largest
    if target == 0:
        assert len(held) == 0
    elif len(np.unique(sources)) > 1:
        assert len(np.unique(sources[held])) >= 1 and len(np.unique(sources[train])) >= 1
    again = holdout_split(n, fraction, seed, sources, mode="source")
    np.testing.assert_array_equal(again[1], held)


@FAST
@given(n=st.integers(0, 300), fraction=fractions, seed=seeds)
def test_random_split(n, fraction, seed):
    train, held = holdout_split(n, fraction, seed)
    check_partition(n, train, held)
    assert len(held) == (round(n * fraction) if n > 1 else 0)
    np.testing.assert_array_equal(holdout_split(n, fraction, seed)[1], held)
    # the split calibrate has always drawn: same seed, same images
    perm = np.random.default_rng(seed).permutation(n)
    np.testing.assert_array_equal(held, np.sort(perm[:len(held)]))


@FAST
@given(n=st.integers(2, 300), fraction=st.floats(0.05, 0.9), seed=seeds, blocks=st.integers(2, 12))
def test_block_split(n, fraction, seed, blocks):
    train, held = holdout_split(n, fraction, seed, mode="blocks", blocks=blocks)
    check_partition(n, train, held)
    block = np.arange(n) * min(blocks, n) // n
    assert np.intersect1d(block[train], block[held]).size == 0
    sizes = np.bincount(block)
    assert abs(len(held) - round(n * fraction)) <= sizes.max()
    # a held-out block is contiguous: held indices form at most `blocks` runs
    runs = 1 + np.count_nonzero(np.diff(held) > 1) if len(held) else 0
    assert runs <= min(blocks, n)


def test_auto_mode_and_seeds():
    sources = np.repeat(np.arange(8), 64)
    train, held = holdout_split(512, 0.25, 0, sources)  # auto: by source
    assert len(np.unique(sources[held])) == 2 and len(held) == 128
    different = {tuple(holdout_split(512, 0.25, seed, sources)[1][:1]) for seed in range(10)}
    assert len(different) > 1  # the seed picks the sources
    _, held_one = holdout_split(512, 0.25, 0, np.zeros(512, np.int64))  # one source: auto falls back to random
    assert len(held_one) == 128
    assert len(holdout_split(512, 0.25, 0, np.zeros(512, np.int64), mode="source")[1]) == 0


def test_split_errors():
    with pytest.raises(ValueError, match="needs source ids"):
        holdout_split(10, 0.2, 0, mode="source")
    with pytest.raises(ValueError, match="unknown split mode"):
        holdout_split(10, 0.2, 0, mode="stratified")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        holdout_split(10, 1.0, 0)
    with pytest.raises(ValueError, match=r"sources must be \(10,\)"):
        holdout_split(10, 0.2, 0, np.zeros(9, np.int64))


def history(train, held):
    rows = [{"epoch": 0, "train_loss": None, "heldout_loss": held[0]}]
    rows += [{"epoch": i, "train_loss": t, "heldout_loss": h} for i, (t, h) in enumerate(zip(train, held[1:]), 1)]
    return rows


def test_divergence_note():
    # both falling together: no note
    assert divergence_note(history([0.5, 0.4, 0.35], [0.6, 0.5, 0.42, 0.38])) is None
    # tiny losses with a large ratio but a negligible gap: no note
    assert divergence_note(history([0.004, 0.003], [0.01, 0.009, 0.008])) is None
    # held-out far above training at the end
    note = divergence_note(history([0.3, 0.1, 0.05], [0.9, 0.8, 0.7, 0.6]))
    assert note is not None and f"{0.6 / 0.05:.1f}x" in note
    assert DIVERGENCE_RATIO * 0.05 < 0.6
    # held-out rising from its best epoch while training falls
    note = divergence_note(history([0.5, 0.4, 0.3, 0.2], [0.6, 0.5, 0.45, 0.5, 0.55]))
    assert note is not None and "rose from 0.4500 (epoch 2) to 0.5500" in note
    # rising held-out but rising training loss too (a bad learning rate, not overfitting): no rise note
    assert divergence_note(history([0.3, 0.35, 0.4], [0.5, 0.3, 0.36, 0.42])) is None
    assert divergence_note([{"epoch": 0, "train_loss": None, "heldout_loss": 0.4}]) is None
    assert divergence_note([]) is None
