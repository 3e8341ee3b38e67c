"""The Grayscale Softcopy Presentation State that draws the findings over the source.

A viewer that renders GSPS shows the original image, windowed like the source (the
source's VOI is copied; MONOCHROME1 gets an INVERSE presentation LUT so it keeps its
look), with a graphic layer "AI": a closed box and a label per nodule and per detection
of another label a model declares ("Mass 0.82, 31 mm"; tracking UIDs shared with the
SR), and at the top left the TB line, the nodule count and the other positive findings
("REFER: Consolidation", "Also found: ..."). Coordinates are the source's
full-resolution pixel coordinates.

What the viewers tested here show of it (docs/CONFORMANCE.md): OHIF 3.13 and Orthanc's
web viewer do not render presentation states at all. DCMTK's dcmp2pgm applies the
state's VOI, presentation LUT and displayed area to the image and lists the layer, the
boxes and the labels (``-v``), but draws neither graphics nor text into its output.
There is no overlay plane: DCMTK leaves an overlay activated on a graphic layer to the
application as well (dcmp2pgm only writes it to a file of its own), so one added nothing
that the graphic objects do not give.
"""
from __future__ import annotations

import datetime
import logging

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, TM

from edge.findings import Findings

from . import common
from .equipment import Equipment
from .inputs import BuildInputs, prepare, with_fallback
from .labels import nodules_marked, other_lines
from .marks import marks
from .metadata import SourceMetadata, instance_number
from .uids import result_series_uid

logger = logging.getLogger(__name__)

__all__ = ["CONTENT_LABEL", "LAYER_NAME", "build_gsps"]

LAYER_NAME = "AI"
CONTENT_LABEL = "AI_RESULTS"


def build_gsps(source: Dataset, findings: Findings, *, equipment: Equipment = Equipment(),
               analysis_time: datetime.datetime | None = None,
               source_digest: str | None = None,
               metadata: SourceMetadata | None = None,
               ) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """Build the presentation state for one analysed image (same inputs, same bytes).

    ``source_digest`` and ``metadata`` as for ``build_sr``.
    """
    inputs = prepare(source, findings, equipment=equipment, analysis_time=analysis_time,
                     source_digest=source_digest, meta=metadata)
    samples = inputs.source.get("SamplesPerPixel", 1)
    if samples not in (None, "") and int(samples) != 1:
        raise ValueError("source must be a grayscale image (SamplesPerPixel 1) for a GSPS")
    gsps = with_fallback("gsps", inputs, _build)
    logger.debug("built GSPS %s for %s", gsps.SOPInstanceUID, inputs.source_uid)
    return gsps


def _build(inputs: BuildInputs) -> hd.pr.GrayscaleSoftcopyPresentationState:
    findings, equipment, when, demo = inputs.findings, inputs.equipment, inputs.when, inputs.demo
    rows, columns = inputs.meta.rows, inputs.meta.columns
    checked = inputs.source
    ref = common.stand_in(inputs)   # what highdicom reads; see common.stand_in
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER_NAME, order=1,
        description="AI findings" + (f" - {common.DEMO_NOTE}" if demo else ""),
    )
    graphics, texts = _mark_objects(inputs, rows, columns)
    texts.extend(_summary_texts(findings, demo))
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[ref], graphic_layer=layer,
        graphic_objects=graphics or None, text_objects=texts,
    )
    monochrome1 = checked.get("PhotometricInterpretation") == "MONOCHROME1"
    presentation_lut = hd.PresentationLUTTransformation(
        presentation_lut_shape=(hd.PresentationLUTShapeValues.INVERSE if monochrome1
                                else hd.PresentationLUTShapeValues.IDENTITY))
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[ref],
        series_instance_uid=result_series_uid(ref.StudyInstanceUID, "gsps", inputs.versions),
        series_number=common.SERIES_NUMBERS["gsps"],
        sop_instance_uid=inputs.result_uid("gsps"),
        instance_number=instance_number(checked),
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_version,
        device_serial_number=equipment.device_serial_number,
        institution_name=equipment.institution_name,
        content_label=CONTENT_LABEL,
        content_description=("AI findings" + (f" - {common.DEMO_NOTE}" if demo else ""))[:64],
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        voi_lut_transformations=_voi(checked),
        presentation_lut_transformation=presentation_lut,
        series_description=common.series_description("gsps", demo),
        series_date=when.date(),
        series_time=when.time(),
        coding_schemes=common.coding_schemes(),
    )
    common.copy_series_anatomy(gsps, checked)
    gsps.PresentationCreationDate = DA(when.date())
    gsps.PresentationCreationTime = TM(when.time())
    common.finish(gsps, inputs)
    return gsps


