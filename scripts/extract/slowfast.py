"""SlowFast R50 8x8 in plain PyTorch with pytorchvideo's ``slowfast_r50`` state-dict keys.

Checkpoint format supported: pytorchvideo's Kinetics-400 ``SLOWFAST_8x8_R50.pyth`` (the file
behind ``torch.hub.load("facebookresearch/pytorchvideo", "slowfast_r50", pretrained=True)``,
published at ``https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics/
SLOWFAST_8x8_R50.pyth``; the weights sit under ``model_state``). Download it once on a machine
with internet and pass it with ``--slowfast_ckpt``. Keys: ``blocks.0`` = the two stems
(``multipathway_blocks.{0,1}.conv/norm``) + ``multipathway_fusion`` (``conv_fast_to_slow``,
``norm``); ``blocks.1..4`` = res stages (``multipathway_blocks.{0,1}.res_blocks.N`` with
``branch1_conv/branch1_norm`` and ``branch2.conv_a/norm_a/conv_b/norm_b/conv_c/norm_c``), fused
after stages 1-3; ``blocks.5`` pooling (no weights); ``blocks.6.proj`` the classifier.
PySlowFast's own ``.pkl``/``.pyth`` files (keys ``s1.pathway0_stem...``) are not supported.

Only the features are computed: each pathway's last stage is averaged over time and space and
the two are concatenated slow first (2048 + 256 = 2304), which equals the checkpoint head's
``AvgPool3d`` on 224x224 inputs and works at any input size.
"""
from __future__ import annotations

import torch
from torch import nn

from scripts.extract.recipe import (
    SLOWFAST_ALPHA,
    SLOWFAST_DIM,
    SLOWFAST_MEAN,
    SLOWFAST_SLOW_FRAMES,
    SLOWFAST_STD,
)

SLOWFAST_R50_DEPTHS = (3, 4, 6, 3)
BETA_INV = 8          # fast pathway has 1/8 of the slow pathway's channels
FUSION_RATIO = 2      # fast->slow lateral connection doubles the fast channels
FUSION_KERNEL_T = 7   # slowfast_r50 uses a (7, 1, 1) lateral convolution
SLOW_CONV_A_T = (1, 1, 3, 3)  # temporal kernel of conv_a per stage: slow pathway
FAST_CONV_A_T = (3, 3, 3, 3)  # ... and fast pathway
NUM_CLASSES = 400


def _conv_bn(c_in: int, c_out: int, kernel, stride=(1, 1, 1)):
    pad = [k // 2 for k in kernel]
    return (nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=pad, bias=False),
            nn.BatchNorm3d(c_out))


class Stem(nn.Module):
    def __init__(self, c_out: int, kernel):
        super().__init__()
        self.conv, self.norm = _conv_bn(3, c_out, kernel, (1, 2, 2))
        self.activation = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x):
        return self.pool(self.activation(self.norm(self.conv(x))))


class BottleneckBlock(nn.Module):
    def __init__(self, c_in: int, c_inner: int, c_out: int, t_kernel: int, stride: int):
        super().__init__()
        self.conv_a, self.norm_a = _conv_bn(c_in, c_inner, (t_kernel, 1, 1))
        self.act_a = nn.ReLU(inplace=True)
        self.conv_b, self.norm_b = _conv_bn(c_inner, c_inner, (1, 3, 3), (1, stride, stride))
        self.act_b = nn.ReLU(inplace=True)
        self.conv_c, self.norm_c = _conv_bn(c_inner, c_out, (1, 1, 1))

    def forward(self, x):
        x = self.act_a(self.norm_a(self.conv_a(x)))
        x = self.act_b(self.norm_b(self.conv_b(x)))
        return self.norm_c(self.conv_c(x))


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_inner: int, c_out: int, t_kernel: int, stride: int):
        super().__init__()
        self.branch1_conv = self.branch1_norm = None
        if c_in != c_out or stride != 1:
            self.branch1_conv, self.branch1_norm = _conv_bn(c_in, c_out, (1, 1, 1),
                                                            (1, stride, stride))
        self.branch2 = BottleneckBlock(c_in, c_inner, c_out, t_kernel, stride)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x if self.branch1_conv is None else self.branch1_norm(self.branch1_conv(x))
        return self.activation(shortcut + self.branch2(x))


class ResStage(nn.Module):
    def __init__(self, depth: int, c_in: int, c_inner: int, c_out: int, t_kernel: int,
                 stride: int):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResBlock(c_in if i == 0 else c_out, c_inner, c_out, t_kernel, stride if i == 0 else 1)
            for i in range(depth))

    def forward(self, x):
        for block in self.res_blocks:
            x = block(x)
        return x


