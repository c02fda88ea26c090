"""`alexnet export`: a checkpoint as ONNX, TorchScript, torch.export (.pt2) or safetensors, each carrying what
a user of the file needs (classes, normalisation, input size, architecture); and reading any of them back
as a predictor for `alexnet predict`.

The metadata travels inside the file (ONNX metadata_props, TorchScript and .pt2 extra files, the safetensors
header) and beside it as `<name>.json`, for programs that do not read those."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .config import eval_crop
from .errors import ConfigError, ExportError

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2", "safetensors": ".safetensors"}




META_KEY = "alexnet"  # the key of the metadata in every format
META_FILE = "alexnet.json"  # its name among TorchScript's and torch.export's extra files


def metadata(state: dict) -> dict:
    cfg = state["config"]
    crop = eval_crop(cfg)  # what the run evaluated with
    return {"arch": cfg["arch"], "fc_width": int(cfg["fc_width"]), "classes": list(state["classes"]),
            "mean": list(cfg["mean"]), "std": list(cfg["std"]), "resize": str(cfg["resize"]), "crop": crop,
            "input": {"name": "images", "shape": ["batch", 3, crop, crop], "dtype": "float32",
                      "layout": "NCHW, RGB, normalised: (pixel / 255 - mean) / std"},
            "output": {"name": "logits", "shape": ["batch", len(state["classes"])]},
            "epoch": state.get("epoch"), "metrics": state.get("metrics") or {}}


def _quietly():
    """torch.onnx and torch.jit print progress and deprecation notices; the command reports for itself."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # onnxscript's optimiser logs each pass at INFO
    stack.callback(logging.disable, logging.NOTSET)
    return stack


def _batch_dim():
    return {"x": {0: torch.export.Dim("batch", min=1, max=65536)}}


def _side_problem(out: Path, meta: dict) -> tuple[str | None, str | None]:
    """(why <out stem>.json cannot be written, or None: a file that is not an export's metadata, package.json
    beside package.onnx; the export of another model or checkpoint beside it that the file described, or
    None: that one keeps its own copy inside, so the file is replaced, with a warning)."""
    side = out.with_suffix(".json")
    if not side.exists():
        return None, None
    try:
        old = json.loads(side.read_text())
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, dict) and {"arch", "classes", "input", "output"} <= old.keys()):
        return f"{side} exists and is not the metadata of an export, which would replace it", None
    others = [p.name for ext in FORMATS.values() if (p := out.with_suffix(ext)) != out and p.is_file()]
    return None, others[0] if others and old != meta else None


def export(checkpoint_path: str, fmt: str, out: str, log=print) -> dict:
    """Write the checkpoint's model in `fmt` to `out` and `<out stem>.json`; returns the metadata. ONNX is
    checked against PyTorch with onnxruntime on a batch of 3 (when onnxruntime is installed)."""
    from .train.state import model_from_checkpoint
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    out_path = Path(out)
    if out_path.is_dir():
        raise ConfigError(f"--out: {out} is a folder; give the file to write, such as {out_path / 'model'}"
                          f"{FORMATS[fmt]}")
    if not out_path.parent.is_dir():
        raise ConfigError(f"--out: the folder {out_path.parent} does not exist")
    if kind_of(out) != fmt:  # predict tells the formats apart by the name
        raise ConfigError(f"--out: for --format {fmt} the file's name ends in {FORMATS[fmt]} (got {out_path.name!r})")
    state = checkpoint.load_run(checkpoint_path)
    meta = metadata(state)
    text = json.dumps(meta)
    problem, replaced = _side_problem(out_path, json.loads(text))
    if problem:
        raise ConfigError(f"--out {out}: {problem}; give another --out name (the metadata goes to <name>.json)")
    model = model_from_checkpoint(state).float().eval()
    example = torch.randn(3, 3, meta["crop"], meta["crop"], generator=torch.Generator().manual_seed(0))
    checked = None
    try:
        with checkpoint.atomic_path(out_path) as tmp:
            _write(model, example, fmt, tmp, text)
            if fmt == "onnx":  # checked before it takes the file's name: a failed check leaves nothing
                checked = onnx_difference(model, tmp, example)
                if checked is not None and checked > 1e-4:
                    raise ExportError(f"onnxruntime's output differs from PyTorch's by {checked:.3g} (max abs) "
                                      f"on a batch of 3; nothing was written")
    except (ConfigError, ImportError, ExportError):
        raise
    except Exception as e:  # an exporter's or onnxruntime's failure: one line naming the format, not a traceback
        raise ExportError(f"writing {fmt} failed: {str(e).strip().splitlines()[0]}") from e
    side = out_path.with_suffix(".json")
    with checkpoint.atomic_path(side) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {out_path} ({fmt}, {out_path.stat().st_size / 2**20:.1f} MiB) and {side}")
    if replaced:
        log(f"WARNING: {side} described {replaced}, another model or another checkpoint of it, and now describes "
            f"{out_path.name}; {replaced} keeps its own metadata inside it, which predict reads")
    if fmt == "onnx":
        log("onnxruntime is not installed: the file was not checked (pip install 'alexnet[onnx]')" if checked is None
            else f"checked with onnxruntime: max |difference| to PyTorch {checked:.2e} on a batch of 3")
    return meta


def _write(model, example, fmt: str, path: str, text: str) -> None:
    if fmt == "onnx":
        _write_onnx(model, example, path, text)
    elif fmt == "torchscript":
        with _quietly(), torch.no_grad():
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, path, _extra_files={META_FILE: text})
    elif fmt == "pt2":
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim())
        torch.export.save(program, path, extra_files={META_FILE: text})
    else:
        from safetensors.torch import save_file
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, path, metadata={META_KEY: text})


