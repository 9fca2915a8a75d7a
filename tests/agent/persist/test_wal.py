"""WriteAheadLog on a real directory: appends, reopen, torn tails, corruption, full disk."""

import errno
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import StateError
from agent.persist import LogDamagedError, WriteAheadLog
from agent.persist.wal_format import FRAME_OVERHEAD, SEGMENT_HEADER


def fill(wal, n, start=0, durable=True):
    return [wal.append(f"rec-{start + i}".encode(), durable=durable) for i in range(n)]


def payloads(records):
    return [p for _, p in records]


def test_append_replay_reopen(tmp_path):
    with WriteAheadLog(tmp_path / "wal") as wal:
        assert wal.last_seq == 0 and list(wal.replay()) == []
        assert fill(wal, 3) == [1, 2, 3]
        assert list(wal.replay(after_seq=1)) == [(2, b"rec-1"), (3, b"rec-2")]
    with WriteAheadLog(tmp_path / "wal") as wal:
        assert wal.last_seq == 3 and wal.warnings == []
        assert wal.append(b"more") == 4
        assert payloads(wal.replay()) == [b"rec-0", b"rec-1", b"rec-2", b"more"]


def test_non_durable_appends_batch_until_sync(tmp_path, faulty_disk):
    with WriteAheadLog(tmp_path / "wal") as wal:
        disk = faulty_disk(what=("fsync",))
        fill(wal, 5, durable=False)
        assert disk.calls == 0
        wal.sync()
        assert disk.calls == 1
        wal.sync()  # nothing pending
        assert disk.calls == 1


def test_torn_tail_is_truncated_on_open_with_a_warning(tmp_path):
    with WriteAheadLog(tmp_path / "wal") as wal:
        fill(wal, 3)
        seg = wal.segments[-1]
    full = seg.stat().st_size
    os.truncate(seg, full - 3)  # the last record lost its last 3 bytes
    with WriteAheadLog(tmp_path / "wal") as wal:
        assert len(wal.warnings) == 1 and "torn record" in wal.warnings[0]
        assert str(seg) in wal.warnings[0]
        assert seg.stat().st_size == full - (FRAME_OVERHEAD + len(b"rec-2"))
        assert wal.last_seq == 2
        assert wal.append(b"new") == 3
    with WriteAheadLog(tmp_path / "wal") as wal:
        assert wal.warnings == []
        assert payloads(wal.replay()) == [b"rec-0", b"rec-1", b"new"]


