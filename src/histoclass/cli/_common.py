"""What every command shares: clean help, choices checked before any work, one ``--device``
convention, one-line errors and exit codes, and the list of files written.

Exit codes: 0 done; 1 the command ran and found a leak, or a step failed (nothing could be
predicted, a member failed to train); 2 bad usage or input, refused before any work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

# Choices, spelled out so ``--help`` lists them without importing the library (which is slow);
# tests/test_cli_help.py checks each against the library's own tuple.
Protocol = Literal["patient", "paper", "kfold"]
Split = Literal["train", "val", "test"]
EvalSplit = Literal["test", "val", "train", "all"]
Task = Literal["binary", "subtype"]
Schedule = Literal["constant", "cosine"]
InputMode = Literal["resize", "tiles"]
Balance = Literal["none", "weights", "sampler"]
Select = Literal["balanced_accuracy", "auc", "loss"]
Amp = Literal["auto", "off", "bf16", "fp16"]
Calibrate = Literal["temperature", "none"]
StainMethod = Literal["reinhard", "macenko", "vahadane"]
CamMethod = Literal["gradcam", "gradcam++", "hirescam", "eigencam", "layercam"]
EnsembleMethod = Literal["soft", "weighted", "hard", "stack", "concat"]
Preset = Literal["v1", "v2", "all"]
Backend = Literal["torch", "onnx"]
Engine = Literal["local", "ray"]
# What an error calls a bad value of each (by default the option's name).
NOUNS = {Select: "selection score", Amp: "AMP mode", StainMethod: "stain method",
         CamMethod: "CAM method", EnsembleMethod: "ensemble method"}

DEVICES = "<auto|cpu|cuda|cuda:N|mps>"
EXIT_FAILED, EXIT_USAGE = 1, 2


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print ``error: <message>`` on stderr and exit with ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _choices(param: Any) -> tuple[tuple[str, ...], str | None]:
    """A choice parameter's values and its noun in :data:`NOUNS` (``((), None)`` for others)."""
    desc = getattr(param, "type_descriptor", None)
    if desc is None or not desc.is_choice:
        return (), None
    return tuple(desc.choices or ()), NOUNS.get(desc.annotation)


class _Clean:
    """Help and errors as people read them (a mixin for Typer's command and group classes).

    Usage lines name arguments in capitals (``MODEL [INPUTS]...``, not ``{model}``), flags
    show no value type (``--tta``, not ``--tta <bool>``), and a value outside an option's
    choices is one ``error:`` line naming it and the choices, exit 2, before any work.
    """

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if isinstance(p, TyperOption) and p.is_flag and p.metavar is None:
                p.metavar = ""  # a flag takes no value: show none
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []  # type: ignore[attr-defined]
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                if p.metavar:  # written as it should read
                    pieces.append(p.metavar)
                    continue
                name = (p.name or "").upper()
                name = name if p.required else f"[{name}]"
                pieces.append(name + ("..." if p.nargs != 1 else ""))
        return pieces

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        original = list(args)
        try:
            return super().parse_args(ctx, args)  # type: ignore[misc]
        except typer.BadParameter as exc:
            choices, noun = _choices(exc.param)
            if not choices or type(exc).__name__ == "MissingParameter":
                raise
            parser = self.make_parser(ctx)  # type: ignore[attr-defined]
            raw = parser.parse_args(args=original)[0].get(exc.param.name)
            values = raw if isinstance(raw, list | tuple) else [raw]
            bad = next((v for v in values if v not in choices), raw)
            noun = noun or (exc.param.opts or [exc.param.name])[0].lstrip("-").replace("-", " ")
            fail(f"unknown {noun} {bad!r}; choose one of {', '.join(choices)}")
            raise  # unreachable: fail() exits


class Command(_Clean, TyperCommand):
    """Every histoclass command (see :class:`_Clean`)."""


