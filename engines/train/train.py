"""Train both demonstration models from scratch on phantoms and write ``engines/models``.

    python -m engines.train.train --out engines/models          # full run, ~80 min on 2 cores
    python -m engines.train.train --quick --out /tmp/models     # 1-2 minute smoke run

Everything is seeded: phantoms come from fixed seeds (``data.TRAIN_SEED_BASE`` onwards,
never used by the evaluation), and torch/numpy generators are seeded from ``--seed``.
After training, each model is exported to ONNX (checked against PyTorch), timed with ONNX
Runtime, evaluated on held-out full-resolution DICOM phantoms (``benchmarks.model_eval``)
and its folder is written: ``model.onnx``, ``manifest.toml`` (with the sha256) and
``MODEL_CARD.md``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from engines.train import data as tdata
from engines.train import metrics
from engines.train.export import export_onnx, ort_latency_ms, write_card, write_manifest_for
from engines.train.nets import NoduleDetector, TBClassifier, count_parameters

logger = logging.getLogger(__name__)

TB_SIZE = 256
TB_STRIDE = 8
DET_SIZE = 512
DET_STRIDE = 4
MEAN, STD = 0.5, 0.25


@dataclass(frozen=True)
class TrainConfig:
    """Sizes and budgets of one training run (the defaults are the shipped models' run)."""

    seed: int = 0
    render_size: int = 640        # phantom columns for the training cache
    train_cases: int = 2400
    val_cases: int = 96
    tb_steps: int = 2400
    tb_batch: int = 16
    tb_lr: float = 2e-3
    det_steps: int = 4500
    det_batch: int = 16
    det_patch: int = 224          # detector trains on windows of the 512 view (fully convolutional)
    det_focus: float = 0.6        # share of windows centred near a lesion
    tb_width: int = 16            # channels of the first stage (see nets.py)
    det_width: int = 16
    det_deep_width: int = 96      # channels of the detector's stride-16/32 stages
    det_lr: float = 2.5e-3
    weight_decay: float = 1e-4
    # augmentation knobs (see data.augment): the phantoms already vary the reader and its
    # processing; ``aug_reprocess`` adds edge enhancement / smoothing and tone curves on the
    # fly. Strong noise and blur slowed learning of the subtle patterns for little gain.
    aug_intensity: float = 0.5
    aug_noise: float = 0.25
    aug_blur: float = 0.0
    aug_reprocess: float = 1.0
    threads: int = 2
    workers: int = 2
    loader_workers: int = 8       # augmenting processes when training on a GPU
    device: str = "cpu"           # "cuda" on a GPU machine (``--device``): the longer runs
    eval_count: int = 200
    eval_seed: int = tdata.EVAL_SEED_DEFAULT


QUICK = TrainConfig(render_size=512, train_cases=48, val_cases=16, tb_steps=40, tb_batch=8,
                    det_steps=30, det_batch=4, det_patch=192, eval_count=8)


def _model_eval():
    """``benchmarks.model_eval`` (the held-out evaluation at the end of a run) from this checkout.

    ``benchmarks`` is a top-level folder of the repository, not an installed package, so
    it is importable only from the checkout root; add that root when run from elsewhere.
    The metrics themselves are ``engines.train.metrics``.
    """
    try:
        import benchmarks.model_eval as model_eval
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        import benchmarks.model_eval as model_eval
    return model_eval


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the rendering and evaluation
    workers): on a shared machine the wall time says little, this says what the run costs."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """Channels-last layout: oneDNN's convolutions run ~10% faster on it on the CPU."""
    return x.contiguous(memory_format=torch.channels_last)


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 2% of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch(cases: list[tdata.RenderedCase], idx: np.ndarray, size: int,
           rng: np.random.Generator, strength: float, **options: float) -> list[tdata.Sample]:
    return [tdata.augment(cases[int(i)], size, size, rng, mean=MEAN, std=STD, strength=strength,
                          **options) for i in idx]


