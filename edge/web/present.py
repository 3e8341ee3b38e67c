"""What the page and the JSON API show about one instance (one shape for both)."""
from __future__ import annotations

from typing import Any

from flask import url_for

from edge.journal import DeliveryRow, InstanceRow
from edge.metrics import skip_reason_category
from edge.patient import display_name

from .images import image_version

# Worst first: the one word for an instance's results (same order as Journal.delivery_summary).
_DELIVERY_PRIORITY = ("gave_up", "retrying", "pending", "sent")


def delivery_word(states: set[str]) -> str:
    """none, pending, retrying, sent or gave_up for a set of delivery row states."""
    for state in _DELIVERY_PRIORITY:
        if state in states:
            return state
    return "none"


def tb_result(row: InstanceRow) -> str:
    """The flag on the card: refer, no_signs, no_tb_result, skipped, failed, analyzing, received.

    "refer" when the TB screen is positive or any other finding refers (``Findings.refer``);
    ``refer_reasons`` says which.
    """
    if row.state != "analyzed":
        return row.state
    findings = row.findings or {}
    if refer_reasons(findings):
        return "refer"
    return "no_signs" if findings.get("tb") else "no_tb_result"


def refer_reasons(findings: dict[str, Any]) -> list[str]:
    """What raises the refer flag of stored findings, as ``Findings.refer_reasons`` says it:
    "Tuberculosis" first when the TB screen is positive, then the display name of each
    referring other finding (the journal keeps ``Findings.to_dict()``, without ``refer``)."""
    tb = findings.get("tb") or {}
    reasons = ["Tuberculosis"] if tb.get("positive") else []
    for other in findings.get("others") or []:
        display = other.get("display") or other.get("label") or "?"
        if other.get("refer") and display not in reasons:
            reasons.append(display)
    return reasons


def other_findings(findings: dict[str, Any]) -> list[dict[str, Any]]:
    """The findings beyond TB and nodules, as the board lists them: positive ones first."""
    out = []
    for other in findings.get("others") or []:
        out.append({key: other.get(key) for key in
                    ("label", "display", "kind", "score", "threshold", "positive", "refer",
                     "diameter_mm", "diameter_px")})
        out[-1]["display"] = out[-1]["display"] or out[-1]["label"] or "?"
    return sorted(out, key=lambda o: (not o["positive"], not o["refer"]))


def instance_view(row: InstanceRow, deliveries: list[DeliveryRow], *, full: bool = False) -> dict[str, Any]:
    """The instance as the page and /api/instances show it (``full`` adds findings in detail)."""
    findings = row.findings or {}
    tb = findings.get("tb") or None
    analyzed = row.state == "analyzed"
    reasons = refer_reasons(findings) if analyzed else []
    history = deliveries
    deliveries = [d for d in deliveries if d.current]   # objects of the latest analysis
    per_dest: dict[str, set[str]] = {}
    for d in deliveries:
        per_dest.setdefault(d.destination, set()).add(d.state)
    sent_times = [d.sent_at for d in deliveries if d.sent_at]
    delivered_all = bool(deliveries) and all(d.state == "sent" for d in deliveries)
    version = image_version(row)
    view: dict[str, Any] = {
        "sop_instance_uid": row.sop_instance_uid,
        "study_instance_uid": row.study_instance_uid,
        "patient_name": display_name(row.patient_name),
        "patient_id": row.patient_id,
        "modality": row.modality,
        "calling_ae": row.calling_ae,
        "state": row.state,
        "reason": row.reason,
        "reason_category": skip_reason_category(row.reason) if row.state == "skipped" else None,
        "result": tb_result(row),
        "tb_score": tb.get("score") if tb else None,
        "tb_threshold": tb.get("threshold") if tb else None,
        "nodule_count": len(findings.get("nodules", [])) if analyzed else None,
        "refer": bool(reasons),
        "tb_positive": bool(analyzed and tb and tb.get("positive")),
        "refer_reasons": reasons,
        "other_findings": other_findings(findings) if analyzed else [],
        "demonstration": analyzed and any(not m.get("clinical_use", False) for m in findings.get("models", [])),
        "received_at": row.received_at,
        "analyzed_at": row.analyzed_at,
        "timings_ms": row.timings,
        "conflicts": row.conflicts,
        "delivery": delivery_word({d.state for d in deliveries}),
        # router mode: the image itself, forwarded (none when it is not routed)
        "forwarding": delivery_word({d.state for d in deliveries if d.is_source}),
        "delivery_by_destination": {dest: delivery_word(states) for dest, states in sorted(per_dest.items())},
        "end_to_end_s": (max(sent_times) - row.received_at) if delivered_all and sent_times else None,
        "thumbnail_url": url_for("pages.image", uid=row.sop_instance_uid, kind="thumb", v=version),
        "image_url": url_for("pages.image", uid=row.sop_instance_uid, kind="full", v=version),
        "detail_url": url_for("pages.instance", uid=row.sop_instance_uid),
    }
    if full:
        view["findings"] = row.findings
        view["deliveries"] = [d.to_dict() for d in deliveries]
        view["replaced_deliveries"] = [d.to_dict() for d in history if not d.current]
    return view
