"""`alexnet export` (ONNX, TorchScript, torch.export, safetensors) and `alexnet predict` with every file it
writes, images, folders and globs."""

import json
import shutil

import numpy as np
import pytest
import torch

from alexnet import checkpoint
from alexnet.train.state import model_from_checkpoint
from alexnet.export import FORMATS, export, load_predictor, onnx_export_available
from conftest import cli as alexnet, run_cli


def predictions(stdout: str) -> dict[str, list]:
    return {r["image"]: r["top"] for r in map(json.loads, stdout.strip().splitlines())}


@pytest.fixture(scope="module")
def onnx_file(shipped, tmp_path_factory):
    out, _ = shipped
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    args = ("export", "--checkpoint", out / "checkpoints" / "last.pt", "--format", "onnx", "--out", path)
    if not onnx_export_available():  # torch 2.4
        p = run_cli(*args, check=False)
        assert p.returncode == 2 and "ONNX export needs torch >= 2.5" in p.stderr and not path.exists(), p.stderr
        pytest.skip(f"ONNX export needs torch >= 2.5 (this is {torch.__version__}); its clear error was checked")
    return path, run_cli(*args)


def test_onnx_matches_pytorch_with_a_dynamic_batch(shipped, onnx_file):
    import onnxruntime as ort
    out, _ = shipped
    path, p = onnx_file
    assert "checked with onnxruntime" in p.stdout
    model = model_from_checkpoint(checkpoint.load_run(out / "checkpoints" / "last.pt"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # a named, dynamic batch dimension
    for n in (3, 1, 5):
        images = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(n))
        got = session.run(None, {"images": images.numpy()})[0]
        with torch.no_grad():
            want = model(images).numpy()
        assert got.shape == (n, 3)
        assert np.abs(got - want).max() <= 1e-4
    meta = json.loads(session.get_modelmeta().custom_metadata_map["alexnet"])
    side = json.loads(path.with_suffix(".json").read_text())
    assert meta["classes"] == side["classes"] == ["circle", "ring", "square"]
    assert meta["crop"] == 64 and meta["resize"] == "72" and len(meta["mean"]) == len(meta["std"]) == 3


def test_predict_with_onnx_gives_the_checkpoints_top1(shipped, onnx_file, tiny_data, capsys):
    out, _ = shipped
    val = tiny_data / "val"
    code, stdout, _ = alexnet(capsys, "predict", "--checkpoint", out / "checkpoints" / "last.pt", val, "--json",
                              "--batch-size", "5")
    from_ckpt = predictions(stdout)
    assert code == 0
    code, stdout, _ = alexnet(capsys, "predict", "--checkpoint", onnx_file[0], val, "--json", "--batch-size", "5")
    from_onnx = predictions(stdout)
    assert code == 0
    assert len(from_ckpt) == 12 and from_ckpt.keys() == from_onnx.keys()
    assert len({top[0]["class"] for top in from_ckpt.values()}) >= 2, "the model must not answer one class"
    for image, top in from_ckpt.items():
        assert [t["class"] for t in from_onnx[image]] == [t["class"] for t in top]
        assert from_onnx[image][0]["prob"] == pytest.approx(top[0]["prob"], abs=1e-5)
    code, _, err = alexnet(capsys, "eval", "--checkpoint", onnx_file[0])
    assert code == 2 and f"{onnx_file[0]} is an ONNX model, not a checkpoint: `alexnet predict` takes it" in err


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "safetensors"])
def test_other_formats_predict_like_the_checkpoint(shipped, tmp_path, fmt, tiny_data):
    out, _ = shipped
    ckpt = out / "checkpoints" / "last.pt"
    path = tmp_path / f"model{FORMATS[fmt]}"
    meta = export(str(ckpt), fmt, str(path), log=lambda *a: None)
    assert json.loads(path.with_suffix(".json").read_text()) == meta
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want = load_predictor(str(ckpt), torch.device("cpu"))(images)
    loaded = load_predictor(str(path), torch.device("cpu"))
    assert loaded.classes == ["circle", "ring", "square"] and loaded.kind == fmt
    assert (loaded(images) - want).abs().max() <= 1e-5
    if fmt == "safetensors":
        from safetensors.torch import load_file
        assert load_file(path).keys() == checkpoint.load_run(ckpt)["model"].keys()
    # Given where a checkpoint is wanted, the file is named for what it is; predict reads it under any name.
    for command in (["eval", "--checkpoint", path], ["export", "--checkpoint", path, "--format", "safetensors",
                                                     "--out", tmp_path / "again.safetensors"]):
        p = run_cli(*command, check=False)
        what = {"torchscript": "a TorchScript model", "pt2": "a torch.export program (.pt2)",
                "safetensors": "a safetensors file"}[fmt]
        assert p.returncode == 2 and f"{path} is {what}" in p.stderr and "`alexnet predict` takes it" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    renamed = tmp_path / "model.pt"
    renamed.write_bytes(path.read_bytes())
    loaded = load_predictor(str(renamed), torch.device("cpu"))
    assert loaded.kind == fmt and (loaded(images) - want).abs().max() <= 1e-5
    if fmt == "pt2":  # a file cut short: one line, without torch's logged traceback before it
        cut = tmp_path / "cut.pt2"
        cut.write_bytes(path.read_bytes()[:300_000])
        p = run_cli("predict", "--checkpoint", cut, next((tiny_data / "val").rglob("*.jpg")), check=False)
        assert p.returncode == 2 and p.stderr.startswith(f"alexnet predict: error: {cut} cannot be read as pt2 (damaged")
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_predict_takes_files_folders_and_globs(shipped, tiny_data, capsys):
    out, _ = shipped
    ckpt = out / "checkpoints" / "last.pt"
    val = tiny_data / "val"
    one = sorted((val / "ring").glob("*.jpg"))[0]
    code, stdout, _ = alexnet(capsys, "predict", "--checkpoint", ckpt, one, val / "circle", val / "s*" / "*.jpg",
                              tiny_data / "**" / "0000[0-2].jpg", "--json", "--topk", "2")
    got = list(predictions(stdout))  # the order given: file, folder, then each pattern's sorted matches
    circles = sorted(str(f) for f in (val / "circle").glob("*.jpg"))
    squares = sorted(str(f) for f in (val / "square").glob("*.jpg"))
    early = sorted(str(f) for f in tiny_data.rglob("0000[0-2].jpg"))
    assert got[:1 + 4 + 4] == [str(one), *circles, *squares] and len(early) >= 2
    rows = [json.loads(x) for x in stdout.strip().splitlines()]
    assert code == 0 and [r["image"] for r in rows[9:]] == early and all(len(r["top"]) == 2 for r in rows)
    code, _, stderr = alexnet(capsys, "predict", "--checkpoint", ckpt, val / "*" / "*.png")
    assert code == 2 and "no image file matches" in stderr


