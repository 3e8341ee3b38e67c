"""Local TB threshold calibration: confirmatory test results joined with the journal's scores.

WHO's guidance for computer-aided detection of TB asks each programme to set the threshold on
its own population, from people who had a confirmatory test, by what the programme needs: a
target sensitivity, or the number of confirmatory tests it can afford. ``edge calibrate``
does that where the scores already are.

The outcomes file (CSV, one row per person) names each person's image by accession number,
or by patient ID and study date, and gives the confirmatory result. Every row must match
exactly one analysed image; any row that matches none or several, a duplicate, or too few
positives or negatives for an interval stop the run with all the problems listed, and
nothing is changed. Statistics (``edge.calibration_stats``) are the empirical ROC with
bootstrap intervals.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import time
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .journal import InstanceRow, Journal

logger = logging.getLogger(__name__)

__all__ = ["CalibrationError", "Outcome", "ScoredImage", "read_outcomes", "scored_images",
           "join_outcomes"]

_POSITIVE = {"positive", "pos", "p", "1", "yes", "y", "true", "+", "dương tính", "duong tinh", "dương", "có"}
_NEGATIVE = {"negative", "neg", "n", "0", "no", "false", "-", "âm tính", "am tinh", "âm", "không"}
# accepted column names (lower case, spaces and hyphens as underscores) for each field
_COLUMNS = {
    "accession_number": ("accession_number", "accession", "accessionnumber", "acc"),
    "patient_id": ("patient_id", "patientid", "pid", "id"),
    "study_date": ("study_date", "studydate", "date"),
    "result": ("result", "outcome", "confirmatory_result", "test_result"),
}
MAX_LISTED = 20   # problems listed in one error message


class CalibrationError(ValueError):
    """The outcomes cannot be used as they are; ``problems`` lists each one. Nothing was changed."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        shown = self.problems[:MAX_LISTED]
        more = len(self.problems) - len(shown)
        text = message + "".join(f"\n  - {p}" for p in shown)
        if more > 0:
            text += f"\n  - ... and {more} more"
        super().__init__(text + "\nNothing was changed.")


@dataclass(frozen=True)
class Outcome:
    """One person's confirmatory result, as the outcomes file gives it."""
    row: int                  # line number in the file (the header is line 1)
    accession: str
    patient_id: str
    study_date: str           # YYYYMMDD or ""
    positive: bool

    def describe(self) -> str:
        if self.accession:
            return f"accession number {self.accession!r}"
        return f"patient ID {self.patient_id!r} on {_show_date(self.study_date)}"


@dataclass(frozen=True)
class ScoredImage:
    """An image in the journal with what the outcomes are matched on."""
    sop_instance_uid: str
    state: str
    reason: str | None
    patient_id: str
    accession: str
    study_date: str           # YYYYMMDD: the image's StudyDate, else the day it was received
    received_at: float
    calling_ae: str
    score: float | None       # the TB score of an analysed image (None: not screened)


def _show_date(yyyymmdd: str) -> str:
    return f"{yyyymmdd[:4]}-{yyyymmdd[4:6]}-{yyyymmdd[6:]}" if len(yyyymmdd) == 8 else yyyymmdd or "?"


