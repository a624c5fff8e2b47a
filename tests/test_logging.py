"""Logging: the Python API prints nothing and logs to the ``compress`` loggers; the command line's
--quiet and --verbose; warnings shown once, as ``warning:`` lines."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
from helpers import tiny_world

import compress
from compress import progress
from compress.cli.main import main
from compress.data.criteo_write import write_criteo_text


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logs")
    ckpt, train, valid, _ = tiny_world(tmp)
    return tmp, ckpt, train, valid


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_the_python_api_prints_nothing_and_logs(world, capfd, caplog):
    tmp, ckpt, train, valid = world
    caplog.set_level(logging.INFO, logger="compress")
    result = compress.run(ckpt, "int4_qat", data=train, valid=valid, out=tmp / "api", steps=4)
    out, err = capfd.readouterr()  # file-descriptor level: tqdm, print, torch's own handlers
    assert out == "" and err == ""
    assert result.out is not None
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert all(name.startswith(("compress", "exporters")) for name, _ in messages), messages
    assert ("compress.api", f"wrote {tmp / 'api'}") in messages
    assert any(name == "compress.api" and m.startswith("plan int4_qat: ") for name, m in messages)
    steps = [m for name, m in messages if name == "compress.pipeline" and m.startswith("step ")]
    assert steps[0].startswith("step 0: loss -, selection auc ") and steps[-1].startswith("step 4:")


def test_progress_bars_are_off_in_the_api_even_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert not progress.enabled()  # the Python API draws nothing
    previous = progress.set_enabled(None)  # what the command line sets
    try:
        assert progress.enabled()
    finally:
        progress.set_enabled(previous)
    assert not progress.enabled()


@pytest.mark.slow
def test_quiet_prints_the_result_and_warnings_only(world, capsys):
    tmp, ckpt, _, valid = world
    argv = ["--recipe", "int8_ptq", ckpt, "--valid", valid]
    code, out, err = run(capsys, *argv, "--out", tmp / "loud")
    assert code == 0 and "recipe: int8_ptq" in err  # the plan, on stderr
    code, out, err = run(capsys, "--quiet", *argv, "--out", tmp / "quiet")
    assert code == 0
    assert "ratio" in out and "artifacts:" in out  # the before/after table
    assert err == ""
    code, out, err = run(capsys, *argv, "-q", "--out", tmp / "quiet2")  # anywhere, short
    assert code == 0 and err == ""


def test_verbose_shows_every_stage_with_logger_names(world, capsys):
    tmp, ckpt, train, valid = world
    code, _, err = run(
        capsys,
        "--verbose",
        "--recipe",
        "int4_qat",
        ckpt,
        "--data",
        train,
        "--valid",
        valid,
        "--steps",
        "3",
        "--out",
        tmp / "verbose",
    )
    assert code == 0
    assert " INFO compress.pipeline: step 0: loss -, selection auc " in err
    assert " INFO compress.pipeline: step 3: loss " in err
    assert "step      3  loss" not in err  # the command's own step lines are not repeated


def test_quiet_and_verbose_together_is_a_usage_error(world, capsys):
    _, ckpt, _, valid = world
    code, _, err = run(capsys, "-q", "-v", "--recipe", "int8_ptq", ckpt, "--valid", valid)
    assert code == 2 and "give --quiet or --verbose, not both" in err


@pytest.mark.parametrize("flag", [[], ["--quiet"]])
def test_a_warning_is_one_warning_line(world, tmp_path, capsys, flag):
    """A library warning (a skipped malformed line) reaches the terminal once, as ``warning:``,
    also with --quiet; the command's handler is removed when it ends."""
    _, ckpt, _, _ = world
    rng = np.random.default_rng(0)
    path = tmp_path / "day.tsv"
    write_criteo_text(
        path, rng.integers(0, 2, 40), rng.integers(0, 9, (40, 5)), rng.integers(0, 99, (40, 4))
    )
    with open(path, "a") as fh:
        fh.write("not\ta\tcriteo\tline\n")
    handlers = list(logging.getLogger("compress").handlers)
    code, out, err = run(capsys, *flag, "eval", ckpt, "--data", path, "--on-bad-line", "skip")
    assert code == 0 and "auc" in out
    assert err.count("skipped 1 malformed lines") == 1, err
    assert f"warning: {path}: skipped 1 malformed lines" in err.splitlines()
    assert logging.getLogger("compress").handlers == handlers
