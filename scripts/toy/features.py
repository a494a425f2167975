"""Per-frame features of the toy videos, in the extractor's per-clip npz layout.

A frame is a noisy sum of fixed prototypes drawn once from the seed:

* ResNet part (2048-d, appearance) = character prototype + location prototype + noise;
* SlowFast part (2304-d, motion) = action prototype + noise.

Prototypes are N(0, 1), noise N(0, ``NOISE_STD``²), stored as float16 like the released
extractor output.  Files go to ``{root}/{resnet,slowfast}_features/<dataset>/<vid>.npz`` (key
``features``), the mirrored layout ``collect_video_feature_paths.py`` walks.  Some videos get one
extra ResNet row, as real extractors disagree by a frame; the converter keeps the minimum.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.toy.world import ACTIONS, CHARACTERS, LOCATIONS, Video

RESNET_DIM = 2048
SLOWFAST_DIM = 2304
NOISE_STD = 0.5


@dataclass(frozen=True)
class Prototypes:
    char: np.ndarray
    loc: np.ndarray
    action: np.ndarray


def make_prototypes(rng: np.random.Generator) -> Prototypes:
    return Prototypes(char=rng.standard_normal((len(CHARACTERS), RESNET_DIM)),
                      loc=rng.standard_normal((len(LOCATIONS), RESNET_DIM)),
                      action=rng.standard_normal((len(ACTIONS), SLOWFAST_DIM)))


def frame_features(video: Video, protos: Prototypes, rng) -> tuple[np.ndarray, np.ndarray]:
    """``(resnet, slowfast)`` float16 arrays; resnet has ``extra_resnet_rows`` more rows."""
    resnet = np.empty((video.n_frames + video.extra_resnet_rows, RESNET_DIM), np.float32)
    slowfast = np.empty((video.n_frames, SLOWFAST_DIM), np.float32)
    for sc in video.scenes:
        resnet[sc.start:sc.end] = protos.char[sc.char] + protos.loc[sc.loc]
        slowfast[sc.start:sc.end] = protos.action[sc.action]
    last = video.scenes[-1]
    resnet[video.n_frames:] = protos.char[last.char] + protos.loc[last.loc]
    resnet += NOISE_STD * rng.standard_normal(resnet.shape, dtype=np.float32)
    slowfast += NOISE_STD * rng.standard_normal(slowfast.shape, dtype=np.float32)
    return resnet.astype(np.float16), slowfast.astype(np.float16)


def write_features(root, dataset: str, video: Video, protos: Prototypes, rng) -> None:
    resnet, slowfast = frame_features(video, protos, rng)
    for kind, arr in (("resnet_features", resnet), ("slowfast_features", slowfast)):
        folder = Path(root) / kind / dataset
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / f"{video.name}.npz", features=arr)
