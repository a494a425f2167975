"""The toy TV world: a fixed cast, actions, places and objects, and the timeline of each video.

Why it looks like this: every fact lives in exactly one modality, so the tasks need both.

* Frames show WHO (ResNet part: character prototype), WHERE (ResNet part: location prototype)
  and WHAT they do (SlowFast part: action prototype), see ``features.py``.
* Subtitles carry WHICH OBJECT the on-screen character talks about; objects are never visible.
* A video is a sequence of scenes (contiguous frames, at least 3 each); in a scene one character
  performs one action at one location.  The characters of a video are all distinct, so a
  character names one moment inside a video, and every moment has a real temporal extent.
  Consecutive scenes never share their action, so boundaries are visible in the frames.
* Subtitles cover only part of each scene (gaps give unmatched frames), and an off-screen
  character may reply with a line that carries no fact (a distractor name in the text).

The lexicon is fixed (not drawn from the seed), so the toy tokenizer is the same for every seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CHARACTERS = ("Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Irene",
              "Jonas", "Karla", "Leon", "Maya", "Nadia", "Oscar", "Paula", "Quentin", "Rosa",
              "Simon", "Tara", "Umberto", "Vera", "Walter", "Yasmin")
# (base, third person, gerund)
ACTIONS = (("walk", "walks", "walking"), ("sit", "sits", "sitting"), ("eat", "eats", "eating"),
           ("read", "reads", "reading"), ("dance", "dances", "dancing"),
           ("run", "runs", "running"), ("cook", "cooks", "cooking"),
           ("sing", "sings", "singing"), ("write", "writes", "writing"),
           ("paint", "paints", "painting"), ("swim", "swims", "swimming"),
           ("jump", "jumps", "jumping"), ("sleep", "sleeps", "sleeping"),
           ("laugh", "laughs", "laughing"), ("cry", "cries", "crying"),
           ("clean", "cleans", "cleaning"), ("drive", "drives", "driving"),
           ("draw", "draws", "drawing"), ("play", "plays", "playing"),
           ("knit", "knits", "knitting"))
# TVQA distractors and VIOLIN false statements name values absent from the clip (a clip has at
# most four scenes). Many values (24 names, 20 actions, 20 places) against few labelled videos
# per task: the labels alone cannot teach every name, action and place (scripts/toy/README.md)
LOCATIONS = ("kitchen", "office", "park", "hospital", "cafe", "bedroom", "garden", "library",
             "beach", "station", "museum", "school", "airport", "bakery", "church", "hotel",
             "market", "theater", "gym", "studio")
OBJECTS = ("phone", "letter", "key", "book", "cake", "ring", "camera", "umbrella", "guitar",
           "wallet")

N_VALUES = {"char": len(CHARACTERS), "action": len(ACTIONS), "loc": len(LOCATIONS),
            "obj": len(OBJECTS)}


@dataclass
class Scene:
    """One character doing one action at one location over frames ``[start, end)``."""

    char: int
    action: int
    loc: int
    obj: int
    start: int
    end: int

    def seconds(self, fi: float) -> list[float]:
        return [round(self.start * fi, 2), round(self.end * fi, 2)]


@dataclass
class Sub:
    text: str
    start: float
    end: float


@dataclass
class Video:
    """A clip with its ground truth; ``extra_resnet_rows`` mimics extractors disagreeing."""

    name: str
    fi: float
    scenes: list[Scene]
    subs: list[Sub] = field(default_factory=list)
    extra_resnet_rows: int = 0

    @property
    def n_frames(self) -> int:
        return self.scenes[-1].end

    @property
    def duration(self) -> float:
        return round(self.n_frames * self.fi, 2)


def absent_values(video: Video, field: str) -> list[int]:
    """The values of ``field`` that no scene of ``video`` has, ascending (TVQA distractors and
    VIOLIN false facts are drawn from them)."""
    present = {getattr(sc, field) for sc in video.scenes}
    return [v for v in range(N_VALUES[field]) if v not in present]


def split_lengths(rng, n_range, len_range, total_range) -> list[int]:
    """Scene lengths (frames) whose sum lies in ``total_range`` (rejection sampling)."""
    while True:
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        lengths = [int(x) for x in rng.integers(len_range[0], len_range[1] + 1, size=n)]
        if total_range[0] <= sum(lengths) <= total_range[1]:
            return lengths


def make_scenes(rng, lengths) -> list[Scene]:
    """Scenes with distinct characters and an action change at every boundary."""
    chars = rng.choice(len(CHARACTERS), size=len(lengths), replace=False)
    scenes, start, prev_action = [], 0, -1
    for char, length in zip(chars, lengths):
        action = int(rng.choice([a for a in range(len(ACTIONS)) if a != prev_action]))
        scenes.append(Scene(int(char), action, int(rng.integers(len(LOCATIONS))),
                            int(rng.integers(len(OBJECTS))), start, start + length))
        start, prev_action = start + length, action
    return scenes


def timed_line(rng, lo: float, hi: float, dur_range) -> tuple[float, float] | None:
    """A ``[start, end]`` of random length inside ``[lo, hi]``, or None if it cannot fit."""
    dur = float(rng.uniform(*dur_range))
    if hi - lo < dur:
        return None
    start = float(rng.uniform(lo, hi - dur))
    return round(start, 3), round(start + dur, 3)


def scene_subs(rng, scene: Scene, fi: float, lines: list[str]) -> list[Sub]:
    """The first line early in the scene, each next one (if it fits) after the previous; the
    rest of the scene is silent."""
    a, b = scene.start * fi, scene.end * fi
    first = timed_line(rng, a + 0.1, min(b - 0.1, a + 4.5), (1.5, 3.0))
    if first is None:
        first = (round(a + 0.1, 3), round(b - 0.1, 3))
    subs = [Sub(lines[0], *first)]
    for text in lines[1:]:
        nxt = timed_line(rng, subs[-1].end + 0.2, b - 0.1, (1.0, 2.5))
        if nxt is None:
            break
        subs.append(Sub(text, *nxt))
    return subs


def segment_scenes(rng, n_frames: int, fi: float, seg_sec: float) -> list[Scene]:
    """DiDeMo-style scenes: runs of 1-2 five-second segments, frames assigned by midpoint.

    Only segments holding at least one frame midpoint count, so no scene is empty.
    """
    n_seg = int(((n_frames - 0.5) * fi) // seg_sec) + 1
    runs, seg = [], 0
    while seg < n_seg:
        length = min(int(rng.integers(1, 3)), n_seg - seg)
        runs.append((seg, seg + length))
        seg += length
    bounds = [0]
    for _, seg_end in runs[:-1]:
        bounds.append(next(t for t in range(n_frames + 1) if (t + 0.5) * fi >= seg_end * seg_sec))
    bounds.append(n_frames)
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    return make_scenes(rng, lengths)


def segment_run(scene: Scene, fi: float, seg_sec: float) -> tuple[int, int]:
    """Inclusive 5-second segment indices covered by a scene's frame midpoints."""
    first = int(((scene.start + 0.5) * fi) // seg_sec)
    last = int(((scene.end - 0.5) * fi) // seg_sec)
    return first, last


def stream_rng(seed: int, stream: int) -> np.random.Generator:
    """Independent, reproducible random stream per dataset (adding one never shifts another)."""
    return np.random.default_rng([seed, stream])
