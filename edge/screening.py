"""TB screening programme figures read from the journal: the threshold in force and where it
came from, the people referred in a date range, and daily figures per calling AE.

Days are the box's local calendar days. Everything here is computed on request from the
journal (the single source of truth); the status page, the JSON API and the CSV export show
the same numbers. Patient data stays behind the login: it is never logged here.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .findings import Findings
from .metrics import SKIP_REASONS, skip_reason_category
from .patient import display_name

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config
    from .journal import CalibrationRow, InstanceRow, Journal

logger = logging.getLogger(__name__)

MAX_RANGE_DAYS = 366


def manifest_tb_threshold(models_dir: str | Path) -> float | None:
    """The TB screen's threshold in the installed manifests (None: no TB classifier)."""
    from engines.manifest import load_manifest
    from engines.store import model_folders

    from .findings import TB_CODES

    try:
        folders = model_folders(models_dir)
    except OSError:
        return None
    for folder in folders:
        try:
            manifest = load_manifest(folder)
        except Exception:   # noqa: BLE001 - a broken folder is reported by the service at start
            continue
        if manifest.task != "classification":
            continue
        for spec in manifest.findings:
            if spec.code is not None and (spec.code.scheme, spec.code.value) in TB_CODES:
                return float(spec.threshold)
    return None


@dataclass(frozen=True)
class ThresholdInForce:
    """The TB threshold this process uses, and its provenance."""
    value: float | None
    source: str                          # "calibration" | "config" | "manifest" | "unknown"
    calibration: "CalibrationRow | None" = None    # the applied calibration that set it
    pending: "CalibrationRow | None" = None        # a newer calibration not in force yet

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "source": self.source,
                               "calibration": self.calibration.to_dict() if self.calibration else None,
                               "pending": self.pending.to_dict() if self.pending else None}
        band = self.expected_band()
        out["expected_referral_band"] = band
        return out

    def expected_band(self) -> dict[str, float] | None:
        """The referral rate the calibration expects at this threshold, with its interval."""
        if self.calibration is None:
            return None
        return self.calibration.summary.get("expected_referral_band")


def threshold_in_force(config: "Config", journal: "Journal | None") -> ThresholdInForce:
    """``[models] tb_threshold`` when set, else the TB model manifest's; "calibration" when an
    applied calibration wrote this value into the config. ``pending``: the config file on
    disk now holds another calibration's threshold (applied since start: restart to use it)."""
    calibrations = journal.calibrations(limit=50) if journal is not None else []
    configured = config.models.tb_threshold

    def calibration_of(value: float | None):
        if value is None:
            return None
        return next((c for c in calibrations if math.isclose(c.threshold, value, abs_tol=1e-9)), None)

    on_disk = _threshold_on_disk(config.source)
    pending = None
    if on_disk is not None and (configured is None or not math.isclose(on_disk, configured, abs_tol=1e-9)):
        pending = calibration_of(on_disk)
    if configured is None:
        value = manifest_tb_threshold(config.models_dir)
        return ThresholdInForce(value, "manifest" if value is not None else "unknown", None, pending)
    match = calibration_of(configured)
    return ThresholdInForce(configured, "calibration" if match else "config", match, pending)


def _threshold_on_disk(path: str | None) -> float | None:
    """``[models] tb_threshold`` in the config file as it is now (None: unset or unreadable)."""
    if not path:
        return None
    from .config import tomllib
    try:
        with open(path, "rb") as fh:
            value = tomllib.load(fh).get("models", {}).get("tb_threshold")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ------------------------------------------------------------------ date ranges

def day_range(start: str | None, end: str | None, *, today: date | None = None) -> tuple[date, date]:
    """[first, last] local days from ISO dates (default: today; ``start`` alone: from then until
    today); ValueError naming the field."""
    today = today or date.today()
    try:
        first = date.fromisoformat(start) if start else today
    except ValueError:
        raise ValueError(f"from: expected a date YYYY-MM-DD, got {start!r}") from None
    try:
        last = date.fromisoformat(end) if end else max(first, today)
    except ValueError:
        raise ValueError(f"to: expected a date YYYY-MM-DD, got {end!r}") from None
    if last < first:
        raise ValueError(f"to: {last} is before from: {first}")
    if (last - first).days >= MAX_RANGE_DAYS:
        raise ValueError(f"from/to: at most {MAX_RANGE_DAYS} days at a time")
    return first, last