def onnx_export_available() -> bool:
    """Whether torch.onnx.export takes dynamo= and dynamic_shapes= (torch 2.5 on; 2.4 has dynamo= only)."""
    import inspect
    return "dynamic_shapes" in inspect.signature(torch.onnx.export).parameters


def _write_onnx(model, example, path: str, text: str) -> None:
    if not onnx_export_available():
        raise ConfigError(f"ONNX export needs torch >= 2.5 (this is {torch.__version__})")
    try:
        with _quietly():
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes=_batch_dim())
    except ImportError as e:
        raise ConfigError(f"ONNX export needs the onnx and onnxscript packages ({e}): "
                          f"pip install 'alexnet[onnx]'") from None
    program.model.metadata_props[META_KEY] = text
    program.save(path)


def onnx_difference(model, path, images: torch.Tensor) -> float | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        want = model(images).numpy()
    return float(np.abs(got - want).max())


class Predictor:
    """Logits for a batch of normalised NCHW float images, from any file alexnet writes."""

    def __init__(self, meta: dict, fn, device: torch.device, kind: str) -> None:
        self.meta, self.fn, self.device, self.kind = meta, fn, device, kind
        self.classes = meta["classes"]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)


def kind_of(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".torchscript":
        return "torchscript"
    return next((fmt for fmt, ext in FORMATS.items() if ext == suffix), "checkpoint")


def _kind(path: str) -> str:
    """What the file at `path` holds, by its content where that tells: an exported model under another name
    (model.pt) or under another format's (m.onnx written as TorchScript), a checkpoint under an export's
    name; by its name where the content does not tell (a damaged archive: its reader then says what is
    wrong). A file that is plainly something else (an image, a document) is said so."""
    named, found = kind_of(path), checkpoint.exported_kind(path)
    if found or named == "checkpoint":
        return found or named
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04" and _saved_by_torch(path):
        return "checkpoint"  # torch.save's zip or pickle, under an export's name
    if what := next((what for magic, what in checkpoint.MAGIC.items() if head.startswith(magic)), None):
        raise checkpoint.CheckpointError(f"{path} is {what}, not {checkpoint.EXPORTED_AS[named]}: give a file of "
                                         f"alexnet export ({', '.join(FORMATS)}) or a checkpoint")
    return named


def _saved_by_torch(path: str) -> bool:
    """Whether the zip archive at `path` is torch.save's (<name>/data.pkl)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.split("/")[1:] == ["data.pkl"] for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_predictor(path: str, device: torch.device, device_asked: bool = False) -> Predictor:
    """A checkpoint (.pt, or any other name) or an exported file (.onnx, .ts, .pt2, .safetensors). An ONNX
    file runs on the GPU when onnxruntime has CUDA; otherwise on the CPU, or an error if the GPU was asked
    for by name (`device_asked`)."""
    from .train.state import model_from_checkpoint
    from .models import create_model
    if not Path(path).is_file():
        raise ConfigError(f"--checkpoint: {checkpoint.not_a_file(Path(path))}")
    kind = _kind(path)
    try:
        if kind == "checkpoint":
            state = checkpoint.load_run(path)
            meta, model = metadata(state), model_from_checkpoint(state).to(device)
            return Predictor(meta, torch.no_grad()(model), device, kind)
        if kind == "onnx":
            return _onnx_predictor(path, device, device_asked)
        if kind == "torchscript":
            extra = {META_FILE: ""}
            with _quietly():
                module = torch.jit.load(path, map_location=device, _extra_files=extra)
            return Predictor(_meta(extra[META_FILE], path), torch.no_grad()(module), device, kind)
        if kind == "pt2":
            extra = {META_FILE: ""}
            with _quietly():  # torch logs a damaged file's traceback before it raises
                module = torch.export.load(path, extra_files=extra).module().to(device)
            return Predictor(_meta(extra[META_FILE], path), torch.no_grad()(module), device, kind)
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(path, framework="pt") as f:
            meta = _meta((f.metadata() or {}).get(META_KEY, ""), path)
        model = create_model(meta["arch"], len(meta["classes"]), 0.0, meta["fc_width"])
        model.load_state_dict(load_file(path))
        return Predictor(meta, torch.no_grad()(model.eval().to(device)), device, kind)
    except (ConfigError, checkpoint.CheckpointError):
        raise
    except ImportError as e:
        raise ConfigError(f"reading {path} needs a package that is not installed ({e}): "
                          f"pip install 'alexnet[all]'") from None
    except Exception as e:  # a damaged or foreign file: say which, not a traceback
        raise checkpoint.CheckpointError(f"{path} cannot be read as {kind} (damaged or cut short? write it again "
                                         f"with alexnet export): {str(e).splitlines()[0]}") from None


def _meta(text: str, path: str) -> dict:
    try:
        meta = json.loads(text)
        meta["classes"]
    except (ValueError, KeyError, TypeError):
        raise checkpoint.CheckpointError(f"{path} holds no alexnet metadata (was it written by alexnet export?)") from None
    return meta


def _onnx_predictor(path: str, device: torch.device, device_asked: bool) -> Predictor:
    import onnxruntime as ort
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers() and not device_asked:
        device = torch.device("cpu")
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError("--device cuda with an ONNX file needs onnxruntime-gpu (this onnxruntime has "
                              f"{', '.join(ort.get_available_providers())}); or use --device cpu")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})] + providers
    session = ort.InferenceSession(path, providers=providers)
    meta = _meta(session.get_modelmeta().custom_metadata_map.get(META_KEY, ""), path)
    name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: images.cpu().float().numpy()})[0])
    return Predictor(meta, run, device, "onnx")
