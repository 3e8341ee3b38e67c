"""Training data: phantoms rendered once, cached, then augmented on the fly.

Each case is rendered by ``engines.train.phantom`` at a size somewhat above the model
inputs and turned into a display-polarity unit image with ``phantom.unit_image`` (what the
appliance does to a received image). The generator already draws a reader and processing
per case (DR/CR, edge enhancement or multi-scale contrast, tone curve, window or none).
Those unit images are cached (in memory and, keyed by the phantom source hash, on disk)
because rendering dominates the CPU budget. Each training sample is then a random crop
(small shift and scale), flip, and a second layer of domain randomisation on the fly:
edge enhancement or smoothing at a random scale and strength, a tone change (gamma,
contrast, brightness, S-curve, as if another window or reader were used), noise and blur,
so that no single rendering choice can be learnt. The result passes through
``engines.preprocess.to_model_input`` exactly as the appliance does.
"""
from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from engines.preprocess import resize_area, to_model_input

logger = logging.getLogger(__name__)

CHUNK = 50  # cases per cache file
TRAIN_SEED_BASE = 7_000_000   # training/validation phantoms use seeds from here upwards
TRAIN_SEED_SPAN = 1_000_000   # ... and never beyond this many
EVAL_SEED_DEFAULT = 424_242   # held-out evaluation phantoms (benchmarks.model_eval)


@dataclass
class RenderedCase:
    """One phantom as the training code keeps it (coordinates in rendered pixels)."""

    image: np.ndarray                 # float16 unit image, display polarity
    tb: bool
    tb_boxes: np.ndarray              # [K, 4] float32 boxes of the TB patterns
    nodule_boxes: np.ndarray          # [M, 4] float32 nodule boxes
    nodule_mm: np.ndarray             # [M] float32 nodule diameters in mm
    seed: int = 0
    style: str = ""                   # reader and processing (phantom_imaging.STYLES)


@dataclass
class Sample:
    """One augmented training sample at model-input resolution."""

    tensor: np.ndarray                # [1, H, W] float32 (normalised model input)
    tb: bool
    tb_boxes: np.ndarray              # [K, 4] in model-input pixels
    nodule_boxes: np.ndarray          # [M, 4] in model-input pixels (may extend past the edges)


def phantom_source_hash() -> str:
    """Hash of the phantom generator's source, so a changed generator invalidates the cache."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(here.glob("phantom*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _boxes(items: Sequence[dict], key: str = "box") -> np.ndarray:
    if not items:
        return np.zeros((0, 4), np.float32)
    return np.asarray([item[key] for item in items], dtype=np.float32).reshape(-1, 4)


def render_case(seed: int, size: int) -> RenderedCase:
    """Render one phantom at ``size`` columns and keep its unit image and truth."""
    from engines.train import phantom

    case = phantom.generate_case(seed, size=size)
    unit = phantom.unit_image(case)
    return RenderedCase(
        image=unit.astype(np.float16),
        tb=bool(case.tb),
        tb_boxes=_boxes(case.tb_patterns),
        nodule_boxes=_boxes(case.nodules),
        nodule_mm=np.asarray([n["diameter_mm"] for n in case.nodules], np.float32),
        seed=seed,
        style=str(case.style.get("style", "")),
    )


def _render_chunk(args: tuple[list[int], int]) -> list[RenderedCase]:
    seeds, size = args
    return [render_case(s, size) for s in seeds]


def _chunk_path(cache_dir: Path, size: int, seeds: list[int]) -> Path:
    key = f"{phantom_source_hash()}-{size}-{seeds[0]}-{seeds[-1]}-{len(seeds)}"
    return cache_dir / f"phantoms-{key}.npz"


def _save_chunk(path: Path, cases: list[RenderedCase]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for i, c in enumerate(cases):
        arrays[f"image{i}"] = c.image
        arrays[f"tbb{i}"] = c.tb_boxes
        arrays[f"nb{i}"] = c.nodule_boxes
        arrays[f"nmm{i}"] = c.nodule_mm
    arrays["tb"] = np.asarray([c.tb for c in cases])
    arrays["seeds"] = np.asarray([c.seed for c in cases], np.int64)
    arrays["styles"] = np.asarray([c.style for c in cases], dtype="U32")
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_chunk(path: Path) -> list[RenderedCase]:
    with np.load(path) as data:
        return [RenderedCase(image=data[f"image{i}"], tb=bool(data["tb"][i]),
                             tb_boxes=data[f"tbb{i}"], nodule_boxes=data[f"nb{i}"],
                             nodule_mm=data[f"nmm{i}"], seed=int(data["seeds"][i]),
                             style=str(data["styles"][i]))
                for i in range(len(data["seeds"]))]


def render_cases(seeds: Sequence[int], size: int, *, workers: int = 2,
                 cache_dir: Path | None = None) -> list[RenderedCase]:
    """Render (or load from ``cache_dir``) the phantoms for ``seeds`` at ``size`` columns."""
    seeds = [int(s) for s in seeds]
    chunks = [seeds[i:i + CHUNK] for i in range(0, len(seeds), CHUNK)]
    results: dict[int, list[RenderedCase]] = {}
    todo: list[int] = []
    for k, chunk in enumerate(chunks):
        path = _chunk_path(cache_dir, size, chunk) if cache_dir else None
        if path is not None and path.exists():
            try:
                results[k] = _load_chunk(path)
                continue
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("ignoring unreadable cache file %s: %s", path, exc)
        todo.append(k)
    if todo:
        logger.info("rendering %d phantoms at size %d (%d cached)", sum(len(chunks[k]) for k in todo),
                    size, len(seeds) - sum(len(chunks[k]) for k in todo))
        if cache_dir:
            cache_dir.mkdir(parents=True, exist_ok=True)
        jobs = [(chunks[k], size) for k in todo]
        if workers <= 1:
            rendered = map(_render_chunk, jobs)
        else:
            context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
            rendered = pool.map(_render_chunk, jobs)
        for k, cases in zip(todo, rendered):
            results[k] = cases
            if cache_dir:
                _save_chunk(_chunk_path(cache_dir, size, chunks[k]), cases)
        if workers > 1:
            pool.shutdown()
    return [case for k in range(len(chunks)) for case in results[k]]


def _box_mean(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 box with edge padding, by cumulative sums (any radius)."""
    if radius < 1:
        return image
    k = 2 * radius + 1
    padded = np.pad(image, radius, mode="edge").astype(np.float64)
    c = np.cumsum(np.pad(padded, ((1, 0), (0, 0))), axis=0)
    rows = c[k:] - c[:-k]
    c = np.cumsum(np.pad(rows, ((0, 0), (1, 0))), axis=1)
    return ((c[:, k:] - c[:, :-k]) / (k * k)).astype(np.float32)


