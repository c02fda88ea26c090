import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import torch

from alexnet import checkpoint
from alexnet.data.synthetic import CLASSES, make_image
from alexnet.models import create_model

# A folder of the session's own, made by the first process that loads this file (pytest-xdist's controller,
# whose workers inherit the variables) and removed when that one finishes. It holds the cache of the
# built-in dataset and of the packs that `alexnet train --data DIR` makes on first use (not the user's
# ~/.cache/alexnet), and the temporary folder (TMPDIR) of the processes the tests start, where a launcher that
# a test kills leaves its own. This process's temporary folder, and pytest's folders for the tests, stay where
# they were: mkdtemp has fixed it for this process before TMPDIR changes.
_SCRATCH = None
if "ALEXNET_TESTS_SCRATCH" not in os.environ:
    _SCRATCH = os.environ["ALEXNET_TESTS_SCRATCH"] = tempfile.mkdtemp(prefix="alexnet-tests-")
    os.environ["TMPDIR"] = os.path.join(_SCRATCH, "tmp")
    os.mkdir(os.environ["TMPDIR"])
    os.environ.setdefault("ALEXNET_CACHE", os.path.join(_SCRATCH, "cache"))


def pytest_unconfigure(config):
    if _SCRATCH is not None:
        shutil.rmtree(_SCRATCH, ignore_errors=True)


def write_folder(root: Path, classes=3, train_per_class=8, val_per_class=4, size=72, seed=0) -> Path:
    """A real JPEG ImageFolder of generated shapes: root/{train,val}/<class>/*.jpg."""
    for split, per in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            (root / split / CLASSES[c]).mkdir(parents=True, exist_ok=True)
        n = 0
        i = 0
        while n < per * classes:
            if i % len(CLASSES) < classes:
                img, label = make_image(seed, split, i, size)
                img.save(root / split / CLASSES[label] / f"{i:05d}.jpg", quality=95)
                n += 1
            i += 1
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("tiny"))


