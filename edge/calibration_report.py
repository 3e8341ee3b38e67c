"""``edge calibrate OUTCOMES.csv``: the calibration run, its report (JSON, and HTML with an ROC
plot) and, with ``--apply``, the new threshold in the config with an audit entry.

The ROC plot is inline SVG written here: a few dozen lines, no plotting library on the box,
and the report stays one self-contained file that any browser opens and prints. The report
holds counts and rates only, never a person's data.

``--apply`` writes the audit entry (journal table ``calibrations``: when, the outcomes file's
SHA-256, counts, rule, result) and then the config file (``[models] tb_threshold``, edited in
place, see ``edge.config_edit``). The running service uses the new threshold after a restart;
results already sent keep the threshold they were made with (each result records it, and
images are not analysed again because the threshold changed).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .calibration import CalibrationError, join_outcomes, read_outcomes, scored_images
from .calibration_stats import (BOOTSTRAP_REPLICATES, METRICS, MIN_PER_CLASS, TABLE_THRESHOLDS,
                                WHO_SENSITIVITY, WHO_SPECIFICITY, auc, bootstrap, choose_threshold,
                                operating_point, roc_points, who_range)

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config

logger = logging.getLogger(__name__)

RULE_NAMES = {"target_sensitivity": "target sensitivity", "max_referral_rate": "maximum referral rate"}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_calibration(config: "Config", outcomes_path: str | Path, *, rule: str, value: float,
                    replicates: int = BOOTSTRAP_REPLICATES) -> dict[str, Any]:
    """The calibration report as a dict (what the JSON report holds); raises CalibrationError."""
    from .journal import Journal
    from .screening import threshold_in_force

    outcomes, digest = read_outcomes(outcomes_path)
    if not config.journal_path.exists():
        raise CalibrationError(f"no journal at {config.journal_path}: no images have been analysed "
                               "with this configuration (check --config)")
    journal = Journal(config.journal_path)
    try:
        by_id_only = not any(o.accession for o in outcomes)
        images = scored_images(journal, config.storage_dir,
                               patient_ids={o.patient_id for o in outcomes} if by_id_only else None)
        pairs = join_outcomes(outcomes, images)
        in_force = threshold_in_force(config, journal)
    finally:
        journal.close()
    scores = np.array([image.score for _, image in pairs], float)
    positive = np.array([o.positive for o, _ in pairs], bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos < MIN_PER_CLASS or n_neg < MIN_PER_CLASS:
        raise CalibrationError(
            f"too few people for an interval: {n_pos} positive and {n_neg} negative; at least "
            f"{MIN_PER_CLASS} of each are needed (WHO suggests a few hundred people with a "
            "confirmatory test, including enough positives)")
    try:
        threshold = choose_threshold(scores, positive, rule, value)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
    thresholds = sorted({*TABLE_THRESHOLDS, threshold}
                        | ({in_force.value} if in_force.value is not None else set()))
    boot = bootstrap(scores, positive, thresholds, replicates=replicates, seed=int(digest[:8], 16))
    points = roc_points(scores, positive)
    who = who_range(points)
    table = []
    for t, intervals in zip(thresholds, boot["at"]):
        point = operating_point(scores, positive, t)
        entry: dict[str, Any] = {"threshold": t, "referred": point["referred"],
                                 "true_positives": point["true_positives"]}
        for m in METRICS:
            lo, hi = intervals[m]
            entry[m] = {"value": _finite(point[m]), "lo": _finite(lo), "hi": _finite(hi)}
        entry["who_target"] = (point["sensitivity"] >= WHO_SENSITIVITY
                               and point["specificity"] >= WHO_SPECIFICITY)
        entry["chosen"] = t == threshold
        entry["in_force"] = in_force.value is not None and t == in_force.value
        table.append(entry)
    chosen = next(e for e in table if e["chosen"])
    auc_lo, auc_hi = boot["auc"]
    return {
        "created_at": time.time(),
        "data": {"name": Path(outcomes_path).name, "sha256": digest, "people": len(pairs),
                 "positives": n_pos, "negatives": n_neg, "prevalence": n_pos / len(pairs),
                 "matched_by_accession": sum(1 for o, _ in pairs if o.accession),
                 "calling_aes": sorted({i.calling_ae for _, i in pairs})},
        "auc": {"value": auc(scores, positive), "lo": auc_lo, "hi": auc_hi},
        "bootstrap": {"replicates": boot["replicates"], "used": boot["used"],
                      "method": "95% percentile intervals; people resampled with replacement"},
        "rule": {"name": rule, "value": value},
        "threshold": threshold,
        "threshold_in_force": {"value": in_force.value, "source": in_force.source},
        "operating_point": chosen,
        "expected_referral_band": {"rate": chosen["referral_rate"]["value"],
                                   "lower": chosen["referral_rate"]["lo"],
                                   "upper": chosen["referral_rate"]["hi"]},
        "who_target": {"sensitivity": WHO_SENSITIVITY, "specificity": WHO_SPECIFICITY,
                       "reachable": who is not None, "thresholds": list(who) if who else None},
        "table": table,
        "roc": [[fpr, tpr] for _, fpr, tpr in points],
    }


def roc_svg(report: dict[str, Any], size: int = 360) -> str:
    """The ROC curve as inline SVG: the curve, the chance line, the WHO target corner and
    the chosen operating point."""
    pad = 40
    inner = size - 2 * pad

    def xy(fpr: float, tpr: float) -> str:
        return f"{pad + fpr * inner:.1f},{pad + (1 - tpr) * inner:.1f}"

    curve = " ".join(xy(f, t) for f, t in report["roc"] + [[1.0, 1.0]])
    op = report["operating_point"]
    ticks = []
    for v in (0, 0.2, 0.4, 0.6, 0.8, 1.0):
        x, y = pad + v * inner, pad + (1 - v) * inner
        ticks.append(f'<line x1="{x:.1f}" y1="{pad}" x2="{x:.1f}" y2="{pad + inner}" class="grid"/>'
                     f'<line x1="{pad}" y1="{y:.1f}" x2="{pad + inner}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{x:.1f}" y="{pad + inner + 16}" text-anchor="middle">{v:.1f}</text>'
                     f'<text x="{pad - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    who_x = pad + (1 - WHO_SPECIFICITY) * inner
    who_h = (1 - WHO_SENSITIVITY) * inner
    point = xy(1 - op["specificity"]["value"], op["sensitivity"]["value"]).split(",")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {size}" width="{size}" '
        f'height="{size}" role="img" aria-label="ROC curve" id="roc">'
        '<style>.grid{stroke:#ddd}text{font:11px sans-serif;fill:#444}</style>'
        f'<rect x="{pad}" y="{pad}" width="{who_x - pad:.1f}" height="{who_h:.1f}" fill="#c8e6c9">'
        '<title>WHO target: sensitivity &gt;= 90% with specificity &gt;= 70%</title></rect>'
        + "".join(ticks) +
        f'<line x1="{pad}" y1="{pad + inner}" x2="{pad + inner}" y2="{pad}" stroke="#999" stroke-dasharray="4 4"/>'
        f'<polyline points="{curve}" fill="none" stroke="#0d47a1" stroke-width="2" id="roc-curve"/>'
        f'<circle cx="{point[0]}" cy="{point[1]}" r="5" fill="#c62828" id="roc-chosen">'
        f'<title>chosen threshold {report["threshold"]:.4f}</title></circle>'
        f'<text x="{pad + inner / 2}" y="{size - 4}" text-anchor="middle">1 - specificity</text>'
        f'<text x="12" y="{pad + inner / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {pad + inner / 2})">sensitivity</text></svg>')


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from markupsafe import Markup

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "web" / "templates"),
                      autoescape=select_autoescape(["html"]))
    return env.get_template("calibration_report.html").render(
        r=report, svg=Markup(roc_svg(report)), rule_names=RULE_NAMES,
        created=time.strftime("%Y-%m-%d %H:%M", time.localtime(report["created_at"])))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def summary_lines(report: dict[str, Any]) -> list[str]:
    d, a, op = report["data"], report["auc"], report["operating_point"]
    rule = report["rule"]
    who = report["who_target"]
    lines = [
        f"{d['people']} people ({d['positives']} positive, {d['negatives']} negative) from {d['name']}",
        f"ROC AUC {a['value']:.3f} (95% CI {a['lo']:.3f}-{a['hi']:.3f}, {report['bootstrap']['used']} bootstrap replicates)",
        f"rule: {RULE_NAMES[rule['name']]} {_pct(rule['value'])} -> threshold {report['threshold']:.4f}",
    ]
    for m, label in (("sensitivity", "sensitivity"), ("specificity", "specificity"),
                     ("referral_rate", "referral rate")):
        v = op[m]
        lines.append(f"  {label:15} {_pct(v['value'])} ({_pct(v['lo'])}-{_pct(v['hi'])})")
    t = op["tests_per_case"]
    fmt = lambda x: "–" if x is None else f"{x:.2f}"   # noqa: E731
    lines.append(f"  {'tests per case':15} {fmt(t['value'])} ({fmt(t['lo'])}-{fmt(t['hi'])})")
    if who["reachable"]:
        lo, hi = who["thresholds"]
        lines.append(f"WHO target (sensitivity >= 90% with specificity >= 70%) reached at thresholds {lo:.4f}-{hi:.4f}")
    else:
        lines.append("WHO target (sensitivity >= 90% with specificity >= 70%) not reachable on these data")
    in_force = report["threshold_in_force"]
    if in_force["value"] is not None:
        lines.append(f"threshold in force: {in_force['value']:.4f} ({in_force['source']})")
    return lines


def apply_threshold(config: "Config", report: dict[str, Any]) -> int:
    """Audit entry, then the config file; returns the calibration id. Raises ConfigError."""
    from .config import ConfigError
    from .config_edit import set_table_key, write_config_text
    from .journal import Journal

    if not config.source:
        raise ConfigError("--apply needs the config file the service runs with (--config FILE)")
    path = Path(config.source)
    rule = report["rule"]
    comment = (f"edge calibrate {time.strftime('%Y-%m-%d')}: {RULE_NAMES[rule['name']]} "
               f"{rule['value']:g}, {report['data']['people']} people, sha256 {report['data']['sha256'][:12]}")
    new_text, previous = set_table_key(path.read_text(encoding="utf-8"), "models", "tb_threshold",
                                       report["threshold"], comment)
    journal = Journal(config.journal_path)
    try:
        d = report["data"]
        summary = {k: report[k] for k in ("auc", "operating_point", "expected_referral_band", "who_target",
                                          "bootstrap", "threshold_in_force")}
        calibration_id = journal.record_calibration(
            threshold=report["threshold"], previous_threshold=previous, rule=rule["name"],
            rule_value=rule["value"], data_sha256=d["sha256"], data_name=d["name"], people=d["people"],
            positives=d["positives"], negatives=d["negatives"], config_path=str(path.resolve()),
            summary=summary)
        try:
            write_config_text(path, new_text)
        except OSError:
            journal.forget_calibration(calibration_id)
            raise
    finally:
        journal.close()
    logger.info("TB threshold %s -> %.4f written to %s (calibration %d)", previous, report["threshold"],
                path, calibration_id)
    return calibration_id


def calibrate_main(ns: Any, config: "Config") -> int:
    """The ``edge calibrate`` command."""
    from .config import ConfigError

    if ns.apply and not config.source:
        print("edge calibrate: --apply needs the config file the service runs with: "
              "edge --config /etc/edge/edge.toml calibrate ... --apply. Nothing was changed.", file=sys.stderr)
        return 2
    if ns.max_referral_rate is not None:
        rule, value = "max_referral_rate", ns.max_referral_rate
    else:
        rule, value = "target_sensitivity", ns.target_sensitivity
    try:
        report = run_calibration(config, ns.outcomes, rule=rule, value=value, replicates=ns.bootstrap)
    except CalibrationError as exc:
        print(f"edge calibrate: {exc}", file=sys.stderr)
        return 2
    out = Path(ns.out) if ns.out else config.storage_dir / "calibration"
    out.mkdir(parents=True, exist_ok=True)
    stem = "calibration-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(report["created_at"]))
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out / f"{stem}.html").write_text(render_html(report), encoding="utf-8")
    if ns.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print("\n".join(summary_lines(report)))
        print(f"report: {out / stem}.html (and .json)")
    if not ns.apply:
        if not ns.json:
            print("nothing changed; run again with --apply to write this threshold to the config")
        return 0
    try:
        calibration_id = apply_threshold(config, report)
    except (ConfigError, OSError) as exc:
        print(f"edge calibrate: the threshold was not applied: {exc}", file=sys.stderr)
        return 2
    print(f"applied: [models] tb_threshold = {report['threshold']!r} in {config.source} (audit entry "
          f"{calibration_id}); restart the service to use it (results already sent are not changed)",
          file=sys.stderr if ns.json else sys.stdout)
    return 0