class Group(_Clean, TyperGroup):
    """The ``histoclass`` group (see :class:`_Clean`)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [*super().collect_usage_pieces(ctx), self.subcommand_metavar]


def choices_of(alias: Any) -> tuple[str, ...]:
    """The values of one of the ``Literal`` choice types above."""
    return get_args(alias)


def _check_device(value: str) -> str:
    from histoclass.models import resolve_device

    try:
        resolve_device(value)
    except ValueError as exc:
        fail(str(exc))
    return value


def device_option(default: str = "auto") -> Any:
    """``--device``, the same on every command, checked by ``histoclass.models.resolve_device``
    before any work."""
    return typer.Option(
        default, "--device", metavar=DEVICES, callback=_check_device,
        help="auto (this process's GPU when there is one, else the CPU), cpu, cuda, cuda:N or "
        "mps.")


def calibrate_option(what: str) -> Any:
    """``--calibrate temperature|none``: ``what`` says on which scores ``T`` is fitted."""
    return typer.Option("temperature", help=f"temperature: fit T on {what} (stored in the "
                        "file, applied at predict time); none: T = 1.")


def refer_options(whose: str) -> tuple[Any, Any]:
    """``--refer-risk`` and ``--refer-delta``: the stated-risk threshold chosen on ``whose``
    validation confidences (:func:`histoclass.calibration.choose_refer_threshold`)."""
    return (typer.Option(None, help=f"Refer images below the lowest val confidence of {whose} "
                         "whose accepted images have error <= this with probability 1 - "
                         "--refer-delta (Clopper-Pearson, Learn then Test)."),
            typer.Option(0.1, help="Allowed probability that --refer-risk's bound is wrong."))


def error_line(exc: BaseException) -> str:
    """The one line a user reads for an expected error; an ``OSError`` (read-only folder,
    full disk, a folder where a file should be) names its path."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename and str(exc.filename) not in exc.strerror else None
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return str(exc)


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Print expected errors as ``error: <message>`` and exit 2, instead of a stack trace."""
    try:
        yield
    except (ValueError, OSError, *kinds) as exc:
        fail(error_line(exc))


def calibration_line(temperature: float, calibration: dict | None, rule: dict | None) -> str:
    """One line on what a model's calibration and ``--refer-risk`` rule are (or why none)."""
    c = calibration or {}
    if c.get("reason"):
        text = f"temperature {temperature:g}: not fitted ({c['reason']})"
    else:
        text = (f"temperature {temperature:.3f} fitted on {c.get('fitted_on', 'val split')}"
                + (f" (ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f})"
                   if c.get("ece_before") is not None and c.get("ece_after") is not None else ""))
    text += "".join(f" [{c[k]}]" for k in ("note", "caution") if c.get(k))
    if rule and rule.get("threshold") is None:
        text += f"; no referral rule: {rule.get('reason')}"
    elif rule:
        text += (f"; refer below confidence {rule['threshold']:.3f} (val error among accepted "
                 f"<= {rule['upper']:.3f} at delta {rule['delta']:g}, coverage "
                 f"{rule['val_coverage']:.2f})")
    return text


def report_written(paths: Iterable[str | Path], what: str = "") -> None:
    """End a command with every file it wrote, one per line."""
    paths = [Path(p) for p in paths]
    typer.echo(f"wrote {len(paths)} file(s){' ' + what if what else ''}:")
    for p in paths:
        typer.echo(f"  {p}")


def report_tree(root: str | Path, skip: tuple[str, ...] = ("cache",)) -> None:
    """End a command that writes a whole tree with every file in it, one line per folder
    (folders named in ``skip``, such as decoded-image caches, are summarised)."""
    root = Path(root)
    folders: dict[Path, list[str]] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not set(rel.parts[:-1]) & set(skip):
            folders.setdefault(rel.parent, []).append(p.name)
    typer.echo(f"wrote {sum(map(len, folders.values()))} file(s) under {root}"
               f" (besides {', '.join(skip)} folders):")
    for folder, names in folders.items():
        typer.echo(f"  {'' if folder == Path('.') else f'{folder.as_posix()}/: '}"
                   f"{', '.join(names)}")


def report_skipped(skipped: Sequence[tuple[str, str]], output: str | Path) -> Path | None:
    """List skipped files on the console and in ``<output stem>.skipped.csv`` (``path,reason``)
    beside the file ``output`` they were left out of; returns that path (``None``: nothing
    skipped)."""
    if not skipped:
        return None
    import pandas as pd

    from histoclass.data.manifest import skip_list_path, write_manifest

    path = write_manifest(pd.DataFrame(list(skipped), columns=["path", "reason"]),
                          skip_list_path(output))
    typer.secho(f"skipped {len(skipped)} file(s) (listed in {path}):", fg=typer.colors.YELLOW)
    for item, reason in skipped:
        typer.echo(f"  {item}: {reason}")
    return path