def test_export_and_predict_refuse_bad_input_clearly(shipped, tmp_path, tiny_data, capsys):
    out, _ = shipped
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    code, _, stderr = alexnet(capsys, "predict", "--checkpoint", junk, tiny_data / "val")
    assert code == 2 and "cannot be read as onnx" in stderr
    shutil.copy(sorted(tiny_data.rglob("*.jpg"))[0], tmp_path / "photo.onnx")
    code, _, stderr = alexnet(capsys, "predict", "--checkpoint", tmp_path / "photo.onnx", tiny_data / "val")
    assert code == 2 and f"{tmp_path / 'photo.onnx'} is a JPEG image, not an ONNX model" in stderr, stderr
    code, _, stderr = alexnet(capsys, "export", "--checkpoint", out / "checkpoints" / "last.pt", "--format", "onnx",
                              "--out", tmp_path / "missing" / "m.onnx")
    assert code == 2 and "does not exist" in stderr
    code, _, stderr = alexnet(capsys, "export", "--checkpoint", out / "checkpoints" / "last.pt", "--format", "onnx",
                              "--out", tmp_path / "model")
    assert code == 2 and "name ends in .onnx" in stderr and not (tmp_path / "model").exists()
    code, _, stderr = alexnet(capsys, "export", "--checkpoint", out / "checkpoints" / "last.pt", "--format", "onnx",
                              "--out", tmp_path)
    assert code == 2 and f"--out: {tmp_path} is a folder; give the file to write, such as {tmp_path}/model.onnx" in stderr
    code, _, stderr = alexnet(capsys, "export", "--checkpoint", junk, "--format", "safetensors",
                              "--out", tmp_path / "m.safetensors")
    assert code == 2 and f"{junk} is not a checkpoint: it is a text file" in stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_export_keeps_a_json_that_is_not_its_own_and_says_when_it_replaces_another_exports(shipped, tmp_path,
                                                                                          tiny_data, capsys):
    """export replaced package.json beside package.onnx, and the m.json of m.ts when another checkpoint was
    exported as m.safetensors, without a word."""
    ckpt = shipped[0] / "checkpoints" / "best.pt"
    (tmp_path / "package.json").write_text('{"name": "my-app"}\n')
    code, _, err = alexnet(capsys, "export", "--checkpoint", ckpt, "--format", "safetensors",
                           "--out", tmp_path / "package.safetensors")
    assert code == 2 and f"{tmp_path / 'package.json'} exists and is not the metadata of an export" in err, err
    assert (tmp_path / "package.json").read_text() == '{"name": "my-app"}\n'
    assert not (tmp_path / "package.safetensors").exists()
    for fmt in ("torchscript", "safetensors"):  # one checkpoint in two formats share m.json, as intended
        assert alexnet(capsys, "export", "--checkpoint", ckpt, "--format", fmt, "--out",
                       tmp_path / f"m{FORMATS[fmt]}")[0] == 0
    side = (tmp_path / "m.json").read_text()
    other = checkpoint.load_run(ckpt)
    other["epoch"] += 5  # another checkpoint of the run
    torch.save(other, tmp_path / "other.pt")
    code, said, _ = alexnet(capsys, "export", "--checkpoint", tmp_path / "other.pt", "--format", "safetensors",
                            "--out", tmp_path / "m.safetensors")
    assert code == 0 and (f"WARNING: {tmp_path / 'm.json'} described m.ts, another model or another checkpoint of it, "
                          "and now describes m.safetensors; m.ts keeps its own metadata inside it") in said
    assert json.loads((tmp_path / "m.json").read_text())["epoch"] == json.loads(side)["epoch"] + 5
    image = sorted(tiny_data.rglob("*.jpg"))[0]  # m.ts still predicts, from the metadata inside it
    assert alexnet(capsys, "predict", "--checkpoint", tmp_path / "m.ts", image)[0] == 0


