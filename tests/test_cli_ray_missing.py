"""``--engine ray`` without Ray: one line naming the extra, a non-zero exit, no traceback, on
``histoclass slides`` and ``histoclass predict`` alike (checked before the model is opened)."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from histoclass.cli import app

LINE = "error: --engine ray needs Ray: pip install 'histoclass[ray]'"


@pytest.mark.parametrize("command", ["slides", "predict"])
def test_engine_ray_without_ray_is_one_line(command, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    model = tmp_path / "m.pt"
    model.write_bytes(b"")
    out = tmp_path / ("out" if command == "slides" else "pred.csv")
    result = CliRunner().invoke(app, [command, str(model), str(tmp_path), "--out", str(out),
                                      "--engine", "ray", "--workers", "2"])
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == [LINE]
    assert "Traceback" not in result.output
    assert not out.exists()  # refused before any work
