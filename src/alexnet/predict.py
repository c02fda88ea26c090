"""`alexnet predict`: top-k classes with probabilities for image files and folders."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from . import checkpoint
from .config import ConfigError, PredictConfig
from .data import eval_transform, load_rgb
from .data.images import is_image_name
from .evaluate import model_from_checkpoint
from .runtime import resolve_device


def expand(paths) -> list[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if is_image_name(f))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ConfigError(f"predict: {p!r} is not a file or folder")
    if not files:
        raise ConfigError("predict: no images given (pass image files or folders)")
    return files


@torch.no_grad()
def run(cfg: PredictConfig) -> list[dict]:
    state = checkpoint.load_run(cfg.checkpoint)
    tcfg, classes = state["config"], state["classes"]
    device = resolve_device(cfg.device)
    model = model_from_checkpoint(state).to(device)
    transform = eval_transform(tcfg["resize"], tcfg["crop"], tcfg["mean"], tcfg["std"])
    files = expand(cfg.images)
    k = min(cfg.topk, len(classes))
    results = []
    for i in range(0, len(files), cfg.batch_size):
        chunk = files[i:i + cfg.batch_size]
        batch = torch.stack([transform(load_rgb(f)) for f in chunk]).to(device)
        probs = model(batch).float().softmax(dim=1)
        top = probs.topk(k, dim=1)
        for f, p, idx in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results.append({"image": f, "top": [{"class": classes[j], "prob": q} for j, q in zip(idx, p)]})
    for r in results:
        if cfg.json:
            json.dump(r, sys.stdout)
            print()
        else:
            print(f"{r['image']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
    return results
