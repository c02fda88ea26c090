"""Each node of a multi-node job reads its own copy of the data. Copies that differ (one image fewer), or a
node whose copy is missing, stop every node at once with one message; equal copies at other paths, with
other modification times, train. Two hosts in network namespaces (tests/conftest.py's `hosts`), each with a
cache folder of its own, so that each packs its image folder on first use (autopack) before the process
group is joined, as the nodes of a job without shared storage do."""

import os
import shutil
import time

import pytest

from conftest import EXACT, start, write_folder

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def copies(tmp_path, drop_one: bool):
    """Host a's and host b's copies of one folder, at different paths, b's files with other times."""
    a = write_folder(tmp_path / "node-a" / "data", classes=3, train_per_class=8, val_per_class=2)
    b = tmp_path / "node-b" / "elsewhere"
    shutil.copytree(a, b)
    for f in b.rglob("*.jpg"):
        os.utime(f, (1_000_000_000, 1_000_000_000))
    if drop_one:
        sorted((b / "train").rglob("*.jpg"))[0].unlink()
    return a, b


def run_two(hosts, tmp_path, data: dict, port: int, timeout: int = 60) -> dict:
    """Both hosts train from their own --data, with their own cache folder (tmp_path/cache-<host>);
    {host: (exit code, output, seconds from start to exit)}."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    procs = {h: start(hosts, h, ["--data", data[h], *EXACT, "--batch-size", "4", "--epochs", "1", "--nnodes", "2",
                                 "--nproc-per-node", "1", "--rdzv-endpoint", f"{hosts['addrs']['a']}:{port}",
                                 "--dist-timeout", timeout, "--out", out],
                      {"ALEXNET_CACHE": str(tmp_path / f"cache-{h}")}) for h in ("a", "b")}
    found = {}
    for h, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        found[h] = (p.returncode, stdout + stderr, time.monotonic() - t0)
    return found


def test_copies_that_differ_by_one_image_stop_both_nodes_at_once(hosts, tmp_path):
    a, b = copies(tmp_path, drop_one=True)
    found = run_two(hosts, tmp_path, {"a": a, "b": b}, 29540)
    for h, (code, text, seconds) in found.items():
        assert code != 0 and seconds < 30, (h, code, seconds, text[-3000:])
        assert "the ranks' copies of the data differ: rank 1 on " in text, text[-3000:]
        line = next(x for x in text.splitlines() if "copies of the data differ" in x)
        assert "23 training images where rank 0" in line or "24 training images where rank 0" in line, line
        assert str(a) in line and str(b) in line and "Traceback" not in text


def test_a_node_without_its_copy_stops_the_other_at_once(hosts, tmp_path):
    a, _ = copies(tmp_path, drop_one=False)
    missing = tmp_path / "node-b" / "not-copied"
    found = run_two(hosts, tmp_path, {"a": a, "b": missing}, 29545, timeout=120)
    for h, (code, text, seconds) in sorted(found.items(), reverse=True):
        # well before the 120 s that host a would otherwise wait (start-up included: slow on a loaded machine)
        assert code != 0 and seconds < 60, (h, code, seconds, text[-3000:])
        assert f"could not open its data: data folder {missing} does not exist" in text, text[-3000:]


def test_equal_copies_at_other_paths_with_other_times_train(hosts, tmp_path):
    a, b = copies(tmp_path, drop_one=False)
    found = run_two(hosts, tmp_path, {"a": a, "b": b}, 29550)
    for h, (code, text, _) in found.items():
        assert code == 0, (h, text[-3000:])
        # each node packed its own copy into its own cache folder, then trained from that pack
        made = [p.parent for p in (tmp_path / f"cache-{h}" / "packed").glob("*/packed.json")]
        assert len(made) == 1, (h, made)
        assert f"packing {a if h == 'a' else b} once" in text and "training from the pack of " in text, text[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert "pack: raw" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_node_that_reads_its_files_where_the_other_reads_a_pack_stops_both_with_the_fix(hosts, tmp_path):
    """Host b's cache folder cannot be written (a file stands at its path): --pack auto trains from its files
    there while host a packs; the ranks' agreement stops both and says to give every node the same --pack."""
    a, b = copies(tmp_path, drop_one=False)
    (tmp_path / "cache-b").write_text("a file where host b's cache folder would be")
    found = run_two(hosts, tmp_path, {"a": a, "b": b}, 29555)
    assert "WARNING: cannot pack" in found["b"][1] and "packing" not in found["b"][1].replace("cannot pack", "")
    for h, (code, text, seconds) in found.items():
        assert code != 0 and seconds < 30, (h, code, seconds, text[-3000:])
        line = next((x for x in text.splitlines() if "the ranks' data differ" in x), text[-3000:])
        assert "rank 1 on " in line and f"({b}) reads image files where rank 0 (" in line, line
        assert f"{a}) reads a raw pack. Give every node the same --data and the same --pack" in line, line
