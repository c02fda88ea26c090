"""`alexnet train|eval --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT]`: a thin wrapper of
torch.distributed.run (torchrun's elastic launch), which starts and watches the worker processes.

What it adds is the network set-up that torchrun leaves to the user: from the rendezvous address it works
out the interface and local address that route there (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME,
--local-addr) and whether this node hosts the rendezvous store (its own address is the endpoint), so
that a host name resolving to 127.0.0.1 cannot send peers to loopback. `--dist-timeout` bounds the join.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import distributed
from .errors import ConfigError
from .runtime import resolve_device

C10D_PORT = 29400
STATIC_PORT = 29500
# torch's c10d rendezvous: a node is taken for lost after KEEP_ALIVE_MISSES heartbeats of KEEP_ALIVE_S
# seconds are missed (torch's defaults, 5 s x 3, keep a node that died from rejoining for 15 s), and a
# rendezvous that has its minimum of nodes waits LAST_CALL_S more for others (torch's default: 30 s).
KEEP_ALIVE_S, KEEP_ALIVE_MISSES, LAST_CALL_S = 2, 3, 3
ELASTIC_RESTARTS = 3  # --max-restarts of an elastic job (--nnodes MIN:MAX) unless given


def node_range(text: str) -> tuple[int, int]:
    """--nnodes as torchrun takes it: "M" or "MIN:MAX"."""
    try:
        low, colon, high = text.partition(":")
        low, high = int(low), int(high) if colon else int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of nodes (M) or a range (MIN:MAX)") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: nodes must be at least 1, and MIN at most MAX")
    return low, high


def at_least(least: int):
    """An argparse type: a whole number of at least `least`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {least}")
        return value
    return parse


# name -> (metavar, type, help)
FLAGS = {
    "nproc_per_node": ("N", at_least(1), "start N worker processes on this node (one per GPU on CUDA machines)"),
    "nnodes": ("M|MIN:MAX", node_range, "number of nodes (machines) in the job (default 1); "
               "MIN:MAX: elastic, the job goes on with as few as MIN nodes when one is lost and takes it back "
               "when it returns (implies --max-restarts 3 unless given, and continues from the newest "
               "checkpoint in --out at every change)"),
    "rdzv_endpoint": ("HOST[:PORT]", str, f"rendezvous address: one node's address, the same on every node "
                                          f"(port default {C10D_PORT}); needed with --nnodes above 1"),
    "master_addr": ("HOST", str, "the same as --rdzv-endpoint HOST:--master-port, for torch.distributed.launch habits"),
    "master_port": ("PORT", int, f"with --master-addr (default {STATIC_PORT})"),
    "node_rank": ("R", int, "fix this node's rank (static rendezvous on --master-addr); optional"),
    "max_restarts": ("K", at_least(0), "restart the workers up to K times when one fails (default 0)"),
    "rdzv_id": ("ID", str, "job id, the same on every node, to tell jobs apart on one endpoint (default alexnet)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "launch on several processes or machines (wraps torch.distributed.run; not needed under torchrun)")
    for name, (metavar, kind, help_text) in FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), metavar=metavar, type=kind, default=None,
                           dest="launch_" + name, help=help_text)


def nodes(args: argparse.Namespace) -> tuple[int, int]:
    """(min, max) nodes of the job."""
    return args.launch_nnodes or (1, 1)


def elastic(args: argparse.Namespace) -> bool:
    low, high = nodes(args)
    return low < high


def world_size(args: argparse.Namespace) -> int:
    """Processes of the whole job (at its largest, for an elastic one)."""
    return (args.launch_nproc_per_node or 1) * nodes(args)[1]


def requested(args: argparse.Namespace) -> bool:
    return any(getattr(args, "launch_" + name, None) is not None for name in FLAGS)


def strip(argv: list[str]) -> list[str]:
    """`argv` without the launch flags and their values: what each worker runs."""
    return _without(argv, {"--" + n.replace("_", "-") for n in FLAGS} | {"--" + n for n in FLAGS})


