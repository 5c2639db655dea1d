"""The README's shell commands use only options their histoclass command has: a renamed or
dropped option fails here instead of in a reader's terminal."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from histoclass.cli import app

README = Path(__file__).parents[1] / "README.md"


def _options(command: str) -> set[str] | None:
    """Every option name of ``histoclass COMMAND`` (None: no such command)."""
    cmd = typer.main.get_command(app).commands.get(command)
    return None if cmd is None else {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def readme_calls(text: str) -> list[tuple[str, list[str]]]:
    """``(command, --options)`` of every ``histoclass COMMAND`` call in the fenced shell blocks
    (continued lines joined; a ``#`` comment or ``;`` ends a call)."""
    calls, block, lang = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
                continue
            if lang in ("", "bash", "sh"):
                for cmd in "\n".join(block).replace("\\\n", " ").splitlines():
                    for m in re.finditer(r"histoclass ([a-z-]+)([^#;]*)", cmd):
                        calls.append((m.group(1),
                                      re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", m.group(2))))
            block = None
        elif block is not None:
            block.append(line)
    return calls


def test_readme_calls_parse_a_known_example():
    text = ("```python\nx = 1\n```\nprose histoclass slide --nope\n```bash\n"
            "histoclass slides M S --out o \\\n  --engine ray  # --nope\n```\n")
    assert readme_calls(text) == [("slides", ["--out", "--engine"])]


def test_readme_commands_use_real_options():
    calls = readme_calls(README.read_text())
    assert {"slide", "slides", "train"} <= {c for c, _ in calls}  # the examples are still there
    assert not [c for c, _ in calls if _options(c) is None], "README names unknown commands"
    bad = [(c, o) for c, opts in calls for o in opts if o not in _options(c)]
    assert not bad, f"README options that the command does not have: {bad}"
