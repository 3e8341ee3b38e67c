"""The technician's pages: the live board, an instance's detail, images, and actions."""
from __future__ import annotations

import logging
import time

from flask import (Blueprint, abort, current_app, flash, g, make_response, redirect, render_template,
                   request, send_file, url_for)

from .auth import check_csrf, login_required
from .i18n import COOKIE, LANGUAGES, STRINGS, reason_text
from .images import ImageUnavailable
from .present import display_name, instance_view

logger = logging.getLogger(__name__)

bp = Blueprint("pages", __name__)


def _state():
    return current_app.extensions["edge"]


@bp.route("/")
@login_required
def index():
    return render_template("index.html", strings=STRINGS[g.lang])


@bp.route("/instances/<uid>")
@login_required
def instance(uid: str):
    journal = _state().journal
    row = journal.find_instance(uid)
    if row is None:
        abort(404, description=g.t("not_found"))
    view = instance_view(row, journal.deliveries_for(uid), full=True)
    reason = reason_text(g.t, row.reason) if row.state == "skipped" else (row.reason or "")
    return render_template("instance.html", view=view, reason=reason,
                           received=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.received_at)))


@bp.route("/image/<uid>/<kind>.jpg")
@login_required
def image(uid: str, kind: str):
    row = _state().journal.find_instance(uid)
    if row is None or kind not in ("thumb", "full"):
        abort(404)
    try:
        path = _state().images.path_for(row, kind)
    except ImageUnavailable as exc:
        logger.info("no image for an instance: %s", exc)
        abort(404, description=str(exc))
    response = send_file(path, mimetype="image/jpeg", conditional=True, max_age=0)
    # URLs carry a version (?v=) that changes with the findings, so browsers may keep them.
    response.headers["Cache-Control"] = "private, max-age=86400" if request.args.get("v") else "private, no-cache"
    return response


@bp.route("/instances/<uid>/resend", methods=["POST"])
@login_required
def resend(uid: str):
    check_csrf()
    outcome = resend_or_requeue(uid)
    if outcome["ok"]:
        _state().wake()
    _flash_outcome(outcome)
    return redirect(url_for("pages.instance", uid=uid))


@bp.route("/deliveries/<int:delivery_id>/retry", methods=["POST"])
@login_required
def retry(delivery_id: int):
    check_csrf()
    journal = _state().journal
    delivery = journal.get_delivery(delivery_id)
    if delivery is None:
        abort(404)
    ok = journal.retry_delivery(delivery_id)
    if ok:
        _state().wake()
    flash(g.t("retried") if ok else g.t("nothing_done"), "info" if ok else "error")
    logger.info("technician asked to retry delivery %d (%s)", delivery_id, "done" if ok else "not possible")
    return redirect(url_for("pages.instance", uid=delivery.sop_instance_uid))


@bp.route("/lang/<code>")
def set_language(code: str):
    """The language switch: remembered in a cookie for a year."""
    if code not in LANGUAGES:
        abort(404)
    target = request.args.get("next", "")
    if not target.startswith("/") or target.startswith("//"):
        target = url_for("pages.index")
    response = make_response(redirect(target))
    response.set_cookie(COOKIE, code, max_age=365 * 24 * 3600, samesite="Lax", httponly=True,
                        secure=request.is_secure)
    return response


def resend_or_requeue(uid: str) -> dict:
    """Resend an instance's results, or analyze it again when it has none to send."""
    journal = _state().journal
    row = journal.find_instance(uid)
    if row is None:
        abort(404, description=g.t("not_found"))
    if journal.deliveries_for(uid):
        n = journal.resend_instance_results(uid)
        logger.info("technician asked to resend %d result object(s) of an instance", n)
        return {"action": "resend", "count": n, "ok": n > 0}
    ok = journal.requeue_instance(uid)
    logger.info("technician asked to analyze an instance again (%s)", "queued" if ok else "still in progress")
    return {"action": "requeue", "count": int(ok), "ok": ok}


def _flash_outcome(outcome: dict) -> None:
    if not outcome["ok"]:
        flash(g.t("nothing_done"), "error")
    elif outcome["action"] == "resend":
        flash(g.t("resent", n=outcome["count"]), "info")
    else:
        flash(g.t("requeued"), "info")


@bp.app_template_filter("person")
def person_filter(value: str) -> str:
    return display_name(value)
