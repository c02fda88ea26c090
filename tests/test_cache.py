"""Folders built once (data.cache): one builder among processes started together, nothing partial left."""

import multiprocessing
import time

import pytest

from alexnet.data.cache import build_once, is_complete


def _racer(final, log, barrier):
    def build(tmp):
        with open(log, "a") as f:
            f.write("build\n")
        time.sleep(0.5)  # long enough for the others to arrive while this one builds
        (tmp / "data.txt").write_text("made")
    barrier.wait()
    built = build_once(final, build)
    assert (final / "data.txt").read_text() == "made"
    return built


def _run(args):
    return _racer(*args)


def test_processes_started_together_build_once(tmp_path):
    # not fork: this test runner has threads of its own (torch's), and a child forked while one of them holds
    # a lock can wait for it forever
    ctx = multiprocessing.get_context("forkserver")
    barrier = ctx.Manager().Barrier(4)
    final, log = tmp_path / "out", tmp_path / "log.txt"
    with ctx.Pool(4) as pool:
        built = pool.map(_run, [(final, log, barrier)] * 4)
    assert sorted(built) == [False, False, False, True]
    assert log.read_text() == "build\n"
    assert is_complete(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "log.txt", "out"]  # no temporary folder


def test_failed_build_leaves_nothing_and_a_rerun_works(tmp_path):
    final = tmp_path / "out"

    def broken(tmp):
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        build_once(final, broken)
    assert not final.exists() and [p.name for p in tmp_path.iterdir()] == [".out.lock"]
    assert build_once(final, lambda tmp: (tmp / "whole.txt").write_text("whole"))
    assert (final / "whole.txt").exists() and not (final / "half.txt").exists()


def test_a_users_files_are_never_removed(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "mine.txt").write_text("keep")
    with pytest.raises(OSError):
        build_once(final, lambda tmp: (tmp / "x").write_text("x"))
    assert (final / "mine.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_once(empty, lambda tmp: (tmp / "x").write_text("x")) and (empty / "x").exists()
