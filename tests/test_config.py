"""The configuration parts: flags generated from their fields, the table in docs/cli.md that lists
them, --help without JAX, one same-experiment rule, and run names that tell experiments apart."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from bn_jax import cli, names
from bn_jax import config as config_lib
from experiments import cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = (config_lib.ExperimentConfig, config_lib.RuntimeConfig, config_lib.CheckpointOptions,
         config_lib.ClusterOptions)


def readme_flag_rows():
    """{flag: default cell} of docs/cli.md's flag table (a row may list several flags)."""
    with open(os.path.join(ROOT, "docs", "cli.md")) as f:
        text = f.read()
    table = text.split("## `python -m experiments.cifar` flags", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`--"):
            for flag in re.findall(r"`(--\w+)`", cells[0]):
                rows[flag] = cells[1].strip("`")
    return rows


def parser_flags():
    return {s for a in cli.build_parser(cifar.RECIPE)._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def test_every_flag_is_in_the_readme_table_and_every_row_is_a_flag():
    assert set(readme_flag_rows()) == parser_flags()


@pytest.mark.parametrize("field", [f for part in PARTS for f in dataclasses.fields(part)], ids=lambda f: f.name)
def test_the_readme_default_is_the_fields_default(field):
    cell = readme_flag_rows()[config_lib.flag_name(field)]
    if field.default is None:
        assert cell in ("none", "all")
    elif isinstance(field.default, bool) or field.metadata["switch"] is not None:
        assert cell == "off"  # a switch that is off unless given (--no_augment for a True field)
    elif isinstance(field.default, (int, float)):
        assert float(cell.replace("−", "-")) == field.default
    else:
        assert cell == field.default


@pytest.mark.parametrize("part", PARTS)
def test_every_field_has_help_and_a_flag(part):
    parser = cli.build_parser(cifar.RECIPE)
    dests = {a.dest: a for a in parser._actions}
    for field in dataclasses.fields(part):
        assert field.metadata["help"], field.name
        assert config_lib.flag_name(field) in dests[field.name].option_strings


def test_the_libraries_key_their_tables_by_the_shared_names():
    from bn_jax import augmentation, models, train_modes
    assert names.TRAIN_MODES == tuple(train_modes.MODES)
    assert names.BN_INITS == tuple(models.BN_INITS)
    assert names.PRECISIONS == tuple(models.PRECISIONS)
    assert names.NORMALIZATIONS == tuple(augmentation.NORMALIZERS)
    assert names.MODEL_FAMILIES == tuple(models.FAMILIES)
    with pytest.raises(AssertionError, match="differ from bn_jax.names"):
        names.check_keys({"full": 1, "bn": 2}, names.TRAIN_MODES, "a table missing modes")


def test_help_imports_no_jax():
    code = ("import sys\nfrom experiments import cifar\n"
            "try:\n    cifar.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = sorted(m for m in ('jax', 'flax', 'optax', 'orbax', 'numpy') if m in sys.modules)\n"
            "print('imported:', heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("imported: []")
    assert "--weight_decay" in out.stdout and "--steps_per_call" in out.stdout


def test_runtime_keys_do_not_make_another_experiment():
    experiment = config_lib.ExperimentConfig(model="resnet8")
    saved_flat = {**experiment.to_dict(), "eval_batch_size": 7, "loop": "fused", "num_devices": 8,
                  "data_dir": "/elsewhere", "steps_per_call": 3}  # a config.json of the older flat layout
    assert config_lib.same_experiment(saved_flat, experiment)
    saved = {"experiment": experiment.to_dict(), "runtime": config_lib.RuntimeConfig(eval_batch_size=7).to_dict()}
    assert config_lib.same_experiment(saved, experiment)
    other = dataclasses.replace(experiment, lr=0.05)
    assert config_lib.different_keys(saved, other) == ["lr"]
    # a key saved before it existed counts as the behaviour of that time
    old = {k: v for k, v in experiment.to_dict().items() if k != "normalize"}
    assert config_lib.same_experiment(old, experiment)
    assert not config_lib.same_experiment(old, dataclasses.replace(experiment, normalize="imagenet"))


def test_run_names_differ_whenever_experiments_do():
    base = config_lib.ExperimentConfig(model="resnet20", train_mode="bn")
    variants = [base, dataclasses.replace(base, lr=0.05), dataclasses.replace(base, epochs=3),
                dataclasses.replace(base, max_train_examples=100), dataclasses.replace(base, precision="bfloat16")]
    names = [config_lib.run_name(c) for c in variants]
    assert len(set(names)) == len(names)
    assert all(n.startswith("resnet20_w1_bn_s0-") for n in names)
    assert config_lib.run_name(base) == config_lib.run_name(config_lib.ExperimentConfig(model="resnet20", train_mode="bn"))


def test_config_json_holds_both_parts_and_provenance(tmp_path):
    from bn_jax import provenance
    experiment, runtime = config_lib.ExperimentConfig(model="resnet8"), config_lib.RuntimeConfig(eval_batch_size=5)
    from bn_jax import workdir
    workdir.RunDir(str(tmp_path)).write_config(experiment, runtime, provenance.provenance())
    import json
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert set(saved) == {"experiment", "runtime", "provenance"}
    assert saved["provenance"]["versions"]["jax"] and "git" in saved["provenance"]
    assert config_lib.load(str(tmp_path / "config.json")) == (experiment, runtime)


def test_a_field_added_later_keeps_earlier_run_names():
    """image_size and init_seed came after run names got their hash: at their defaults they are
    left out of the hash, so a CIFAR run started before keeps its folder (the hash of the fields as
    they were then)."""
    import hashlib
    import json
    base = config_lib.ExperimentConfig(model="resnet20", train_mode="bn")
    before = {k: v for k, v in base.to_dict().items() if k not in ("image_size", "init_seed")}
    expected = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:8]
    assert base.short_hash() == expected
    imagenet = config_lib.ExperimentConfig(model="imagenet_resnet18", dataset="imagenet2012", normalize="imagenet")
    assert imagenet.short_hash() != dataclasses.replace(imagenet, image_size=64).short_hash()
    assert base.short_hash() != dataclasses.replace(base, init_seed=0).short_hash()


@pytest.mark.parametrize("changes, message", [
    (dict(model="imagenet_resnet50"), "ImageNet model: train it with python -m experiments.imagenet"),
    (dict(image_size=64), "image_size applies to streamed datasets"),
    (dict(dataset="imagenet2012", normalize="imagenet"), "imagenet2012 takes the ImageNet ResNets"),
    (dict(dataset="imagenet2012", model="imagenet_resnet50"), "normalize 'dataset' needs the training set in memory"),
])
def test_models_data_and_crops_must_belong_together(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(config_lib.ExperimentConfig(), **changes).validate()


def test_the_imagenet_cli_takes_torchvision_model_names():
    from experiments import imagenet
    experiment, runtime, _ = cli.configs_from_argv(imagenet.RECIPE, ["--model", "resnet152", "--workers", "1"])
    assert (experiment.model, experiment.dataset, experiment.batch_size) == ("imagenet_resnet152", "imagenet2012", 1024)
    assert runtime.resolved_workers() == 1
    with pytest.raises(SystemExit):
        cli.configs_from_argv(imagenet.RECIPE, ["--model", "resnet20"])
    with pytest.raises(SystemExit):  # (CIFAR's resnet50 would otherwise train with the ImageNet recipe)
        cli.configs_from_argv(imagenet.RECIPE, ["--dataset", "cifar10"])
    named, _, _ = cli.configs_from_argv(imagenet.RECIPE, ["--image_size", "224"])
    assert named.image_size is None and named.short_hash() == cli.configs_from_argv(imagenet.RECIPE, [])[0].short_hash()
