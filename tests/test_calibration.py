"""``edge calibrate`` on phantoms with known TB truth, analysed by the appliance's models.

The synthetic outcomes file is made here: phantom chest X-rays (``engines.train.phantom``)
with and without the TB pattern are written as DICOM, stored and journaled as received
images, analysed by the shipped models through the appliance's ``Analyzer``, and their truth
becomes the confirmatory results. The truth AUC and the threshold each rule implies are
computed here independently (pairwise Mann-Whitney, sorting), and ``edge calibrate`` must
give the same. Bad files must fail with a clear message and change nothing.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import subprocess
import time
from pathlib import Path

import pytest

from conftest import EDGE
from edge.cli import main
from edge.config import load_config
from edge.journal import Journal, NewInstance

N_PHANTOMS = 40          # 20 with the TB pattern, 20 without
SEED0 = 7100
CONFIG_TEXT = """# Edge appliance, van 2 (comments and order must survive `edge calibrate --apply`)
[storage]
dir = "{storage}"
min_free_mb = 1

[models]
backend = "onnxruntime"          # CPU here
# tb_threshold = 0.5             # default: the model manifest's

[triage]
min_side_px = 256                # small phantoms keep the test quick
"""


def _write_phantoms(config, journal: Journal) -> list[dict]:
    """Phantoms stored, journaled and analysed; one truth entry per analysed image."""
    from engines.store import load_models
    from engines.train.phantom import generate_case, write_dicom

    from edge.analysis import Analyzer

    analyzer = Analyzer(load_models(config.models_dir, "onnxruntime"), triage_rules=config.triage)
    truth = []
    for i in range(N_PHANTOMS):
        case = generate_case(SEED0 + i, size=448, tb=(i % 2 == 0), nodules=False)
        rel = f"spool/ph/{i:03d}.dcm"
        path = config.storage_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = write_dicom(case, path)
        calling_ae = "VAN-02" if i % 3 else "ROOM-1"
        journal.record_received(NewInstance(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), calling_ae=calling_ae, path=rel,
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size_bytes=path.stat().st_size,
            patient_name=str(ds.PatientName), patient_id=str(ds.PatientID), modality=ds.Modality))
        prepared = analyzer.prepare(path)
        assert prepared.findings_if_skipped is None, prepared.findings_if_skipped.reason
        findings = analyzer.infer(prepared)
        journal.finish_instance(ds.SOPInstanceUID, "analyzed", findings=findings.to_dict(),
                                timings_ms=findings.timings_ms)
        # The confirmatory result: the phantom's truth, except one person in five of each
        # group, as an imperfect reference test (a missed smear, a contaminated culture)
        # gives: the scores then overlap whatever the model's quality.
        confirmed = case.tb != (i % 10 in (0, 5))
        truth.append({"uid": ds.SOPInstanceUID, "tb": confirmed, "score": findings.tb.score,
                      "accession": str(ds.AccessionNumber), "patient_id": str(ds.PatientID),
                      "study_date": str(ds.StudyDate)})
    return truth


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A box's storage with analysed phantoms, and its config file."""
    root = tmp_path_factory.mktemp("calibration")
    config_path = root / "edge.toml"
    config_path.write_text(CONFIG_TEXT.format(storage=root / "data"))
    config = load_config(config_path)
    journal = Journal(config.journal_path)
    try:
        truth = _write_phantoms(config, journal)
    finally:
        journal.close()
    return {"root": root, "config_path": config_path, "config": config, "truth": truth,
            "config_text": config_path.read_text()}


