"""Analysis of one instance: triage, decode, preprocess, run the models, findings in full-res pixels.

Split in two so the pipeline can decode the next image while the models read the current
one: ``prepare`` (CPU: triage, pixel decode, model tensors) and ``infer`` (the models, each
behind its own lock). ``analyze`` does both. ``analyze_main`` is the ``edge analyze FILE``
command.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from pydicom.dataset import Dataset

from edge.findings import NODULE_CODES, TB_CODES, Findings, ModelInfo, Nodule, Other, TBResult
from edge.imaging import ImageForModels, ImagingError, load_for_models, read_dataset
from edge.triage import TriageRules, triage
from engines.findings import Finding, decode_findings, to_full_image
from engines.geometry import InputGeometry
from engines.preprocess import prepare_input
from engines.store import LoadedModel

logger = logging.getLogger(__name__)

#: Short names for timings and logs, by model task (the first model of each task; further
#: models are timed under their own names).
SHORT_NAMES = {"classification": "tb", "detection": "nodule"}


@dataclass
class Prepared:
    """One instance ready for the models (or already decided: ``findings_if_skipped``)."""

    sop_instance_uid: str
    rows: int
    columns: int
    dataset: Dataset
    image: ImageForModels | None = None               # kept for the secondary capture
    tensors: dict[str, np.ndarray] = field(default_factory=dict)   # by model name
    geometries: dict[str, InputGeometry] = field(default_factory=dict)   # by model name
    findings_if_skipped: Findings | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


class Analyzer:
    """Runs the loaded models on instances; thread-safe (one lock per model).

    ``models``: any number of models; each is fed and decoded by its manifest
    (``engines.preprocess.prepare_input``, ``engines.findings.decode_findings``) and its
    findings mapped to full-resolution pixels. The first classification finding coded as
    tuberculosis is the TB screen (``Findings.tb``), detections coded as nodules are
    ``Findings.nodules``, and everything else is ``Findings.others``.
    ``tb_threshold`` overrides the TB screen's manifest threshold. ``decode_min_side``
    overrides how far images are decoded (default: the largest model input side).
    ``decoder`` decodes the pixels of a stored file, ``decoder(path, min_side=...)``: the
    service passes an ``edge.decoder.IsolatedDecoder`` so that a crashing codec cannot take
    it down; by default the pixels are decoded in this process.
    """

    def __init__(self, models: Mapping[str, LoadedModel], *, tb_threshold: float | None = None,
                 triage_rules: TriageRules = TriageRules(), decode_min_side: int | None = None,
                 decoder: Callable[..., ImageForModels] | None = None) -> None:
        if not models:
            raise ValueError("models: no models loaded; at least one model is needed")
        if tb_threshold is not None and not 0.0 <= float(tb_threshold) <= 1.0:
            raise ValueError(f"tb_threshold: must be between 0 and 1, got {tb_threshold!r}")
        if not isinstance(triage_rules, TriageRules):
            raise TypeError(f"triage_rules: expected TriageRules, got {type(triage_rules).__name__}")
        self.models = dict(models)
        self.short_names: dict[str, str] = {}
        for name, model in self.models.items():
            task = model.manifest.task
            if task not in SHORT_NAMES:
                raise ValueError(f"models[{name!r}]: unsupported task {task!r}")
            short = SHORT_NAMES[task]
            self.short_names[name] = short if short not in self.short_names.values() else name
        self.classifier = next((m for m in self.models.values()
                                if m.manifest.task == "classification"), None)
        self.detector = next((m for m in self.models.values()
                              if m.manifest.task == "detection"), None)
        self.tb_threshold = None if tb_threshold is None else float(tb_threshold)
        # Each model's manifest as decoded here: the TB threshold override (config) replaces
        # the manifest's, so that the decision and its heatmap region follow it.
        self._manifests = {name: _with_tb_threshold(model.manifest, self.tb_threshold)
                           for name, model in self.models.items()}
        self.triage_rules = triage_rules
        self.decode_min_side = int(decode_min_side) if decode_min_side else model_input_side(self.models)
        self._locks = {name: threading.Lock() for name in self.models}
        self.decoder = decoder

    @property
    def model_infos(self) -> list[ModelInfo]:
        return self._model_infos({})

    def _model_infos(self, used: Mapping[str, str]) -> list[ModelInfo]:
        """``used``: the backend that produced this image's outputs, by model name (with
        Triton it may be the local fallback); else the model's current backend."""
        return [ModelInfo(name=m.manifest.name, version=m.manifest.version,
                          backend=used.get(name, m.backend), clinical_use=m.manifest.clinical_use)
                for name, m in self.models.items()]

    def prepare(self, path_or_ds: str | Path | Dataset) -> Prepared:
        """Triage, decode and preprocess; raises ImagingError for unreadable files or pixels."""
        start = time.perf_counter()
        isolated = self.decoder is not None and not isinstance(path_or_ds, Dataset)
        # With an isolated decoder this process reads only the metadata; the decoder
        # process reads the pixels.
        ds = read_dataset(path_or_ds, pixels=not isolated)
        read_ms = (time.perf_counter() - start) * 1000.0
        uid = str(ds.get("SOPInstanceUID", "") or "")
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        prepared = Prepared(sop_instance_uid=uid, rows=rows, columns=cols, dataset=ds)
        reason = triage(ds, self.triage_rules)
        if reason is not None:
            total = (time.perf_counter() - start) * 1000.0
            logger.info("instance %s skipped: %s", uid, reason)
            prepared.findings_if_skipped = Findings(
                sop_instance_uid=uid, eligible=False, reason=reason, rows=rows, columns=cols,
                timings_ms={"read": round(read_ms, 2), "total": round(total, 2)})
            prepared.timings_ms = {"read": read_ms, "prepare": total}
            return prepared
        if isolated:
            t_dec = time.perf_counter()
            image = self.decoder(path_or_ds, min_side=self.decode_min_side)
            image.decode_ms = (time.perf_counter() - t_dec) * 1000.0   # with the hand-over
        else:
            image = load_for_models(ds, min_side=self.decode_min_side)
        t_pre = time.perf_counter()
        full_hw = (image.full_rows, image.full_cols)
        by_input: dict[Any, Any] = {}
        for name, model in self.models.items():
            spec = model.manifest.input
            if spec not in by_input:   # models fed alike share one tensor
                by_input[spec] = prepare_input(image.unit_image, spec, full_hw)
            prepared.tensors[name] = by_input[spec].tensor
            prepared.geometries[name] = by_input[spec].geometry
        done = time.perf_counter()
        prepared.image = image
        prepared.timings_ms = {"read": read_ms, "decode": image.decode_ms,
                               "preprocess": (done - t_pre) * 1000.0, "prepare": (done - start) * 1000.0}
        return prepared

    def infer(self, prepared: Prepared) -> Findings:
        """Run the models on a prepared instance; a skipped instance is returned unchanged."""
        if prepared.findings_if_skipped is not None:
            return prepared.findings_if_skipped
        if prepared.image is None:
            raise ValueError("prepared: has neither an image nor findings_if_skipped")
        start = time.perf_counter()
        image = prepared.image
        timings = {k: v for k, v in prepared.timings_ms.items() if k != "prepare"}
        decoded: list[Finding] = []
        used: dict[str, str] = {}
        for name, model in self.models.items():
            t = time.perf_counter()
            with self._locks[name]:
                outputs = model.run(prepared.tensors[name])
                used[name] = getattr(model, "last_backend", None) or model.backend
            timings[self.short_names[name]] = (time.perf_counter() - t) * 1000.0
            decoded.extend(to_full_image(decode_findings(outputs, self._manifests[name]),
                                         prepared.geometries[name]))
        tb, nodules, others = self._sort(decoded, image)
        timings["total"] = prepared.timings_ms.get("prepare", 0.0) + (time.perf_counter() - start) * 1000.0
        return Findings(
            sop_instance_uid=prepared.sop_instance_uid, eligible=True, tb=tb, nodules=nodules,
            others=others, timings_ms={k: round(v, 2) for k, v in timings.items()},
            models=self._model_infos(used), rows=image.full_rows, columns=image.full_cols,
            pixel_spacing_mm=list(image.pixel_spacing_mm) if image.pixel_spacing_mm else None)

    def analyze(self, path_or_ds: str | Path | Dataset) -> Findings:
        """prepare + infer."""
        return self.infer(self.prepare(path_or_ds))

    def _sort(self, decoded: list[Finding], image: ImageForModels,
              ) -> tuple[TBResult | None, list[Nodule], list[Other]]:
        """The TB screen, the nodules and the other findings, in full-resolution pixels."""
        tb: TBResult | None = None
        nodules: list[Nodule] = []
        others: list[Other] = []
        for f in decoded:
            key = (f.code.scheme, f.code.value) if f.code is not None else None
            if tb is None and f.kind == "classification" and key in TB_CODES:
                region = None if f.box is None else [round(float(v), 2) for v in f.box]
                tb = TBResult(score=f.score, threshold=f.threshold, positive=f.positive,
                              region=region if f.positive else None, model=f.model)
                continue
            box, mm, px = _sized(f.box, image)
            if f.kind == "detection" and key in NODULE_CODES:
                if box is not None:
                    nodules.append(Nodule(box=box, score=f.score, diameter_mm=mm, diameter_px=px,
                                          model=f.model))
                continue
            if f.kind == "detection" and box is None:
                continue
            code = None if f.code is None else {"value": f.code.value, "scheme": f.code.scheme,
                                                "meaning": f.code.meaning}
            others.append(Other(label=f.label, display=f.display, kind=f.kind, score=f.score,
                                threshold=f.threshold, positive=f.positive, refer=f.refer,
                                code=code, model=f.model, box=box, diameter_mm=mm,
                                diameter_px=px))
        return tb, nodules, others


