"""An independent, functional EfficientNet-Lite0 forward pass that reads the lukemelas keys directly.

Written from the architecture's definition (TF "SAME" padding, BN eps 1e-3, ReLU6,
no squeeze-excitation, residual when stride 1 and channels unchanged), sharing no
code with timm, so a test can prove that position mapping onto timm reproduces it.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

# first-block stride of each stage of lite0 (stages change output channels: 16 24 40 80 112 192 320)
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
EPS = 1e-3


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _bn(x: torch.Tensor, sd: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                        sd[f"{prefix}.bias"], training=False, eps=EPS)


def _conv(x: torch.Tensor, w: torch.Tensor, stride: int = 1, groups: int = 1) -> torch.Tensor:
    return F.conv2d(_same_pad(x, w.shape[-1], stride), w, stride=stride, groups=groups)


def lite0_reference(sd: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of EfficientNet-Lite0 for (N, 3, H, W) inputs normalised as (x - 127) / 128."""
    x = F.relu6(_bn(_conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("_blocks.")})
    stage, prev_out = -1, None
    for b in blocks:
        p = f"_blocks.{b}"
        out_ch = sd[f"{p}._project_conv.weight"].shape[0]
        first = out_ch != prev_out
        stage += int(first)
        stride = STAGE_STRIDES[stage] if first else 1
        inp = x
        if f"{p}._expand_conv.weight" in sd:
            x = F.relu6(_bn(_conv(x, sd[f"{p}._expand_conv.weight"]), sd, f"{p}._bn0"))
        dw = sd[f"{p}._depthwise_conv.weight"]
        x = F.relu6(_bn(_conv(x, dw, stride, groups=dw.shape[0]), sd, f"{p}._bn1"))
        x = _bn(_conv(x, sd[f"{p}._project_conv.weight"]), sd, f"{p}._bn2")
        if stride == 1 and inp.shape[1] == x.shape[1]:
            x = x + inp
        prev_out = out_ch
    x = F.relu6(_bn(_conv(x, sd["_conv_head.weight"]), sd, "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])
