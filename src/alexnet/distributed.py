"""The one home of process groups and collectives.

Workers are started by torchrun or by `alexnet ... --nproc-per-node N` (which wraps torch.distributed.run);
both set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Without them, this is rank 0 of a
world of 1 and every helper here answers accordingly, so the training loop has one code path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import socket
import struct
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import DistributedError

_device = torch.device("cpu")  # where collective tensors live (CUDA for NCCL)
NCCL_NEEDS_CUDA = "--backend nccl needs CUDA devices; use --backend gloo (or auto) on CPU"


# ----------------------------------------------------------------------------------------------- ranks

def launched() -> bool:
    """Whether this process was started by an elastic launcher as one worker of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world_size() > 1


def nodes() -> tuple[int, int]:
    """(nodes, processes per node) of the launched group: torchrun's LOCAL_WORLD_SIZE processes on each node."""
    world = world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if active() else 1
    return (world // per_node, per_node) if per_node and world % per_node == 0 else (1, world)


# -------------------------------------------------------------------------------------------- network

def interface_addresses() -> dict[str, str]:
    """IPv4 address of each network interface of this host (Linux), by interface name."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:  # no IPv4 address on this interface
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def resolve(host: str) -> str:
    """The IPv4 address of `host`, or DistributedError naming it."""
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError) as e:
        raise DistributedError(f"cannot resolve host {host!r}: {e}") from None


def _local_address_towards(ip: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((ip, 9))  # a UDP connect sends nothing; it only asks the kernel for the route
        return s.getsockname()[0]


def route(host: str, multi_node: bool = False) -> dict:
    """Which interface and local address this host uses to reach `host`, and whether `host` is this host.

    The interface is chosen from the route to the rendezvous address, never from this host's name, which
    often resolves to loopback (127.0.1.1 in /etc/hosts): the classic multi-node trap. When `host` is a
    name that resolves to loopback in a multi-node job, it is this machine's own name, and the interface
    of the default route is used instead, since the other nodes reach this one from outside."""
    ip = resolve(host)
    loopback = ipaddress.ip_address(ip).is_loopback
    # A literal loopback endpoint (127.0.0.1, localhost) means all nodes on this machine: keep loopback.
    own_name = multi_node and loopback and host != "localhost" and not _is_ip(host)
    if own_name:
        try:
            local = _local_address_towards("198.51.100.1")  # any outside address: the default route
        except OSError:
            raise DistributedError(f"{host} resolves to {ip} (loopback) here and there is no default route to "
                                   "guess the network from; give the endpoint as this node's IP address") from None
    else:
        try:
            local = _local_address_towards(ip)
        except OSError as e:
            raise DistributedError(f"no network route to {host} ({ip}): {e.strerror or e}") from None
    addresses = interface_addresses()
    names = [name for name, addr in addresses.items() if addr == local]
    if not names and ipaddress.ip_address(local).is_loopback:
        names = [name for name, addr in addresses.items() if ipaddress.ip_address(addr).is_loopback] or ["lo"]
    is_host = loopback or ip in addresses.values()
    return {"host": host, "ip": ip, "interface": names[0] if names else None, "address": local, "is_host": is_host,
            "own_name_is_loopback": own_name}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def port_in_use(port: int) -> bool:
    """Whether another process listens on TCP `port` of this machine, where the rendezvous store would (on
    every address, as torch's store does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free to reuse
        try:
            s.bind(("", port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def configure_network(host: str, log=None, multi_node: bool = False) -> dict:
    """Pin gloo and NCCL to the interface that routes to `host`, unless the user set them."""
    net = route(host, multi_node)
    chosen = []
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if var in os.environ:
            chosen.append(f"{var}={os.environ[var]} (set by you)")
        elif net["interface"]:
            os.environ[var] = net["interface"]
            chosen.append(f"{var}={net['interface']}")
    net["settings"] = chosen
    if log:
        if net["own_name_is_loopback"]:
            log(f"network: {host} resolves to {net['ip']} (loopback) on this node, so it is this node; the other "
                f"nodes are reached through interface {net['interface']} from {net['address']} (the default "
                f"route); {', '.join(chosen)}")
        else:
            log(f"network: {host} ({net['ip']}) is reached through interface {net['interface']} from "
                f"{net['address']}; {', '.join(chosen)}")
    return net


# ----------------------------------------------------------------------------------------------- setup

def setup(device: torch.device, backend: str = "auto", timeout_s: float = 300, log=None) -> torch.device:
    """Join the process group when launched as a worker; return the device this process uses.

    One process per GPU: a CUDA device becomes cuda:LOCAL_RANK. The backend is NCCL for CUDA and gloo
    for CPU unless `backend` says otherwise. `timeout_s` bounds the store connection and every
    collective, so a lost peer gives an error instead of a hang."""
    global _device
    if not launched():
        return device
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank()} has no GPU: this machine has "
                                   f"{torch.cuda.device_count()}; start at most that many processes per node")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistributedError(NCCL_NEEDS_CUDA)
    master = os.environ.get("MASTER_ADDR")
    if master and os.environ.get("ALEXNET_NETWORK_SET") != "1":  # under torchrun; our launcher did it already
        several_nodes = int(os.environ["WORLD_SIZE"]) > int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        configure_network(master, log if int(os.environ["RANK"]) == 0 else None, multi_node=several_nodes)
    _bind_defaults_before_the_group()
    try:
        store = _attempt_store(timeout_s)
        if store is None:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, TimeoutError) as e:
        where = f"{master}:{os.environ.get('MASTER_PORT')}" if master else "the master"
        raise DistributedError(f"could not join the process group at {where} within {timeout_s:g} s "
                               f"({backend}): {str(e).splitlines()[0]}") from None
    _device = device if backend == "nccl" else torch.device("cpu")
    _meet_peers()
    if log and is_main():
        log(f"process group: {world_size()} processes, backend {backend}, rank 0 on "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, timeout {timeout_s:g} s")
    return device


def _bind_defaults_before_the_group() -> None:
    """Import torch.distributed.nn.functional before the process group exists.

    That module binds `group.WORLD` as a default argument of its functions when it is first imported
    (torchvision and torch.compile import it). Imported after init_process_group, it keeps the group, and
    gloo's threads, alive past destroy_process_group; one of those threads can then release a finished
    collective's tensor while the interpreter exits, which aborts the process ("terminate called without
    an active exception") after its work is done. Imported first, those defaults hold None."""
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except ImportError:  # a build without it: nothing binds the group
        pass


def _attempt_store(timeout_s: float):
    """Under an elastic launch whose workers share the agent's store (torchrun's default), that store with
    a prefix of its own for each restart; None (torch's own set-up from MASTER_ADDR) otherwise.

    The elastic agent keeps one store across worker restarts; without a prefix, a restarted worker can
    read the address a dead worker of the previous attempt published there and wait on it until the
    timeout (seen with gloo after a SIGKILLed worker). The prefix counts the agent's restarts, which only
    works while one agent counts them all: `alexnet ... --nnodes` therefore gives the workers a store of
    their own for each round (launch.py), new every time, which needs no prefix."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if attempt is None or "MASTER_ADDR" not in os.environ or not agent_hosts:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    return dist.PrefixStore(f"alexnet/attempt-{attempt}/", store)


# ------------------------------------------------------------------------------------------ lost peers

_peers: list[dict] = []  # by rank: {"node", "host", "addr"}
_last_seen: list[float] = []  # when the last collective of all ranks completed (time.time())


def _meet_peers() -> None:
    """Every rank's node, host name and address, to name a node when a collective with it fails."""
    iface = os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME")
    addr = interface_addresses().get(iface) if iface else None
    if addr is None and os.environ.get("MASTER_ADDR"):
        try:
            addr = route(os.environ["MASTER_ADDR"])["address"]
        except DistributedError:
            pass
    me = {"node": int(os.environ.get("GROUP_RANK", "0")), "host": socket.gethostname(), "addr": addr}
    _peers[:] = all_gather_objects(me)
    _last_seen[:] = [time.time()]
    note_for_launcher({"joined": _last_seen[0]}, "joined")


def is_collective_failure(e: BaseException) -> bool:
    """gloo and NCCL report a dead peer or a timeout as a RuntimeError (DistBackendError)."""
    backend_error = getattr(dist, "DistBackendError", ())
    text = str(e).lower()
    return isinstance(e, RuntimeError) and (isinstance(e, backend_error) or any(
        s in text for s in ("connection closed by peer", "timed out", "connection reset", "connection refused")))


def failure_text(e: BaseException) -> str:
    """The first line of a failed collective's error, without the advice torch appends to it."""
    line = str(e).splitlines()[0] if str(e) else type(e).__name__
    return line.split(" This is typically caused")[0].rstrip(". ")


def lost_node(e: BaseException) -> dict | None:
    """The other node a failed collective `e` lost: the one whose address the error names, or the only
    other node of the job. {"node", "host", "addr", "ranks", "seen"} (seen: when the last collective of
    all ranks completed, as HH:MM:SS); None when it cannot be told (or `e` is not a failed collective)."""
    if not _peers or not is_collective_failure(e):
        return None
    mine = _peers[rank()]["node"]
    others = {p["node"]: p for p in _peers if p["node"] != mine}
    named = set(re.findall(r"\b(\d{1,3}(?:\.\d{1,3}){3})\b", str(e)))
    found = [n for n, p in others.items() if p["addr"] in named]
    if len(found) != 1:
        found = list(others) if len(others) == 1 else []
    if not found:
        return None
    node = found[0]
    return {**others[node], "ranks": [r for r, p in enumerate(_peers) if p["node"] == node],
            "seen": time.strftime("%H:%M:%S", time.localtime(_last_seen[0])) if _last_seen else "never"}


def note_for_launcher(note: dict, kind: str = "lost") -> None:
    """Leave `note` where the launcher of this node reads it after its workers end (launch.py): "joined"
    (this rank's process group formed) or "lost" (distributed.lost_node)."""
    folder = os.environ.get("ALEXNET_LAUNCH_NOTES")
    if folder:
        with contextlib.suppress(OSError):
            with open(os.path.join(folder, f"{kind}-rank-{rank()}.json"), "w") as f:
                json.dump(note, f)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        if torch.__version__ < "2.8":
            # Before torch 2.8 (pytorch/pytorch#154976) the process group's destructor joins gloo's threads
            # while it holds the GIL. A thread still releasing a finished collective whose tensor Python
            # has dropped needs the GIL for that, so the two wait on each other for ever (seen on torch
            # 2.4.1 as a rank that printed its result and never exited, in most 3-process evals). The
            # pause hands the GIL to such a thread first.
            time.sleep(0.1)
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ collectives

def sum_all(values: list[float]) -> list[float]:
    """Element-wise sum over all processes (float64, so counts stay exact)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    out = t.tolist()  # on a CPU device, after the wait: every rank has been heard from
    _last_seen[:] = [time.time()]
    return out


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any process: a decision every rank takes alike at the same step."""
    return sum_all([float(flag)])[0] > 0 if active() else flag


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device)
    return box[0]


def all_gather_objects(obj) -> list:
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def average_buffers(model: nn.Module) -> None:
    """Replace each floating-point buffer of `model` (BatchNorm's running statistics) by its mean over all
    processes. DDP only broadcasts rank 0's before each forward, so each rank's last update stays its own."""
    if not active():
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer /= world_size()


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's state (names and bytes), to show that all ranks hold the same weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ exchanges of activations (hybrid)

def all_sizes(n: int) -> list[int]:
    """Every process's `n` (its batch size, say), in rank order."""
    if not active():
        return [n]
    mine = torch.tensor([n], dtype=torch.int64, device=_device)
    out = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return [int(t) for t in out]


def gather_rows(x: torch.Tensor, sizes: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every process's rows of `x` (sizes[r] rows on rank r), concatenated in rank order, on every process.
    An all-to-all: each process sends its rows once to each peer (uneven sizes allowed, which gloo's
    all-gather refuses); sent as `dtype` when given (bf16 halves the bytes)."""
    if not active():
        return x
    send = (x.to(dtype) if dtype is not None else x).contiguous()
    world = world_size()
    out = send.new_empty((sum(sizes), *x.shape[1:]))
    dist.all_to_all_single(out, torch.cat([send] * world), output_split_sizes=list(sizes),
                           input_split_sizes=[x.shape[0]] * world)
    return out.to(x.dtype)


def scatter_sum_rows(x: torch.Tensor, sizes: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The sum over processes of `x` (sum(sizes) rows on every process), each process keeping its own
    rows (sizes[rank] of them, from offset sum(sizes[:rank])): a reduce-scatter as an all-to-all, which
    on gloo sends half the bytes of its reduce_scatter. Summed in fp32 or better."""
    if not active():
        return x
    send = (x.to(dtype) if dtype is not None else x).contiguous()
    world, mine = world_size(), sizes[rank()]
    out = send.new_empty((world * mine, *x.shape[1:]))
    dist.all_to_all_single(out, send, output_split_sizes=[mine] * world, input_split_sizes=list(sizes))
    total = out.view(world, mine, *x.shape[1:])
    return total.to(torch.promote_types(x.dtype, torch.float32)).sum(0).to(x.dtype)


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s `t` on every process (in place)."""
    if active():
        dist.broadcast(t, src=src)
    return t


def average_parameters(model: nn.Module) -> None:
    """Replace each parameter of `model` by its mean over all processes."""
    if not active():
        return
    with torch.no_grad():
        for p in model.parameters():
            dist.all_reduce(p.data, op=dist.ReduceOp.SUM)
            p.data /= world_size()


# ------------------------------------------------------------------------------------------- wrapping

def _local_gradients_hook(state, bucket):
    """For tests only: keep each process's own gradients (no all-reduce), to show that sync matters."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def wrap(model: nn.Module, device: torch.device, *, comm_hook: str = "none", bucket_cap_mb: float = 25,
         gradient_as_bucket_view: bool = False, static_graph: bool = False, powersgd_rank: int = 2,
         powersgd_start_step: int = 1000, log=None) -> nn.Module:
    """DistributedDataParallel around `model` when there is more than one process (on CPU too), with the
    chosen gradient compression hook. Returns `model` itself in a world of one."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    backend = dist.get_backend()
    if comm_hook == "powersgd" and backend == "gloo":
        # With gloo, PowerSGD aborts ("Received data size doesn't match expected size") when DDP splits
        # the gradients into several buckets; one bucket holding every gradient works.
        size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        if bucket_cap_mb <= size_mb:
            if log:
                log(f"PowerSGD on gloo needs a single gradient bucket: bucket_cap_mb {bucket_cap_mb:g} -> "
                    f"{int(size_mb) + 1}")
            bucket_cap_mb = int(size_mb) + 1
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=gradient_as_bucket_view,
              static_graph=static_graph)
    if os.environ.get("ALEXNET_UNSYNCED_GRADIENTS") == "1":
        if log:
            log("WARNING: ALEXNET_UNSYNCED_GRADIENTS=1: gradients are NOT synchronised between processes")
        ddp.register_comm_hook(None, _local_gradients_hook)
    elif comm_hook == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif comm_hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif comm_hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                            start_powerSGD_iter=powersgd_start_step)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return ddp


def average_gradients_within_nodes(ddp: nn.Module, start_step: int):
    """torch's post-local-SGD hook on `ddp`: the gradients all-reduced over all processes for the first
    `start_step` steps, then within each node only (one subgroup of LOCAL_WORLD_SIZE consecutive ranks a
    node, as torchrun numbers them). Returns the hook's state, whose `iter` counts the steps taken."""
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
    subgroup, _ = dist.new_subgroups(group_size=nodes()[1])
    state = PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=start_step)
    ddp.register_comm_hook(state, post_localSGD_hook)
    return state


def forward_sync_as_after(ddp: nn.Module, synced: bool) -> None:
    """A DDP wrapper made at a resume, set as after a step whose gradients were (`synced`) or were not
    exchanged: DDP broadcasts rank 0's buffers (BatchNorm's statistics) before a forward only when the
    previous one was synchronised, and a new wrapper would broadcast at once."""
    if hasattr(ddp, "require_forward_param_sync"):
        ddp.require_forward_param_sync = synced


def no_sync(module: nn.Module, sync: bool):
    """The context of one micro-batch's backward pass: DDP's no_sync around `module` unless `sync` (the
    last micro-batch of a step, whose gradients are exchanged); nothing for a module DDP does not wrap."""
    return contextlib.nullcontext() if sync or not hasattr(module, "no_sync") else module.no_sync()
