"""WindowBuffer against a slow obvious oracle: concatenate everything, then slice."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.windowing import DeviceWindows, WindowBuffer


def oracle(frames, window, hop):
    """All samples in order, windows at 0, hop, 2*hop, ... (no gaps or duplicates)."""
    samples = np.concatenate([v for _, v in frames])
    seq_of = np.concatenate([np.full(len(v), s) for s, v in frames])
    out = []
    start = 0
    while start + window <= len(samples):
        out.append((samples[start:start + window].T, seq_of[start], seq_of[start + window - 1]))
        start += hop
    return out


@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=30),
       window=st.integers(1, 25), hop=st.integers(1, 40), channels=st.integers(1, 4))
def test_windows_match_oracle(sizes, window, hop, channels):
    rng = np.random.default_rng(len(sizes) * 1000 + window)
    frames = [(i, rng.standard_normal((n, channels)).astype(np.float32))
              for i, n in enumerate(sizes)]
    wb = WindowBuffer(n_channels=channels, window=window, hop=hop)
    got = [w for s, v in frames for w in wb.push(s, float(s), v)]
    want = oracle(frames, window, hop)
    assert len(got) == len(want)
    for i, (w, (values, first, last)) in enumerate(zip(got, want, strict=True)):
        assert w.index == i
        np.testing.assert_array_equal(w.values, values)
        assert (w.seq_first, w.seq_last) == (first, last)
        assert w.values.shape == (channels, window)


def test_duplicates_dropped_and_gaps_reset():
    wb = WindowBuffer(n_channels=1, window=4, hop=4)
    one = np.ones((3, 1), np.float32)
    assert wb.push(0, 0, one) == []
    assert wb.push(0, 0, one) == []           # duplicate
    assert wb.counters.duplicates == 1
    assert wb.push(5, 0, one) == []           # gap: partial window discarded
    assert wb.counters.gaps == 1
    w = wb.push(6, 0, one)
    assert len(w) == 1 and (w[0].seq_first, w[0].seq_last) == (5, 6)


def test_wrong_channel_count_is_refused():
    wb = WindowBuffer(n_channels=3, window=4, hop=4)
    with pytest.raises(ValueError, match=r"expected \(samples, 3\)"):
        wb.push(0, 0, np.ones((2, 2), np.float32))


def test_device_windows_bounded():
    dw = DeviceWindows(n_channels=1, window=2, hop=2, max_devices=2)
    dw.get("a"), dw.get("b"), dw.get("a")
    with pytest.raises(OverflowError, match="max_devices=2"):
        dw.get("c")
