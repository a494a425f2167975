"""Samplers for the four toy video collections, each with its own subtitle style.

* TV (TVR/TVQA/TVC, pretraining) and VIOLIN: 1.5 s frames; 3-4 scenes of 3-5 frames (9-20
  frames). Short clips keep a CPU training step cheap (a TVQA question runs five copies of its
  clip: about 1.2 s instead of 1.9 s per update of 16 questions on one core), so the demo's
  QA/VIOLIN fine-tuning gets more updates; few scenes leave room for absent distractor values
  (``world.py``).
  Subtitles are ``" Name : text"`` lines: the scene's character states the object, an
  off-screen character may reply with an empty line.
* DiDeMo: 17-20 frames of 1.5 s (25.5-30 s), scenes are runs of 1-2 five-second segments; ASR
  lines (lower case, no speaker) exist for 3 videos in 4, others have no speech at all (their
  subtitle DB records become pseudo-subtitles).
* MSR-VTT: 2 s frames, 5-15 frames (10-30 s), 1-3 scenes of 3-8 frames, ASR like DiDeMo.
"""
from __future__ import annotations

from scripts.toy.text import ASR_LINES, FACT_LINES, MENTION_LINES, REPLIES, describe
from scripts.toy.world import (
    CHARACTERS,
    Video,
    make_scenes,
    scene_subs,
    segment_scenes,
    split_lengths,
)

TV_FI = 1.5
MSRVTT_FI = 2.0
DIDEMO_SEG_SEC = 5.0
P_MENTION = 0.5


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def tv_name(i: int) -> str:
    """``toy_s01e01_seg01_clip_00``-style names: 4 clips per segment, 2 segments per episode."""
    season, episode, seg, clip = i // 80 + 1, (i // 8) % 10 + 1, (i // 4) % 2 + 1, i % 4
    return f"toy_s{season:02d}e{episode:02d}_seg{seg:02d}_clip_{clip:02d}"


def dialogue(rng, video: Video) -> None:
    """Per scene: the on-screen character names the object; with ``P_MENTION`` it also says
    where it is or what it does (a weak, partial hint: the pre-training signal that ties the
    place and action words to the frames); then maybe an off-screen reply."""
    for sc in video.scenes:
        speaker = f"{CHARACTERS[sc.char]} : "
        lines = [speaker + describe(pick(rng, FACT_LINES), sc)]
        if rng.random() < P_MENTION:
            lines.append(speaker + describe(pick(rng, pick(rng, MENTION_LINES)), sc))
        if rng.random() < 0.5:
            other = pick(rng, [c for c in range(len(CHARACTERS)) if c != sc.char])
            lines.append(f"{CHARACTERS[other]} : " + describe(pick(rng, REPLIES), sc))
        video.subs += scene_subs(rng, sc, video.fi, lines)


def asr(rng, video: Video, p_speech: float = 0.75, p_line: float = 0.7) -> None:
    if rng.random() >= p_speech:
        return
    for sc in video.scenes:
        if rng.random() < p_line:
            video.subs += scene_subs(rng, sc, video.fi, [describe(pick(rng, ASR_LINES), sc)])


def tv_video(rng, name: str, n_scenes=(3, 4), total=(9, 20)) -> Video:
    video = Video(name, TV_FI, make_scenes(rng, split_lengths(rng, n_scenes, (3, 5), total)),
                  extra_resnet_rows=int(rng.random() < 0.25))
    dialogue(rng, video)
    return video


def violin_video(rng, name: str) -> Video:
    return tv_video(rng, name)


def didemo_video(rng, name: str) -> Video:
    n_frames = int(rng.integers(17, 21))
    video = Video(name, TV_FI, segment_scenes(rng, n_frames, TV_FI, DIDEMO_SEG_SEC))
    asr(rng, video)
    return video


def msrvtt_video(rng, name: str) -> Video:
    lengths = split_lengths(rng, (1, 3), (3, 8), (5, 15))
    video = Video(name, MSRVTT_FI, make_scenes(rng, lengths))
    asr(rng, video)
    return video
