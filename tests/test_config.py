import re

import pytest

from alexnet.config import ConfigError, SYNTHETIC_DEFAULTS, TrainConfig, resolve_train
from conftest import TINY, cli


def test_defaults_are_the_paper_and_torchvision_augmentation(tmp_path):
    cfg, _ = resolve_train({"data": str(tmp_path)})
    assert (cfg.resize, cfg.crop, cfg.hflip) == ("256", 224, 0.5)
    assert cfg.mean == [0.485, 0.456, 0.406] and cfg.std == [0.229, 0.224, 0.225]


def test_builtin_dataset_defaults_fill_only_unset_values():
    cfg, _ = resolve_train({})
    assert cfg.crop == SYNTHETIC_DEFAULTS["crop"] and cfg.epochs == SYNTHETIC_DEFAULTS["epochs"]
    cfg, _ = resolve_train({"epochs": "2"})
    assert cfg.epochs == 2 and cfg.crop == SYNTHETIC_DEFAULTS["crop"]


def test_yaml_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 0.5\nbatch-size: 16\n")
    cfg, explicit = resolve_train({"config": str(f), "lr": "0.1"})
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (7, 0.1, 16)
    assert {"epochs", "lr", "batch_size"} <= explicit


@pytest.mark.parametrize("flags,message", [
    ({"batch_size": "0"}, "--batch-size: must be at least 1"),
    ({"batch_size": "many"}, "--batch-size: 'many' is not a whole number"),
    ({"lr": "fast"}, "--lr: 'fast' is not a finite number"),
    ({"lr": "inf"}, "--lr: 'inf' is not a finite number"),
    ({"contrast": "inf"}, "--contrast: 'inf' is not a finite number"),
    ({"mean": "inf,0,0"}, "--mean: 'inf,0,0' is not a list of finite numbers"),
    ({"seed": "-1"}, "--seed: must be a whole number in [0, 4294967295]"),
    ({"split_seed": str(2**63)}, "--split-seed: must be a whole number in [0, 4294967295]"),
    ({"dist_timeout": "1e10"}, "--dist-timeout: must be a positive number of seconds, at most 604,800 (a week)"),
    ({"epochs": "1000000000000"}, "--epochs: must be at least 1 (and at most 1,000,000)"),
    ({"data": ""}, "--data: an empty path; give one, or leave the flag out"),
    ({"weights": " "}, "--weights: an empty path"),
    ({"resume": ""}, "--resume: an empty path"),
    ({"recipe": ""}, "--recipe: an empty name; give one of "),
    ({"arch": "resnet"}, "--arch: 'resnet' is not one of alexnet, alexnet2012"),
    ({"crop": "300", "resize": "256"}, "--crop: 300 is larger than the resized image"),
    ({"crop": "32"}, "--crop: 32 is below AlexNet's smallest input, 63"),
    ({"resize": "big"}, "--resize: 'big' is not N or WxH"),
    ({"data": "/no/such/folder"}, "--data: '/no/such/folder' does not exist"),
    ({"lr": "-1"}, "--lr: must be positive"),
    ({"mean": "0.5,0.5"}, "--mean: needs 3 numbers"),
    ({"hue": "0.9"}, "--hue: must be in [0, 0.5]"),
    ({"device": "tpu"}, "--device: 'tpu' is not auto, cpu, cuda or cuda:N"),
    ({"warmup_epochs": "20", "epochs": "5"}, "--warmup-epochs"),
    ({"deterministic": "maybe"}, "--deterministic: 'maybe' is not true or false"),
    ({"mixup": "-0.2"}, "--mixup: must be 0 (off) or a positive number"),
    ({"cutmix": "inf"}, "--cutmix: 'inf' is not a finite number"),
    ({"clip_grad_norm": "-1"}, "--clip-grad-norm: must be 0 (off) or a positive number"),
])
def test_invalid_values_name_the_setting(flags, message):
    with pytest.raises(ConfigError) as e:
        resolve_train(flags)
    assert message in str(e.value)


def test_unknown_yaml_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochz: 3\n")
    with pytest.raises(ConfigError) as e:
        resolve_train({"config": str(f)})
    assert str(e.value) == f"config {f}: unknown setting 'epochz' (did you mean 'epochs'?)"


@pytest.mark.parametrize("text,said", [
    ("epochs: ten\n", "epochs: 'ten' is not a whole number"), ("fc_width: 1.5\n", "fc_width: 1.5 is not a whole number"),
    ("lr: [0.1]\n", "lr: [0.1] is not a finite number"), ("nesterov: maybe\n", "nesterov: 'maybe' is not true or false"),
    ("data: ''\n", "data: an empty path; give one, or leave the line out"),
])
def test_a_config_file_mistake_is_said_as_the_file_has_it_not_as_a_flag(tmp_path, text, said):
    """`epochs: ten` in a config file was said as "--epochs: 'ten' ...", a flag the user never typed."""
    for source, flags in (("config", {"config": str(tmp_path / "c.yaml")}),
                          ("--recipe", {"recipe": str(tmp_path / "c.yaml")})):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError) as e:
            resolve_train(flags)
        assert str(e.value) == f"{source} {tmp_path / 'c.yaml'}: {said}"


