"""FHIR R4 results for the hospital's electronic medical record (EMR).

Per analysed image, one transaction ``Bundle`` (docs/CONFORMANCE.md, "FHIR"):

- a ``DiagnosticReport`` (status preliminary, category radiology, LOINC 36554-4 "XR Chest
  Single view", the conclusion in the configured language, the study as a logical
  ``imagingStudy`` reference by Study Instance UID, ``result`` -> the observations);
- one ``Observation`` per finding: the TB screen (probability in %, positive/negative
  interpretation, the threshold and the refer decision as components), each nodule or
  other detection (its code, long axis in mm when the pixel spacing is known, certainty,
  the box on the image), each other classification (like TB);
- the ``Device`` (the appliance, its software and model versions) the observations name.

Every resource has a stable business identifier (system ``urn:xray-edge:...``, value from
the source's SOP Instance UID), and every entry is a conditional update
(``PUT Type?identifier=system|value``): sending the same result again, or an amended one,
updates the resources instead of adding new ones. The patient is never created: the
subject is a conditional reference (``Patient?identifier=system|value``) that the server
resolves to exactly one patient or refuses. Hand-written because no FHIR client library
is made for building transaction bundles with conditional references offline; the tests
validate every resource against the R4 models of ``fhir.resources``.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any
from urllib.parse import quote

from .config_outbound import FhirConfig
from .findings import NODULE_KIND_CODES, Findings

__all__ = ["BUNDLE_KIND", "LOINC_CHEST_SINGLE_VIEW", "build_bundle", "patient_identifier"]

BUNDLE_KIND = "fhir"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
LOCAL = "urn:xray-edge:label"          # labels a site's manifest gives no code
LOINC_CHEST_SINGLE_VIEW = ("36554-4", "XR Chest Single view")
SYSTEMS = {"SCT": SNOMED, "DCM": DCM, "LN": LOINC, "UCUM": UCUM}
ID_REPORT = "urn:xray-edge:diagnostic-report"
ID_OBSERVATION = "urn:xray-edge:observation"
ID_DEVICE = "urn:xray-edge:device"

_TEXT = {
    "en": {"refer_tb": "Refer for TB testing.", "no_tb": "No signs of TB.",
           "refer": "Refer: {}.", "nodules": "{} nodule(s) marked.", "none": "No nodules marked.",
           "also": "Also found: {}.", "demo": "Demonstration model, not for diagnosis.",
           "ai": "AI result, to be confirmed by a reader.", "threshold": "Threshold",
           "refer_decision": "Refer", "region": "Image region", "certainty": "Certainty of finding"},
    "vi": {"refer_tb": "Chuyển xét nghiệm lao.", "no_tb": "Không có dấu hiệu lao.",
           "refer": "Chuyển tuyến: {}.", "nodules": "{} nốt được đánh dấu.",
           "none": "Không có nốt được đánh dấu.", "also": "Phát hiện khác: {}.",
           "demo": "Mô hình minh họa, không dùng để chẩn đoán.",
           "ai": "Kết quả AI, cần bác sĩ xác nhận.", "threshold": "Ngưỡng",
           "refer_decision": "Chuyển tuyến", "region": "Vùng trên ảnh",
           "certainty": "Độ tin cậy của phát hiện"},
}


def patient_identifier(source: Any, config: FhirConfig) -> tuple[str, str] | None:
    """(system, value) the EMR knows the patient by: DICOM Patient ID with the system its
    Issuer of Patient ID maps to (``issuer_systems``; an issuer that is itself a URI is
    used as is; an unmapped one gives ``urn:xray-edge:issuer:<issuer>``, which no EMR
    matches, so the delivery fails with the EMR's message instead of naming another
    patient), or ``patient_identifier_system`` without an issuer. None without Patient ID."""
    value = str(source.get("PatientID", "") or "").strip()
    if not value:
        return None
    issuer = str(source.get("IssuerOfPatientID", "") or "").strip()
    if not issuer:
        return config.patient_identifier_system, value
    if issuer in config.issuer_systems:
        return config.issuer_systems[issuer], value
    if issuer.startswith(("urn:", "http://", "https://")):
        return issuer, value
    return f"urn:xray-edge:issuer:{quote(issuer, safe='')}", value


def build_bundle(source: Any, findings: Findings, *, config: FhirConfig, equipment: Any,
                 issued: datetime.datetime) -> tuple[str, bytes]:
    """(bundle id, JSON bytes) of the transaction for one analysed image; the same inputs
    give the same bytes. ``source``: the image's dataset (metadata only is read);
    ``issued``: when the result was made (the journal's time, for repeatable bytes)."""
    sop_uid = str(source.get("SOPInstanceUID", "") or findings.sop_instance_uid)
    study_uid = str(source.get("StudyInstanceUID", "") or "")
    text = _TEXT[config.language]
    patient = patient_identifier(source, config)
    subject = ({"reference": f"Patient?identifier={quote(patient[0], safe=':/')}|{quote(patient[1], safe='')}"}
               if patient else None)
    effective = _effective(source) or _iso(issued)
    demo = any(not m.clinical_use for m in findings.models)
    device_entry, device_ref = _device(equipment, findings)
    entries = [device_entry]
    observations: list[dict[str, Any]] = []

    def observation(key: str, code: dict, **content: Any) -> None:
        body = {"resourceType": "Observation",
                "identifier": [{"system": ID_OBSERVATION, "value": f"{sop_uid}/{key}"}],
                "status": "preliminary",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "imaging", "display": "Imaging"}]}],
                "code": code, "effectiveDateTime": effective, "issued": _iso(issued),
                "device": device_ref}
        if subject:
            body["subject"] = subject
        if demo:
            body["note"] = [{"text": text["demo"]}]
        body.update(content)
        observations.append(body)

    if findings.tb is not None:
        tb = findings.tb
        observation("tb", _concept("SCT", "56717001", "Tuberculosis"),
                    valueQuantity=_percent(tb.score), interpretation=[_interpretation(tb.positive)],
                    method={"text": _method(findings, tb.model)},
                    component=[{"code": {"text": text["threshold"]}, "valueQuantity": _percent(tb.threshold)},
                               {"code": {"text": text["refer_decision"]}, "valueBoolean": bool(tb.positive)}])
    for index, nodule in enumerate(findings.nodules, start=1):
        observation(f"nodule-{index}", _concept(*NODULE_KIND_CODES[nodule.kind]),
                    **_detection(nodule.box, nodule.score, nodule.diameter_mm, sop_uid, text,
                                 _method(findings, nodule.model)))
    for index, other in enumerate(findings.others, start=1):
        code = (_concept(other.code["scheme"], other.code["value"], other.code.get("meaning") or other.display)
                if other.code else {"coding": [{"system": LOCAL, "code": other.label,
                                                "display": other.display}], "text": other.display})
        if other.kind == "detection" and other.box is not None:
            observation(f"other-{index}", code, **_detection(other.box, other.score, other.diameter_mm,
                                                             sop_uid, text, _method(findings, other.model)))
        else:
            observation(f"other-{index}", code, valueQuantity=_percent(other.score),
                        interpretation=[_interpretation(other.positive)],
                        method={"text": _method(findings, other.model)},
                        component=[{"code": {"text": text["threshold"]},
                                    "valueQuantity": _percent(other.threshold)},
                                   {"code": {"text": text["refer_decision"]},
                                    "valueBoolean": bool(other.refer)}])

    for n, body in enumerate(observations):
        entries.append(_entry(body, f"urn:uuid:{_uuid(sop_uid, 'obs', str(n))}"))
    report = {"resourceType": "DiagnosticReport",
              "identifier": [{"system": ID_REPORT, "value": sop_uid}],
              "status": "preliminary",
              "category": [{"coding": [
                  {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                   "display": "Radiology"},
                  {"system": LOINC, "code": "LP29684-5", "display": "Radiology"}]}],
              "code": {"coding": [{"system": LOINC, "code": LOINC_CHEST_SINGLE_VIEW[0],
                                   "display": LOINC_CHEST_SINGLE_VIEW[1]}],
                       "text": LOINC_CHEST_SINGLE_VIEW[1]},
              "effectiveDateTime": effective, "issued": _iso(issued),
              "result": [{"reference": e["fullUrl"]} for e in entries[1:]],
              "conclusion": _conclusion(findings, text)}
    if subject:
        report["subject"] = subject
    if study_uid:
        report["imagingStudy"] = [{"type": "ImagingStudy", "identifier": {
            "system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}}]
    accession = str(source.get("AccessionNumber", "") or "").strip()
    if accession:
        report["identifier"].append({"type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": accession})
    entries.append(_entry(report, f"urn:uuid:{_uuid(sop_uid, 'report')}"))
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    bundle_id = _uuid(sop_uid, "bundle", digest)
    bundle = {"resourceType": "Bundle", "id": bundle_id, "type": "transaction", "entry": entries}
    return bundle_id, json.dumps(bundle, ensure_ascii=False, sort_keys=True, indent=1).encode("utf-8")


def _entry(resource: dict[str, Any], full_url: str) -> dict[str, Any]:
    """A conditional update by the resource's first business identifier."""
    ident = resource["identifier"][0]
    url = (f"{resource['resourceType']}?identifier={quote(ident['system'], safe=':/')}"
           f"|{quote(ident['value'], safe='')}")
    return {"fullUrl": full_url, "resource": resource, "request": {"method": "PUT", "url": url}}


def _device(equipment: Any, findings: Findings) -> tuple[dict[str, Any], dict[str, str]]:
    serial = f"{equipment.manufacturer}/{equipment.model_name}/{equipment.device_serial_number}"
    versions = [{"type": {"text": "software"}, "value": equipment.software_version}]
    versions += [{"type": {"text": m.name}, "value": f"{m.version} ({m.backend})"} for m in findings.models]
    device = {"resourceType": "Device",
              "identifier": [{"system": ID_DEVICE, "value": serial}],
              "status": "active", "manufacturer": equipment.manufacturer,
              "serialNumber": equipment.device_serial_number,
              "deviceName": [{"name": equipment.model_name, "type": "model-name"}],
              "type": {"text": "AI chest X-ray analysis"},
              "version": versions}
    full_url = f"urn:uuid:{_uuid(serial, 'device')}"
    return _entry(device, full_url), {"reference": full_url}


def _detection(box: Any, score: float, diameter_mm: float | None, sop_uid: str,
               text: dict[str, str], method: str) -> dict[str, Any]:
    x1, y1, x2, y2 = (float(v) for v in box)
    content: dict[str, Any] = {
        "interpretation": [_interpretation(True)],
        "bodySite": _concept("SCT", "39607008", "Lung"),
        "method": {"text": method},
        "component": [
            {"code": _concept("DCM", "111012", "Certainty of Finding", text["certainty"]),
             "valueQuantity": _percent(score)},
            {"code": {"text": text["region"]},
             "valueString": f"box {x1:.1f},{y1:.1f} to {x2:.1f},{y2:.1f} px on image {sop_uid}"}]}
    if diameter_mm is not None:
        content["valueQuantity"] = {"value": round(float(diameter_mm), 1), "unit": "mm",
                                    "system": UCUM, "code": "mm"}
    return content


def _conclusion(findings: Findings, text: dict[str, str]) -> str:
    parts = [text["ai"]]
    if findings.tb is not None:
        parts.append(text["refer_tb"] if findings.tb.positive else text["no_tb"])
    others = [r for r in findings.refer_reasons() if r != "Tuberculosis"]
    if others:
        parts.append(text["refer"].format(", ".join(others)))
    parts.append(text["nodules"].format(len(findings.nodules)) if findings.nodules else text["none"])
    also = [o.display for o in findings.others if o.positive and not o.refer]
    if also:
        parts.append(text["also"].format(", ".join(dict.fromkeys(also))))
    if any(not m.clinical_use for m in findings.models):
        parts.append(text["demo"])
    return " ".join(parts)


def _method(findings: Findings, model_name: str) -> str:
    for m in findings.models:
        if m.name == model_name:
            return f"{m.name} {m.version} ({m.backend})"
    return model_name or "AI model"


def _concept(scheme: str, value: str, meaning: str, text: str | None = None) -> dict[str, Any]:
    system = SYSTEMS.get(scheme, f"urn:xray-edge:scheme:{scheme}")
    return {"coding": [{"system": system, "code": value, "display": meaning}], "text": text or meaning}


def _percent(probability: float) -> dict[str, Any]:
    return {"value": round(float(probability) * 100.0, 2), "unit": "%", "system": UCUM, "code": "%"}


def _interpretation(positive: bool) -> dict[str, Any]:
    code, display = ("POS", "Positive") if positive else ("NEG", "Negative")
    return {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": code, "display": display}]}


def _effective(source: Any) -> str | None:
    """The study's date and time (DICOM DA/TM, in the box's time zone, which is the
    modality's), when readable."""
    date = str(source.get("StudyDate", "") or source.get("ContentDate", "") or "").strip()
    if len(date) != 8 or not date.isdigit():
        return None
    time_ = str(source.get("StudyTime", "") or "").strip().split(".")[0]
    try:
        if len(time_) >= 4 and time_[:6].isdigit():
            time_ = (time_ + "00")[:6]
            return _iso(datetime.datetime.strptime(date + time_, "%Y%m%d%H%M%S"))
        datetime.datetime.strptime(date, "%Y%m%d")
    except ValueError:
        return None
    return f"{date[:4]}-{date[4:6]}-{date[6:]}"


def _iso(moment: datetime.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.replace(microsecond=0).isoformat()


def _uuid(*parts: str) -> str:
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-5{digest[13:16]}-a{digest[17:20]}-{digest[20:32]}"
