"""The report's "Calibration and referral" section, drawn from ``calibration.json``
(:func:`histoclass.selective.summary`): ECE and Brier before and after the model's
temperature, both reliability diagrams, and the risk-coverage curve with the point the
``--refer-risk`` rule chose."""

from __future__ import annotations

import html

from histoclass.evaluate import Evaluation
from histoclass.report.parts import fmt, reliability_figure, risk_coverage_figure, table


def _chosen(c: dict) -> tuple[float, float] | None:
    if c.get("coverage") is None or c.get("selective_error") is None:
        return None
    return c["coverage"], c["selective_error"]


def _rule_text(c: dict) -> str:
    if c.get("referral_rule") is None:
        return ("No image was referred for low confidence: the model carries no --refer-risk "
                "threshold (none was asked, or none could be certified on its validation "
                "split; its file says which). The curve shows what each confidence threshold "
                "would keep.")
    if _chosen(c) is None:
        return "The --refer-risk rule referred every image: no error among kept images."
    ci = c.get("ci95") or {}
    spans = {k: f" [{fmt(ci[k][0])}, {fmt(ci[k][1])}]" if ci.get(k) else ""
             for k in ("coverage", "selective_error")}
    note = f" (95% CIs: {c['ci_note']})" if c.get("ci_note") else " (patient bootstrap 95% CIs)"
    return (f"The --refer-risk rule kept {fmt(c['coverage'])}{spans['coverage']} of the images "
            f"with error {fmt(c['selective_error'])}{spans['selective_error']} among them"
            f"{note}: the red point.")


def calibration_section(ev: Evaluation) -> list[str]:
    """HTML parts of the section (none when there is nothing to evaluate)."""
    c = ev.calibration
    if not c:
        return []
    parts, bins = ["<h2>Calibration and referral</h2>"], c["reliability"]
    if c["calibrated"]:
        rows = [["before the temperature (raw.p_ columns)", fmt(c["ece_before"]),
                 fmt(c["brier_before"])], ["after (p_ columns, as predicted)", fmt(c["ece"]),
                                           fmt(c["brier"])]]
    else:
        parts.append(f"<p><b>{html.escape(c['note'])}</b></p>")
        rows = [["as predicted (p_ columns)", fmt(c["ece"]), fmt(c["brier"])]]
    parts.append(table(["probabilities", f"ECE ({c['bins']} bins)", "Brier"], rows))
    if c.get("before_rows_unknown"):
        parts.append(f"<p>{c['before_rows_unknown']} row(s) have empty raw.p_ cells (a "
                     "probability underflowed under T &lt; 1): left out of the 'before' figures."
                     "</p>")
    parts.append('<div class="figs">')
    if c["calibrated"]:
        parts.append(reliability_figure(bins["before"], c["ece_before"],
                                        "Before the temperature"))
    parts.append(reliability_figure(bins["after"], c["ece"], "After the temperature"
                                    if c["calibrated"] else "Reliability"))
    curve = c["risk_coverage"]
    parts += [risk_coverage_figure(curve, _chosen(c)), "</div>",
              f"<p>{html.escape(_rule_text(c))} AURC {fmt(curve['aurc'])} (an oracle that "
              f"ranks every error last: {fmt(curve['aurc_oracle'])}).</p>"]
    return parts
