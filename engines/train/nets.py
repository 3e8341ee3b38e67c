"""PyTorch networks for the two demonstration models (training only; never imported at run time).

Both networks are small enough for a 2-core CPU and a Jetson Orin Nano, and use only
operations that export to ONNX opset 17 and build in TensorRT 10: Conv (+BatchNorm, folded
at export), Relu, Sigmoid, Add, Resize (nearest), MaxPool, AveragePool and Reshape.
Input is ``[1, 1, H, W]`` float32 from ``engines.preprocess.to_model_input``.

- ``TBClassifier``: a class-activation style network. A 1x1 convolution turns the stride-8
  features into a per-cell logit map; ``tb_heatmap`` is its sigmoid, and the image score is
  a learned mix of the map's max and mean logits, so the score and the overlay agree.
- ``NoduleDetector``: a CenterNet-style network with a stride-4 output (see manifest.md for
  the tensor semantics): ``nodule_heatmap`` (sigmoid), ``nodule_size`` (box width and height
  in model-input pixels) and ``nodule_offset`` (sub-cell centre offset, sigmoid so 0..1).
  Its deep stages (strides 16 and 32) can be wider than the rest (``deep_width``): they
  see whole masses of 3-6 cm with their surroundings and cost little at that resolution.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

HEATMAP_PRIOR_BIAS = -4.6  # sigmoid(-4.6) ~ 0.01: CenterNet's focal-loss prior


class ConvBNReLU(nn.Sequential):
    """3x3 (or kxk) convolution, batch norm and ReLU; the batch norm is folded at export."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut (keeps gradients healthy in a short run)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(channels, channels)
        self.conv2 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


def _upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling (exports as ONNX Resize with static scales)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class TBClassifier(nn.Module):
    """TB image classifier with a coarse heatmap: input 256x256, heatmap 32x32 (stride 8)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        c1, c2, c3, c4 = width, width * 2, width * 3, width * 4
        self.stem = ConvBNReLU(1, c1, stride=2)                                   # /2
        self.stage2 = nn.Sequential(ConvBNReLU(c1, c2, stride=2), ResidualBlock(c2))  # /4
        self.stage3 = nn.Sequential(ConvBNReLU(c2, c3, stride=2), ResidualBlock(c3))  # /8
        self.stage4 = nn.Sequential(ConvBNReLU(c3, c4, stride=2), ResidualBlock(c4))  # /16
        self.stage5 = nn.Sequential(ConvBNReLU(c4, c4, stride=2), ResidualBlock(c4))  # /32
        self.lateral4 = nn.Conv2d(c4, c3, 1)
        self.lateral5 = nn.Conv2d(c4, c3, 1)
        self.fuse = ConvBNReLU(c3, c3)
        self.cam = nn.Conv2d(c3, 1, 1)
        # score logit = a * max(map) + b * mean(map) + c, as a 1x1 conv over [max, mean]
        self.pool_mix = nn.Conv2d(2, 1, 1)
        with torch.no_grad():
            self.pool_mix.weight.copy_(torch.tensor([[[[0.7]], [[0.3]]]]))
            self.pool_mix.bias.zero_()
            self.cam.bias.fill_(-2.0)

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score logit ``[N, 1]`` and heatmap logits ``[N, 1, H/8, W/8]`` (for the losses)."""
        f3 = self.stage3(self.stage2(self.stem(x)))
        f4 = self.stage4(f3)
        f5 = self.stage5(f4)
        p4 = self.lateral4(f4) + _upsample_to(self.lateral5(f5), f4)
        p3 = f3 + _upsample_to(p4, f3)
        cam = self.cam(self.fuse(p3))
        h, w = cam.shape[-2:]
        pooled_max = F.max_pool2d(cam, kernel_size=(h, w))
        pooled_mean = F.avg_pool2d(cam, kernel_size=(h, w))
        score = self.pool_mix(torch.cat([pooled_max, pooled_mean], dim=1))
        return score.reshape(-1, 1), cam

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exported outputs: ``tb_score`` [N, 1] and ``tb_heatmap`` [N, 1, H/8, W/8], both 0..1."""
        score, cam = self.forward_logits(x)
        return torch.sigmoid(score), torch.sigmoid(cam)


class NoduleDetector(nn.Module):
    """CenterNet-style nodule/mass detector: input 512x512, outputs at stride 4 (128x128)."""

    stride = 4

    def __init__(self, width: int = 16, deep_width: int | None = None) -> None:
        super().__init__()
        c1, c2, c3, c4 = width, width * 2, width * 3, deep_width or width * 4
        self.stem = ConvBNReLU(1, c1, stride=2)                                     # /2
        self.stage2 = nn.Sequential(ConvBNReLU(c1, c2, stride=2), ResidualBlock(c2))  # /4
        self.stage3 = nn.Sequential(ConvBNReLU(c2, c3, stride=2), ResidualBlock(c3))  # /8
        self.stage4 = nn.Sequential(ConvBNReLU(c3, c4, stride=2), ResidualBlock(c4),
                                    ResidualBlock(c4))                                # /16
        self.stage5 = nn.Sequential(ConvBNReLU(c4, c4, stride=2), ResidualBlock(c4))  # /32
        self.lat5 = nn.Conv2d(c4, c2, 1)
        self.lat4 = nn.Conv2d(c4, c2, 1)
        self.lat3 = nn.Conv2d(c3, c2, 1)
        self.lat2 = nn.Conv2d(c2, c2, 1)
        self.fuse = ConvBNReLU(c2, c2)
        self.head_heatmap = nn.Sequential(ConvBNReLU(c2, c2), nn.Conv2d(c2, 1, 1))
        self.head_size = nn.Sequential(ConvBNReLU(c2, c2), nn.Conv2d(c2, 2, 1))
        self.head_offset = nn.Conv2d(c2, 2, 1)
        with torch.no_grad():
            self.head_heatmap[-1].bias.fill_(HEATMAP_PRIOR_BIAS)
            self.head_size[-1].bias.fill_(12.0)

    def forward_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heatmap logits, sizes (px) and offset logits, each at stride 4 (for the losses)."""
        f2 = self.stage2(self.stem(x))
        f3 = self.stage3(f2)
        f4 = self.stage4(f3)
        f5 = self.stage5(f4)
        p = self.lat4(f4) + _upsample_to(self.lat5(f5), f4)
        p = self.lat3(f3) + _upsample_to(p, f3)
        p = self.lat2(f2) + _upsample_to(p, f2)
        p = self.fuse(p)
        return self.head_heatmap(p), self.head_size(p), self.head_offset(p)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exported outputs: ``nodule_heatmap`` (0..1), ``nodule_size`` (px), ``nodule_offset`` (0..1)."""
        heat, size, offset = self.forward_raw(x)
        return torch.sigmoid(heat), size, torch.sigmoid(offset)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (quoted in the model cards)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
