"""The `alexnet` command: parsing only; each subcommand calls one function."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys

from . import __version__, distributed, launch, logs
from .config import (BenchConfig, EvalConfig, PredictConfig, TrainConfig, build, check_split, fields,
                     resolve_train, validate_eval, validate_predict)
from .errors import (BenchError, CheckpointError, ConfigError, DataError, DistributedError, ExportError,
                     NonFiniteLoss, WriteError, message)
from .export import FORMATS
from .runtime import out_of_memory


def _add_fields(parser: argparse.ArgumentParser, cls, suppress: bool) -> None:
    for f in fields(cls):
        meta = f.metadata
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if not meta.get("flag", True):
            parser.add_argument(f.name, nargs="+", help=meta["help"])
            continue
        name = "--" + f.name.replace("_", "-")
        shown = ",".join(str(v) for v in default) if isinstance(default, list) else default
        help_text = meta["help"] if "default:" in meta["help"] or meta.get("required") else \
            f"{meta['help']} (default: {shown})"
        kw = {"default": argparse.SUPPRESS} if suppress else {"default": default}
        if meta.get("required"):
            kw["required"] = True
        if isinstance(default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text, **kw)
        else:
            parser.add_argument(name, metavar=f.name.upper(), help=help_text,
                                choices=meta.get("choices"), **kw)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (like every other invalid value), not after the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the flags)\n")


def _path(text: str) -> str:
    """A file or folder named on the command line, with `~` expanded as the shell does (it does not in
    --out=~/x); an empty one (an unset variable, `alexnet data pack "$SRC" out`) is refused, not read as
    the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder")
    return os.path.expanduser(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alexnet", description="Train, evaluate and predict with AlexNet.")
    parser.add_argument("--version", action="version", version=f"alexnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser("train", help="train a model (no --data: the built-in generated dataset)",
                           description="Train AlexNet. Settings: defaults < --config YAML < flags.")
    _add_fields(train, TrainConfig, suppress=True)
    launch.add_arguments(train)

    ev = sub.add_parser("eval", help="loss, top-1 and top-5 of a checkpoint on a validation split")
    _add_fields(ev, EvalConfig, suppress=False)
    launch.add_arguments(ev)

    pr = sub.add_parser("predict", help="top-k classes of images with a checkpoint or an exported model")
    _add_fields(pr, PredictConfig, suppress=False)

    ex = sub.add_parser("export", help="write a checkpoint's model as ONNX, TorchScript, torch.export or safetensors")
    ex.add_argument("--checkpoint", required=True, type=_path, help="checkpoint (.pt) written by alexnet train")
    ex.add_argument("--format", required=True, choices=list(FORMATS),
                    help="onnx (dynamic batch, checked with onnxruntime), torchscript, pt2 (torch.export) or "
                         "safetensors (weights only)")
    ex.add_argument("--out", required=True, type=_path, help="file to write; the metadata also goes to the same name .json")

    pl = sub.add_parser("plot", help="curves of loss, top-1, top-5, learning rate and images/s of runs")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", type=_path, help="run folders (alexnet train --out)")
    pl.add_argument("--out", default="curves.png", type=_path, help="PNG file to write (default: curves.png)")

    bn = sub.add_parser("bench", help="images/s of our pipeline and the reference pipeline (the PyTorch ImageNet "
                                      "example's), data, model step and end to end, alternating, medians")
    _add_fields(bn, BenchConfig, suppress=False)

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    dsub.required = True
    stats = dsub.add_parser("stats", help="per-channel mean and std of a dataset's images (for --mean/--std) and "
                                          "their RGB principal components (for --pca-eigval/--pca-eigvec)")
    stats.add_argument("dir", type=_path, help="ImageFolder root (with train/) or a split folder")
    stats.add_argument("--split", default=None, help="split to measure (default: train, or DIR itself when it is a "
                                                     "split folder)")
    stats.add_argument("--max-images", type=launch.at_least(0), default=0,
                       help="sample at most this many images (0: all)")
    pk = dsub.add_parser("pack", help="decode and resize a dataset once into a packed, memory-mapped form that "
                                      "alexnet train --data OUT reads with almost no CPU work")
    pk.add_argument("dir", type=_path, help="ImageFolder root: train/<class>/ and val/<class>/ (or valid/, validation/, "
                                "test/), or class folders alone with --val-fraction")
    pk.add_argument("out", type=_path, help="folder to write (made once: several processes may ask for it at the same time)")
    pk.add_argument("--resize", default="256", help="resize as alexnet train's --resize (default: 256); training "
                                                    "from the packed form must use the same")
    pk.add_argument("--workers", type=int, default=None, help="decoding processes (default: the cores available)")
    pk.add_argument("--encoding", choices=("raw", "jpeg"), default="raw",
                    help="raw: the resized pixels (about 190 KiB an image at 256; nothing to decode, for sets that "
                         "fit in memory); jpeg: the resized images encoded again as JPEG (about a tenth of that, "
                         "decoded a batch at a time while training: on a CPU as alexnet train's --jpeg-decode "
                         "says, or on the GPU) (default: raw)")
    pk.add_argument("--quality", type=int, default=None, help="JPEG quality of --encoding jpeg, 1 to 100 (default: 90)")
    check = dsub.add_parser("check", help="decode every image and list the unreadable ones and layout problems; "
                                          "for a packed dataset, check every image against its checksum")
    check.add_argument("dir", type=_path, help="ImageFolder root (as alexnet data pack takes it), or a packed dataset")
    for sub in (pk, check):
        sub.add_argument("--val-dir", default=None, help="the validation split's folder under DIR (default: the first "
                                                         "of val, valid, validation and test that exists)")
        sub.add_argument("--val-fraction", type=float, default=0.0,
                         help="hold out this share of each class of DIR/train (or of DIR's class folders) as the "
                              "validation split, as alexnet train --val-fraction does (default: 0, off)")
        sub.add_argument("--split-seed", type=int, default=0, help="which files --val-fraction holds out (default: 0)")
    return parser


def _data_check(folder: str, val_dir: str | None, val_fraction: float, split_seed: int) -> int:
    from pathlib import Path
    from .data import packed
    from .data.check import image_files, problems_of_layout, unreadable
    from .data.folder import by_extension
    from .progress import Progress
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root} {'is not a folder' if root.exists() else 'does not exist'}")
    if packed.is_packed(root):
        meta = packed.read_meta(root)
        images = sum(m["images"] for m in meta["splits"].values())
        damage = packed.verify(root, Progress(images, f"checking {root}", every=max(images // 10, 100)))
        for problem in damage:
            print(f"damaged: {problem}")
        print(f"{images} packed images, {'damaged' if damage else 'every one as packed'}")
        return 1 if damage else 0
    layout = problems_of_layout(root, val_dir, val_fraction, split_seed)
    files, others = image_files(root)
    # in a pipe or a log: a line every tenth of the files (at least 100) and at the end, never one an image
    bad = unreadable(files, Progress(len(files), f"checking {root}", every=max(len(files) // 10, 100)))
    for path, reason in bad:
        print(f"unreadable: {path}: {reason}")
    for problem in layout:
        print(f"layout: {problem}")
    if others:
        print(f"not read (not image files by their names): {by_extension(others)}")
    print(f"{len(files)} image files, {len(bad)} unreadable; {len(layout)} layout problem(s)")
    return 1 if bad or layout else 0


def _settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "command" and not k.startswith("launch_")}


LESS_MEMORY = {  # what to lower when a command runs out of memory
    "train": "lower --batch-size (--accum-steps keeps the global batch), --crop or --fc-width",
    "eval": "lower --batch-size", "predict": "lower --batch-size", "bench": "lower --batch-size or --image-size"}


def entry() -> int:
    """The `alexnet` command as installed (and `python -m alexnet`, as the launcher starts its workers): main,
    with what is alive at start (torch and the other imports) and at the end kept out of the cyclic garbage
    collector. Its collections then skip those objects, forked loader workers leave their pages shared,
    and the process exits without a last full collection over every imported module (0.5 to 0.7 s of
    each command on the Zen 4 box)."""
    gc.freeze()
    try:
        return main()
    finally:
        gc.collect()  # what is garbage now is freed, and its finalisers run, as at any exit
        gc.freeze()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "val_dir", None):  # `--val-dir test/` as a shell completes it: the folder's name
        args.val_dir = args.val_dir.rstrip("/") or args.val_dir
    ranked = distributed.launched() and os.environ.get("WORLD_SIZE") != "1"
    who = f" (rank {os.environ['RANK']})" if ranked else ""
    if args.command == "data":  # `alexnet data pack: error: ...`, as the user typed it
        who = f" {args.data_command}{who}"
    log = logs.setup(os.environ["RANK"] if ranked else None).info
    try:
        if args.command == "train":
            from .train import batch_sizes, fit
            from .train.state import earlier_run, restarted, saved_config
            early = logs.hold_early()  # what resolving the settings says belongs in the run's train.log
            try:
                # A node of a multi-node job whose --data is missing says so through the ranks' agreement on
                # the data (train.open_data), which stops its peers too, not here, where they would wait for it.
                agreed = launch.nodes(args)[1] > 1 if launch.requested(args) else ranked
                cfg, _ = resolve_train(_settings(args), saved_config, check_data=not agreed)
                if launch.requested(args):
                    launch.check(args, cfg.device, cfg.backend)
                if not cfg.resume and not restarted() and (earlier := earlier_run(cfg.out)):
                    raise ConfigError(earlier)
                from .data import autopack  # packed on first use here, before any process group is joined
                cfg = autopack.prepare(cfg, log)
                if launch.requested(args):  # settings are checked once, here, before any worker starts
                    logs.drop_early(early)
                    batch_sizes(cfg, launch.world_size(args))
                    if (args.launch_max_restarts or launch.elastic(args)) and not cfg.out:
                        raise ConfigError(f"{'--max-restarts' if args.launch_max_restarts else '--nnodes MIN:MAX'} "
                                          "needs --out: restarted workers continue from the checkpoints in that run "
                                          "folder")
                    workers = argv[argv.index("train") + 1:] + (["--pack", "no"] if autopack.fell_back(cfg) else [])
                    return launch.run(args, "train", workers, cfg.dist_timeout, log)
                fit(cfg, log=log, early=early)
            finally:
                logs.drop_early(early)
        elif args.command == "eval":
            from .evaluate import run
            cfg = build(EvalConfig, _settings(args))
            validate_eval(cfg)
            if launch.requested(args):
                launch.check(args, cfg.device, cfg.backend)
                return launch.run(args, "eval", argv[argv.index("eval") + 1:], cfg.dist_timeout, log)
            run(cfg, log=log)
        elif args.command == "predict":
            from .predict import run
            cfg = build(PredictConfig, {k: v for k, v in vars(args).items() if k != "command"})
            validate_predict(cfg)
            if run(cfg)[1]:
                return 1  # some images unreadable: said, the others predicted
        elif args.command == "export":
            from .export import export
            export(args.checkpoint, args.format, args.out, log=print)
        elif args.command == "plot":
            from .plots import load_runs, save, training_curves
            runs = load_runs(args.runs)
            print(f"wrote {save(training_curves(runs), args.out)} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
        elif args.command == "bench":
            from .bench import run
            run(build(BenchConfig, {k: v for k, v in vars(args).items() if k != "command"}), log=log)
        elif args.command == "data" and args.data_command == "stats":
            from .stats import channel_stats, split_to_measure
            root, split = split_to_measure(args.dir, args.split)
            s = channel_stats(root, split, args.max_images)
            print(f"# {s['images']} images of {root / split}")
            if s["unreadable"]:
                path, reason = s["unreadable"][0]
                print(f"# {len(s['unreadable'])} unreadable file(s) left out (the first: {path}: {reason}); "
                      f"alexnet data check lists them")
            print(f"mean: [{', '.join(map(str, s['mean']))}]")
            print(f"std: [{', '.join(map(str, s['std']))}]")
            print(f"# as flags: --mean {','.join(map(str, s['mean']))} --std {','.join(map(str, s['std']))}")
            print(f"pca eigval: [{', '.join(map(str, s['eigval']))}]")
            print(f"pca eigvec: [{', '.join(map(str, s['eigvec']))}]  # columns are the eigenvectors")
            print(f"# for --pca-lighting 0.1: --pca-eigval={','.join(map(str, s['eigval']))} "
                  f"--pca-eigvec={','.join(map(str, s['eigvec']))}")
        elif args.command == "data" and args.data_command == "pack":
            from .data.packed import available_cores, pack
            if args.workers is None:
                args.workers = available_cores()
            if args.workers < 0:
                raise ConfigError("--workers: must be 0 or more")
            check_split(args.val_fraction, args.val_dir)
            if args.quality is not None and args.encoding == "raw" and 1 <= args.quality <= 100:
                log(f"WARNING: --quality {args.quality} is for --encoding jpeg: a raw pack stores the pixels as they are")
            pack(args.dir, args.out, args.resize, args.workers, log=log, val_dir=args.val_dir,
                 val_fraction=args.val_fraction, split_seed=args.split_seed, encoding=args.encoding,
                 quality=90 if args.quality is None else args.quality)
        elif args.command == "data" and args.data_command == "check":
            check_split(args.val_fraction, args.val_dir)
            return _data_check(args.dir, args.val_dir, args.val_fraction, args.split_seed)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"alexnet {args.command}{who}: error: {message(e)}", file=sys.stderr)
        return 2
    except (DistributedError, NonFiniteLoss, ExportError, BenchError, WriteError) as e:
        print(f"alexnet {args.command}{who}: error: {message(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # an unwritable run folder, a full disk, an unreadable file
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"alexnet {args.command}{who}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"alexnet {args.command}{who}: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:
        if (asked := out_of_memory(e)) is not None:
            advice = f": {LESS_MEMORY[args.command]}" if args.command in LESS_MEMORY else ""
            gpu = " (nvidia-smi shows what else holds the GPU)" if "CUDA" in str(e) else ""
            print(f"alexnet {args.command}{who}: error: out of memory{asked}{advice}{gpu}", file=sys.stderr)
            return 1
        if not distributed.is_collective_failure(e):
            raise
        print(f"alexnet {args.command}{who}: error: lost contact with the other processes: "
              f"{distributed.failure_text(e)} (a peer stopped or the network failed; see the other ranks' "
              f"messages; --dist-timeout sets how long to wait)", file=sys.stderr)
        return 1
    distributed.shutdown()  # after success only: with a lost peer, tearing down the group can block
    return 0