def test_corruption_in_the_middle_is_an_error_and_recover_keeps_the_prefix(tmp_path):
    with WriteAheadLog(tmp_path / "wal") as wal:
        fill(wal, 6)
        seg = wal.segments[-1]
    raw = bytearray(seg.read_bytes())
    third = SEGMENT_HEADER.size + 2 * (FRAME_OVERHEAD + 5)
    raw[third + FRAME_OVERHEAD + 1] ^= 0x04  # a bit flip inside record 3's payload
    seg.write_bytes(bytes(raw))
    with WriteAheadLog(tmp_path / "wal") as wal:
        with pytest.raises(StateError, match="refusing to write"):
            wal.append(b"x")  # appending after garbage would be unreachable
        got = []
        with pytest.raises(LogDamagedError, match=r"offset \d+ \(seq 3\).*4..6"):
            for rec in wal.replay():
                got.append(rec)
        assert payloads(got) == [b"rec-0", b"rec-1"]
        records, warnings = wal.recover(after_seq=0)
        assert payloads(records) == [b"rec-0", b"rec-1"]
        assert len(warnings) == 1 and "payload checksum" in warnings[0]
        assert "3 intact-looking later records" in warnings[0]
        assert wal.append(b"after") == 3
    aside = [p for p in seg.parent.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == bytes(raw)  # kept for forensics
    with WriteAheadLog(tmp_path / "wal") as wal:
        assert payloads(wal.replay()) == [b"rec-0", b"rec-1", b"after"]


def test_strict_recover_raises(tmp_path):
    with WriteAheadLog(tmp_path / "wal") as wal:
        fill(wal, 3)
        seg = wal.segments[-1]
    raw = bytearray(seg.read_bytes())
    raw[SEGMENT_HEADER.size + 2] ^= 1
    seg.write_bytes(bytes(raw))
    with WriteAheadLog(tmp_path / "wal") as wal, pytest.raises(LogDamagedError):
        wal.recover(after_seq=0, strict=True)


def test_damage_covered_by_the_checkpoint_is_only_a_warning(tmp_path):
    with WriteAheadLog(tmp_path / "wal") as wal:
        fill(wal, 4)
        wal.rotate()
        fill(wal, 2, start=4)
        old = wal.segments[0]
    raw = bytearray(old.read_bytes())
    raw[-1] ^= 0x80  # last record (seq 4) of the old segment
    old.write_bytes(bytes(raw))
    with WriteAheadLog(tmp_path / "wal") as wal:
        assert payloads(wal.recover(after_seq=4)[0]) == [b"rec-4", b"rec-5"]
        records, warnings = wal.recover(after_seq=3)
        assert records == [] and "log corrupt" in warnings[-1]  # seq 4 was needed: error


def test_rotation_and_truncate_before(tmp_path):
    with WriteAheadLog(tmp_path / "wal") as wal:
        fill(wal, 3)
        wal.rotate()
        wal.rotate()  # a second rotation of an empty segment is a no-op
        fill(wal, 3, start=3)
        wal.rotate()
        fill(wal, 1, start=6)
        assert [p.name for p in wal.segments] == [
            "wal-000000000001.log", "wal-000000000004.log", "wal-000000000007.log"]
        assert wal.truncate_before(5) == 1  # segment 4..6 still holds 5 and 6
        assert payloads(wal.replay(after_seq=4)) == [b"rec-4", b"rec-5", b"rec-6"]
        assert wal.truncate_before(100) == 1  # the active segment always stays
        assert len(wal.segments) == 1


def test_a_missing_segment_is_a_gap(tmp_path):
    with WriteAheadLog(tmp_path / "wal") as wal:
        fill(wal, 2)
        wal.rotate()
        fill(wal, 2, start=2)
        wal.rotate()
        fill(wal, 2, start=4)
        middle = wal.segments[1]
    middle.unlink()
    with WriteAheadLog(tmp_path / "wal") as wal:
        records, warnings = wal.recover(after_seq=0)
        assert payloads(records) == [b"rec-0", b"rec-1"]
        assert "records 3..4 are missing" in warnings[0]
        assert wal.append(b"z") == 3


def test_ensure_next_seq_never_reuses_covered_seqs(tmp_path):
    with WriteAheadLog(tmp_path / "wal") as wal:
        fill(wal, 2)
        wal.ensure_next_seq(10)
        assert wal.append(b"x") == 10
        assert list(wal.replay(after_seq=9)) == [(10, b"x")]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_failed_append_leaves_the_log_valid(tmp_path, faulty_disk, err):
    with WriteAheadLog(tmp_path / "wal") as wal:
        fill(wal, 3)
        size = wal.segments[-1].stat().st_size
        faulty_disk(fail_at=1, err=err)
        with pytest.raises(StateError, match=f"{wal.segments[-1]}.*{errno.errorcode[err]}"):
            wal.append(b"x" * 1000)
        assert wal.segments[-1].stat().st_size == size  # the partial frame is gone
    with WriteAheadLog(tmp_path / "wal") as wal:
        assert wal.warnings == [] and wal.last_seq == 3
        assert wal.append(b"ok") == 4


def test_failed_fsync_refuses_further_writes(tmp_path, faulty_disk):
    with WriteAheadLog(tmp_path / "wal") as wal:
        fill(wal, 2)
        faulty_disk(fail_at=1, err=errno.EIO, what=("fsync",))
        with pytest.raises(StateError, match="fsync"):
            wal.append(b"x")
        with pytest.raises(StateError, match="refusing"):
            wal.append(b"y")
    with WriteAheadLog(tmp_path / "wal") as wal:
        assert payloads(wal.replay()) == [b"rec-0", b"rec-1"]


def test_oversized_record_is_refused(tmp_path):
    with WriteAheadLog(tmp_path / "wal", max_record_bytes=10) as wal, pytest.raises(StateError):
        wal.append(b"x" * 11)


def test_segments_rotate_at_max_segment_bytes(tmp_path):
    with WriteAheadLog(tmp_path / "wal", max_segment_bytes=100) as wal:
        fill(wal, 20)
        assert len(wal.segments) > 3
    with WriteAheadLog(tmp_path / "wal") as wal:
        assert payloads(wal.replay()) == [f"rec-{i}".encode() for i in range(20)]


def test_files_are_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        with WriteAheadLog(tmp_path / "a" / "wal") as wal:
            fill(wal, 1)
            wal.rotate()
    finally:
        os.umask(old)
    for p in [tmp_path / "a", tmp_path / "a" / "wal"]:
        assert p.stat().st_mode & 0o777 == 0o700
    for p in (tmp_path / "a" / "wal").iterdir():
        assert p.stat().st_mode & 0o777 == 0o600


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=6), st.data())
def test_a_bit_flip_in_the_file_never_yields_a_wrong_record(tmp_path_factory, records, data):
    root = tmp_path_factory.mktemp("flip") / "wal"
    with WriteAheadLog(root) as wal:
        for p in records:
            wal.append(p)
        seg = wal.segments[-1]
    raw = bytearray(seg.read_bytes())
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    seg.write_bytes(bytes(raw))
    with WriteAheadLog(root) as wal:
        got, warnings = wal.recover(after_seq=0)
        assert payloads(got) == records[: len(got)] and len(got) < len(records)
        assert warnings, "the flip was not reported"
        seq = wal.append(b"next")
    with WriteAheadLog(root) as wal:
        assert list(wal.replay()) == [*got, (seq, b"next")] and seq == len(got) + 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=6), st.data())
def test_any_truncation_of_the_file_yields_a_prefix(tmp_path_factory, records, data):
    root = tmp_path_factory.mktemp("cut") / "wal"
    with WriteAheadLog(root) as wal:
        for p in records:
            wal.append(p)
        seg = wal.segments[-1]
    cut = data.draw(st.integers(0, seg.stat().st_size))
    os.truncate(seg, cut)
    with WriteAheadLog(root) as wal:
        got, _ = wal.recover(after_seq=0)
        assert payloads(got) == records[: len(got)]
        assert wal.append(b"next") == len(got) + 1
    with WriteAheadLog(root) as wal:
        assert wal.warnings == [] and payloads(wal.replay()) == [*payloads(got), b"next"]


def test_leftover_temp_files_are_removed(tmp_path):
    (tmp_path / "wal").mkdir()
    (tmp_path / "wal" / ".wal-000000000005.log.tmp-999").write_bytes(b"x")
    with WriteAheadLog(tmp_path / "wal") as wal:
        assert [p.name for p in (tmp_path / "wal").iterdir()] == ["wal-000000000001.log"]
        assert wal.last_seq == 0


def test_agent_persist_imports_no_torch():
    code = ("import sys, agent.persist; "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'export', 'firmware_sim')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