def run_cli(*args, timeout=300, cwd=None, env=None, check=True) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process; a hang fails the test through the timeout."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "alexnet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"alexnet {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def run_here(*args, check=True, env=None) -> subprocess.CompletedProcess:
    """The command line as run_cli runs it, with the same result, but in this process: a fresh interpreter
    spends seconds importing torch before it trains for less than one. For runs of one process whose
    loader reads in that process (--workers 0), where nothing is killed; runs that start processes, kill
    them or compile stay with run_cli. What a run sets for the whole process (the root logger, the thread
    count, deterministic algorithms, the random state, the environment) is put back afterwards. An
    uncaught exception fails the test, as a traceback would with run_cli."""
    import contextlib
    import io
    import logging
    from alexnet.cli import main
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    environ = dict(os.environ)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    flags = [str(a) for a in args]
    assert "--workers" not in flags or flags[len(flags) - 1 - flags[::-1].index("--workers") + 1] == "0", \
        "loader workers would be forked from the test runner: use run_cli"
    out, err = io.StringIO(), io.StringIO()
    for h in handlers:  # so that the run's logging.basicConfig writes to `out`, as in a process of its own
        root.removeHandler(h)
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
            h.close()
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
    proc = subprocess.CompletedProcess(["alexnet", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"alexnet {' '.join(map(str, args))} returned {code}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def cli(capsys, *args) -> tuple[int, str, str]:
    """The command line run in this process: quicker than a fresh interpreter for checks that end before
    any training. Returns the exit code (argparse's too), stdout and stderr; an uncaught exception fails."""
    from alexnet.cli import main
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse: --help, --version and usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Small and quick settings for real runs of `alexnet train` on the tiny folder.
TINY = ["--resize", "72", "--crop", "64", "--fc-width", "32", "--batch-size", "8", "--workers", "0",
        "--epochs", "1", "--quiet"]


# Equivalence settings: fp32, deterministic, no dropout, 24 training images = 3 steps of a global batch of 8.
EXACT = ["--resize", "72", "--crop", "64", "--fc-width", "32", "--workers", "0", "--epochs", "1", "--quiet",
         "--deterministic", "--dropout", "0", "--lr", "0.05"]


def final_weights(out) -> dict:
    return checkpoint.load_run(out / "checkpoints" / "last.pt")["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def batchnorm_variances(state: dict) -> list[torch.Tensor]:
    """The running variances of a --train-bn checkpoint's BatchNorms (`model_with_bn`), one per convolution."""
    return [v for k, v in state["model_with_bn"].items() if k.endswith(".bn.running_var")]


def shas(text: str) -> dict[int, str]:
    """rank -> SHA-256 of its final weights, from the log lines every rank writes."""
    return {int(r): h for h, r in re.findall(r"final weights sha256 ([0-9a-f]{64}) \(rank (\d+) of", text)}


_EXACT_ROOTS: list[Path] = []  # the `exact` fixture's folder, once made


@pytest.fixture(scope="session")
def exact(tmp_path_factory):
    """Shared inputs of the equivalence runs: the data, the initial weights w0."""
    root = tmp_path_factory.mktemp("exact")
    data = write_folder(root / "data")  # 3 classes x 8 = 24 training images
    torch.manual_seed(1)
    model = create_model("alexnet", 3, dropout=0.0, fc_width=32)
    torch.save(model.state_dict(), root / "w0.pt")
    _EXACT_ROOTS.append(root)
    return {"root": root, "data": data, "w0": model.state_dict()}


@pytest.fixture(scope="module", autouse=True)
def _remove_exact_runs(request):
    """The run folders a module's tests and fixtures made beside the `exact` inputs are removed when the
    module ends (step checkpoints of many runs add up to gigabytes over a session), unless one of its tests
    failed: they are kept for a look, as pytest keeps a failed test's tmp_path. The session fixtures that
    train there keep only weights in memory."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        return
    for root in _EXACT_ROOTS:
        for entry in root.iterdir():
            if entry.is_dir() and entry.name != "data":
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_file() and entry.name != "w0.pt":
                entry.unlink()


def train_run(exact, name, *flags, env=None):
    out = exact["root"] / name
    run = run_cli if env or "--nproc-per-node" in flags or "--compile" in flags else run_here
    p = run("train", "--data", exact["data"], "--weights", exact["root"] / "w0.pt", "--out", out, *EXACT,
            *flags, env=env)
    return final_weights(out), p


@pytest.fixture(scope="session")
def one_process(exact):
    return train_run(exact, "one", "--batch-size", "8")[0]


@pytest.fixture(scope="session")
def two_processes(exact):
    return train_run(exact, "two", "--batch-size", "4", "--nproc-per-node", "2", "--parallel", "ddp")


def tolerance(exact, w1) -> float:
    return 1e-4 * max_diff(w1, exact["w0"])


@pytest.fixture(scope="session")
def shipped(tmp_path_factory, tiny_data):
    """A 2-epoch run (with TensorBoard) whose model's top-1 differs between images, so that comparing the
    predictions of exported files with the checkpoint's is a real comparison. Its initial weights are
    random, with the last bias set so that each class wins on some validation images; the learning rate
    is tiny, so training keeps that."""
    from alexnet.config import IMAGENET_MEAN, IMAGENET_STD
    from alexnet.data import eval_transform, load_rgb
    root = tmp_path_factory.mktemp("shipped")
    torch.manual_seed(3)
    model = create_model("alexnet", 3, dropout=0.0, fc_width=32, init="fan-in").eval()
    transform = eval_transform("72", 64, IMAGENET_MEAN, IMAGENET_STD)
    images = torch.stack([transform(load_rgb(f)) for f in sorted((tiny_data / "val").rglob("*.jpg"))])
    with torch.no_grad():
        logits = model(images)
        model.classifier[6].bias -= logits.median(dim=0).values
    torch.save(model.state_dict(), root / "w0.pt")
    out = root / "run"
    p = run_here("train", "--data", tiny_data, "--out", out, *TINY, "--epochs", "2", "--weights", root / "w0.pt",
                 "--lr", "1e-7", "--momentum", "0", "--dropout", "0", "--tensorboard", "--log-every", "1")
    return out, p


# --------------------------------------------------------------- two hosts in network namespaces

def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    assert shutil.which("ip"), "iproute2 (the `ip` command) is needed for the two-host test: apt-get install iproute2"
    tag = f"{os.getpid() % 100000}"
    net = random.randint(1, 250)
    names = {"a": f"alxa{tag}", "b": f"alxb{tag}"}
    links = {"a": f"vxa{tag}", "b": f"vxb{tag}"}
    addrs = {"a": f"10.231.{net}.1", "b": f"10.231.{net}.2"}
    hostname = socket.gethostname()
    try:
        sh("ip", "link", "add", links["a"], "type", "veth", "peer", "name", links["b"])
        for h in ("a", "b"):
            sh("ip", "netns", "add", names[h])
            sh("ip", "link", "set", links[h], "netns", names[h])
            sh("ip", "-n", names[h], "addr", "add", f"{addrs[h]}/24", "dev", links[h])
            sh("ip", "-n", names[h], "link", "set", links[h], "up")
            sh("ip", "-n", names[h], "link", "set", "lo", "up")
            sh("ip", "-n", names[h], "route", "add", "default", "dev", links[h])  # as a real host has
            # `ip netns exec` mounts /etc/netns/<name>/hosts over /etc/hosts: the host name is loopback there.
            etc = Path("/etc/netns") / names[h]
            etc.mkdir(parents=True, exist_ok=True)
            # Host a also answers to the name "nodea", which is loopback on a and a's address on b.
            a_line = f"127.0.1.1 {hostname} nodea" if h == "a" else f"127.0.1.1 {hostname}\n{addrs['a']} nodea"
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{a_line}\n")
            # No name server is reachable from the namespaces: ask loopback, which refuses at once, instead
            # of the machine's, whose queries time out (seconds for each reverse lookup torch makes).
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        yield {"ns": names, "links": links, "addrs": addrs, "hostname": hostname}
    finally:
        for h in ("a", "b"):
            subprocess.run(["ip", "netns", "del", names[h]], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / names[h], ignore_errors=True)
        subprocess.run(["ip", "link", "del", links["a"]], capture_output=True)


def start(hosts, h: str, args: list, env: dict, private: Path | None = None) -> subprocess.Popen:
    """`alexnet train` on host h; `private`: a folder this host sees empty (its own disk, not shared)."""
    prefix = []
    if private is not None:
        prefix = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs "{private}" && exec "$0" "$@"']
    cmd = ["ip", "netns", "exec", hosts["ns"][h], *prefix, sys.executable, "-m", "alexnet", "train",
           *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def kill_host(hosts, h: str) -> None:
    """SIGKILL every process of host h, as a machine that dies (torchelastic starts its workers in sessions
    of their own, so killing the launcher's process group would leave them running)."""
    pids = subprocess.run(["ip", "netns", "pids", hosts["ns"][h]], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass


def set_link(hosts, h: str, up: bool) -> None:
    """Host h's veth link down or up; up also restores its default route (taking a link down deletes it)."""
    ns, dev = hosts["ns"][h], hosts["links"][h]
    sh("ip", "-n", ns, "link", "set", dev, "up" if up else "down")
    if up:
        subprocess.run(["ip", "-n", ns, "route", "replace", "default", "dev", dev], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a file system of its own whose size the test sets (tmpfs; needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = []

    def mount(size_bytes: int) -> Path:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)], check=True)
        mounted.append(folder)
        return folder
    yield mount
    for f in mounted:
        subprocess.run(["umount", str(f)], capture_output=True)
