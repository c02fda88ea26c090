"""Device choice, seeding and determinism."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import re
import sys

import numpy as np
import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {name!r} asks for CUDA, which is not available on this machine; "
                          "use --device cpu or auto")
    return device


def cpu_has_bf16() -> bool:
    """An x86 CPU with bf16 arithmetic in hardware: AMX tiles (Intel Sapphire Rapids and later) or AVX512-BF16
    (Intel Cooper Lake, AMD Zen 4 and later). There bf16 autocast beats fp32; on CPUs without either, bf16 is
    emulated and far slower."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            pass
    return False


def resolve_precision(name: str, device: torch.device, deterministic: bool) -> torch.dtype | None:
    """The autocast dtype for --precision NAME, or None for fp32."""
    if name == "auto":
        if deterministic:
            return None
        if device.type == "cuda":  # bf16 in hardware from Ampere (compute capability 8) on; before, fp16
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def precision_warning(dtype: torch.dtype | None, device: torch.device) -> str | None:
    """Why `dtype` on `device` is a poor choice, when it is far slower there than fp32; else None."""
    if dtype == torch.float16 and device.type == "cpu":
        # torch runs the fp16 convolution backward on CPUs without an optimised kernel (2.14: about 70x fp32)
        return ("fp16 on a CPU: torch's convolution backward in fp16 is far slower there than fp32; "
                "--precision bf16 is the fast reduced precision on CPUs with AMX or AVX512-BF16 (auto picks it)")
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The forward pass's precision context: torch.autocast with `dtype`, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_sgd(params, impl: str, device: torch.device, **kw) -> torch.optim.SGD:
    """SGD with the implementation asked for; auto: fused when this torch has it for the device (one kernel
    for the whole update; on CPUs several times quicker than the per-tensor loop), else foreach."""
    choices = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
    if impl != "auto":
        try:
            return torch.optim.SGD(params, **kw, **choices[impl])
        except (RuntimeError, TypeError, ValueError) as e:
            raise ConfigError(f"--sgd {impl}: not available with this torch on {device.type}: {e}") from None
    params = list(params)
    try:
        return torch.optim.SGD(params, **kw, fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the fused kernel
        return torch.optim.SGD(params, **kw, foreach=device.type == "cuda")


def out_of_memory(e: BaseException) -> str | None:
    """When `e` is a failed allocation (the CPU allocator's "can't allocate memory", a GPU's out of
    memory, Python's MemoryError): what it asked for, in words (" (it asked for 343.3 GiB more)"; empty
    when the error does not say); else None."""
    text = str(e)
    if not (isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", ()))) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return None
    if found := re.search(r"allocate (\d+) bytes", text):
        size = int(found.group(1))
        unit = next(u for u in range(4, -1, -1) if size >= 1024 ** u or u == 0)
        return f" (it asked for {size / 1024 ** unit:.1f} {('bytes', 'KiB', 'MiB', 'GiB', 'TiB')[unit]} more)"
    if found := re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]i?B)", text):
        return f" (it asked for {found.group(1)} more)"
    return ""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def match_state_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (the momentum buffers) its parameter's memory layout. A
    checkpoint saved with one layout and resumed with the other (--channels-last changed) would otherwise
    pair channels_last parameters with NCHW buffers, and torch's fused SGD on CPUs walks all of them in
    memory order: the update would then mix up elements."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if (isinstance(value, torch.Tensor) and value.shape == param.shape
                        and value.stride() != param.stride()):
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def tune_allocator() -> bool:
    """Keep freed memory in this process for the next allocation of the same size (glibc only).

    By default glibc serves every block of more than 32 MiB (a fully connected layer's weights, its
    bf16 copy under autocast, their gradients) with a fresh mmap and unmaps it on free, so each training
    step faults in hundreds of MiB of new pages again; on a 2-core CPU that was 30% of the bf16 step. With
    mmap off and trimming raised, those blocks come from the heap and are reused: the price is that the
    process keeps its peak memory until it exits. The effect is that of the jemalloc or tcmalloc preload
    that CPU-training guides recommend, without a library to install. Returns whether it was applied."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1
               for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))


def configure(deterministic: bool, threads: int) -> int:
    """Set the thread count and, when asked, deterministic algorithms. Returns the thread count."""
    if deterministic:
        # Reductions split work by thread, so a fixed count is part of reproducibility.
        threads = threads or 1
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def rng_state() -> dict:
    """This process's random states (Python, NumPy, torch CPU and CUDA) as tensors and plain types, so
    that a checkpoint holding them loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