def _with_tb_threshold(manifest: Any, threshold: float | None) -> Any:
    """``manifest`` with ``threshold`` for its TB classification findings (unchanged when
    ``threshold`` is None or the model has none)."""
    if threshold is None or manifest.task != "classification":
        return manifest
    specs = tuple(dataclasses.replace(f, threshold=threshold)
                  if f.code is not None and (f.code.scheme, f.code.value) in TB_CODES else f
                  for f in manifest.findings)
    return manifest if specs == manifest.findings else dataclasses.replace(manifest, findings=specs)


def _sized(box: Any, image: ImageForModels) -> tuple[list[float] | None, float | None, float]:
    """A full-resolution box rounded to 0.01 px, with its mean side in mm (when the pixel
    spacing is known) and in px; (None, None, 0.0) for no box or an empty one."""
    if box is None:
        return None, None, 0.0
    x1, y1, x2, y2 = box
    width, height = x2 - x1, y2 - y1
    if width <= 0 or height <= 0:
        return None, None, 0.0
    spacing = image.pixel_spacing_mm
    mm = round((width * spacing[1] + height * spacing[0]) / 2.0, 2) if spacing else None
    return [round(float(v), 2) for v in box], mm, round((width + height) / 2.0, 2)


def model_input_side(models: Mapping[str, LoadedModel]) -> int:
    """The largest input side of the models: images are decoded at least that far."""
    return max(max(m.manifest.input.height, m.manifest.input.width) for m in models.values())


