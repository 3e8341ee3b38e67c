"""Results to the EMR as FHIR R4, and referred images to a reading centre.

- The transaction Bundle: every resource valid against the R4 models of ``fhir.resources``
  (strict), the same result gives the same bytes, the conclusion in Vietnamese keeps its
  diacritics, the patient is a conditional reference by identifier (never created).
- ``post_transaction`` against the local FHIR endpoint (``support.fhir_server``, which
  enforces transaction, conditional update/reference and OperationOutcome semantics):
  an unknown patient or a bad token is refused with the EMR's message and not retried;
  a 503 is retried.
- ``edge serve`` end to end: the EMR down while images arrive, then up: exactly one
  DiagnosticReport per image; ``edge serve`` SIGKILLed while it delivers: still exactly one;
  the status page lists the EMR delivery.
- ``[[forward]]``: a second Orthanc as the reading centre gets a referred image and its
  SR/GSPS/SC exactly once (counted by C-STORE operations), a negative image nothing.
"""
from __future__ import annotations

import datetime
import importlib
import json
import time
from pathlib import Path

import pytest
from pydicom import Dataset

from conftest import EdgeServer, OrthancPACS, require_tool, wait_until
from edge.config_outbound import FhirConfig
from edge.fhir import build_bundle, patient_identifier
from edge.fhir_client import post_transaction
from edge.findings import Findings, ModelInfo, Nodule, Other, TBResult
from edge.reporting.equipment import Equipment

fhir_resources = pytest.importorskip("fhir.resources", reason="the test extra's fhir.resources "
                                     "(R4 models) is not installed (run `make test`)")
from support.fhir_server import FhirServer  # noqa: E402

SYSTEM = "urn:oid:1.2.704.0.1"          # the hospital's patient ID system (example)
RECEIVED = datetime.datetime(2026, 11, 28, 9, 30, 5)


