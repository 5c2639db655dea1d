"""``histoclass split`` and ``histoclass audit`` end to end."""

from typer.testing import CliRunner

from histoclass.cli import app

runner = CliRunner()


def test_split_then_audit_clean(official_tree, tmp_path):
    out = tmp_path / "m"
    res = runner.invoke(app, ["split", str(official_tree), "--out", str(out), "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "SOB_B_A-14-22549AB-40-009.png: corrupt or truncated" in res.output
    assert "duplicate images:" in res.output
    assert "patients" in res.output and "400X" in res.output
    assert (out / "manifest.skipped.csv").read_text().count("\n") == 2
    res = runner.invoke(app, ["audit", str(out / "manifest.csv")])
    assert res.exit_code == 0 and res.output.startswith("clean: ")


def test_paper_manifest_fails_audit_naming_patients(class_folder_tree, tmp_path):
    res = runner.invoke(app, ["split", str(class_folder_tree), "--out", str(tmp_path),
                              "--protocol", "paper"])
    assert res.exit_code == 0 and "patients leak between splits" in res.output
    res = runner.invoke(app, ["audit", str(tmp_path / "manifest.csv")])
    assert res.exit_code == 1
    assert "patient(s) in several splits: " in res.output and "14-" in res.output


def test_kfold_manifest_passes_audit(class_folder_tree, tmp_path):
    res = runner.invoke(app, ["split", str(class_folder_tree), "--out", str(tmp_path),
                              "--protocol", "kfold", "--folds", "3"])
    assert res.exit_code == 0, res.output
    assert "fold2:" in res.output
    res = runner.invoke(app, ["audit", str(tmp_path / "manifest.csv")])
    assert res.exit_code == 0, res.output


def test_errors_are_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["split", str(tmp_path / "empty"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "error: " in res.output and "no images found" in res.output
    res = runner.invoke(app, ["split", "sample", "--out", str(tmp_path), "--protocol", "x"])
    assert res.exit_code == 2 and "unknown protocol 'x'; choose one of patient, paper, kfold" \
        in res.output
    res = runner.invoke(app, ["audit", str(tmp_path / "none.csv")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_bundled_sample_splits_by_group(tmp_path):
    res = runner.invoke(app, ["split", "sample", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "46 images kept, 0 skipped" in res.output
    assert runner.invoke(app, ["audit", str(tmp_path / "manifest.csv")]).exit_code == 0