def _without(argv: list[str], names: set[str]) -> list[str]:
    """`argv` without the flags `names` and their values (`--flag VALUE` or `--flag=VALUE`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif arg.split("=", 1)[0] in names and "=" in arg:
            continue
        else:
            out.append(arg)
    return out


def _endpoint(a: argparse.Namespace) -> tuple[str, int, bool]:
    """(host, port, static) of the rendezvous."""
    if a.launch_rdzv_endpoint and a.launch_master_addr:
        raise ConfigError("--rdzv-endpoint and --master-addr name the same thing; give one")
    if a.launch_node_rank is not None and not a.launch_master_addr:
        raise ConfigError("--node-rank goes with --master-addr HOST --master-port PORT (a static rendezvous)")
    if a.launch_master_addr:
        return a.launch_master_addr, a.launch_master_port or STATIC_PORT, a.launch_node_rank is not None
    if a.launch_master_port is not None:
        raise ConfigError("--master-port goes with --master-addr")
    if a.launch_rdzv_endpoint:
        text = a.launch_rdzv_endpoint
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
        try:
            return host.strip("[]"), int(port) if port else C10D_PORT, False
        except ValueError:
            raise ConfigError(f"--rdzv-endpoint: {text!r} is not HOST or HOST:PORT") from None
    return "127.0.0.1", 0, False  # one node: a store on a free local port


def check(a: argparse.Namespace, device: str = "auto", backend: str = "auto") -> None:
    """The launch flags, and the device and backend the workers will ask for, checked before any work (a
    first use's packing included), so that a mistake is said at once and not by every worker of every
    restart."""
    if distributed.launched():
        raise ConfigError("this process is already a worker of a distributed launch (torchrun sets RANK); "
                          "drop --nproc-per-node, --nnodes and the rendezvous flags")
    low, nnodes = nodes(a)
    if nnodes > 1 and not (a.launch_rdzv_endpoint or a.launch_master_addr):
        raise ConfigError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (or --master-addr HOST "
                          "--master-port PORT): the address of one of the nodes, the same on every node")
    _, _, static = _endpoint(a)
    if static and low < nnodes:
        raise ConfigError("--nnodes MIN:MAX (elastic) needs the c10d rendezvous: --rdzv-endpoint HOST:PORT, not "
                          "--master-addr with --node-rank")
    if static and not 0 <= a.launch_node_rank < nnodes:
        raise ConfigError(f"--node-rank {a.launch_node_rank} must be in [0, {nnodes - 1}] for --nnodes {nnodes}")
    if device.startswith("cuda"):  # only where CUDA is asked for: the launcher itself stays off the GPU
        resolve_device(device)
    if backend == "nccl" and (device == "cpu" or device == "auto" and not torch.cuda.is_available()):
        raise ConfigError(distributed.NCCL_NEEDS_CUDA)


def torchrun_args(a: argparse.Namespace, command: str, worker_argv: list[str], timeout: float, log) -> list[str]:
    """The torch.distributed.run command line for this node, after choosing the network settings (and making
    the rendezvous of older torch versions publish the chosen address: _advertise)."""
    check(a)
    nproc = a.launch_nproc_per_node or 1  # at least 1 when given (at_least, the flag's type)
    low, nnodes = nodes(a)
    host, port, static = _endpoint(a)
    try:
        net = distributed.configure_network(host, log, multi_node=nnodes > 1)
    except distributed.DistributedError as e:
        raise ConfigError(f"rendezvous {host}:{port}: {e}") from None
    os.environ["ALEXNET_NETWORK_SET"] = "1"  # the workers inherit the choice
    _advertise(net["address"])
    seconds = max(1, int(round(timeout)))
    args = ["--nnodes", f"{low}:{nnodes}" if low < nnodes else str(nnodes), "--nproc-per-node", str(nproc),
            "--max-restarts", "0", "--rdzv-id", a.launch_rdzv_id or "alexnet",
            "--monitor-interval", "1", "--local-addr", net["address"]]
    if _can_keep_ctrl_c():  # Ctrl-C is the launcher's own (CtrlC): torch's agent handles the other signals
        args += ["--signals-to-handle", "SIGTERM,SIGHUP,SIGQUIT"]
    if static:
        args += ["--rdzv-backend", "static", "--master-addr", host, "--master-port", str(port),
                 "--node-rank", str(a.launch_node_rank), "--rdzv-conf", f"timeout={seconds}"]
        hosting = a.launch_node_rank == 0
    else:
        hosting = net["is_host"]
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host}:{port}",
                 "--rdzv-conf", f"is_host={str(hosting).lower()},join_timeout={seconds},read_timeout={seconds},"
                                f"close_timeout={seconds},keep_alive_interval={KEEP_ALIVE_S},"
                                f"keep_alive_max_attempt={KEEP_ALIVE_MISSES},last_call_timeout={LAST_CALL_S}"]
        # Each round's workers get a store of their own (rank 0's worker hosts it) instead of sharing the
        # agent's: with the shared one, an agent that holds rank 0 across a round does not publish the
        # workers' address again, and a node that comes back waits for it until the read timeout.
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if hosting and port and distributed.port_in_use(port):
        flag = "--master-port PORT" if a.launch_master_addr else "--rdzv-endpoint HOST:PORT"
        raise ConfigError(f"port {port} of this node ({host}), where the rendezvous would be hosted, is in use by "
                          f"another process (another job's rendezvous?): give another port with {flag}, the same on "
                          f"every node")
    if log:
        log(f"launch: {f'{low} to {nnodes}' if low < nnodes else nnodes} node(s) x {nproc} process(es); rendezvous "
            f"{'static' if static else 'c10d'} at {f'{host}:{port}' if port else f'{host}, on a free port'}, "
            f"{'hosted by this node' if hosting else 'hosted by another node'}; this node advertises "
            f"{net['address']}; join timeout {seconds} s")
    return args + ["-m", "alexnet", command, *worker_argv]


def _store_info_builder(address: str):
    """torch's RendezvousStoreInfo.build as later versions have it with --local-addr: node rank 0 publishes
    `address` and a free port of its own as MASTER_ADDR and MASTER_PORT, and every node reads them back."""
    from torch.distributed.elastic.rendezvous.api import RendezvousStoreInfo
    from torch.distributed.elastic.utils.distributed import get_free_port

    def build(rank: int, store) -> RendezvousStoreInfo:
        if rank == 0:
            store.set(RendezvousStoreInfo.MASTER_ADDR_KEY, address.encode())
            store.set(RendezvousStoreInfo.MASTER_PORT_KEY, str(get_free_port()).encode())
        return RendezvousStoreInfo(master_addr=store.get(RendezvousStoreInfo.MASTER_ADDR_KEY).decode(),
                                   master_port=int(store.get(RendezvousStoreInfo.MASTER_PORT_KEY).decode()))
    return build


def _advertise(address: str) -> None:
    """Make the c10d rendezvous tell the workers to reach rank 0 at `address` on torch versions that ignore
    --local-addr for it.

    Up to torch 2.4 at least, the agent of node rank 0 publishes its host name (socket.getfqdn()) as the
    workers' MASTER_ADDR. Where that name resolves to loopback, or to an address the other nodes have no
    route to, their workers wait on it until the timeout (pytorch/examples #812). Later versions publish
    --local-addr, the address chosen here from the route to the rendezvous; this gives the older ones the
    same behaviour."""
    from torch.distributed.elastic.rendezvous import api
    info = getattr(api, "RendezvousStoreInfo", None)
    if info is None or "local_addr" in inspect.signature(info.build).parameters:
        return
    info.build = staticmethod(_store_info_builder(address))


class _SaidByUs(logging.Filter):
    """Leaves out torch's agent's lines about stopping and failed workers, which the launcher says itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith(("Sending process", "Closing process")) or "failed (exitcode" in text)


def run(a: argparse.Namespace, command: str, argv: list[str], timeout: float, log=print) -> int:
    """Launch the workers for this node and wait for them. Returns the exit status for the command line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    args = torchrun_args(a, command, strip(argv), timeout, log)
    host, port, _ = _endpoint(a)
    if (a.launch_nproc_per_node or 1) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun picks too, without its banner
    scratch = tempfile.mkdtemp(prefix="alexnet-launch-")  # this launch's own, removed when it ends
    notes = os.path.join(scratch, "notes")  # where a worker that lost a node says which
    os.mkdir(notes)
    os.environ["ALEXNET_LAUNCH_NOTES"] = notes
    # torch's agent makes a folder for its workers' error files in each run; by default a new one in /tmp,
    # which it never removes
    args = ["--log-dir", os.path.join(scratch, "torchelastic"), *args]
    ctrl_c = CtrlC(command, agent_takes_it="--signals-to-handle" not in args)
    # torch's agent logs each worker it stops ("Sending process N closing signal SIGTERM") and each failure
    # ("failed (exitcode: 1) local_rank: 0 ..."), in its own format among our lines: the launcher says the
    # outcome itself, once, rank by rank (_run_once). Its other lines (a worker that had to be killed) stay.
    agent = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    if not any(isinstance(f, _SaidByUs) for f in agent.filters):
        agent.addFilter(_SaidByUs())
    os.environ["ALEXNET_SIGINT"] = "launcher"  # for the workers: they leave Ctrl-C to the launcher
    try:
        return _run(a, command, args, timeout, host, port, log, notes)
    except _Failed as failed:
        lost = _lost_node_message(notes, command, argv, host, port)
        print(f"alexnet {command}: error: {lost or failed.message}", file=sys.stderr)
        return failed.code
    except _Stopped as stopped:
        return stopped.code
    except SignalException as e:  # Ctrl-C between two runs of torch's agent (a restart, a retried rendezvous)
        print(f"alexnet {command}: stopped by {'Ctrl-C' if str(e) == 'Ctrl-C' else signal.Signals(e.sigval).name}",
              file=sys.stderr)
        return 128 + (signal.SIGINT if str(e) == "Ctrl-C" else int(e.sigval))
    finally:
        ctrl_c.restore()
        os.environ.pop("ALEXNET_SIGINT", None)
        shutil.rmtree(scratch, ignore_errors=True)


def _can_keep_ctrl_c() -> bool:
    """Whether torch's agent can be told to leave SIGINT alone (torchrun's --signals-to-handle, torch 2.9 on);
    before, it takes SIGINT as it takes SIGTERM and passes it on to the workers (CtrlC takes it back)."""
    from torch.distributed import run as torchrun
    return any(action.dest == "signals_to_handle" for action in torchrun.get_args_parser()._actions)


class CtrlC:
    """The launcher's SIGINT: the first stops the workers as a scheduler does (torch's agent sends them
    SIGTERM: they stop at their next step, rank 0 saves, and the agent waits for them); a second stops them
    at once (SIGKILL: checkpoints are written to a temporary file and renamed, so none is left half written).
    The workers ignore SIGINT meanwhile (ALEXNET_SIGINT), so that a Ctrl-C that reaches them too (they share
    the terminal's process group on some torch versions) is not taken for a second request.

    Before torch 2.9 (`agent_takes_it`) the agent cannot be told to leave SIGINT alone: it installs its own
    handler each time it starts the workers, so this one is put back right after."""

    def __init__(self, command: str, agent_takes_it: bool = False) -> None:
        self.command, self.pressed = command, 0
        self._previous = signal.signal(signal.SIGINT, self._handle)
        self._start = None
        if agent_takes_it:
            from torch.distributed.elastic.multiprocessing.api import PContext
            self._start = original = PContext.start

            def start(context) -> None:
                original(context)
                signal.signal(signal.SIGINT, self._handle)
            PContext.start = start

    def _handle(self, signum, frame) -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        self.pressed += 1
        if self.pressed == 1:
            saving = " and save a checkpoint" if self.command == "train" else ""
            print(f"alexnet {self.command}: Ctrl-C: the workers stop at their next step{saving}; Ctrl-C again "
                  f"stops them at once", file=sys.stderr, flush=True)
            raise SignalException("Ctrl-C", sigval=signal.SIGTERM)  # what torch's agent does on a SIGTERM
        for pid in _children():
            _kill_group(pid)
        print(f"alexnet {self.command}: stopped at once by a second Ctrl-C", file=sys.stderr, flush=True)
        raise _Stopped(128 + signal.SIGINT)

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)
        if self._start is not None:
            from torch.distributed.elastic.multiprocessing.api import PContext
            PContext.start = self._start


class _Stopped(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _children() -> list[int]:
    """The processes this one started (the workers), from /proc."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # the field after the state: the parent's pid
                found.append(int(entry))
    return found


def _kill_group(pid: int) -> None:
    """SIGKILL to a worker and, where it leads a process group of its own (torch starts each in a new
    session), to its loader workers with it."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class _Failed(Exception):
    def __init__(self, message: str, code: int, restartable: bool = False) -> None:
        self.message, self.code, self.restartable = message, code, restartable


def _run(a: argparse.Namespace, command: str, args: list[str], timeout: float, host: str, port: int, log,
         notes: str) -> int:
    """torchrun's run of the workers, started again on a failure while --max-restarts allows: 0, or _Failed
    with the message and exit code of the failure.

    A restart starts torch's elastic agent anew, not only its workers (the agent itself is told to make
    none): a new agent opens new connections to the rendezvous. The agent of a node whose link was down
    for longer than --dist-timeout otherwise keeps waiting on its old connection, which TCP retries ever
    more rarely, while its peers' join timeout runs out. Its workers continue from the newest checkpoint
    (ALEXNET_RESTARTED). After such a restart, an agent that cannot reach the rendezvous (its host is
    restarting, or the link is still down) tries again every few seconds until `timeout` seconds have
    passed since the failure (an agent whose workers had joined the process group, as the notes in
    `notes` show, may find the rendezvous gone before its workers fail: that counts as a failure too)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousConnectionError

    restarts, restarted_at, first = a.launch_max_restarts or 0, None, args
    since = 0.0  # the wall-clock time of the last restart: workers that joined after it ran the job again
    if elastic(a):  # every change of size restarts the workers, which continue from the newest checkpoint
        restarts = ELASTIC_RESTARTS if a.launch_max_restarts is None else restarts
        os.environ["ALEXNET_RESTARTED"] = "1"
    _connect_within_its_timeout()
    while True:
        try:
            return _run_once(a, command, torchrun.get_args_parser().parse_args(args), timeout, host, port)
        except _Failed as failed:
            if not failed.restartable or restarts == 0:
                raise
            # the full join timeout again (for the nodes that must start again), the connection to the
            # rendezvous (whose node may be gone) within a third of it (_joining_within)
            restarts, restarted_at, since = restarts - 1, time.monotonic(), time.time()
            args = _joining_within(first, max(1, int(timeout)))
            if log:
                log(f"launch: {failed.message.rsplit('; ', 1)[0]}; starting this node's workers again, from the newest "
                    f"checkpoint ({restarts} restart(s) left)")
        except (RendezvousConnectionError, RendezvousClosedError):  # closed: a failed agent closes it on its way out
            if restarts > 0 and _joined_after(notes, since):  # the job had been running again: a failure of its own
                restarts, restarted_at, since = restarts - 1, time.monotonic(), time.time()
            left = timeout - (time.monotonic() - restarted_at) if restarted_at is not None else 0
            if left <= 0:
                raise _Failed(_unreachable(host, port, timeout, "RendezvousConnectionError"), 1) from None
            if log:
                log(f"launch: the rendezvous at {host}:{port} cannot be reached; trying again for up to "
                    f"{left:.0f} s more")
            time.sleep(2)
            args = _joining_within(args, max(1, int(left) - 2))  # each try ends by the deadline too
        os.environ["ALEXNET_RESTARTED"] = "1"


