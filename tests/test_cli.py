"""The ``reverie`` command line as a user meets it: every ``--help`` works, and a mistake
gets one line naming the bad value and the fix, never a traceback (``--debug`` or
``REVERIE_DEBUG=1`` shows it)."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest

from agent.cli import build_parser, main
from agent.dataset import load_dataset, save_dataset
from agent.errors import DatasetError


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every command path of the parser tree: (), ("run",), ("bench", "fewshot"), ..."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))


def test_the_tree_holds_the_commands_the_readme_uses():
    for path in [("run",), ("health",), ("config", "check"), ("config", "example"),
                 ("bench", "fewshot"), ("bench", "cl"), ("bench", "e2e"), ("bench", "chaos"),
                 ("bench", "fuzz"), ("bench", "sim"), ("sim",), ("sim", "dataset"),
                 ("sim", "replay"), ("sim", "broker"), ("export", "train"), ("demo",)]:
        assert path in COMMANDS, path


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "reverie")
def test_every_help_exits_0_with_its_own_usage_line(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    usage = out.splitlines()[0]
    # a sub-mode's usage names itself, not its parent's multi-line usage (sim dataset, replay)
    assert usage.startswith(f"usage: {' '.join(('reverie', *path))}"), usage


def test_bench_fewshot_options_are_documented():
    fewshot = build_parser()._subparsers._group_actions[0].choices["bench"]
    sub = fewshot._subparsers._group_actions[0].choices["fewshot"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings


def _transposed(tmp_path, channels: bool = False):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 128, 6)).astype(np.float32)     # (N, T, C): transposed
    y = np.repeat(np.arange(4), 10)
    return save_dataset(tmp_path / "t.npz", X, y, classes=["a", "b", "c", "d"],
                        channels=[f"c{i}" for i in range(6)] if channels else None)


def test_a_transposed_dataset_is_found_by_its_channels_key_or_the_bundle(tmp_path, caplog):
    with pytest.raises(DatasetError, match=r"6 channel names but X is \(N, 128, 6\): X looks "
                       r"like \(N, T, C\); transpose it"):
        load_dataset(_transposed(tmp_path, channels=True))
    with pytest.raises(DatasetError, match=r"the bundle takes windows of \(C, T\) = \(6, 128\): "
                       r"X looks like \(N, T, C\)"):
        load_dataset(_transposed(tmp_path), input_shape=(6, 128))
    with pytest.raises(DatasetError, match=r"windows of shape \(128, 6\), the bundle takes "
                       r"\(3, 64\)"):
        load_dataset(_transposed(tmp_path), input_shape=(3, 64))
    # nothing to tell: loaded as (N, C, T), with the assumption said out loud
    with caplog.at_level(logging.WARNING, logger="reverie.dataset"):
        ds = load_dataset(_transposed(tmp_path))
    assert ds.input_shape == (128, 6)
    assert "taken as (N, C, T), 128 channels of 6 samples" in caplog.text


def test_bench_fewshot_with_a_transposed_dataset_is_one_line(sim_bundle, tmp_path, capsys):
    assert main(["bench", "fewshot", "--bundle", str(sim_bundle), "--data",
                 str(_transposed(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "X looks like (N, T, C)" in err, err


def test_bench_fewshot_on_a_bundle_of_every_class_says_base_classes(sim_bundle, tmp_path,
                                                                   capsys):
    from firmware_sim.signals import write_dataset

    data = write_dataset(tmp_path / "d.npz", n_per_class=5, seed=1)
    assert main(["bench", "fewshot", "--bundle", str(sim_bundle), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--base-classes" in err, err


def test_a_missing_bundle_says_it_does_not_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("REVERIE_DEBUG", raising=False)
    assert main(["bench", "fewshot", "--bundle", str(tmp_path / "nope"), "--data", "x"]) == 2
    err = capsys.readouterr().err
    assert err == f"reverie bench: error: {tmp_path / 'nope'}: does not exist (expected a " \
                  "bundle directory from `reverie export train`)\n"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, how):
    argv = ["config", "check", str(tmp_path / "missing.toml")]
    monkeypatch.delenv("REVERIE_DEBUG", raising=False)
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    if how == "flag":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("REVERIE_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("missing.toml': no such file\n")


def test_sim_gives_the_protocol_hint_when_the_broker_drops_it():
    from agent.errors import BrokerError
    from firmware_sim.cli import _wait

    class Dropped:
        def start(self):
            raise BrokerError("MQTT broker mqtt://127.0.0.1:1 closed the connection before "
                              "CONNACK")

    with pytest.raises(BrokerError, match="try --protocol 3.1.1"):
        _wait(Dropped(), protocol="5")
    with pytest.raises(BrokerError) as exc:
        _wait(Dropped(), protocol="3.1.1")
    assert "--protocol" not in str(exc.value)