class FuseFastToSlow(nn.Module):
    """Lateral connection: time-strided conv of the fast pathway concatenated to the slow one."""

    def __init__(self, c_fast: int):
        super().__init__()
        self.conv_fast_to_slow, self.norm = _conv_bn(
            c_fast, c_fast * FUSION_RATIO, (FUSION_KERNEL_T, 1, 1), (SLOWFAST_ALPHA, 1, 1))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        slow, fast = x
        fuse = self.activation(self.norm(self.conv_fast_to_slow(fast)))
        return [torch.cat([slow, fuse], 1), fast]


class MultiPathWayWithFuse(nn.Module):
    def __init__(self, blocks, fusion: nn.Module):
        super().__init__()
        self.multipathway_blocks = nn.ModuleList(blocks)
        self.multipathway_fusion = fusion

    def forward(self, x):
        x = [block(inp) for block, inp in zip(self.multipathway_blocks, x)]
        return self.multipathway_fusion(x)


class PoolConcatPathway(nn.Module):
    """Global average pool of each pathway, concatenated slow first (no weights)."""

    def forward(self, x):
        return torch.cat([p.mean(dim=(2, 3, 4)) for p in x], 1)


class ResNetBasicHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.proj = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.proj(x)


def _stages(depths):
    """Yield ``(idx, slow (c_in, c_inner, c_out), fast (...))`` as pytorchvideo computes them."""
    dim_in, dim_out = 64, 256
    for idx, _ in enumerate(depths):
        slow = (dim_in + dim_in * FUSION_RATIO // BETA_INV, dim_out // 4, dim_out)
        fast = (dim_in // BETA_INV, dim_out // 4 // BETA_INV, dim_out // BETA_INV)
        yield idx, slow, fast
        dim_in, dim_out = dim_out, dim_out * 2


class SlowFast(nn.Module):
    """SlowFast R50 (``depths`` = blocks per stage; (3, 4, 6, 3) is R50)."""

    def __init__(self, depths=SLOWFAST_R50_DEPTHS):
        super().__init__()
        blocks = [MultiPathWayWithFuse([Stem(64, (1, 7, 7)), Stem(64 // BETA_INV, (5, 7, 7))],
                                       FuseFastToSlow(64 // BETA_INV))]
        for idx, slow, fast in _stages(depths):
            stride = 1 if idx == 0 else 2
            pathways = [ResStage(depths[idx], *slow, SLOW_CONV_A_T[idx], stride),
                        ResStage(depths[idx], *fast, FAST_CONV_A_T[idx], stride)]
            last = idx == len(depths) - 1
            blocks.append(MultiPathWayWithFuse(pathways,
                                               nn.Identity() if last else FuseFastToSlow(fast[2])))
        blocks += [PoolConcatPathway(), ResNetBasicHead(SLOWFAST_DIM, NUM_CLASSES)]
        self.blocks = nn.ModuleList(blocks)
        _init(self)

    def features(self, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, 8, H, W)`` and ``(B, 3, 32, H, W)`` clips -> ``(B, 2304)``."""
        x = [slow, fast]
        for block in self.blocks[:-1]:
            x = block(x)
        return x

    def forward(self, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
        return self.blocks[-1](self.features(slow, fast))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def slowfast_r50(depths=SLOWFAST_R50_DEPTHS) -> SlowFast:
    """SlowFast R50 8x8 with random weights; ``depths`` may be shrunk (tests), widths stay."""
    return SlowFast(depths)


def slow_indices(n_fast: int) -> torch.Tensor:
    """Fast-frame indices of the slow pathway: PySlowFast's ``linspace(0, T-1, T // alpha)``."""
    return torch.linspace(0, n_fast - 1, n_fast // SLOWFAST_ALPHA).long()


class SlowFastStream(nn.Module):
    """uint8 clips ``(B, 32, H, W, 3)`` -> ``(B, 2304)`` float32 features."""

    name = "slowfast"
    dim = SLOWFAST_DIM

    def __init__(self, net: SlowFast):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(SLOWFAST_MEAN).view(1, 3, 1, 1, 1), False)
        self.register_buffer("std", torch.tensor(SLOWFAST_STD).view(1, 3, 1, 1, 1), False)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x = clips.permute(0, 4, 1, 2, 3).float().div_(255)
        fast = (x - self.mean) / self.std
        slow = fast.index_select(2, slow_indices(fast.shape[2]).to(fast.device))
        assert slow.shape[2] == SLOWFAST_SLOW_FRAMES, slow.shape
        if fast.is_cuda:
            slow = slow.contiguous(memory_format=torch.channels_last_3d)
            fast = fast.contiguous(memory_format=torch.channels_last_3d)
        return self.net.features(slow, fast).float()
