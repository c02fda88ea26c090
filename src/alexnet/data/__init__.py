"""Datasets, transforms and loaders."""

from .folder import DataError, ImageFolder, open_splits
from .images import load_rgb, to_rgb
from . import packed
from .loader import EpochSampler, make_loader
from .transforms import crop_schedule, eval_transform, parse_resize, train_transform

__all__ = ["DataError", "ImageFolder", "open_splits", "load_rgb", "to_rgb", "EpochSampler", "make_loader", "packed",
           "crop_schedule", "eval_transform", "parse_resize", "train_transform"]
