"""The command line as a newcomer meets it: clean help, choices listed and checked before any
work, one --device convention, --version, exit codes, and every file written named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histoclass.cli import _common as common
from histoclass.cli import app

runner = CliRunner()
COMMANDS = ["split", "audit", "stain", "models", "train", "train-all", "predict", "ensemble",
            "explain", "evaluate", "export", "serve", "run", "demo"]


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    """Help rendered 200 columns wide, so a phrase is not broken across table lines."""
    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", 200)


def _help(*args: str) -> str:
    res = runner.invoke(app, [*args, "--help"])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_has_clean_usage_and_no_bool_types(command):
    text = _help(*([command] if command else []))
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage
    assert "<bool>" not in text


def test_usage_names_arguments_as_people_write_them():
    assert re.search(r"Usage: \S+ predict \[OPTIONS\] MODEL \[INPUTS\]\.\.\.", _help("predict"))
    assert "explain [OPTIONS] MODEL... [IMAGES]..." in _help("explain")
    assert re.search(r"--tta\s+Average the 8", _help("predict"))  # a flag takes no value


def test_choices_are_listed_and_match_the_library():
    from histoclass.api import BACKENDS
    from histoclass.data.splits import PROTOCOLS
    from histoclass.distributed import ENGINES
    from histoclass.explain import METHODS as CAM
    from histoclass.models.members import FAMILIES
    from histoclass.models.voting import METHODS as ENSEMBLE
    from histoclass.stain import METHODS as STAIN
    from histoclass.train.config import CHOICES

    of = common.choices_of
    assert of(common.Protocol) == PROTOCOLS and of(common.Backend) == BACKENDS
    assert of(common.CamMethod) == tuple(CAM) and of(common.EnsembleMethod) == ENSEMBLE
    assert of(common.Engine) == ENGINES
    assert of(common.StainMethod) == STAIN and set(of(common.Preset)) == set(FAMILIES)
    for name in ("task", "schedule", "balance", "select", "amp"):
        assert of(getattr(common, name.capitalize())) == CHOICES[name]
    assert "<patient|paper|kfold>" in _help("split")
    assert "<soft|weighted|hard|stack|concat>" in _help("ensemble")
    assert "<gradcam|gradcam++|hirescam|eigencam|layercam>" in _help("explain")


def test_bad_choice_fails_before_any_work(tmp_path):
    # The model and manifest do not exist: the choice is refused before anything is opened.
    res = runner.invoke(app, ["predict", str(tmp_path / "none.pt"), "--manifest", "m.csv",
                              "--out", "p.csv", "--split", "tset"])
    assert res.exit_code == 2
    assert "error: unknown split 'tset'; choose one of train, val, test" in res.output
    res = runner.invoke(app, ["train", "none.csv", "--out", str(tmp_path), "--task", "grade"])
    assert res.exit_code == 2 and "unknown task 'grade'; choose one of binary, subtype" \
        in res.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", [["train", "m.csv", "--out", "o"],
                                     ["train-all", "m.csv", "--out", "o"],
                                     ["predict", "m.pt", "x.png", "--out", "p.csv"],
                                     ["ensemble", "a.pt", "--method", "soft", "--out", "e.pt"]])
def test_one_device_convention(command):
    res = runner.invoke(app, [*command, "--device", "gpu0"])
    assert res.exit_code == 2
    assert "error: unknown device 'gpu0'; use auto, cpu, cuda, cuda:N or mps" in res.output
    assert "<auto|cpu|cuda|cuda:N|mps>" in _help(command[0])


def test_version_and_exit_codes_are_documented():
    from histoclass._version import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"histoclass {__version__}"
    assert "Exit codes: 0 done; 1 a leak was found or a step failed; 2 bad usage" in _help()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "| 0 |" in readme and "| 1 |" in readme and "| 2 |" in readme
    assert (common.EXIT_FAILED, common.EXIT_USAGE) == (1, 2)


def test_explain_out_is_required_unless_score_before_loading(tmp_path):
    assert "required unless --score" in _help("explain")
    res = runner.invoke(app, ["explain", str(tmp_path / "none.pt"), "x.png"])
    assert res.exit_code == 2 and "--out DIR is required (or use --score)" in res.output


def test_train_all_shows_its_whole_default():
    text = " ".join(_help("train-all").split())
    assert ("default: the study's ten, v1-b0, v1-b1, v1-b2, v1-b3, v1-b4, v2-b0, v2-b1, v2-b2, "
            "v2-b3, v2-s") in text


def test_train_names_every_file_it_wrote(tmp_path):
    from train_helpers import synthetic_manifest

    manifest = synthetic_manifest(tmp_path, n_train=4, n_val=2, n_test=0)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(manifest), "--out", str(out), "--model",
                              "test_efficientnet", "--no-pretrained", "--epochs", "1",
                              "--image-size", "64", "--batch-size", "4", "--workers", "0",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    listed = res.output.split("wrote ", 1)[1].splitlines()[1:]
    assert [Path(line.strip()).name for line in listed] == [
        "best.pt", "last.pt", "history.csv", "curves.png", "config.yaml", "done"]
    assert all(Path(line.strip()).is_file() for line in listed)
