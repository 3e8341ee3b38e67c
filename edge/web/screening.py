"""The TB screening programme's pages (login required): people referred in a date range, its
CSV export, a printable referral slip per person (English or Vietnamese), the daily figures
per room or van, and the TB threshold in force with where it came from; the same as JSON.

Everything is read from the journal (``edge.screening``). The threshold in force is fixed
for the life of the process (the config is read at start), so it is worked out once, when
the app is built, and exported as metrics (``Metrics.set_tb_screen``) for the drift alert.
"""
from __future__ import annotations

import csv
import io
import logging
import time
from datetime import date
from typing import Any

from flask import Blueprint, Response, abort, current_app, g, jsonify, render_template, request

from edge.screening import daily_figures, day_range, referrals, threshold_in_force

from .auth import login_required
from .i18n import LANGUAGES, translator

logger = logging.getLogger(__name__)

bp = Blueprint("screening", __name__)
CSV_COLUMNS = ("time", "patient_id", "patient_name", "accession_number", "study_date", "tb_score",
               "tb_threshold", "reasons", "calling_ae", "result")


@bp.record_once
def _setup(state) -> None:
    """Work out the threshold in force once, and export it (see the module docstring)."""
    app = state.app
    edge = app.extensions["edge"]
    info = threshold_in_force(edge.config, edge.journal)
    app.extensions["screening"] = {"threshold": info}
    edge.metrics.set_tb_screen(info.value, calibrated=info.source == "calibration",
                               expected=info.expected_band())


def _state():
    return current_app.extensions["edge"]


def _threshold():
    return current_app.extensions["screening"]["threshold"]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def threshold_text(t, info) -> dict[str, Any]:
    """The threshold in force as the page says it: value, where it came from, what to expect."""
    value = "–" if info.value is None else f"{info.value:.2f}"
    if info.source == "calibration":
        c = info.calibration
        rule = t(f"rule_{c.rule}", value=_pct(c.rule_value))
        source = t("source_calibration", date=time.strftime("%Y-%m-%d", time.localtime(c.applied_at)),
                   people=c.people, positives=c.positives, rule=rule)
    else:
        source = t(f"source_{info.source}")
    band = info.expected_band()
    expected = (t("expected_rate", rate=_pct(band.get("rate")), lower=_pct(band.get("lower")),
                  upper=_pct(band.get("upper"))) if band else "")
    pending = ""
    if info.pending is not None:
        pending = t("pending_calibration", threshold=f"{info.pending.threshold:.2f}",
                    date=time.strftime("%Y-%m-%d", time.localtime(info.pending.applied_at)))
    return {"value": value, "source": source, "expected": expected, "pending": pending}


@bp.app_context_processor
def _globals() -> dict[str, Any]:
    """``tb_threshold()`` for the status page's templates."""
    def tb_threshold() -> dict[str, Any]:
        return threshold_text(g.t, _threshold())
    return {"tb_threshold": tb_threshold}


def _range() -> tuple[date, date]:
    return day_range(request.args.get("from") or None, request.args.get("to") or None)


def _keys(rows: list[dict]) -> None:
    """Accession number and study date of each referred image, from its stored header (for the
    CSV: filled in with the confirmatory results, it is an outcomes file for ``edge calibrate``)."""
    from pydicom import dcmread

    storage = _state().config.storage_dir
    journal = _state().journal
    for r in rows:
        r["accession_number"], r["study_date"] = "", ""
        row = journal.find_instance(r["sop_instance_uid"])
        try:
            ds = dcmread(storage / row.path, stop_before_pixels=True,
                         specific_tags=["AccessionNumber", "StudyDate"])
            r["accession_number"] = str(ds.get("AccessionNumber", "") or "")
            d = str(ds.get("StudyDate", "") or "")
            r["study_date"] = f"{d[:4]}-{d[4:6]}-{d[6:]}" if len(d) == 8 else ""
        except Exception:   # noqa: BLE001 - file gone or unreadable: the columns stay empty
            pass