class _StepBatches(torch.utils.data.Dataset):
    """Batch number ``step`` of a run, drawn by ``make`` from a generator seeded by
    ``(seed, step)``: the batches are the same however many workers make them."""

    def __init__(self, make: Callable[[np.random.Generator], tuple], steps: int, seed: int) -> None:
        self.make, self.steps, self.seed = make, steps, seed

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple:
        return self.make(np.random.default_rng([self.seed, step]))


def _batches(make: Callable[[np.random.Generator], tuple], steps: int, seed: int,
             cfg: TrainConfig) -> torch.utils.data.DataLoader:
    """The run's batches in step order. On a GPU, ``loader_workers`` processes (forked, so
    they share the rendered phantoms) augment ahead of the training step, which would
    otherwise wait for the CPU; on the CPU the batches are made in this process between
    steps (a worker would only take a core from the training step)."""
    workers = cfg.loader_workers if cfg.device != "cpu" else 0
    return torch.utils.data.DataLoader(
        _StepBatches(make, steps, seed), batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=cfg.device != "cpu", prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers else None)


def _aug_options(cfg: TrainConfig) -> dict[str, float]:
    return {"intensity": cfg.aug_intensity, "noise": cfg.aug_noise, "blur": cfg.aug_blur,
            "reprocess": cfg.aug_reprocess}


def tb_loss(score_logit: torch.Tensor, cam_logit: torch.Tensor, labels: torch.Tensor,
            masks: torch.Tensor) -> torch.Tensor:
    """Image-level BCE on the score plus weakly supervised BCE on the heatmap cells (the
    cells say where the pattern is, which matters more now that readers vary so much)."""
    image = F.binary_cross_entropy_with_logits(score_logit[:, 0], labels)
    cells = F.binary_cross_entropy_with_logits(cam_logit[:, 0], masks)
    return image + 1.0 * cells


def centernet_loss(heat_logit: torch.Tensor, size: torch.Tensor, offset_logit: torch.Tensor,
                   targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """CenterNet losses: penalty-reduced focal loss, L1 size (x0.1) and L1 offset."""
    gt, mask = targets["heatmap"], targets["mask"]
    pos = (gt >= 1.0).float()
    log_p = F.logsigmoid(heat_logit)
    log_not_p = F.logsigmoid(-heat_logit)
    p = torch.sigmoid(heat_logit)
    pos_loss = -(pos * (1 - p) ** 2 * log_p).sum()
    neg_loss = -((1 - pos) * (1 - gt) ** 4 * p ** 2 * log_not_p).sum()
    num_pos = pos.sum().clamp(min=1.0)
    focal = (pos_loss + neg_loss) / num_pos
    n_mask = mask.sum().clamp(min=1.0)
    size_l1 = (torch.abs(size - targets["size"]) * mask).sum() / n_mask
    offset_l1 = (torch.abs(torch.sigmoid(offset_logit) - targets["offset"]) * mask).sum() / n_mask
    total = focal + 0.1 * size_l1 + offset_l1
    return total, {"focal": focal.item(), "size": size_l1.item(), "offset": offset_l1.item()}


def train_tb(cases: list[tdata.RenderedCase], val: list[tdata.RenderedCase],
             cfg: TrainConfig) -> tuple[TBClassifier, dict]:
    """Train the TB classifier; returns the model and a training summary."""
    roc_auc = metrics.roc_auc
    rng = np.random.default_rng(cfg.seed + 11)
    torch.manual_seed(cfg.seed + 11)
    dev = torch.device(cfg.device)

    def make(step_rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        samples = _batch(cases, step_rng.integers(0, len(cases), cfg.tb_batch), TB_SIZE, step_rng, 1.0,
                         **_aug_options(cfg))
        masks = np.stack([tdata.tb_mask(s.tb_boxes, TB_SIZE, TB_SIZE, TB_STRIDE) for s in samples])
        return (torch.from_numpy(np.stack([s.tensor for s in samples])),
                torch.tensor([float(s.tb) for s in samples]), torch.from_numpy(masks))

    model = TBClassifier(width=cfg.tb_width).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.tb_lr, weight_decay=cfg.weight_decay)
    val_x = _nhwc(torch.from_numpy(np.stack([s.tensor for s in _batch(val, np.arange(len(val)), TB_SIZE, rng, 0.0)]
                                            )).to(dev))
    val_y = np.asarray([c.tb for c in val])
    history = []
    start = time.monotonic()
    for step, (x, y, masks) in enumerate(_batches(make, cfg.tb_steps, cfg.seed + 11, cfg)):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.tb_steps, cfg.tb_lr)
        model.train()
        x, y, masks = _nhwc(x.to(dev, non_blocking=True)), y.to(dev), masks.to(dev, non_blocking=True)
        score, cam = model.forward_logits(x)
        loss = tb_loss(score, cam, y, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, cfg.tb_steps // 10) == 0 or step + 1 == cfg.tb_steps:
            model.eval()
            with torch.no_grad():
                val_scores = torch.sigmoid(model.forward_logits(val_x)[0])[:, 0].cpu().numpy()
            auc = roc_auc(val_scores[val_y], val_scores[~val_y]) if val_y.any() and (~val_y).any() else float("nan")
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "val_auc": round(auc, 4)})
            logger.info("tb step %d/%d loss %.4f val AUC %.3f (%.0f s)", step + 1, cfg.tb_steps,
                        loss.item(), auc, time.monotonic() - start)
    model.eval()
    model = model.to("cpu", memory_format=torch.contiguous_format)     # exported on the CPU
    return model, {"steps": cfg.tb_steps, "batch": cfg.tb_batch, "seconds": round(time.monotonic() - start),
                   "history": history}