def source(patient_id: str = "BN-0042", issuer: str | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID, ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.10"
    ds.PatientID, ds.AccessionNumber = patient_id, "ACC17"
    ds.StudyDate, ds.StudyTime = "20261128", "092955.123"
    if issuer:
        ds.IssuerOfPatientID = issuer
    return ds


def findings(**kw) -> Findings:
    base = dict(
        sop_instance_uid="1.2.826.0.1.3680043.8.498.11", eligible=True,
        tb=TBResult(0.83, 0.5, True, [10.0, 10.0, 200.0, 300.0], "tb_classifier"),
        nodules=[Nodule([100.0, 120.0, 180.0, 200.0], 0.91, 12.0, 80.0, "nodule_detector")],
        models=[ModelInfo("tb_classifier", "0.1.0", "onnxruntime"),
                ModelInfo("nodule_detector", "0.1.0", "onnxruntime"),
                ModelInfo("cxr_yolo", "2.0", "onnxruntime", clinical_use=True)],
        others=[Other("mass", "Mass", "detection", 0.7, 0.4, True, False,
                      {"value": "4147007", "scheme": "SCT", "meaning": "Mass"}, "cxr_yolo",
                      [300.0, 300.0, 400.0, 420.0], 31.5, 110.0),
                Other("pleural_thickening", "Pleural thickening", "classification", 0.2, 0.5,
                      False, False, None, "cxr_yolo")],
        rows=2000, columns=1800, pixel_spacing_mm=[0.15, 0.15])
    base.update(kw)
    return Findings(**base)


def bundle(config: FhirConfig, f: Findings | None = None, ds: Dataset | None = None) -> dict:
    _, data = build_bundle(ds or source(), f or findings(), config=config, equipment=Equipment(),
                           issued=RECEIVED)
    return json.loads(data)


def check_r4(resource: dict) -> None:
    kind = resource["resourceType"]
    module = importlib.import_module(f"fhir.resources.{kind.lower()}")
    getattr(module, kind)(resource, strict=True)   # raises FHIRValidationError


def test_every_resource_is_valid_r4_and_the_bytes_repeat():
    config = FhirConfig(base_url="http://emr/fhir", patient_identifier_system=SYSTEM, language="vi")
    cases = [findings(), findings(tb=None, nodules=[], others=[]),
             findings(tb=TBResult(0.1, 0.5, False, None, "tb_classifier"), pixel_spacing_mm=None,
                      nodules=[Nodule([1.0, 2.0, 30.0, 40.0], 0.5, None, 33.0, "nodule_detector")])]
    for f in cases:
        b = bundle(config, f)
        check_r4(b)
        for entry in b["entry"]:
            check_r4(entry["resource"])
            assert entry["request"]["method"] == "PUT" and "?identifier=" in entry["request"]["url"]
    b = bundle(config)
    kinds = [e["resource"]["resourceType"] for e in b["entry"]]
    assert kinds == ["Device"] + ["Observation"] * 4 + ["DiagnosticReport"]
    report = b["entry"][-1]["resource"]
    assert report["status"] == "preliminary" and report["code"]["coding"][0]["code"] == "36554-4"
    assert report["subject"] == {"reference": f"Patient?identifier={SYSTEM}|BN-0042"}
    assert report["imagingStudy"][0]["identifier"]["value"] == "urn:oid:1.2.826.0.1.3680043.8.498.10"
    assert "Chuyển xét nghiệm lao" in report["conclusion"] and "Mass" in report["conclusion"]
    assert report["effectiveDateTime"].startswith("2026-11-28T09:29:55")
    tb = b["entry"][1]["resource"]
    assert tb["valueQuantity"] == {"value": 83.0, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}
    assert tb["interpretation"][0]["coding"][0]["code"] == "POS"
    assert [c.get("valueBoolean") for c in tb["component"]] == [None, True]
    nodule = b["entry"][2]["resource"]
    assert nodule["valueQuantity"]["value"] == 12.0 and nodule["bodySite"]["coding"][0]["code"] == "39607008"
    uncoded = b["entry"][4]["resource"]
    assert uncoded["code"]["coding"][0]["system"] == "urn:xray-edge:label"
    assert bundle(config) == b                                        # same result, same bytes
    assert bundle(FhirConfig(base_url="http://emr/fhir"))["entry"][-1]["resource"]["conclusion"] \
        .startswith("AI result")


def test_patient_identifier_by_issuer():
    config = FhirConfig(base_url="http://emr/fhir", patient_identifier_system=SYSTEM,
                        issuer_systems={"BVBN": "urn:oid:1.2.704.9"})
    assert patient_identifier(source(), config) == (SYSTEM, "BN-0042")
    assert patient_identifier(source(issuer="BVBN"), config) == ("urn:oid:1.2.704.9", "BN-0042")
    assert patient_identifier(source(issuer="urn:oid:9.9"), config) == ("urn:oid:9.9", "BN-0042")
    assert patient_identifier(source(issuer="OTHER X"), config)[0] == "urn:xray-edge:issuer:OTHER%20X"
    assert patient_identifier(source(patient_id=""), config) is None
    no_patient = bundle(config, ds=source(patient_id=""))
    assert all("subject" not in e["resource"] for e in no_patient["entry"])


def test_the_emr_refusals_are_shown_and_not_retried_transient_ones_are():
    emr = FhirServer(patients=[(SYSTEM, "BN-0042")], token="s3cret").start()
    try:
        config = FhirConfig(base_url=emr.base_url, patient_identifier_system=SYSTEM, token="s3cret")
        _, data = build_bundle(source(), findings(), config=config, equipment=Equipment(), issued=RECEIVED)
        ok = post_transaction(config, data)
        assert ok.delivered and ok.status == 200
        again = post_transaction(config, data)          # the same result again: updated, not added
        assert again.delivered and len(emr.resources("DiagnosticReport")) == 1
        (report,) = emr.resources("DiagnosticReport")
        assert report["meta"]["versionId"] == "2" and report["subject"]["reference"].startswith("Patient/")
        assert len(emr.resources("Observation")) == 4 and len(emr.resources("Patient")) == 1

        _, unknown = build_bundle(source(patient_id="NOBODY"), findings(), config=config,
                                  equipment=Equipment(), issued=RECEIVED)
        refused = post_transaction(config, unknown)
        assert not refused.delivered and refused.permanent and refused.status == 422
        assert "matches 0 Patient" in refused.message
        wrong = post_transaction(FhirConfig(base_url=emr.base_url, token="nope"), data)
        assert wrong.permanent and wrong.status == 401 and "bearer token" in wrong.message
        emr.fail_next = 1
        busy = post_transaction(config, data)
        assert not busy.delivered and not busy.permanent and busy.status == 503
    finally:
        emr.stop()
    gone = post_transaction(config, data)
    assert not gone.delivered and not gone.permanent and gone.status is None


def _phantoms(tmp_path: Path, seeds, **kw) -> tuple[list[Path], list[Dataset]]:
    from engines.train.phantom import generate_case, write_dicom
    files, datasets = [], []
    for seed in seeds:
        path = tmp_path / f"img{seed}.dcm"
        datasets.append(write_dicom(generate_case(seed, size=1200, **kw), path))
        files.append(path)
    return files, datasets


def _emr_server(tmp_path: Path, emr: FhirServer, **extra) -> EdgeServer:
    token = tmp_path / "fhir-token"
    token.write_text("s3cret\n")
    return EdgeServer(tmp_path, extra={"fhir": {"base_url": emr.base_url, "token_file": str(token),
                                                "patient_identifier_system": SYSTEM},
                                       "delivery": {"initial_backoff_s": 0.5, "max_backoff_s": 2.0},
                                       **extra})


@pytest.mark.slow
def test_emr_down_then_up_and_a_kill_mid_delivery_give_one_report_per_image(tmp_path):
    require_tool("storescu")
    files, datasets = _phantoms(tmp_path, (31, 32, 33), tb=True, nodules=True)
    emr = FhirServer(patients=[(SYSTEM, str(ds.PatientID)) for ds in datasets], token="s3cret")
    server = _emr_server(tmp_path, emr)
    try:
        server.start()                                   # the EMR is down
        assert server.storescu(*files).returncode == 0
        wait_until(lambda: all(j["state"] == "analyzed" for j in server.jobs()) and len(server.jobs()) == 3,
                   90, what="analysis")
        time.sleep(1.5)
        emr_rows = lambda: [d for j in server.jobs() for d in j["deliveries"]   # noqa: E731
                            if d["destination"] == "emr"]
        assert len(emr_rows()) == 3 and {d["state"] for d in emr_rows()} == {"retrying"}
        assert {d["object_type"] for d in emr_rows()} == {"fhir"}
        emr.start()
        wait_until(lambda: len(emr.resources("DiagnosticReport")) == 3, 60, what="3 reports at the EMR")
        wait_until(lambda: {d["state"] for d in emr_rows()} == {"sent"}, 30,
                   what="deliveries recorded as sent")
        reports = emr.resources("DiagnosticReport")
        assert sorted(r["identifier"][0]["value"] for r in reports) == \
            sorted(str(ds.SOPInstanceUID) for ds in datasets)
        jobs_text = server.edge("jobs").stdout
        assert "sent" in jobs_text

        # Kill edge serve while it delivers: the EMR answers slowly, so the kill lands
        # between the request and the recorded answer; after the restart it is sent again
        # and updates the same report.
        more, more_ds = _phantoms(tmp_path, (34, 35), tb=False, nodules=False)
        with emr.lock:
            for ds in more_ds:
                emr.store["Patient"][f"p{ds.PatientID}"] = {
                    "resourceType": "Patient", "id": f"p{ds.PatientID}", "meta": {"versionId": "1"},
                    "identifier": [{"system": SYSTEM, "value": str(ds.PatientID)}]}
        seen, done = emr.requests, emr.transactions
        emr.delay_s = 3.0
        assert server.storescu(*more).returncode == 0
        wait_until(lambda: emr.requests > seen, 60, what="a delivery to the EMR under way")
        server.kill()                                    # the EMR has the request, no answer yet
        wait_until(lambda: emr.transactions > done, 10, what="the EMR keeping the transaction")
        emr.delay_s = 0.0
        server.start()
        wait_until(lambda: len(emr.resources("DiagnosticReport")) == 5, 90, what="5 reports at the EMR")
        wait_until(lambda: len(emr_rows()) == 5 and {d["state"] for d in emr_rows()} == {"sent"},
                   60, what="all deliveries sent")
        reports = emr.resources("DiagnosticReport")
        values = [r["identifier"][0]["value"] for r in reports]
        assert len(values) == len(set(values)) == 5     # exactly one per image
        # the transaction cut off by the kill was sent again and updated its report
        assert any(int(r["meta"]["versionId"]) >= 2 for r in reports)
        observations = [o["identifier"][0]["value"] for o in emr.resources("Observation")]
        assert len(observations) == len(set(observations))
    finally:
        server.stop()
        emr.stop()


@pytest.mark.slow
def test_a_referred_image_goes_to_the_reading_centre_once_a_negative_one_not(tmp_path):
    require_tool("storescu")
    (tmp_path / "pacs").mkdir()
    centre = OrthancPACS(tmp_path, aet="CENTRE", count_stores=True).start()
    pacs = OrthancPACS(tmp_path / "pacs", aet="PACS").start()
    server = EdgeServer(tmp_path, destinations=[pacs.destination(), centre.destination("centre")])
    with open(server.config, "a") as fh:
        fh.write('\n[[forward]]\nname = "tb-to-province"\ndestination = "centre"\ntb_refer = true\n')
    try:
        server.start()
        referred, _ = _phantoms(tmp_path, (41, 42), tb=True, nodules=False)
        negative, _ = _phantoms(tmp_path, (43, 44), tb=False, nodules=False)
        assert server.storescu(*referred, *negative).returncode == 0
        wait_until(lambda: len(server.jobs()) == 4 and all(
            d["state"] == "sent" for j in server.jobs() for d in j["deliveries"])
            and all(j["state"] == "analyzed" for j in server.jobs()), 120, what="all delivered")
        jobs = {j["sop_instance_uid"]: j for j in server.jobs()}
        positive = {uid for uid, j in jobs.items() if j["findings"]["tb"]["positive"]}
        assert positive and positive != set(jobs), "the phantoms should give both decisions"
        time.sleep(2)                                   # a duplicate would land now
        held = {t["SOPInstanceUID"]: t for t in centre.instances()}
        for uid, job in jobs.items():
            to_centre = [d for d in job["deliveries"] if d["destination"] == "centre"]
            if uid in positive:
                assert sorted(d["object_type"] for d in to_centre) == ["gsps", "sc", "source", "sr"]
                assert {d["rule"] for d in to_centre} == {"tb-to-province"}
                assert uid in held                       # the image itself
                assert {d["result_uid"] for d in to_centre} <= set(held)
            else:
                assert to_centre == [] and uid not in held
            assert all(d["rule"] is None for d in job["deliveries"] if d["destination"] == "pacs")
        stores = _store_operations(centre)
        assert set(stores.values()) == {1}, stores      # each object exactly once
        assert len(stores) == 4 * len(positive)
    finally:
        server.stop()
        centre.stop()
        pacs.stop()


def _store_operations(orthanc: OrthancPACS) -> dict[str, int]:
    """C-STORE operations Orthanc received, by SOP Instance UID (duplicates counted)."""
    from collections import Counter
    return dict(Counter(orthanc.stores()))