def _reprocess(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Another reader's processing on top: unsharp masking (edge enhancement with halos)
    or smoothing at a random scale, and an S-curve or its inverse (latitude)."""
    if rng.random() < 0.5 * strength:
        radius = int(rng.integers(1, 9))
        gain = float(rng.uniform(-0.4, 2.0)) * strength      # < 0: a softer reader
        image = image + np.float32(gain) * (image - _box_mean(image, radius))
    if rng.random() < 0.3 * strength:
        slope = float(rng.uniform(2.0, 7.0))
        centre = float(np.clip(rng.normal(0.5, 0.1), 0.3, 0.7))
        lo, hi = (1.0 / (1.0 + math.exp(-slope * (v - centre))) for v in (0.0, 1.0))
        curve = (1.0 / (1.0 + np.exp(-slope * (np.clip(image, -0.5, 1.5) - centre))) - lo) / (hi - lo)
        mix = float(rng.uniform(0.3, 1.0))
        image = (1.0 - mix) * image + mix * curve.astype(np.float32)
    return image


def _transform_boxes(boxes: np.ndarray, x0: float, y0: float, sx: float, sy: float,
                     width: int, height: int, flip: bool, clip: bool = True) -> np.ndarray:
    """Map boxes from rendered pixels through crop + resize (+ flip); optionally clip them."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4)
    out = boxes.copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - x0) * sx
    out[:, [1, 3]] = (out[:, [1, 3]] - y0) * sy
    if flip:
        out[:, [0, 2]] = width - out[:, [2, 0]]
    if not clip:
        return out
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    return out


