"""Triage: each rule skips with the reason a technician reads; a frontal adult chest passes."""
from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from edge.triage import TriageRules, patient_age_years, triage

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MR = "1.2.840.10008.5.1.4.1.1.4"


def code(value: str, scheme: str = "SCT", meaning: str = "") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning or value
    return item


def chest(**attrs: object) -> Dataset:
    """Header of an eligible PA chest DX of a 40-year-old (no pixel data: triage needs none)."""
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = DX_PRESENTATION, "DX"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.PatientAge = "040Y"
    ds.Rows, ds.Columns = 2048, 2048
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("attrs", [
    {},
    {"SOPClassUID": CR, "Modality": "CR"},
    {"SOPClassUID": DX_PROCESSING, "PhotometricInterpretation": "MONOCHROME1"},
    {"BodyPartExamined": "THORAX", "ViewPosition": "AP"},
    {"BodyPartExamined": None, "ViewPosition": None, "PatientAge": None},   # portable, unknown age
    {"BodyPartExamined": "", "AnatomicRegionSequence": [code("816094009", meaning="Chest")]},
    {"AnatomicRegionSequence": [code("T-D3000", "SRT", "Chest")]},
    {"Rows": 1024, "Columns": 5000},
    {"PatientAge": "015Y"},
    {"PatientAge": None, "PatientBirthDate": "19800101", "StudyDate": "20240101"},
    {"NumberOfFrames": 1},
], ids=lambda a: ",".join(a) or "plain")
def test_frontal_adult_chest_is_eligible(attrs) -> None:
    assert triage(chest(**attrs)) is None


@pytest.mark.parametrize("attrs, reason", [
    ({"ViewPosition": "LL"}, "lateral view"),
    ({"ViewPosition": "RL"}, "lateral view"),
    ({"ViewPosition": "LATERAL"}, "lateral view"),
    ({"ViewPosition": "", "ViewCodeSequence": [code("399198007", meaning="right lateral")]}, "lateral view"),
    ({"ViewPosition": "LLO"}, "not a frontal view (view LLO)"),
    ({"BodyPartExamined": "HAND"}, "not a chest image"),
    ({"BodyPartExamined": "", "AnatomicRegionSequence": [code("85562004", meaning="Hand")]}, "not a chest image"),
    ({"Modality": "MR", "SOPClassUID": MR}, "not an X-ray image (modality MR)"),
    ({"Modality": "DX", "SOPClassUID": SECONDARY_CAPTURE}, "not an X-ray image (secondary capture)"),
    ({"Modality": "MG", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.2"}, "not an X-ray image (modality MG)"),
    ({"Modality": None}, "not an X-ray image (modality unknown)"),
    ({"PatientAge": "009Y"}, "patient under 15 years: outside intended use"),
    ({"PatientAge": "014M"}, "patient under 15 years: outside intended use"),
    ({"PatientAge": None, "PatientBirthDate": "20150601", "StudyDate": "20240101"},
     "patient under 15 years: outside intended use"),
    ({"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}, "colour image"),
    ({"PhotometricInterpretation": "PALETTE COLOR"}, "colour image"),
    ({"PhotometricInterpretation": "YBR_FULL_422", "SamplesPerPixel": 3}, "colour image"),
    ({"Rows": 600, "Columns": 800}, "image too small (800 x 600)"),
    ({"Rows": 6000, "Columns": 4000}, "image too large (4000 x 6000)"),
    ({"NumberOfFrames": 3}, "multi-frame image"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_rule_gives_its_reason(attrs, reason: str) -> None:
    assert triage(chest(**attrs)) == reason


def test_rules_are_configurable_and_checked() -> None:
    child = chest(PatientAge="010Y", ViewPosition="LL", BodyPartExamined="ABDOMEN", Rows=800, Columns=800)
    rules = TriageRules(body_parts=["chest", "abdomen"], views=("pa", "ll"), min_age_years=0, min_side_px=512)
    assert rules.body_parts == ("CHEST", "ABDOMEN") and rules.views == ("PA", "LL")
    assert triage(child, rules) is None
    assert triage(chest(Modality="CR"), TriageRules(modalities=("DX",))) == "not an X-ray image (modality CR)"
    assert triage(chest(SOPClassUID=MR)) == f"not an X-ray image (SOP class {MR})"
    assert triage(chest(PatientAge="016Y"), TriageRules(min_age_years=18)) == \
        "patient under 18 years: outside intended use"
    with pytest.raises(ValueError, match="min_side_px"):
        TriageRules(min_side_px=6000)
    with pytest.raises(TypeError, match="views"):
        TriageRules(views="PA")
    with pytest.raises(ValueError, match="min_age_years"):
        TriageRules(min_age_years=-1)
    assert TriageRules.from_mapping({"min_age_years": 18, "unrelated": 1}).min_age_years == 18


def test_patient_age_sources() -> None:
    assert patient_age_years(chest(PatientAge="040Y")) == pytest.approx(40.0)
    assert patient_age_years(chest(PatientAge="026W")) == pytest.approx(0.5, abs=0.01)
    assert patient_age_years(chest(PatientAge=None)) is None
    with pytest.warns(UserWarning):
        assert patient_age_years(chest(PatientAge="garbage")) is None
    assert patient_age_years(chest(PatientAge=None, PatientBirthDate="20000229", AcquisitionDate="20200228")) \
        == pytest.approx(20.0, abs=0.01)
    with pytest.warns(UserWarning):
        assert patient_age_years(chest(PatientAge=None, PatientBirthDate="2000", StudyDate="20200101")) is None