def write_outcomes(path: Path, entries: list[dict], *, header=("accession_number", "patient_id", "study_date", "result")) -> Path:
    """Half the rows name the image by accession number, half by patient ID and study date
    (DD/MM/YYYY, as written in Vietnam)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i, e in enumerate(entries):
            d = e["study_date"]
            by_accession = i % 2 == 0
            w.writerow([e["accession"] if by_accession else "", "" if by_accession else e["patient_id"],
                        "" if by_accession else f"{d[6:]}/{d[4:6]}/{d[:4]}",
                        "positive" if e["tb"] else "negative"][:len(header)])
    return path


def truth_auc(entries: list[dict]) -> float:
    """Mann-Whitney by pairwise comparison (no ranks, no library)."""
    pos = [e["score"] for e in entries if e["tb"]]
    neg = [e["score"] for e in entries if not e["tb"]]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def implied_by_sensitivity(entries: list[dict], target: float) -> float:
    """The highest threshold with sensitivity >= target, midway to the next lower score."""
    pos = sorted((e["score"] for e in entries if e["tb"]), reverse=True)
    lowest = pos[math.ceil(target * len(pos) - 1e-9) - 1]
    below = [e["score"] for e in entries if e["score"] < lowest]
    return (lowest + max(below)) / 2 if below else lowest


def implied_by_referral_rate(entries: list[dict], rate: float) -> float:
    """The lowest threshold that refers at most ``rate`` of the people."""
    allowed = math.floor(rate * len(entries) + 1e-9)
    ranked = sorted((e["score"] for e in entries), reverse=True)
    lowest = min(s for s in ranked if s > ranked[allowed])
    below = [s for s in ranked if s < lowest]
    return (lowest + max(below)) / 2


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _calibrations(site) -> list:
    journal = Journal(site["config"].journal_path)
    try:
        return journal.calibrations(limit=100)
    finally:
        journal.close()


def _unchanged(site, out_dir: Path, calibrations_before: list) -> None:
    assert site["config_path"].read_text() == site["config_text"]
    assert _calibrations(site) == calibrations_before
    assert not out_dir.exists() or not list(out_dir.iterdir())


def test_calibrate_recovers_phantom_truth_auc_and_rule_thresholds(site, tmp_path, capsys):
    truth = site["truth"]
    outcomes = write_outcomes(tmp_path / "outcomes.csv", truth)
    expected_auc = truth_auc(truth)
    before = _calibrations(site)
    assert 0.5 < expected_auc < 1.0, f"phantom AUC {expected_auc}: the test needs overlapping scores"

    started = time.monotonic()
    proc = subprocess.run(EDGE + ["--config", str(site["config_path"]), "calibrate", str(outcomes),
                                  "--json", "--out", str(tmp_path / "reports")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 30
    report = json.loads(proc.stdout)
    assert report["data"]["people"] == N_PHANTOMS and report["data"]["positives"] == N_PHANTOMS // 2
    assert report["data"]["matched_by_accession"] == N_PHANTOMS // 2
    assert report["auc"]["value"] == pytest.approx(expected_auc, abs=1e-12)
    assert report["auc"]["lo"] < expected_auc < report["auc"]["hi"] <= 1.0
    assert report["rule"] == {"name": "target_sensitivity", "value": 0.9}
    assert report["threshold"] == pytest.approx(implied_by_sensitivity(truth, 0.9), abs=1e-6)
    op = report["operating_point"]
    assert op["sensitivity"]["value"] >= 0.9
    assert op["sensitivity"]["lo"] <= op["sensitivity"]["value"] <= op["sensitivity"]["hi"]
    assert op["tests_per_case"]["value"] == pytest.approx(op["referred"] / op["true_positives"])
    band = report["expected_referral_band"]
    assert band["lower"] <= band["rate"] == op["referral_rate"]["value"] <= band["upper"]
    assert [e["threshold"] for e in report["table"]] == sorted(e["threshold"] for e in report["table"])
    who = [e for e in report["table"] if e["who_target"]]
    assert all(e["sensitivity"]["value"] >= 0.9 and e["specificity"]["value"] >= 0.7 for e in who)
    assert report["threshold_in_force"] == {"value": 0.5, "source": "manifest"}
    html = next((tmp_path / "reports").glob("*.html")).read_text()
    assert "<svg" in html and 'id="roc-curve"' in html and f"{expected_auc:.3f}" in html
    for entry in truth:   # the report holds no person's data
        assert entry["patient_id"] not in html and entry["accession"] not in html

    # by budget: at most 30% referred
    rc, out, err = _run(capsys, "--config", str(site["config_path"]), "calibrate", str(outcomes), "--json",
                        "--max-referral-rate", "30%", "--bootstrap", "300", "--out", str(tmp_path / "r2"))
    assert rc == 0, err
    by_rate = json.loads(out)
    assert by_rate["threshold"] == pytest.approx(implied_by_referral_rate(truth, 0.3), abs=1e-6)
    assert by_rate["operating_point"]["referral_rate"]["value"] <= 0.3
    assert by_rate["auc"]["value"] == report["auc"]["value"]
    _unchanged(site, tmp_path / "nothing", before)   # no --apply: config and journal untouched


def test_apply_writes_threshold_in_place_with_audit_entry(site, tmp_path, capsys):
    config_path = tmp_path / "edge.toml"
    config_path.write_text(site["config_text"])
    outcomes = write_outcomes(tmp_path / "outcomes.csv", site["truth"])
    journal = Journal(site["config"].journal_path)
    before = {r.sop_instance_uid: r.findings_json for r in journal.instances_between(0, float("inf"))}
    journal.close()
    running = load_config(config_path)   # what a service started before the calibration runs
    rc, out, err = _run(capsys, "--config", str(config_path), "calibrate", str(outcomes), "--apply",
                        "--bootstrap", "300", "--out", str(tmp_path / "reports"))
    assert rc == 0, err
    expected = implied_by_sensitivity(site["truth"], 0.9)
    assert "ROC AUC" in out and "applied: [models] tb_threshold" in out
    new_lines = config_path.read_text().splitlines()
    old_lines = site["config_text"].splitlines()
    added = [ln for ln in new_lines if ln not in old_lines]
    assert len(added) == 1 and added[0].startswith("tb_threshold = ") and "edge calibrate" in added[0]
    assert [ln for ln in new_lines if ln != added[0]] == old_lines   # comments and order kept
    assert new_lines.index(added[0]) == old_lines.index("# tb_threshold = 0.5             # default: the model manifest's") + 1
    config = load_config(config_path)
    assert config.models.tb_threshold == pytest.approx(expected, abs=1e-6)

    journal = Journal(config.journal_path)
    try:
        (entry,) = journal.calibrations()
        assert entry.threshold == config.models.tb_threshold and entry.previous_threshold is None
        assert entry.rule == "target_sensitivity" and entry.rule_value == 0.9
        assert entry.data_sha256 == hashlib.sha256(outcomes.read_bytes()).hexdigest()
        assert (entry.people, entry.positives, entry.negatives) == (N_PHANTOMS, N_PHANTOMS // 2, N_PHANTOMS // 2)
        assert entry.config_path == str(config_path.resolve())
        assert entry.summary["expected_referral_band"]["lower"] <= entry.summary["expected_referral_band"]["upper"]
        # results already made keep their threshold: nothing in the journal was rewritten
        after = {r.sop_instance_uid: r.findings_json for r in journal.instances_between(0, float("inf"))}
        assert after == before
        assert all(json.loads(f)["tb"]["threshold"] == 0.5 for f in after.values())

        from edge.screening import threshold_in_force
        in_force = threshold_in_force(config, journal)
        assert in_force.source == "calibration" and in_force.calibration.id == entry.id
        waiting = threshold_in_force(running, journal)   # restart needed
        assert waiting.source == "manifest" and waiting.value == 0.5 and waiting.pending.id == entry.id
        assert threshold_in_force(site["config"], journal).pending is None   # another config file

        # a second --apply replaces the line and records the previous value
        rc, out, err = _run(capsys, "--config", str(config_path), "calibrate", str(outcomes), "--apply",
                            "--max-referral-rate", "0.3", "--bootstrap", "200", "--out", str(tmp_path / "reports"))
        assert rc == 0, err
        newest = journal.calibrations()[0]
        assert newest.previous_threshold == entry.threshold and newest.rule == "max_referral_rate"
        assert sum(ln.startswith("tb_threshold = ") for ln in config_path.read_text().splitlines()) == 1
        assert load_config(config_path).models.tb_threshold == newest.threshold
    finally:
        journal.close()


def _bad_cases(truth: list[dict]) -> dict[str, tuple[list[list[str]], str]]:
    e0, e1 = truth[0], truth[1]
    rows = [[e["accession"], "positive" if e["tb"] else "negative"] for e in truth]
    return {
        "wrong_columns": ([["name", "outcome"], ["x", "positive"]], "wrong columns"),
        "unknown_ids": ([["accession_number", "result"], *rows[:-1], ["NOPE-123", "negative"]],
                        "no analysed image with accession number 'NOPE-123'"),
        "duplicates": ([["accession_number", "patient_id", "study_date", "result"],
                        *[[a, "", "", r] for a, r in rows],
                        ["", e1["patient_id"], f"{e1['study_date'][:4]}-{e1['study_date'][4:6]}-{e1['study_date'][6:]}",
                         "positive" if e1["tb"] else "negative"]],
                       "the same image as row 3"),
        "bad_result": ([["accession_number", "result"], [e0["accession"], "maybe"]],
                       "result 'maybe' is not positive or negative"),
        "too_few_positives": ([["accession_number", "result"],
                               *[[e["accession"], "positive" if e["tb"] else "negative"]
                                 for e in truth if not e["tb"]],
                               *[[e["accession"], "positive"] for e in [t for t in truth if t["tb"]][:4]]],
                              "too few people for an interval: 4 positive and 20 negative"),
    }


@pytest.mark.parametrize("case", ["wrong_columns", "unknown_ids", "duplicates", "bad_result", "too_few_positives"])
def test_bad_outcomes_files_give_clear_errors_and_change_nothing(site, tmp_path, capsys, case):
    rows, message = _bad_cases(site["truth"])[case]
    before = _calibrations(site)
    outcomes = tmp_path / "bad.csv"
    with open(outcomes, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    rc, out, err = _run(capsys, "--config", str(site["config_path"]), "calibrate", str(outcomes), "--apply",
                        "--bootstrap", "100", "--out", str(tmp_path / "reports"))
    assert rc == 2
    assert message in err and "Nothing was changed." in err, err
    assert out == ""
    _unchanged(site, tmp_path / "reports", before)


def test_apply_without_a_config_file_is_refused_at_once(site, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outcomes = write_outcomes(tmp_path / "outcomes.csv", site["truth"])
    rc, out, err = _run(capsys, "calibrate", str(outcomes), "--apply")
    assert rc == 2 and "--apply needs the config file" in err and "Nothing was changed." in err
    assert not (tmp_path / "edge-data").exists()


def test_ambiguous_row_names_both_images(tmp_path, capsys):
    """A person X-rayed twice on one day: patient ID and date match two analysed images."""
    from test_web import add_instance

    config_path = tmp_path / "edge.toml"
    config_path.write_text(CONFIG_TEXT.format(storage=tmp_path / "data"))
    config = load_config(config_path)
    journal = Journal(config.journal_path)
    for score in (0.7, 0.2):
        add_instance(journal, config.storage_dir, "analyzed", pid="P-TWICE", score=score)
    add_instance(journal, config.storage_dir, "skipped", pid="P-LATERAL", reason="lateral view")
    journal.close()
    today = time.strftime("%Y-%m-%d")
    outcomes = tmp_path / "twice.csv"
    outcomes.write_text(f"patient_id;study_date;result\nP-TWICE;{today};positive\n"
                        f"P-LATERAL;{today};negative\n")
    rc, out, err = _run(capsys, "--config", str(config_path), "calibrate", str(outcomes), "--apply",
                        "--out", str(tmp_path / "reports"))
    assert rc == 2 and "Nothing was changed." in err
    assert f"row 2: 2 analysed images match patient ID 'P-TWICE' on {today}" in err
    assert f"row 3: no analysed image with patient ID 'P-LATERAL' on {today} (only skipped: lateral view)" in err
    assert config_path.read_text() == CONFIG_TEXT.format(storage=tmp_path / "data")
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("text, expected_line, error", [
    ("[models]\nbackend = \"auto\"\n", "tb_threshold = 0.41", None),
    ("[models]\ntb_threshold = 0.5   # set by hand\n[triage]\nmin_age_years = 15\n", "tb_threshold = 0.41", None),
    ("# no models table yet\n[storage]\ndir = \"/var/lib/edge\"", "tb_threshold = 0.41", None),
    ("[models]\r\n# tb_threshold = 0.5\r\n", "tb_threshold = 0.41", None),
    ("models = { backend = \"auto\" }\n", None, "inline table"),
    ("models.backend = \"auto\"\n", None, "dotted keys"),
    ("[models]\ntb_threshold = 0.5\n", None, None),
])
def test_config_edit_keeps_the_rest_of_the_file(text, expected_line, error):
    from edge.config import ConfigError
    from edge.config_edit import set_table_key

    if error:
        with pytest.raises(ConfigError, match=error):
            set_table_key(text, "models", "tb_threshold", 0.41)
        return
    new, previous = set_table_key(text, "models", "tb_threshold", 0.41, "edge calibrate")
    if expected_line is None:   # the same value again: only the comment changes
        assert previous == 0.5 and "tb_threshold = 0.41" in new
        return
    appended = "[models]" not in text
    added = [ln for ln in new.splitlines() if ln not in text.splitlines() and ln.strip()]
    if appended:   # the table is added at the end
        assert added[0] == "[models]" and new.startswith(text)
        added = added[1:]
    assert len(added) == 1 and added[0] == f"{expected_line}   # edge calibrate", new
    kept = [ln for ln in new.splitlines() if ln.strip() and ln != added[0]
            and not (appended and ln == "[models]")]
    assert kept == [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("tb_threshold")]
    assert ("\r\n" in new) == ("\r\n" in text)
    with pytest.raises(ConfigError, match="tb_threshold"):   # out of range: refused, not written
        set_table_key(text, "models", "tb_threshold", 1.5)


def test_older_journal_gains_the_calibrations_table(tmp_path):
    import sqlite3

    from edge.journal import SCHEMA_VERSION

    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE calibrations")
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()
    journal = Journal(path)
    try:
        assert journal.calibrations() == []
        journal.record_calibration(threshold=0.4, previous_threshold=0.5, rule="target_sensitivity",
                                   rule_value=0.9, data_sha256="0" * 64, data_name="o.csv", people=30,
                                   positives=10, negatives=20, config_path="/etc/edge/edge.toml", summary={})
        assert journal.calibrations()[0].previous_threshold == 0.5
    finally:
        journal.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5


def test_config_edit_of_the_shipped_template():
    """The annotated template installed on the box: the line goes under the commented example
    and its note, everything else stays."""
    from edge.config_edit import set_table_key

    text = (Path(__file__).resolve().parent.parent / "firmware_scripts" / "edge.toml").read_text()
    new, previous = set_table_key(text, "models", "tb_threshold", 0.3812, "edge calibrate")
    old_lines, new_lines = text.splitlines(), new.splitlines()
    at = new_lines.index("tb_threshold = 0.3812   # edge calibrate")
    assert new_lines[:at] + new_lines[at + 1:] == old_lines and previous is None
    assert new_lines[at - 2].startswith("# tb_threshold = ") and new_lines[at - 1].lstrip().startswith("#")