def _joined_after(notes: str, since: float) -> bool:
    """Whether a worker of this node joined its process group after the wall-clock time `since`."""
    for path in Path(notes).glob("joined-rank-*.json"):
        try:
            if json.loads(path.read_text())["joined"] > since:
                return True
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return False


def _joining_within(args: list[str], seconds: int) -> list[str]:
    """torchrun's `args` for a try that ends within `seconds`: the rendezvous's join timeout set to that, and
    the connection to its store to a third of it (connect_timeout, _connect_within_its_timeout). torch
    tries a connection that timed out once more, after a pause that grows with the time spent, each try for
    the whole timeout: up to about three times that in all (53 s for 17 s)."""
    args = [re.sub(r"\bjoin_timeout=\d+", f"join_timeout={seconds}", arg) for arg in args]
    args = [re.sub(r",connect_timeout=\d+", "", arg) for arg in args]
    return [re.sub(r"\b(read_timeout=\d+)", rf"\1,connect_timeout={max(1, seconds // 3)}", arg) for arg in args]


def _connect_within_its_timeout() -> None:
    """Make torch's c10d rendezvous connect to its store within the rendezvous setting connect_timeout,
    where given, and keep read_timeout for what the agent reads from it afterwards (torch uses read_timeout
    for both): a restarted agent gives up on a rendezvous whose node is gone soon enough to try again within
    --dist-timeout, and waits as long as before on a live one."""
    from datetime import timedelta
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as backend
    create = getattr(backend, "_create_tcp_store", None)
    if create is None or getattr(create, "connects_within", False):
        return

    def create_store(params):
        connect = params.get_as_int("connect_timeout")
        if connect is None:
            return create(params)
        given = params.config.get("read_timeout")
        params.config["read_timeout"] = connect
        try:
            store = create(params)
        finally:
            params.config.pop("read_timeout")
            if given is not None:
                params.config["read_timeout"] = given
        store.set_timeout(timedelta(seconds=params.get_as_int("read_timeout", 60)))
        return store

    create_store.connects_within = True
    backend._create_tcp_store = create_store