def test_yaml_not_a_mapping(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve_train({"config": str(f)})


def test_exact_resize_accepted():
    cfg, _ = resolve_train({"resize": "256x256"})
    assert cfg.resize == "256x256"


def test_cli_errors_are_clear_and_fail_before_work(tmp_path, capsys):
    for args, message in [
        (["--data", tmp_path / "missing"], "--data: "),
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--crop", "300", "--resize", "256"], "--crop: 300 is larger than the resized image"),
    ]:
        code, _, stderr = cli(capsys, "train", *args, "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache")
        assert code == 2, stderr
        assert message in stderr
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    code, _, stderr = cli(capsys, "train", "--arch", "vgg")
    assert code == 2 and "invalid choice: 'vgg'" in stderr


def test_data_folder_without_splits(tmp_path, capsys):
    (tmp_path / "d" / "cats").mkdir(parents=True)
    code, _, stderr = cli(capsys, "train", "--data", tmp_path / "d", "--out", tmp_path / "run", *TINY)
    assert code == 2 and "train does not exist" in stderr


def test_empty_class_folder(tmp_path, tiny_data, capsys):
    import shutil
    d = tmp_path / "d"
    shutil.copytree(tiny_data, d)
    (d / "train" / "empty").mkdir()
    code, _, stderr = cli(capsys, "train", "--data", d, "--out", tmp_path / "run", *TINY)
    assert code == 2 and "holds no images" in stderr and "empty" in stderr


def test_a_file_where_the_run_folder_goes_is_a_clear_error(tmp_path, tiny_data, capsys):
    """Said before any work, with the file left as it was: a file given as --out, or on its way."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "run"):
        code, _, stderr = cli(capsys, "train", "--data", tiny_data, "--out", out, *TINY)
        assert code == 2 and stderr == (f"alexnet train: error: --out: {blocker} is a file; give a folder for the "
                                        f"run (it is made if missing)\n"), stderr
    assert blocker.read_text() == "not a folder"


def test_a_run_folder_without_permission_to_write_is_refused_at_start(tmp_path, tiny_data, capsys, monkeypatch):
    """Before any work (a first use's pack of the data, say), naming the folder; root may write anywhere, so
    the permission is taken away by os.access here."""
    import os
    (tmp_path / "ro").mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else access(p, mode))
    code, stdout, stderr = cli(capsys, "train", "--data", tiny_data, "--out", tmp_path / "ro" / "run", *TINY,
                               "--cache-dir", tmp_path / "cache")
    assert code == 2 and stderr == (f"alexnet train: error: --out: no permission to write in {tmp_path / 'ro'}; give "
                                    f"a folder you can write in\n"), stderr
    assert not (tmp_path / "cache").exists() and stdout == ""


def test_linear_lr_scaling_brings_a_warm_up_unless_one_is_given():
    from alexnet.config import resolve_train
    cfg, _ = resolve_train({"data": ".", "lr_scaling": "linear", "epochs": 10})
    assert cfg.warmup_epochs == 5
    cfg, _ = resolve_train({"data": ".", "lr_scaling": "linear", "epochs": 10, "warmup_epochs": 2})
    assert cfg.warmup_epochs == 2
    cfg, _ = resolve_train({"data": ".", "epochs": 10})
    assert cfg.warmup_epochs == 0


def test_checkpoint_every_takes_steps_or_minutes():
    from alexnet.config import ConfigError, parse_every
    assert parse_every("500") == (500, 0.0) and parse_every("10m") == (0, 10.0) and parse_every("0") == (0, 0.0)
    for bad in ("5h", "1.5", "-3", "m"):
        with pytest.raises(ConfigError, match="--checkpoint-every"):
            parse_every(bad)


@pytest.mark.parametrize("text,said", [
    ("epochs: [1\n", "line 2, column 1: expected ',' or ']', but got '<stream end>'"),
    ("epochs: 1\n  lr: 2\n", "line 2, column 5: mapping values are not allowed here"),
])
def test_a_config_file_that_is_not_yaml_is_one_line_that_says_where(text, said, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(text)
    code, _, err = cli(capsys, "train", "--config", tmp_path / "run.yaml")
    assert code == 2 and err == f"alexnet train: error: config: {tmp_path / 'run.yaml'} is not valid YAML ({said})\n"


def test_a_config_file_of_a_list_is_refused(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("- 1\n- 2\n")
    code, _, err = cli(capsys, "train", "--config", tmp_path / "run.yaml")
    assert code == 2 and err == (f"alexnet train: error: config: {tmp_path / 'run.yaml'} must hold a mapping of "
                                 f"settings, not list\n")


def test_a_config_file_that_is_not_text_is_refused(tmp_path, capsys):
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)))
    code, _, err = cli(capsys, "train", "--config", tmp_path / "photo.jpg")
    assert code == 2 and err.startswith(f"alexnet train: error: config: {tmp_path / 'photo.jpg'} is not a YAML file")


def test_paths_expand_the_home_folder_and_the_runs_are_absolute(tmp_path, monkeypatch):
    """`~` in a flag the shell left alone (--out=~/runs/a) or in a YAML file is the home folder; the paths a
    run keeps in its saved config are absolute, so that its checkpoint means the same from any folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "data").mkdir(parents=True)
    (tmp_path / "run.yaml").write_text("cache-dir: ~/cache\n")
    cfg, _ = resolve_train({"data": "~/data", "out": "~/runs/a", "config": str(tmp_path / "run.yaml")})
    assert (cfg.data, cfg.out, cfg.cache_dir) == (str(tmp_path / "home" / "data"), str(tmp_path / "home" / "runs" / "a"),
                                                   str(tmp_path / "home" / "cache"))
    monkeypatch.chdir(tmp_path / "home")
    cfg, _ = resolve_train({"data": "data", "out": "runs/b"})
    assert (cfg.data, cfg.out) == (str(tmp_path / "home" / "data"), str(tmp_path / "home" / "runs" / "b"))


def test_a_resumed_runs_data_folder_that_is_not_here_is_said_to_come_from_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"--data: the run's data folder, 'tiny' \(from its checkpoint, a path "
                                          r"relative to the folder the run was started in\), does not exist here"):
        resolve_train({"resume": "last.pt"}, checkpoint_config=lambda resume, out: {"data": "tiny"})
    cfg, _ = resolve_train({"resume": "last.pt", "data": str(tmp_path)},
                           checkpoint_config=lambda resume, out: {"data": "tiny"})
    assert cfg.data == str(tmp_path)