def _epoch(day: date) -> float:
    return time.mktime(datetime(day.year, day.month, day.day).timetuple())


def _rows(journal: "Journal", first: date, last: date, states=()) -> list["InstanceRow"]:
    return journal.instances_between(_epoch(first), _epoch(last + timedelta(days=1)), states=states)


# ------------------------------------------------------------------ referrals

def _refer_reasons(findings: dict[str, Any]) -> list[str]:
    """What raised the refer flag of stored findings (``Findings.refer_reasons``)."""
    if not findings:
        return []
    return Findings.from_dict(findings).refer_reasons()


def referrals(journal: "Journal", first: date, last: date) -> list[dict[str, Any]]:
    """People referred (``Findings.refer``) among images received on these days, oldest first."""
    out = []
    for row in _rows(journal, first, last, states=("analyzed",)):
        findings = row.findings or {}
        reasons = _refer_reasons(findings)
        if not reasons:
            continue
        tb = findings.get("tb") or {}
        out.append({
            "sop_instance_uid": row.sop_instance_uid,
            "patient_id": row.patient_id,
            "patient_name": display_name(row.patient_name),
            "received_at": row.received_at,
            "time": time.strftime("%Y-%m-%d %H:%M", time.localtime(row.received_at)),
            "calling_ae": row.calling_ae,
            "tb_score": tb.get("score"),
            "tb_threshold": tb.get("threshold"),
            "tb_positive": bool(tb.get("positive")),
            "reasons": reasons,
            "nodules": len(findings.get("nodules") or []),
        })
    return out


# ------------------------------------------------------------------ daily figures

def _empty() -> dict[str, Any]:
    return {"received": 0, "analyzed": 0, "failed": 0, "waiting": 0, "skipped": 0,
            "skipped_by_reason": {}, "referred": 0, "referral_rate": None, "nodules_flagged": 0,
            "tb_positive": 0}


def _add(total: dict[str, Any], row: "InstanceRow") -> None:
    total["received"] += 1
    if row.state == "analyzed":
        total["analyzed"] += 1
        findings = row.findings or {}
        if _refer_reasons(findings):
            total["referred"] += 1
        if (findings.get("tb") or {}).get("positive"):
            total["tb_positive"] += 1
        if findings.get("nodules"):
            total["nodules_flagged"] += 1
    elif row.state == "skipped":
        total["skipped"] += 1
        category = skip_reason_category(row.reason)
        total["skipped_by_reason"][category] = total["skipped_by_reason"].get(category, 0) + 1
    elif row.state == "failed":
        total["failed"] += 1
    else:
        total["waiting"] += 1


def _finish(total: dict[str, Any]) -> dict[str, Any]:
    total["referral_rate"] = total["referred"] / total["analyzed"] if total["analyzed"] else None
    total["skipped_by_reason"] = {r: total["skipped_by_reason"][r] for r in SKIP_REASONS
                                  if r in total["skipped_by_reason"]}
    return total


def daily_figures(journal: "Journal", first: date, last: date) -> dict[str, Any]:
    """Images received, analysed, skipped by reason, failed, referred (count and rate among
    analysed), nodules flagged: per day, per calling AE (room or van), per day and AE, and
    for the whole range (a campaign)."""
    days: dict[str, dict] = {}
    aes: dict[str, dict] = {}
    cells: dict[tuple[str, str], dict] = {}
    total = _empty()
    for row in _rows(journal, first, last):
        day = time.strftime("%Y-%m-%d", time.localtime(row.received_at))
        ae = row.calling_ae or "?"
        for bucket in (days.setdefault(day, _empty()), aes.setdefault(ae, _empty()),
                       cells.setdefault((day, ae), _empty()), total):
            _add(bucket, row)
    return {
        "from": first.isoformat(), "to": last.isoformat(),
        "total": _finish(total),
        "by_day": [{"day": d, **_finish(v)} for d, v in sorted(days.items())],
        "by_calling_ae": [{"calling_ae": a, **_finish(v)} for a, v in sorted(aes.items())],
        "by_day_and_calling_ae": [{"day": d, "calling_ae": a, **_finish(v)}
                                  for (d, a), v in sorted(cells.items())],
    }