def _det_targets(samples: list[tdata.Sample]) -> dict[str, torch.Tensor]:
    maps = [tdata.centernet_targets(s.nodule_boxes, s.tensor.shape[-2], s.tensor.shape[-1], DET_STRIDE)
            for s in samples]
    return {key: torch.from_numpy(np.stack([m[key] for m in maps])) for key in maps[0]}


def _validate_detector(model: NoduleDetector, samples: list[tdata.Sample],
                       cases: list[tdata.RenderedCase]) -> dict:
    """FROC of ``model`` on the (unaugmented) validation samples."""
    decode_detections, froc = metrics.decode_detections, metrics.froc
    model.eval()
    dev = next(model.parameters()).device
    per_image = []
    with torch.no_grad():
        for sample, case in zip(samples, cases):
            heat, size, offset = model(_nhwc(torch.from_numpy(sample.tensor[None]).to(dev)))
            outputs = {"nodule_heatmap": heat.cpu().numpy(), "nodule_size": size.cpu().numpy(),
                       "nodule_offset": offset.cpu().numpy()}
            per_image.append((decode_detections(outputs, stride=DET_STRIDE, score_threshold=0.05,
                                                nms_iou=0.3, max_detections=20),
                              sample.nodule_boxes, list(case.nodule_mm)))
    return froc(per_image)