def _unreachable(host: str, port: int, timeout: float, what: str) -> str:
    return (f"could not reach the rendezvous at {host}:{port} within {timeout:g} s ({what}). Is the node that "
            f"owns {host} started, is the address right, and is port {port} open in its firewall?")


def _run_once(a: argparse.Namespace, command: str, parsed, timeout: float, host: str, port: int) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousConnectionError, RendezvousError

    try:
        torchrun.run(parsed)
    except (RendezvousConnectionError, RendezvousClosedError):
        raise
    except ChildFailedError as e:
        parts = []  # a rank killed by a signal first: those that exited then had lost contact with it
        for r, f in sorted(e.failures.items(), key=lambda rf: (rf[1].exitcode >= 0, rf[0])):
            code = f.exitcode
            parts.append(f"rank {r} failed (exit code {code})" if code > 0 else
                         f"rank {r} was stopped (signal {-code})" if code < 0 else f"rank {r} ended")
        codes = [f.exitcode for f in e.failures.values() if f.exitcode > 0]
        # exit 2 is a mistake in the command or its files (errors.py): starting again would repeat it
        raise _Failed(f"{'; '.join(parts)}; the workers' messages are above", max(codes) if codes else 1,
                      restartable=2 not in codes) from None
    except SignalException as e:  # the launcher was signalled: torch's agent has passed it on to the workers
        name = signal.Signals(e.sigval).name
        saved = (" (a training run stops at its next step and saves a checkpoint, and says so above; continue "
                 "with --resume auto)" if command == "train" and e.sigval in (signal.SIGTERM, signal.SIGHUP) else "")
        if str(e) == "Ctrl-C":  # CtrlC: the workers were sent SIGTERM
            print(f"alexnet {command}: stopped by Ctrl-C (SIGINT); the workers were sent SIGTERM{saved}",
                  file=sys.stderr)
            return 128 + signal.SIGINT
        print(f"alexnet {command}: stopped by {name}; the workers were sent it too{saved}", file=sys.stderr)
        # the shell's code for a signalled process: torch's agent stops workers that do not end within its
        # grace period, so the launcher cannot promise that every one of them saved
        return 128 + int(e.sigval)
    except (RendezvousError, RuntimeError, TimeoutError) as e:  # the static rendezvous's store raises plain errors
        from torch.distributed.elastic.rendezvous import RendezvousTimeoutError
        if isinstance(e, RendezvousTimeoutError) or "waiting for clients" in str(e).lower():
            why = (f"not all {nodes(a)[0]} nodes joined the rendezvous at {host}:{port} within "
                   f"{timeout:g} s. Start the same command on every node (same --nnodes, --rdzv-endpoint "
                   f"and --rdzv-id), or allow longer with --dist-timeout")
        else:
            why = _unreachable(host, port, timeout, type(e).__name__)
        raise _Failed(why, 1) from None
    return 0