@bp.route("/referrals")
@login_required
def referral_list():
    error = None
    try:
        first, last = _range()
    except ValueError as exc:
        error, (first, last) = g.t("bad_range", error=exc), day_range(None, None)
    people = referrals(_state().journal, first, last)
    return render_template("referrals.html", people=people, first=first.isoformat(), last=last.isoformat(),
                           error=error, today=date.today().isoformat())


def _cell(text: str) -> str:
    """Free text a spreadsheet must not run as a formula (a name from the modality: "=...")."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@bp.route("/referrals.csv")
@login_required
def referral_csv():
    try:
        first, last = _range()
    except ValueError as exc:
        abort(400, description=str(exc))
    people = referrals(_state().journal, first, last)
    _keys(people)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for p in people:
        writer.writerow([p["time"], p["patient_id"], _cell(p["patient_name"]), p["accession_number"],
                         p["study_date"], "" if p["tb_score"] is None else f"{p['tb_score']:.4f}",
                         "" if p["tb_threshold"] is None else f"{p['tb_threshold']:.4f}",
                         _cell("; ".join(p["reasons"])), _cell(p["calling_ae"]), ""])
    name = f"referrals-{first.isoformat()}" + ("" if last == first else f"-to-{last.isoformat()}") + ".csv"
    logger.info("referral list exported (%d rows)", len(people))   # counts only: no patient data
    # UTF-8 with a byte order mark: spreadsheet programs then show Vietnamese names correctly
    return Response("\ufeff" + buf.getvalue(), mimetype="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@bp.route("/referrals/<uid>/slip")
@login_required
def slip(uid: str):
    lang = request.args.get("lang", g.lang)
    if lang not in LANGUAGES:
        abort(404)
    journal = _state().journal
    row = journal.find_instance(uid)
    if row is None or row.state != "analyzed":
        abort(404, description=g.t("not_found"))
    day = date.fromtimestamp(row.received_at)
    person = next((p for p in referrals(journal, day, day) if p["sop_instance_uid"] == uid), None)
    if person is None:
        abort(404, description=g.t("not_found"))
    t = translator(lang)
    identity = _state().config.identity
    facility = " · ".join(x for x in (identity.institution_name, identity.station_name, person["calling_ae"]) if x)
    demonstration = any(not m.get("clinical_use", False) for m in (row.findings or {}).get("models", []))
    return render_template("slip.html", p=person, t=t, lang=lang, facility=facility,
                           demonstration=demonstration, printed=time.strftime("%Y-%m-%d"))


@bp.route("/figures")
@login_required
def figures():
    error = None
    try:
        first, last = _range()
    except ValueError as exc:
        error, (first, last) = g.t("bad_range", error=exc), day_range(None, None)
    data = daily_figures(_state().journal, first, last)
    return render_template("figures.html", data=data, first=first.isoformat(), last=last.isoformat(),
                           error=error, drift=_drift(data), pct=_pct)


def _drift(data: dict[str, Any]) -> dict[str, str] | None:
    """The period's TB-positive rate when it lies outside the calibration's expected band."""
    band = _threshold().expected_band()
    total = data["total"]
    if not band or not total["analyzed"]:
        return None
    rate = total["tb_positive"] / total["analyzed"]
    if band["lower"] <= rate <= band["upper"]:
        return None
    return {"rate": _pct(rate), "lower": _pct(band["lower"]), "upper": _pct(band["upper"])}


# ---------------------------------------------------------------------- JSON API

def _api_range():
    try:
        return _range(), None
    except ValueError as exc:
        response = jsonify({"error": str(exc)})
        response.status_code = 400
        return None, response


@bp.route("/api/referrals")
@login_required
def api_referrals():
    span, error = _api_range()
    if error is not None:
        return error
    people = referrals(_state().journal, *span)
    return jsonify({"from": span[0].isoformat(), "to": span[1].isoformat(), "referrals": people})


@bp.route("/api/figures")
@login_required
def api_figures():
    span, error = _api_range()
    if error is not None:
        return error
    return jsonify(daily_figures(_state().journal, *span))


@bp.route("/api/threshold")
@login_required
def api_threshold():
    return jsonify(_threshold().to_dict())