def _voi(checked: Dataset) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The source's VOI as the state's VOI, so that it displays like the source.

    The window is preferred over a VOI LUT Sequence when a source has both (many DR
    images do; highdicom refuses to choose): the window is what the models' input and
    most viewers use by default. Both were checked in ``metadata.read_source``; the
    highdicom input carries neither (``common.stand_in``), so this is the only VOI.
    """
    return _voi_from_window(checked) or _voi_from_lut(checked)


def _voi_from_window(checked: Dataset) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    if not (checked.get("WindowCenter") and checked.get("WindowWidth")):
        return None

    def values(keyword: str) -> list:
        value = checked.get(keyword)
        return list(value) if isinstance(value, MultiValue) else [value]

    # Always lists: highdicom 0.28 writes a single explanation string as a list of
    # its characters.
    explanations = None
    if checked.get("WindowCenterWidthExplanation"):
        explanations = [str(v) for v in values("WindowCenterWidthExplanation")]
    return [hd.pr.SoftcopyVOILUTTransformation(
        window_center=[float(v) for v in values("WindowCenter")],
        window_width=[float(v) for v in values("WindowWidth")],
        window_explanation=explanations,
        voi_lut_function=checked.get("VOILUTFunction") or None,
    )]


def _voi_from_lut(checked: Dataset) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The source's VOI LUT(s), rescaled to 16-bit entries.

    highdicom writes 16-bit LUT entries; a 12-bit LUT copied as-is would display at a
    sixteenth of its brightness (and dciodvfy rejects it), so the entries are scaled to
    the full 16-bit range, which keeps the displayed result.
    """
    luts = []
    for item in checked.get("VOILUTSequence") or ():
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
        table = (np.frombuffer(data, dtype="<u2") if isinstance(data, bytes)
                 else np.asarray(list(data), dtype=np.int64)).astype(np.float64)
        if not 0 <= first < 2 ** 16 or not 8 <= bits <= 16:
            return None
        table = np.clip(np.round(table * (65535.0 / (2 ** bits - 1))), 0, 65535)
        explanation = item.get("LUTExplanation") or None
        luts.append(hd.VOILUT(first, table.astype(np.uint16),
                              str(explanation) if explanation else None))
    if not luts:
        return None
    return [hd.pr.SoftcopyVOILUTTransformation(voi_luts=luts)]


def _mark_objects(inputs: BuildInputs, rows: int, columns: int,
                  ) -> tuple[list[hd.pr.GraphicObject], list[hd.pr.TextObject]]:
    """A closed box and a label above it (below it at the top edge) per nodule and per
    other detection (``marks.marks``), with the tracking UIDs the SR's groups have."""
    graphics: list[hd.pr.GraphicObject] = []
    texts: list[hd.pr.TextObject] = []
    text_height = max(12.0, round(rows * 0.03))
    for mark in marks(inputs.findings):
        box = common.clip_box(mark.box, rows, columns)
        graphics.append(hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            graphic_data=common.box_polyline(box),
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            tracking_id=mark.identifier, tracking_uid=inputs.tracking_uid(mark.key),
        ))
        label = mark.label
        width = min(float(columns), max(box[2] - box[0], text_height * 0.6 * len(label)))
        left = min(box[0], columns - width)
        if box[1] >= text_height:                       # above the box
            top, bottom = box[1] - text_height, box[1]
        elif rows - box[3] >= text_height:              # below it
            top, bottom = box[3], box[3] + text_height
        else:                                           # inside its top edge
            top, bottom = box[1], min(float(rows), box[1] + text_height)
        texts.append(hd.pr.TextObject(
            text_value=label, units=hd.pr.AnnotationUnitsValues.PIXEL,
            bounding_box=(round(left, 2), round(top, 2), round(left + width, 2),
                          round(bottom, 2)),
            text_justification=hd.pr.TextJustificationValues.LEFT,
            tracking_id=f"{mark.identifier} label",
            tracking_uid=inputs.tracking_uid(f"{mark.key}-label"),
        ))
    return graphics, texts


def _summary_texts(findings: Findings, demo: bool) -> list[hd.pr.TextObject]:
    """TB line at the top left of the displayed area, the nodules, the other positive
    findings (at most two lines, ``labels.other_lines``), then the not-for-diagnosis
    note."""
    lines = []
    tb_line = common.tb_label(findings)
    if tb_line is not None:
        lines.append(tb_line)
    lines.append(nodules_marked(findings))
    lines.extend(other_lines(findings))
    lines.append("AI result - not for diagnosis" + (" (demonstration model)" if demo else ""))
    texts = []
    for number, line in enumerate(lines):
        top = 0.01 + 0.045 * number
        texts.append(hd.pr.TextObject(
            text_value=line, units=hd.pr.AnnotationUnitsValues.DISPLAY,
            bounding_box=(0.01, round(top, 3), 0.75, round(top + 0.04, 3)),
            text_justification=hd.pr.TextJustificationValues.LEFT,
        ))
    return texts
