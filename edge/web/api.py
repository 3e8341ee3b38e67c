"""JSON API (``/api/...``, login required) and ``/healthz`` (open, for systemd and probes)."""
from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, current_app, jsonify, request

from .auth import check_csrf, login_required
from .pages import resend_or_requeue
from .present import instance_view

logger = logging.getLogger(__name__)

bp = Blueprint("api", __name__)
MAX_LIMIT = 200


def _state():
    return current_app.extensions["edge"]


def _error(status: int, message: str):
    response = jsonify({"error": message})
    response.status_code = status
    return response


@bp.route("/api/status")
@login_required
def status():
    return jsonify(_state().health_snapshot())


@bp.route("/api/instances")
@login_required
def instances():
    raw = request.args.get("limit", "20")
    try:
        limit = int(raw)
    except ValueError:
        return _error(400, f"limit: expected an integer 1-{MAX_LIMIT}, got {raw!r}")
    if not 1 <= limit <= MAX_LIMIT:
        return _error(400, f"limit: expected an integer 1-{MAX_LIMIT}, got {limit}")
    journal = _state().journal
    rows = journal.list_instances(limit=limit)
    items = [instance_view(r, journal.deliveries_for(r.sop_instance_uid)) for r in rows]
    return jsonify({"instances": items, "counts": journal.count_instances_by_state()})


@bp.route("/api/instances/<uid>")
@login_required
def instance(uid: str):
    journal = _state().journal
    row = journal.find_instance(uid)
    if row is None:
        return _error(404, "no instance with this SOP Instance UID in the journal")
    return jsonify(instance_view(row, journal.deliveries_for(uid), full=True))


@bp.route("/api/instances/<uid>/resend", methods=["POST"])
@login_required
def resend(uid: str):
    check_csrf()
    outcome = resend_or_requeue(uid)
    if outcome["ok"]:
        _state().wake()
    return jsonify(outcome), (200 if outcome["ok"] else 409)


@bp.route("/api/deliveries/<int:delivery_id>/retry", methods=["POST"])
@login_required
def retry(delivery_id: int):
    check_csrf()
    journal = _state().journal
    if journal.get_delivery(delivery_id) is None:
        return _error(404, f"no delivery with id {delivery_id}")
    ok = journal.retry_delivery(delivery_id)
    if ok:
        _state().wake()
    return jsonify({"action": "retry", "ok": ok}), (200 if ok else 409)


@bp.route("/healthz")
def healthz():
    """200 when the box does its job, else 503 naming what is wrong.

    Fails on the critical problems of the health snapshot (listener not accepting, a worker
    dead, analysis stalled, journal unreadable) and on a failed journal integrity check;
    other problems (a PACS unreachable, results waiting for disk space) are listed as
    warnings. The same rule decides whether the systemd watchdog is petted.
    """
    state = _state()
    body: dict[str, Any] = {}
    try:
        snap = state.health_snapshot()
    except Exception as exc:   # noqa: BLE001 - the probe must answer whatever broke
        logger.exception("health snapshot failed")
        snap = {"critical": ["health_check_failed"], "problems": [f"health_check_failed: {type(exc).__name__}"]}
    problems = list(snap.get("critical", []))
    try:
        if not state.journal.check_integrity():
            problems.append("journal_integrity")
    except Exception:   # noqa: BLE001
        problems.append("journal_unreadable")
    for key in ("listener_up", "queues", "oldest_pending_delivery_s", "oldest_waiting_analysis_s"):
        if key in snap:
            body[key] = snap[key]
    body["status"] = "ok" if not problems else "unhealthy"
    body["problems"] = problems
    body["warnings"] = [p for p in snap.get("problems", []) if p not in problems]
    body["notices"] = snap.get("notices", [])
    return jsonify(body), (200 if not problems else 503)
