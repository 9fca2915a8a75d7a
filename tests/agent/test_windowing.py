"""WindowBuffer against a slow obvious oracle: concatenate everything, then slice.

Reordered and duplicated streams must give exactly the in-order stream's windows; with
dropped frames, windows must still be runs of consecutive samples and the counters must
account for every pushed frame.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.windowing import (
    RESTART_BACKSTEP,
    RESTART_TS_SLACK_S,
    RESTART_ZERO_AFTER,
    DeviceWindows,
    WindowBuffer,
    WindowCounters,
)


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


def shuffle_bounded(n, offsets):
    """Order of ``range(n)`` sorted by ``i + offsets[i]`` (offsets in 0..D): every frame ends
    up at most D places from its own. Frame 0 stays first (offset forced to 0), since the
    first frame a buffer sees starts its stream."""
    keys = [i + (offsets[i] if i else 0) for i in range(n)]
    return sorted(range(n), key=lambda i: (keys[i], i))


def with_duplicates(order, dup_after):
    """Insert a copy of ``order[i]`` right after position ``i + dup_after[i]`` (or at the
    end) for each i in dup_after; copies come after their original."""
    out = list(order)
    for i, lag in sorted(dup_after.items(), reverse=True):
        out.insert(min(i + 1 + lag, len(out)), order[i])
    return out


def overtaken(arrival):
    """Frames that a lower seq arrived after (first arrivals only)."""
    seen, first = set(), []
    for s in arrival:
        if s not in seen:
            seen.add(s)
            first.append(s)
    pos = {s: p for p, s in enumerate(first)}
    return sum(any(pos[i] > pos[j] for i in pos if i < j) for j in pos)


def frame_values(sizes, channels, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, channels)).astype(np.float32) for n in sizes]


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


@given(data=st.data(), sizes=st.lists(st.integers(1, 12), min_size=1, max_size=30),
       window=st.integers(1, 25), hop=st.integers(1, 30), channels=st.integers(1, 3),
       reorder=st.integers(0, 6), start=st.integers(0, 50))
def test_reordered_and_duplicated_stream_gives_the_in_order_windows(
        data, sizes, window, hop, channels, reorder, start):
    n = len(sizes)
    values = frame_values(sizes, channels, seed=n * 31 + window)
    offsets = data.draw(st.lists(st.integers(0, reorder), min_size=n, max_size=n), "offsets")
    dups = data.draw(st.dictionaries(st.integers(0, n - 1), st.integers(0, 8), max_size=n),
                     "dups")
    arrival = with_duplicates(shuffle_bounded(n, offsets), dups)

    wb = WindowBuffer(n_channels=channels, window=window, hop=hop, reorder_frames=reorder,
                      start_index=start)
    got = [w for s in arrival for w in wb.push(s, float(s), values[s])]

    want = oracle(list(enumerate(values)), window, hop)
    assert len(got) == len(want)
    for i, (w, (v, first, last)) in enumerate(zip(got, want, strict=True)):
        assert w.index == start + i
        np.testing.assert_array_equal(w.values, v)
        assert (w.seq_first, w.seq_last, w.ts) == (first, last, float(first))
    c = wb.counters
    assert (c.frames, c.duplicates, c.gaps, c.lost_frames, c.restarts, wb.held()) == (
        n, len(dups), 0, 0, 0, 0)
    assert c.reordered == overtaken(arrival)
    assert c.windows == len(got) and wb.next_index == start + len(got)


@given(data=st.data(), sizes=st.lists(st.integers(1, 12), min_size=2, max_size=30),
       window=st.integers(1, 25), hop=st.integers(1, 30), reorder=st.integers(0, 5))
def test_with_drops_windows_never_span_a_missing_frame(data, sizes, window, hop, reorder):
    n = len(sizes)
    # Each sample's value is its global position, so a window is valid iff its values are
    # consecutive integers (float32 holds them exactly at these sizes).
    bounds = np.cumsum([0, *sizes])
    values = [np.arange(bounds[i], bounds[i + 1], dtype=np.float32)[:, None] for i in range(n)]
    dropped = data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1), "dropped")
    offsets = data.draw(st.lists(st.integers(0, reorder + 2), min_size=n, max_size=n))
    dups = data.draw(st.dictionaries(st.integers(0, n - 1), st.integers(0, 8), max_size=n))
    order = [s for s in shuffle_bounded(n, offsets) if s not in dropped]
    arrival = with_duplicates(order, {i: lag for i, lag in dups.items() if i < len(order)})
    injected = len(arrival) - len(order)

    wb = WindowBuffer(n_channels=1, window=window, hop=hop, reorder_frames=reorder)
    got = [w for s in arrival for w in wb.push(s, float(s), values[s])]

    for i, w in enumerate(got):
        assert w.index == i
        ids = w.values[0].astype(np.int64)
        np.testing.assert_array_equal(np.diff(ids), 1)
        frame_of = np.searchsorted(bounds, ids, side="right") - 1
        assert (frame_of[0], frame_of[-1]) == (w.seq_first, w.seq_last)
        assert not dropped & set(range(w.seq_first, w.seq_last + 1))
    c = wb.counters
    assert len(arrival) == c.frames + c.duplicates + wb.held()
    assert c.windows == len(got) and c.restarts == 0
    # Every dropped seq below the last consumed one was declared lost; so was every
    # present frame that came later than the reorder budget, which then was a duplicate.
    dropped_passed = sum(s < wb.last_seq for s in dropped)
    late = c.lost_frames - dropped_passed
    assert late >= 0 and c.duplicates == injected + late
    assert (c.gaps == 0) == (c.lost_frames == 0) and c.gaps <= c.lost_frames
    if reorder == 0:
        assert c.reordered == 0


def _one(n=2):
    return np.ones((n, 1), np.float32)


def test_strict_mode_drops_duplicates_and_resets_at_gaps():
    wb = WindowBuffer(n_channels=1, window=4, hop=4, reorder_frames=0)
    one = np.ones((3, 1), np.float32)
    assert wb.push(0, 0, one) == []
    assert wb.push(0, 0, one) == []           # duplicate
    assert wb.counters.duplicates == 1
    assert wb.push(5, 0, one) == []           # gap: partial window discarded
    assert (wb.counters.gaps, wb.counters.lost_frames) == (1, 4)
    w = wb.push(6, 0, one)
    assert len(w) == 1 and (w[0].seq_first, w[0].seq_last) == (5, 6)


def test_missing_frame_releases_the_held_ones_in_order():
    wb = WindowBuffer(n_channels=1, window=2, hop=2)
    assert len(wb.push(0, 0, _one())) == 1
    assert wb.push(3, 0, _one()) == [] and wb.push(2, 0, _one()) == []
    assert wb.push(3, 0, _one()) == []        # duplicate of a held frame
    assert wb.held() == 2
    got = wb.push(1, 0, _one())
    assert [(w.index, w.seq_first) for w in got] == [(1, 1), (2, 2), (3, 3)]
    c = wb.counters
    # 3 was overtaken by 2 and 1, 2 by 1: each counts once; 1 itself was just late
    assert (c.reordered, c.duplicates, c.gaps, wb.held()) == (2, 1, 0, 0)


def test_overflow_declares_one_gap_per_missing_run():
    wb = WindowBuffer(n_channels=1, window=1, hop=1, reorder_frames=2)
    wb.push(0, 0, _one(1))
    assert wb.push(2, 0, _one(1)) == [] and wb.push(4, 0, _one(1)) == []
    got = wb.push(5, 0, _one(1))              # 3 held > 2: seq 1 is lost, 2 released
    assert [w.seq_first for w in got] == [2]
    assert (wb.counters.gaps, wb.counters.lost_frames, wb.held()) == (1, 1, 2)
    got = wb.push(7, 0, _one(1))              # 4, 5, 7 held: seq 3 is lost
    assert [w.seq_first for w in got] == [4, 5]
    assert (wb.counters.gaps, wb.counters.lost_frames, wb.held()) == (2, 2, 1)
    assert wb.push(1, 0, _one(1)) == []       # came too late: a duplicate now
    assert wb.counters.duplicates == 1 and wb.counters.reordered == 0


def test_a_gap_discards_the_partial_window():
    wb = WindowBuffer(n_channels=1, window=4, hop=4, reorder_frames=1)
    wb.push(0, 0, _one(3))
    wb.push(2, 0, _one(3))
    got = wb.push(3, 0, _one(3))              # seq 1 lost: samples of 0 must not be used
    assert [(w.seq_first, w.seq_last) for w in got] == [(2, 3)]


def test_device_restart_is_accepted_and_flushes_held_frames():
    wb = WindowBuffer(n_channels=1, window=2, hop=2)
    for s in range(RESTART_ZERO_AFTER + 1):
        wb.push(s, 0, _one())
    held_seq = RESTART_ZERO_AFTER + 2
    wb.push(held_seq, 0, _one())
    before = wb.next_index
    got = wb.push(0, 0, _one())
    assert [(w.index, w.seq_first) for w in got] == [(before, held_seq), (before + 1, 0)]
    c = wb.counters
    assert (c.restarts, c.gaps, c.lost_frames, wb.held(), wb.last_seq) == (1, 1, 1, 0, 0)
    assert len(wb.push(1, 0, _one())) == 1    # the new stream continues


def test_far_backwards_seq_is_a_restart_but_a_near_one_a_duplicate():
    wb = WindowBuffer(n_channels=1, window=2, hop=2)
    top = 5 * RESTART_BACKSTEP
    wb.push(top, 0, _one())
    assert wb.push(top - RESTART_BACKSTEP, 0, _one()) == []
    assert (wb.counters.duplicates, wb.counters.restarts) == (1, 0)
    assert len(wb.push(top - RESTART_BACKSTEP - 1, 0, _one())) == 1
    assert wb.counters.restarts == 1


def test_seq_zero_early_in_a_stream_is_a_duplicate():
    wb = WindowBuffer(n_channels=1, window=2, hop=2)
    for s in range(RESTART_ZERO_AFTER):
        wb.push(s, 0, _one())
    assert wb.push(0, 0, _one()) == []
    assert (wb.counters.duplicates, wb.counters.restarts) == (1, 0)


PERIOD_S = 0.32    # 16 samples at 50 Hz, the simulator's frame


def _run(wb, seqs, t0):
    """Push frames `seqs` stamped like a device started at `t0`; the windows made."""
    return [w for s in seqs for w in wb.push(s, t0 + s * PERIOD_S, _one())]


def test_a_rerun_short_stream_is_a_restart_by_its_timestamps():
    # issue 17: a 6 s `reverie sim` run again: seq 0.. again, below RESTART_ZERO_AFTER,
    # but stamped later: taken at once, not dropped as duplicates until seq 19
    wb = WindowBuffer(n_channels=1, window=2, hop=2)
    t0 = 1.7e9
    first = _run(wb, range(19), t0)
    again = _run(wb, range(19), t0 + 8.0)
    assert len(again) == len(first) and wb.counters.duplicates == 0
    assert wb.counters.restarts == 1 and wb.last_seq == 18
    # a re-run faster than real time (its stamps run ahead of the wall clock), restarted
    # before the old stream's last stamp: still off the old time line
    wb = WindowBuffer(n_channels=1, window=2, hop=2)
    _run(wb, range(25), t0)                         # stamps t0 .. t0 + 7.7
    fresh = _run(WindowBuffer(n_channels=1, window=2, hop=2), range(10), t0)
    assert len(_run(wb, range(10), t0 + 2.0)) == len(fresh)  # before t0 + 7.7, off the line
    assert (wb.counters.restarts, wb.counters.duplicates) == (1, 0)


def test_stale_copies_on_the_time_line_stay_duplicates():
    wb = WindowBuffer(n_channels=1, window=2, hop=2)
    t0 = 1.7e9
    _run(wb, range(20), t0)
    for s in (0, 5, 19):                        # redelivered copies: their own stamps
        assert _run(wb, [s], t0) == []
    near = t0 + 3 * PERIOD_S + RESTART_TS_SLACK_S / 2   # jitter within the slack
    assert wb.push(3, near, _one()) == []
    assert (wb.counters.duplicates, wb.counters.restarts) == (4, 0)
    assert len(wb.push(4, t0 + 4 * PERIOD_S + 2 * RESTART_TS_SLACK_S, _one())) == 1  # restart
    assert wb.counters.restarts == 1 and wb.last_seq == 4


def test_full_uint64_seq_range():
    wb = WindowBuffer(n_channels=1, window=2, hop=2)
    top = 2**64 - 1
    wb.push(top - 1, 0, _one(1))
    (w,) = wb.push(top, 0, _one(1))
    assert (w.seq_first, w.seq_last) == (top - 1, top)


@pytest.mark.parametrize("kwargs, match", [
    ({"reorder_frames": -1}, "reorder_frames=-1"),
    ({"start_index": -2}, "start_index=-2"),
    ({"window": 0}, "window=0"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WindowBuffer(**{"n_channels": 1, "window": 2, "hop": 2, **kwargs})


def test_wrong_channel_count_is_refused():
    wb = WindowBuffer(n_channels=3, window=4, hop=4)
    with pytest.raises(ValueError, match=r"expected \(samples, 3\)"):
        wb.push(0, 0, np.ones((2, 2), np.float32))


def test_counters_as_dict():
    assert WindowCounters(frames=3, restarts=1).as_dict() == {
        "frames": 3, "duplicates": 0, "gaps": 0, "windows": 0, "reordered": 0,
        "lost_frames": 0, "restarts": 1}


def test_device_windows_bounded():
    dw = DeviceWindows(n_channels=1, window=2, hop=2, max_devices=2)
    dw.get("a"), dw.get("b"), dw.get("a")
    with pytest.raises(OverflowError, match="max_devices=2"):
        dw.get("c")


def test_device_windows_continue_numbering_and_sum_counters():
    dw = DeviceWindows(1, 2, 2, reorder_frames=1, start_indices={"a": 10})
    assert dw.next_index("a") == 10 and dw.next_index("b") == 0
    assert [w.index for w in dw.get("a").push(0, 0, _one(4))] == [10, 11]
    dw.set_start_index("b", 7)
    dw.get("b").push(0, 0, _one())
    dw.get("b").push(2, 0, _one())            # held
    dw.set_start_index("a", 5)                # never backwards
    assert dw.next_indices() == {"a": 12, "b": 8}
    assert dw.get("a").reorder_frames == 1
    t = dw.totals()
    assert (t["frames"], t["windows"], t["held"], t["devices"]) == (2, 3, 1, 2)
    with pytest.raises(ValueError, match="'b'"):
        dw.set_start_index("b", -1)