def test_a_config_file_that_names_another_is_refused(tmp_path):
    (tmp_path / "run.yaml").write_text("config: other.yaml\nepochs: 2\n")
    with pytest.raises(ConfigError, match="run.yaml names another config file"):
        resolve_train({"config": str(tmp_path / "run.yaml")})
    (tmp_path / "run.yaml").write_text("config: null\nepochs: 2\n")  # as a run's config.yaml has it: no other
    assert resolve_train({"config": str(tmp_path / "run.yaml")})[0].epochs == 2


@pytest.mark.parametrize("file,flags,batch,global_batch", [
    ("global_batch_size: 32\n", {"batch_size": 8}, 8, 0),  # refused before: the flag could not win over the file
    ("global_batch_size: 32\n", {"batch_size": 8, "global_batch_size": 0}, 8, 0),
    ("global_batch_size: 32\n", {}, None, 32),
    ("batch_size: 4\n", {"global_batch_size": 16}, None, 16),
    ("batch_size: 4\n", {"recipe": "paper2012"}, 4, 0),  # the file over the recipe's global batch of 128
])
def test_a_batch_flag_wins_over_the_config_files_as_every_flag_does(tmp_path, file, flags, batch, global_batch):
    (tmp_path / "c.yaml").write_text(file)
    cfg = resolve_train({"config": str(tmp_path / "c.yaml"), "data": str(tmp_path), **flags})[0]
    assert cfg.global_batch_size == global_batch and (batch is None or cfg.batch_size == batch)


def test_both_batches_at_one_level_are_refused_naming_where(tmp_path):
    (tmp_path / "c.yaml").write_text("global_batch_size: 32\nbatch_size: 8\n")
    for flags, said in (({"config": str(tmp_path / "c.yaml")}, f"config {tmp_path / 'c.yaml'}: batch_size and "
                                                                "global_batch_size: give one, not both"),
                        ({"batch_size": 8, "global_batch_size": 16}, "--batch-size and --global-batch-size: give one")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            resolve_train(flags)


@pytest.mark.parametrize("text,said", [
    ("epochs: 2\nlr: 0.1\nepochs: 1\n", "is not valid YAML (line 3, column 1: 'epochs' is given twice)"),  # kept the last
    ("nproc_per_node: 2\n", "nproc_per_node is a setting of the launch, not of the training: give it on the command "
                            "line, --nproc-per-node"),
])
def test_a_config_file_with_a_key_twice_or_a_launch_setting_is_refused_saying_why(tmp_path, text, said):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(said)):
        resolve_train({"config": str(tmp_path / "c.yaml")})


def test_a_config_that_is_a_folder_is_said_so(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"config: {tmp_path} is a folder; give a YAML file")):
        resolve_train({"config": str(tmp_path)})
