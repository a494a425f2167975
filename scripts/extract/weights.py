"""Build the two networks and load their checkpoints from local files (nothing downloaded).

ResNet-152: a torchvision ImageNet state dict (``resnet152-b121ed2d.pth`` = IMAGENET1K_V1, the
weights of 2020; ``resnet152-f82ba261.pth`` = V2 also loads). SlowFast R50 8x8: pytorchvideo's
``SLOWFAST_8x8_R50.pyth`` (see :mod:`scripts.extract.slowfast`). Wrappers are unpacked
(``model_state``, ``state_dict``, ``model``) and a DataParallel ``module.`` prefix is dropped;
then the keys must match exactly (BatchNorm ``num_batches_tracked`` counters may be absent, as
in old torchvision files), otherwise a ValueError names the file, the flag and the first keys
at fault.
"""
from __future__ import annotations

import logging
import pickle

import torch
from torch import nn

from scripts.extract.resnet import ResNetStream, resnet152
from scripts.extract.slowfast import SlowFastStream, slowfast_r50

LOGGER = logging.getLogger(__name__)
WRAPPER_KEYS = ("model_state", "state_dict", "model")
TINY_DEPTHS = (1, 1, 1, 1)
SHOW_KEYS = 5
FORMAT_HINTS = {
    "resnet": "torchvision resnet152 keys (conv1.weight, layer1.0.conv1.weight, ..., fc.weight)",
    "slowfast": "pytorchvideo slowfast_r50 keys (blocks.0.multipathway_blocks.0.conv.weight, "
                "..., blocks.6.proj.weight) as in SLOWFAST_8x8_R50.pyth",
}


def unwrap_state_dict(obj, path: str) -> dict:
    """The tensor dict inside a checkpoint object, ``module.`` prefixes removed."""
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors (looked inside "
                         f"{', '.join(WRAPPER_KEYS)})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _read(path: str, flag: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag}: checkpoint file not found: {path}") from None
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise ValueError(f"{flag} {path}: cannot be read as a tensor-only checkpoint "
                         f"(torch.load weights_only=True): {exc}. Re-save just its state dict "
                         "with torch.save(state_dict, path).") from exc


def load_checkpoint(net: nn.Module, path: str, stream: str, flag: str) -> None:
    """Load ``path`` into ``net`` strictly; a key or shape mismatch raises a clear ValueError."""
    state = unwrap_state_dict(_read(path, flag), path)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
                   for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        hint = (" It looks like a PySlowFast checkpoint (s1.pathway0_stem...), which is not "
                "supported." if any(k.startswith("s1.") for k in state) else "")
        raise ValueError(
            f"{flag} {path}: keys do not match the {stream} network, expected "
            f"{FORMAT_HINTS[stream]}. missing {len(missing)} {missing[:SHOW_KEYS]}, "
            f"unexpected {len(unexpected)} {unexpected[:SHOW_KEYS]}, wrong shape "
            f"{len(wrong_shape)} {wrong_shape[:SHOW_KEYS]}.{hint}")
    net.load_state_dict(state, strict=False)


def build_streams(streams, resnet_ckpt=None, slowfast_ckpt=None, random_weights=False,
                  tiny=False) -> dict:
    """``{name: stream module}`` in eval mode; a checkpoint is required unless random weights.

    ``tiny`` (random weights only) keeps the feature widths but one block per stage, for smoke
    tests and benchmarks of the data path.
    """
    if tiny and not random_weights:
        raise ValueError("--tiny is only meant with --random_weights")
    built = {}
    for name in streams:
        ckpt, flag = {"resnet": (resnet_ckpt, "--resnet_ckpt"),
                      "slowfast": (slowfast_ckpt, "--slowfast_ckpt")}[name]
        if name == "resnet":
            net = resnet152(TINY_DEPTHS) if tiny else resnet152()
        else:
            net = slowfast_r50(TINY_DEPTHS) if tiny else slowfast_r50()
        if ckpt:
            load_checkpoint(net, ckpt, name, flag)
        elif not random_weights:
            raise ValueError(f"{flag} is required for the {name} stream (a local checkpoint "
                             "file; nothing is downloaded), or pass --random_weights to test")
        else:
            LOGGER.warning("%s stream uses RANDOM weights: features are meaningless", name)
        built[name] = (ResNetStream(net) if name == "resnet" else SlowFastStream(net)).eval()
    return built