def augment(case: RenderedCase, height: int, width: int, rng: np.random.Generator, *,
            mean: float = 0.5, std: float = 0.25, strength: float = 1.0,
            patch: int | None = None, focus: float = 0.0, intensity: float = 1.0,
            noise: float = 1.0, blur: float = 1.0, reprocess: float = 0.0) -> Sample:
    """Random crop/shift/scale, reprocessing, intensity, flip, noise and blur, then ``to_model_input``.

    The image is first cropped (88-100% of each side) and mapped to ``height`` x ``width``
    as the appliance would. With ``patch``, only a ``patch`` x ``patch`` window of that
    model-input view is produced (centred near a random nodule with probability
    ``focus``), which lets the fully convolutional detector train on 4x more windows
    for the same compute. ``reprocess`` scales the on-the-fly edge enhancement and tone
    curves (``_reprocess``). ``strength=0`` gives the plain appliance preprocessing.
    """
    rows, cols = case.image.shape
    if strength > 0:
        scale_x = rng.uniform(1.0 - 0.12 * strength, 1.0)
        scale_y = float(np.clip(scale_x * rng.uniform(1 - 0.06 * strength, 1 + 0.06 * strength),
                                0.8, 1.0))
        cw, ch = int(round(cols * scale_x)), int(round(rows * scale_y))
        x0 = int(rng.integers(0, cols - cw + 1))
        y0 = int(rng.integers(0, rows - ch + 1))
    else:
        x0 = y0 = 0
        ch, cw = rows, cols
    out_h, out_w = height, width
    if patch is not None:
        pw = min(cw, max(1, int(round(patch * cw / width))))
        ph = min(ch, max(1, int(round(patch * ch / height))))
        if len(case.nodule_boxes) and rng.random() < focus:
            box = case.nodule_boxes[int(rng.integers(0, len(case.nodule_boxes)))]
            cx = (box[0] + box[2]) / 2 + rng.uniform(-0.35, 0.35) * pw
            cy = (box[1] + box[3]) / 2 + rng.uniform(-0.35, 0.35) * ph
            px = int(np.clip(round(cx - pw / 2), x0, x0 + cw - pw))
            py = int(np.clip(round(cy - ph / 2), y0, y0 + ch - ph))
        else:
            px = int(rng.integers(x0, x0 + cw - pw + 1))
            py = int(rng.integers(y0, y0 + ch - ph + 1))
        x0, y0, cw, ch = px, py, pw, ph
        out_h = out_w = patch
    crop = case.image[y0:y0 + ch, x0:x0 + cw].astype(np.float32)
    resized = resize_area(crop, out_h, out_w)
    flip = bool(strength > 0 and rng.random() < 0.5)
    if flip:
        resized = resized[:, ::-1]
    if strength > 0 and reprocess > 0:
        resized = _reprocess(np.ascontiguousarray(resized, dtype=np.float32), rng, strength * reprocess)
    if strength > 0 and intensity > 0:
        gamma = math.exp(rng.normal(0.0, 0.2 * strength * intensity))
        contrast = math.exp(rng.normal(0.0, 0.15 * strength * intensity))
        shift = rng.normal(0.0, 0.05 * strength * intensity)
        resized = np.clip(resized, 0.0, 1.0) ** gamma
        resized = (resized - 0.5) * contrast + 0.5 + shift
    if strength > 0 and blur > 0 and rng.random() < 0.3 * strength * blur:
        resized = _box_mean(resized, 1)      # 3x3: mild detector-MTF variation
    if strength > 0 and noise > 0:
        sigma = rng.uniform(0.0, 0.02 * strength * noise)
        resized = resized + rng.normal(0.0, sigma, resized.shape).astype(np.float32)
    if strength > 0:
        resized = np.clip(resized, 0.0, 1.0)
    tensor = to_model_input(np.ascontiguousarray(resized, dtype=np.float32), out_h, out_w, mean, std)[0]
    sx, sy = out_w / cw, out_h / ch
    return Sample(
        tensor=tensor,
        tb=case.tb,
        tb_boxes=_transform_boxes(case.tb_boxes, x0, y0, sx, sy, out_w, out_h, flip),
        # unclipped: a nodule cut by the crop keeps its true centre and size (targets skip
        # centres outside the window)
        nodule_boxes=_transform_boxes(case.nodule_boxes, x0, y0, sx, sy, out_w, out_h, flip, clip=False),
    )


def tb_mask(boxes: np.ndarray, height: int, width: int, stride: int) -> np.ndarray:
    """Weak-supervision target for the TB heatmap: fraction of each cell covered by a pattern box."""
    mh, mw = height // stride, width // stride
    mask = np.zeros((mh, mw), np.float32)
    ys = (np.arange(mh, dtype=np.float32) + 0.5) * stride
    xs = (np.arange(mw, dtype=np.float32) + 0.5) * stride
    for x1, y1, x2, y2 in boxes:
        if x2 - x1 < 1 or y2 - y1 < 1:
            continue
        inside = ((ys[:, None] >= y1) & (ys[:, None] <= y2)) & ((xs[None, :] >= x1) & (xs[None, :] <= x2))
        mask[inside] = 1.0
    return mask


def gaussian_radius(w: float, h: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius (in cells) for a box of ``w`` x ``h`` cells."""
    a1, b1, c1 = 1.0, h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4.0, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def centernet_targets(boxes: np.ndarray, height: int, width: int,
                      stride: int) -> dict[str, np.ndarray]:
    """Dense CenterNet targets: heatmap [1,h,w], size [2,h,w], offset [2,h,w], mask [1,h,w]."""
    mh, mw = height // stride, width // stride
    heat = np.zeros((1, mh, mw), np.float32)
    size = np.zeros((2, mh, mw), np.float32)
    offset = np.zeros((2, mh, mw), np.float32)
    mask = np.zeros((1, mh, mw), np.float32)
    yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float32)
    for x1, y1, x2, y2 in boxes:
        w, h = float(x2 - x1), float(y2 - y1)
        if w < 1 or h < 1:
            continue
        cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
        if not (0 <= cx < mw and 0 <= cy < mh):
            continue
        ci, cj = int(cy), int(cx)
        radius = max(0.0, gaussian_radius(w / stride, h / stride))
        sigma = (2 * int(radius) + 1) / 6.0
        g = np.exp(-((xx - cj) ** 2 + (yy - ci) ** 2) / (2 * sigma ** 2))
        heat[0] = np.maximum(heat[0], g)
        heat[0, ci, cj] = 1.0
        size[:, ci, cj] = (w, h)
        offset[:, ci, cj] = (cx - cj, cy - ci)
        mask[0, ci, cj] = 1.0
    return {"heatmap": heat, "size": size, "offset": offset, "mask": mask}