def _lost_node_message(notes: str, command: str, argv: list[str], host: str, port: int) -> str | None:
    """What a worker of this node said of a node it lost (distributed.note_for_launcher), as the last
    line: which node, when it was last heard from, the newest checkpoint here and the command that
    continues the job; None when no worker lost one."""
    said = []
    for path in sorted(Path(notes).glob("lost-rank-*.json")):
        try:
            said.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not said:
        return None
    note, lost = said[0], said[0]["lost"]
    who = f"lost node {lost['node']} (host {lost['host']}, {lost['addr']}), last heard from at {lost['seen']}"
    again = continue_command(command, argv, note["out"])
    where = (f"the newest checkpoint on this node is {note['checkpoint']}" if note["checkpoint"] else
             f"this node holds no checkpoint in {note['out']} (a node that holds one sends it at the resume)")
    try:
        endpoint_lost = distributed.resolve(host) == lost["addr"]
    except distributed.DistributedError:
        endpoint_lost = False
    if endpoint_lost:
        return (f"{who}; it held the rendezvous endpoint {host}:{port}, without which the job cannot go on. "
                f"{where[0].upper()}{where[1:]}. Once that machine is back, run this on every node; or name a "
                f"surviving node's address with --rdzv-endpoint instead: {again}")
    return (f"{who}: it stopped or the link to it failed; {where}. Continue the job by running this on every "
            f"node (on the lost one once it is back): {again}")


def continue_command(command: str, argv: list[str], out: str) -> str:
    """`argv` (the command line after `alexnet COMMAND`) as the command that resumes the run in `out`."""
    return shlex.join(["alexnet", command, *_without(argv, {"--resume", "--out"}), "--out", out, "--resume", "auto"])