def _norm(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip().lower()


def _parse_date(raw: str) -> str | None:
    """YYYYMMDD from YYYYMMDD, YYYY-MM-DD or DD/MM/YYYY (the Vietnamese order); None if invalid."""
    raw = raw.strip()
    for fmt in ("%Y%m%d", "%Y-%m-%d", "%d/%m/%Y", "%Y/%m/%d"):
        try:
            return datetime.strptime(raw, fmt).strftime("%Y%m%d")
        except ValueError:
            continue
    return None


def read_outcomes(path: str | Path) -> tuple[list[Outcome], str]:
    """The outcomes of a CSV file and the SHA-256 of its bytes; raises CalibrationError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: not UTF-8 text (byte {exc.start}); save it as "
                               "\"CSV UTF-8\"") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise CalibrationError(f"{path}: empty; expected a header line, then one row per person")
    try:
        dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    header = [re.sub(r"[\s-]+", "_", _norm(h)) for h in next(reader)]
    where: dict[str, int] = {}
    for field, names in _COLUMNS.items():
        found = [i for i, h in enumerate(header) if h in names]
        if len(found) > 1:
            raise CalibrationError(f"{path}: more than one column for {field} "
                                   f"({', '.join(header[i] for i in found)})")
        if found:
            where[field] = found[0]
    has_key = "accession_number" in where or {"patient_id", "study_date"} <= where.keys()
    if "result" not in where or not has_key:
        raise CalibrationError(
            f"{path}: wrong columns ({', '.join(header) or 'none'}). Expected a header with "
            "\"result\" (positive/negative) and either \"accession_number\", or \"patient_id\" "
            "and \"study_date\" (YYYY-MM-DD or DD/MM/YYYY), or all three")
    outcomes, problems = [], []
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue
        def cell(field: str) -> str:
            i = where.get(field)
            return cells[i].strip() if i is not None and i < len(cells) else ""
        result = _norm(cell("result"))
        if result in _POSITIVE:
            positive = True
        elif result in _NEGATIVE:
            positive = False
        else:
            problems.append(f"row {line}: result {cell('result')!r} is not positive or negative")
            continue
        accession, pid, raw_date = cell("accession_number"), cell("patient_id"), cell("study_date")
        study_date = _parse_date(raw_date) if raw_date else ""
        if study_date is None:
            problems.append(f"row {line}: study date {raw_date!r} is not a date (use YYYY-MM-DD or DD/MM/YYYY)")
            continue
        if not accession and not (pid and study_date):
            problems.append(f"row {line}: no accession number, and no patient ID with a study date")
            continue
        outcomes.append(Outcome(line, accession, pid, study_date, positive))
    if problems:
        raise CalibrationError(f"{path}: {len(problems)} row(s) cannot be read:", problems)
    if not outcomes:
        raise CalibrationError(f"{path}: no rows after the header")
    return outcomes, digest


def scored_images(journal: "Journal", storage_dir: str | Path, *,
                  patient_ids: set[str] | None = None) -> list[ScoredImage]:
    """Every image in the journal with its TB score (analysed ones), accession number and
    study date (read from the stored file's header; the day received when it is gone).
    ``patient_ids``: only the images of these patients (fewer headers to read)."""
    from pydicom import dcmread

    storage_dir = Path(storage_dir)
    out = []
    for row in journal.instances_between(0.0, float("inf")):
        if patient_ids is not None and row.patient_id not in patient_ids:
            continue
        accession, study_date = "", ""
        try:
            ds = dcmread(storage_dir / row.path, stop_before_pixels=True,
                         specific_tags=["AccessionNumber", "StudyDate"])
            accession = str(ds.get("AccessionNumber", "") or "").strip()
            study_date = str(ds.get("StudyDate", "") or "").strip()
        except Exception:   # noqa: BLE001 - a missing or unreadable file: match by what the journal has
            logger.debug("calibration: no header for an image; matched by the day it was received")
        if not re.fullmatch(r"\d{8}", study_date):
            study_date = date.fromtimestamp(row.received_at).strftime("%Y%m%d")
        out.append(ScoredImage(row.sop_instance_uid, row.state, row.reason, row.patient_id, accession,
                               study_date, row.received_at, row.calling_ae, _tb_score(row)))
    return out


def _tb_score(row: "InstanceRow") -> float | None:
    if row.state != "analyzed":
        return None
    tb = (row.findings or {}).get("tb") or {}
    score = tb.get("score")
    return None if score is None else float(score)


def _matches(outcome: Outcome, image: ScoredImage) -> bool:
    if outcome.accession:
        if image.accession != outcome.accession:
            return False
        if outcome.patient_id and image.patient_id != outcome.patient_id:
            return False
        return not outcome.study_date or image.study_date == outcome.study_date
    return image.patient_id == outcome.patient_id and image.study_date == outcome.study_date


def join_outcomes(outcomes: list[Outcome], images: list[ScoredImage]) -> list[tuple[Outcome, ScoredImage]]:
    """Each outcome with the one analysed image it names; raises CalibrationError listing
    every row that matches no analysed image, several, or an image another row matched."""
    by_accession: dict[str, list[ScoredImage]] = {}
    by_patient: dict[str, list[ScoredImage]] = {}
    for image in images:
        if image.accession:
            by_accession.setdefault(image.accession, []).append(image)
        by_patient.setdefault(image.patient_id, []).append(image)
    pairs, problems = [], []
    taken: dict[str, int] = {}
    for outcome in outcomes:
        pool = by_accession.get(outcome.accession, []) if outcome.accession else by_patient.get(outcome.patient_id, [])
        named = [i for i in pool if _matches(outcome, i)]
        scored = [i for i in named if i.score is not None]
        if not scored:
            others = sorted({f"{i.state}" + (f": {i.reason}" if i.reason else "") for i in named})
            problems.append(f"row {outcome.row}: no analysed image with {outcome.describe()}"
                            + (f" (only {', '.join(others)})" if others else ""))
            continue
        if len(scored) > 1:
            when = ", ".join(time.strftime("%Y-%m-%d %H:%M", time.localtime(i.received_at)) for i in scored)
            problems.append(f"row {outcome.row}: {len(scored)} analysed images match {outcome.describe()} "
                            f"(received {when}); name the image by its accession number")
            continue
        image = scored[0]
        if image.sop_instance_uid in taken:
            problems.append(f"row {outcome.row}: the same image as row {taken[image.sop_instance_uid]} "
                            f"({outcome.describe()}); each person once")
            continue
        taken[image.sop_instance_uid] = outcome.row
        pairs.append((outcome, image))
    if problems:
        raise CalibrationError(f"{len(problems)} of {len(outcomes)} row(s) do not name exactly one "
                               "analysed image:", problems)
    return pairs