def format_findings(findings: Findings) -> str:
    """The readable text form of ``edge analyze`` (no patient data)."""
    lines = [f"image {findings.sop_instance_uid or '(no SOP Instance UID)'} "
             f"({findings.columns} x {findings.rows} px"
             + (f", {findings.pixel_spacing_mm[1]:.3f} mm/px" if findings.pixel_spacing_mm else "") + ")"]
    if not findings.eligible:
        lines.append(f"skipped: {findings.reason}")
        return "\n".join(lines)
    if findings.tb is not None:
        tb = findings.tb
        verdict = "POSITIVE: refer for TB testing" if tb.positive else "negative"
        lines.append(f"TB: score {tb.score:.3f} at threshold {tb.threshold:.3f}: {verdict}")
    lines.append(f"nodules: {len(findings.nodules)}")
    for i, n in enumerate(findings.nodules, 1):
        size = f"{n.diameter_mm:.1f} mm" if n.diameter_mm is not None else f"{n.diameter_px:.0f} px"
        x1, y1, x2, y2 = n.box
        lines.append(f"  {i}. score {n.score:.3f}, box ({x1:.0f}, {y1:.0f})-({x2:.0f}, {y2:.0f}), diameter {size}")
    if findings.others:
        lines.append(f"other findings: {sum(o.positive for o in findings.others)} positive of {len(findings.others)}")
    for i, o in enumerate(findings.others, 1):
        verdict = ("POSITIVE, refer" if o.refer else "POSITIVE") if o.positive else "negative"
        line = f"  {i}. {o.display} ({o.kind}): score {o.score:.3f} at threshold {o.threshold:.3f}: {verdict}"
        if o.box is not None:   # a detection's box, or a positive classification's hottest region
            x1, y1, x2, y2 = o.box
            line += f", box ({x1:.0f}, {y1:.0f})-({x2:.0f}, {y2:.0f})"
        if o.kind == "detection":
            size = f"{o.diameter_mm:.1f} mm" if o.diameter_mm is not None else f"{o.diameter_px:.0f} px"
            line += f", diameter {size}"
        lines.append(line)
    lines.append("refer: " + (", ".join(findings.refer_reasons()) if findings.refer else "no"))
    lines.append("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in findings.timings_ms.items()))
    lines.append("models: " + ", ".join(f"{m.name} {m.version} ({m.backend})" for m in findings.models))
    if not all(m.clinical_use for m in findings.models):
        lines.append("demonstration models: not for clinical use")
    return "\n".join(lines)


def analyze_main(path: str, *, as_json: bool, models_dir: Path, backend: str,
                 tb_threshold: float | None, triage_rules: TriageRules, triton: Any = None) -> int:
    """``edge analyze FILE``: print the findings; 0 when analyzed or skipped, 1 on errors."""
    from engines.manifest import ManifestError, ModelIntegrityError
    from engines.runners.base import RunnerError

    try:
        models = _load_models(models_dir, backend, triton)
    except (ManifestError, ModelIntegrityError, RunnerError, OSError, ValueError) as exc:
        print(f"error: cannot load the models from {models_dir}: {exc}", file=sys.stderr)
        return 1
    try:
        analyzer = Analyzer(models, tb_threshold=tb_threshold, triage_rules=triage_rules)
        findings = analyzer.analyze(path)
    except ImagingError as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for model in models.values():
            model.close()
    if as_json:
        print(json.dumps(findings.to_dict(), indent=2))
    else:
        print(format_findings(findings))
    return 0


def _load_models(models_dir: Path, backend: str, triton: Any = None) -> dict[str, Any]:
    from engines.store import load_models

    return load_models(Path(models_dir), backend, triton=triton)