def test_predict_reads_a_model_or_checkpoint_named_as_another_format_by_its_content(shipped, tmp_path, tiny_data,
                                                                                  capsys):
    """A checkpoint copied to m.onnx was "damaged or cut short? write it again with alexnet export"."""
    out, _ = shipped
    image = sorted((tiny_data / "val").rglob("*.jpg"))[0]
    code, expected, _ = alexnet(capsys, "predict", "--checkpoint", out / "checkpoints" / "last.pt", image)
    assert code == 0
    shutil.copy(out / "checkpoints" / "last.pt", tmp_path / "ckpt.onnx")
    assert alexnet(capsys, "export", "--checkpoint", out / "checkpoints" / "last.pt", "--format", "torchscript",
                   "--out", tmp_path / "m.ts")[0] == 0
    shutil.copy(tmp_path / "m.ts", tmp_path / "ts.onnx")
    for named in ("ckpt.onnx", "ts.onnx"):
        code, said, err = alexnet(capsys, "predict", "--checkpoint", tmp_path / named, image)
        assert code == 0 and said.split(": ")[0] == expected.split(": ")[0], err
        assert [p.split()[0] for p in said.split(": ", 1)[1].split(", ")] == \
            [p.split()[0] for p in expected.split(": ", 1)[1].split(", ")]