def train_detector(cases: list[tdata.RenderedCase], val: list[tdata.RenderedCase],
                   cfg: TrainConfig) -> tuple[NoduleDetector, dict]:
    """Train the nodule detector; returns the model and a training summary."""
    rng = np.random.default_rng(cfg.seed + 23)
    torch.manual_seed(cfg.seed + 23)
    dev = torch.device(cfg.device)
    model = NoduleDetector(width=cfg.det_width, deep_width=cfg.det_deep_width).to(
        dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.det_lr, weight_decay=cfg.weight_decay)
    # over-sample cases with nodules 2:1 so the rare positive cells get enough gradient
    weights = np.asarray([2.0 if len(c.nodule_boxes) else 1.0 for c in cases])
    weights /= weights.sum()
    val_samples = _batch(val, np.arange(len(val)), DET_SIZE, rng, 0.0)

    def make(step_rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        samples = _batch(cases, step_rng.choice(len(cases), cfg.det_batch, p=weights), DET_SIZE, step_rng,
                         1.0, patch=cfg.det_patch, focus=cfg.det_focus, **_aug_options(cfg))
        return torch.from_numpy(np.stack([s.tensor for s in samples])), _det_targets(samples)

    history = []
    start = time.monotonic()
    for step, (x, targets) in enumerate(_batches(make, cfg.det_steps, cfg.seed + 23, cfg)):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.det_steps, cfg.det_lr)
        model.train()
        x = _nhwc(x.to(dev, non_blocking=True))
        targets = {key: value.to(dev, non_blocking=True) for key, value in targets.items()}
        heat, size, offset = model.forward_raw(x)
        loss, parts = centernet_loss(heat, size, offset, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        if (step + 1) % max(1, cfg.det_steps // 10) == 0 or step + 1 == cfg.det_steps:
            result = _validate_detector(model, val_samples, val)
            history.append({"step": step + 1, "loss": round(loss.item(), 4),
                            **{k: round(v, 4) for k, v in parts.items()},
                            "val_sens_at_1fp": round(result["all"]["1"], 3),
                            "val_sens_ge8mm_at_1fp": round(result["ge8"]["1"], 3)})
            logger.info("det step %d/%d loss %.4f %s val sens@1FP %.3f (>= 8 mm %.3f) (%.0f s)", step + 1,
                        cfg.det_steps, loss.item(), {k: round(v, 3) for k, v in parts.items()},
                        result["all"]["1"], result["ge8"]["1"], time.monotonic() - start)
    if not history:
        result = _validate_detector(model, val_samples, val)
    # default operating point: the score at <= 0.5 false positives per image on validation
    threshold = round(float(np.clip(result["thresholds"]["0.5"], 0.2, 0.6)), 2)
    logger.info("detector score threshold %.2f (validation: %s)", threshold,
                {k: result[k] for k in ("all", "small", "ge8", "large", "thresholds")})
    model = model.to("cpu", memory_format=torch.contiguous_format)     # exported on the CPU
    return model, {"steps": cfg.det_steps, "batch": cfg.det_batch, "score_threshold": threshold,
                   "seconds": round(time.monotonic() - start), "history": history}


#: TrainConfig fields that ``--<field>`` sets (integers)
_INT_OPTIONS = ("train_cases", "render_size", "tb_steps", "det_steps", "det_batch", "val_cases", "loader_workers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engines.train.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="models folder to write (engines/models)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (1-2 minutes)")
    parser.add_argument("--seed", type=int, default=0, help="torch/numpy seed (default 0)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "xray-edge-train",
                        help="rendered-phantom cache folder (reused when the generator is unchanged)")
    parser.add_argument("--no-cache", action="store_true", help="render without a disk cache")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="phantom rendering processes")
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (cuda when a GPU is visible, else cpu), cpu or cuda")
    parser.add_argument("--eval-count", type=int, default=None, help="held-out phantoms to evaluate")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    for key in _INT_OPTIONS:
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                            help=f"override {key} (default: {getattr(TrainConfig(), key)})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Train both models and write their folders under ``--out``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = QUICK if args.quick else TrainConfig()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no GPU visible to torch {torch.__version__}")
    cfg = replace(cfg, seed=args.seed, threads=args.threads, workers=args.workers, device=device)
    overrides = {key: getattr(args, key) for key in ("eval_count", *_INT_OPTIONS) if getattr(args, key) is not None}
    cfg = replace(cfg, **overrides)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    command = "python -m engines.train.train " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()

    seeds = tdata.TRAIN_SEED_BASE + np.arange(cfg.train_cases + cfg.val_cases)
    cache = None if args.no_cache else args.cache
    t0 = time.monotonic()
    rendered = tdata.render_cases(seeds, cfg.render_size, workers=cfg.workers, cache_dir=cache)
    render_s = time.monotonic() - t0
    train_cases, val_cases = rendered[:cfg.train_cases], rendered[cfg.train_cases:]
    logger.info("%d training + %d validation phantoms ready in %.0f s", len(train_cases),
                len(val_cases), render_s)
    data_summary = {
        "train_cases": len(train_cases), "val_cases": len(val_cases), "render_size": cfg.render_size,
        "seeds": f"{int(seeds[0])}..{int(seeds[-1])}", "render_seconds": round(render_s),
        "tb_fraction": round(float(np.mean([c.tb for c in train_cases])), 3),
        "nodule_case_fraction": round(float(np.mean([len(c.nodule_boxes) > 0 for c in train_cases])), 3),
        "nodules": int(sum(len(c.nodule_boxes) for c in train_cases)),
        "lesion_sizes": {"< 8 mm": int(sum((c.nodule_mm < 8).sum() for c in train_cases)),
                         "8-30 mm": int(sum(((c.nodule_mm >= 8) & (c.nodule_mm <= 30)).sum() for c in train_cases)),
                         "> 30 mm": int(sum((c.nodule_mm > 30).sum() for c in train_cases))},
        "styles": {s: int(sum(c.style == s for c in train_cases)) for s in sorted({c.style for c in train_cases})},
        "phantom_hash": tdata.phantom_source_hash(),
    }

    tb_model, tb_summary = train_tb(train_cases, val_cases, cfg)
    det_model, det_summary = train_detector(train_cases, val_cases, cfg)

    out: Path = args.out
    specs = {
        "tb_classifier": (tb_model, TB_SIZE, ["tb_score", "tb_heatmap"], tb_summary),
        "nodule_detector": (det_model, DET_SIZE, ["nodule_heatmap", "nodule_size", "nodule_offset"],
                            det_summary),
    }
    exported = {}
    for name, (model, size, outputs, summary) in specs.items():
        folder = out / name
        info = export_onnx(model, folder / "model.onnx", height=size, width=size,
                           input_name="image", output_names=outputs)
        info["latency_ms"] = round(ort_latency_ms(folder / "model.onnx", threads=cfg.threads), 2)
        info["parameters"] = count_parameters(model)
        info["width"] = cfg.tb_width if name == "tb_classifier" else cfg.det_width
        info["deep_width"] = None if name == "tb_classifier" else cfg.det_deep_width
        info["input_size"] = [size, size]
        info["output"] = ({"score_threshold": summary["score_threshold"]}
                          if "score_threshold" in summary else {})
        write_manifest_for(name, folder, size=size, output=info["output"])
        exported[name] = info
        logger.info("%s: %d parameters, ORT CPU median %.1f ms", name, info["parameters"], info["latency_ms"])

    evaluation, evaluation_md = None, None
    if not args.no_eval and cfg.eval_count > 0:
        evaluate, format_report = _model_eval().evaluate, _model_eval().format_report
        evaluation = evaluate(models_dir=out, count=cfg.eval_count, seed=cfg.eval_seed,
                              workers=cfg.workers)
        evaluation_md = format_report(evaluation)
        print(evaluation_md)
    total_s = time.monotonic() - started
    run = {"command": command, "config": asdict(cfg), "data": data_summary, "total_seconds": round(total_s),
           "cpu_seconds": round(_cpu_seconds()), "load_average": [round(v, 2) for v in os.getloadavg()],
           "torch": torch.__version__, "threads": cfg.threads,
           "device": (f"GPU ({torch.cuda.get_device_name()})" if cfg.device.startswith("cuda") else "CPU")}
    for name, (_, _, _, summary) in specs.items():
        write_card(name, out / name, run=run, training=summary, export=exported[name],
                   evaluation_md=evaluation_md)
    logger.info("run summary: %s", json.dumps(
        {"run": run, "tb": tb_summary, "det": det_summary, "export": exported, "evaluation": evaluation},
        default=str))
    logger.info("done in %.0f s; models in %s", total_s, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
