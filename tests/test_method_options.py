"""Each method's options are its own: `train --method M --help` shows M's (choices and help
its own), a value is checked against the chosen method's option, `compare` shares options
out per method and passes `--anomaly-source` to the methods that take it; the anomaly-source
pool has one helper."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medad_fast.cli import build_parser, main as cli
from medad_fast.methods import resolve_config
from medad_fast.data.sources import (TRAINING_SOURCE_SEED_OFFSET, anomaly_source_pool, load_anomaly_sources,
                                     perlin_texture_sources, training_sources)
from medad_fast.method_options import method_options, option_owners, settings_for_methods
from medad_fast.cli._arguments import config_from_args

pytestmark = pytest.mark.usefixtures("one_thread")

SQUID_HELP = "SQUID image score: discriminator"
DDAD_HELP = "(DDAD's mean of the map)"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from medad_fast.data.phantom import write_phantom_dataset
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, n_train=8, n_test=4, size=32, seed=2, progress=False)
    return root


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(["train", *argv])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- declarations

def test_a_shared_setting_name_keeps_each_methods_choices_and_help():
    owners = option_owners()["image_score"]
    assert sorted(owners) == ["ae", "ddad", "squid"]
    assert owners["squid"].choices == ("discriminator", "max_filter")
    assert owners["ddad"].choices == ("max_filter", "mean") and DDAD_HELP in owners["ddad"].help
    assert SQUID_HELP in owners["squid"].help
    # the paper's ablation switches are the paper's method's, not the generic parser's
    [mode] = [o for o in method_options("frequency_aware").values() if o.setting == "mode"]
    assert {(s.option, s.value) for s in mode.shortcuts} == {("--recon-only", "recon_only"), ("--seg-only", "seg_only")}
    assert not any(o.shortcuts for m in ("ae", "draem", "ddad", "squid") for o in method_options(m).values())
    # a bool setting whose default is None is a switch (was a string option)
    assert method_options("ddad")["data_json_pool"].is_switch


def test_declared_choices_are_checked_for_every_config():
    with pytest.raises(ValueError, match=r"config image_score='mean': must be one of \['discriminator', 'max_filter'\]"):
        resolve_config("squid", "tiny", image_score="mean")
    with pytest.raises(ValueError, match=r"unlabeled_split='train': must be None or one of \['valid', 'test'\]"):
        resolve_config("ddad", "tiny", unlabeled_split="train")
    assert resolve_config("ddad", "tiny").method.unlabeled_split is None


# ----------------------------------------------------------------------------- train --help

def test_train_help_of_squid_shows_squids_options_only(capsys):
    out = help_of(capsys, "--method", "squid", "--help")
    assert "squid options (default: the preset's):" in out
    assert "--image-score {discriminator,max_filter}" in out and SQUID_HELP in out
    assert DDAD_HELP not in out and "--members" not in out and "--recon-only" not in out


def test_train_help_of_ddad_shows_ddads_options_only(capsys):
    out = help_of(capsys, "--method", "ddad", "--help")
    assert "ddad options (default: the preset's):" in out
    assert "--image-score {max_filter,mean}" in out and DDAD_HELP in out
    assert SQUID_HELP not in out and "--grid" not in out and "--no-roi" not in out


def test_train_help_without_a_method_shows_the_generic_options_and_how_to_list_a_methods(capsys):
    out = help_of(capsys, "--help")
    assert "--val-fraction" in out and "--anomaly-source" in out
    assert "--image-score" not in out and "--recon-only" not in out
    assert "`medad-fast train --method M --help` lists method M's" in " ".join(out.split())
    out = help_of(capsys, "--method", "frequency_aware", "--help")
    assert "--recon-only" in out and "--seg-only" in out and "--mode {full,recon_only,seg_only}" in out


# ----------------------------------------------------------------------------- train parsing

def parse_train(*argv: str):
    return build_parser("train").parse_args(["train", "--data", "D", *argv])


@pytest.mark.parametrize("argv", [["--method", "squid", "--image-score", "mean"],
                                  ["--image-score", "mean", "--method", "squid"]])
def test_a_value_outside_the_methods_choices_exits_2_naming_option_and_method(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train(*argv)
    assert exit_info.value.code == 2
    assert ("argument --image-score: invalid choice 'mean' for method squid (choose from discriminator, "
            "max_filter)") in capsys.readouterr().err


def test_an_option_of_another_method_exits_2_naming_its_owner(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train("--method", "ae", "--recon-only")
    assert exit_info.value.code == 2
    assert "argument --recon-only: method ae has no option --recon-only (it is an option of frequency_aware)" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_train("--method", "ddad", "--members", "three")
    assert "argument --members: invalid int value 'three' (method ddad)" in capsys.readouterr().err


def test_an_option_the_default_method_lacks_is_refused_at_config_time(data, tmp_path, capsys):
    # without --method the default method's options apply; the error waits for a later --method
    assert cli(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--image-score", "mean"]) == 2
    assert "argument --image-score: method frequency_aware has no option --image-score" in capsys.readouterr().err


def test_parsed_values_are_the_methods_types():
    args = parse_train("--method", "ae", "--image-score", "mean", "--latent-size", "8", "--preset", "tiny")
    config = config_from_args(args)
    assert (config.method.image_score, config.method.latent_size) == ("mean", 8)
    args = parse_train("--ae-lr", "0.002", "--method", "ddad", "--no-data-json-pool", "--preset", "tiny")
    config = config_from_args(args)
    assert config.method.ae_lr == 0.002 and config.method.data_json_pool is False
    assert config_from_args(parse_train("--seg-only", "--preset", "tiny")).method.mode == "seg_only"


# ----------------------------------------------------------------------------- compare

def test_settings_are_shared_out_per_method():
    per_method, ignored = settings_for_methods(["frequency_aware", "ae", "ddad"], {"image_score": "mean",
                                                                                  "latent_size": "8"})
    assert per_method == {"frequency_aware": {}, "ae": {"image_score": "mean", "latent_size": 8},
                          "ddad": {"image_score": "mean", "latent_size": 8}}
    assert ignored == {"image_score": ["frequency_aware"], "latent_size": ["frequency_aware"]}
    with pytest.raises(ValueError, match="--image-score: invalid choice 'mean' for method squid"):
        settings_for_methods(["ae", "squid"], {"image_score": "mean"})
    with pytest.raises(ValueError, match=r"--no-roi: no method of ae, squid has it \(an option of frequency_aware\)"):
        settings_for_methods(["ae", "squid"], {"roi": False})


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(folder / f"s{i}.png")
    return folder


def test_compare_passes_each_method_its_own_settings_and_the_anomaly_source(data, sources, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli(["compare", "--data", str(data), "--methods", "frequency_aware,ae", "--preset", "tiny", "--epochs", "1",
                "--out", str(out), "--device", "cpu", "--no-progress", "--image-score", "mean",
                "--anomaly-source", str(sources), "--ema", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "--image-score goes to ae; ignored by frequency_aware (no such setting)" in printed
    assert "--anomaly-source goes to frequency_aware; ignored by ae" in printed
    paper = json.loads((out / "frequency_aware" / "run" / "config.json").read_text())
    ae = json.loads((out / "ae" / "run" / "config.json").read_text())
    assert paper["run"]["anomaly_source"] == str(sources.resolve()) and "image_score" not in paper["method_config"]
    assert ae["run"]["anomaly_source"] is None and ae["method_config"]["image_score"] == "mean"
    assert "--image-score mean" in (out / "compare.md").read_text()
    # --ema reaches every method, and each row is scored with the average
    assert paper["run"]["ema"] == ae["run"]["ema"] == 0.9
    assert all(json.loads((out / name / "eval" / "metrics.json").read_text())["weights"] == "ema"
               for name in ("frequency_aware", "ae"))


def test_compare_refuses_a_value_a_method_does_not_take(data, tmp_path, capsys):
    assert cli(["compare", "--data", str(data), "--methods", "ae,squid", "--preset", "tiny", "--out", str(tmp_path),
                "--image-score", "mean"]) == 2
    assert ("--image-score: invalid choice 'mean' for method squid (choose from discriminator, max_filter)"
            in capsys.readouterr().err)
    assert not any(tmp_path.iterdir())  # nothing trained


def test_with_a_validation_set_the_anomaly_source_goes_to_every_method(tmp_path):
    from medad_fast.compare import anomaly_source_methods, compare_entries
    assert anomaly_source_methods(["frequency_aware", "ae", "draem", "ddad", "squid"], None) == ["frequency_aware",
                                                                                              "draem"]
    assert anomaly_source_methods(["ae", "squid"], 0.25) == ["ae", "squid"]
    # the library call behind `compare`: each entry gets its own settings and the folder when it takes it
    entries, ignored = compare_entries(["ae", "draem"], {"image_score": "mean"}, tmp_path)
    assert [(e.name, e.overrides) for e in entries] == [
        ("ae", {"image_score": "mean"}), ("draem", {"anomaly_source": str(tmp_path.resolve())})]
    assert ignored == {"image_score": ["draem"], "anomaly_source": ["ae"]}


# ----------------------------------------------------------------------------- the anomaly-source helper

def test_the_anomaly_source_pool_is_the_folder_or_seeded_textures(sources):
    config = resolve_config("draem", "tiny", seed=5)
    expected = perlin_texture_sources(3, 32, torch.Generator().manual_seed(5 + TRAINING_SOURCE_SEED_OFFSET))
    assert torch.equal(training_sources(config, 3), expected)
    assert torch.equal(anomaly_source_pool(None, 32, 3, 7), perlin_texture_sources(3, 32, torch.Generator().manual_seed(7)))
    with_folder = training_sources(config.replace(anomaly_source=str(sources)), 2)
    assert torch.equal(with_folder, load_anomaly_sources(sources, 32, max_images=2))
