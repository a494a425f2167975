"""VIOLIN, DiDeMo and MSR-VTT annotations in their ORIGINAL release formats, so the project's
converters (``scripts/prepro_{violin,didemo,msrvtt}.py``) run on them.

* VIOLIN ``violin_annotation.json``: ``{clip_key: {"file", "source", "split", "span",
  "statement": [[true, false], ...], "sub": [[text, start, end], ...]}}``; split values
  ``train``/``validate``/``test``; subtitle times are in the source episode's clock, the clip
  being ``span = [start, end]`` of that episode.  Each false statement flips one fact
  (character, action, location or object) of a true one, re-drawn until it matches no scene.
* DiDeMo ``{train,val,test}_data.json``: lists of ``{"annotation_id", "description", "video",
  "times"}``, ``times`` = 4 annotators' ``[first, last]`` 5-second segment indices (inclusive),
  each annotator may move one end by a segment.  Descriptions are visual only.
* MSR-VTT ``videodatainfo.json`` (``videos`` with ``video_id``/``split``
  train|validate|test, ``sentences`` with ``caption``/``video_id``/``sen_id``) and the 1k-A style
  test csv ``key,vid_key,video_id,sentence`` (one sentence per test video).
"""
from __future__ import annotations

from scripts.toy.text import DIDEMO, MSRVTT, VIOLIN, describe
from scripts.toy.videos import DIDEMO_SEG_SEC, pick
from scripts.toy.world import Scene, Video, absent_values, segment_run

VIOLIN_SPLITS = {"train": "train", "val": "validate", "test": "test"}
MSRVTT_SPLITS = {"train": "train", "val": "validate", "test": "test"}
VISUAL_FIELDS = ("char", "action", "loc")


def false_fact(rng, video: Video, scene: Scene) -> dict:
    """The visual facts of ``scene`` (character, action, place), each changed to a value that
    occurs in no scene of the video; the object (a subtitle fact) stays.

    A false statement thus describes a moment absent from the clip. Why: with one flipped fact
    the model must tell three matching facts from two inside one scene, which the demo's few
    hundred CPU updates do not learn (measured: 59% after 300 updates); a value seen elsewhere in
    the clip would also need the binding of facts to one scene.
    """
    facts = {}
    for field in VISUAL_FIELDS:
        absent = absent_values(video, field)
        facts[field] = absent[int(rng.integers(len(absent)))]
    return facts


def violin_clip(rng, video: Video, split: str) -> dict:
    offset = round(float(rng.uniform(0, 900)), 2)
    scenes = [video.scenes[int(i)] for i in rng.permutation(len(video.scenes))[:3]]
    statements = []
    for sc in scenes:
        template = pick(rng, VIOLIN)
        statements.append([describe(template, sc),
                           describe(template, sc, **false_fact(rng, video, sc))])
    return {"file": video.name, "source": "toy", "split": VIOLIN_SPLITS[split],
            "span": [offset, round(offset + video.duration, 2)], "statement": statements,
            "sub": [[s.text, round(s.start + offset, 3), round(s.end + offset, 3)]
                    for s in video.subs]}


def violin_annotation(rng, splits: dict[str, list[Video]]) -> dict:
    clips = [(split, v) for split, vids in splits.items() for v in vids]
    return {str(k): violin_clip(rng, v, split) for k, (split, v) in enumerate(clips)}


def annotator_times(rng, first: int, last: int, n_seg: int) -> list[list[int]]:
    times = []
    for _ in range(4):
        lo, hi, r = first, last, rng.random()
        if r < 0.2 and lo > 0:
            lo -= 1
        elif 0.2 <= r < 0.4 and hi < n_seg - 1:
            hi += 1
        times.append([lo, hi])
    return times


def didemo_data(rng, videos: list[Video], ids) -> list[dict]:
    data = []
    for v in videos:
        n_seg = segment_run(v.scenes[-1], v.fi, DIDEMO_SEG_SEC)[1] + 1
        for sc in v.scenes[:4]:
            first, last = segment_run(sc, v.fi, DIDEMO_SEG_SEC)
            data.append({"annotation_id": next(ids), "description": describe(pick(rng, DIDEMO), sc),
                         "video": f"{v.name}.mov",
                         "times": annotator_times(rng, first, last, n_seg)})
    return data


def msrvtt_info(rng, splits: dict[str, list[Video]]) -> dict:
    videos, sentences = [], []
    for split, vids in splits.items():
        for v in vids:
            videos.append({"category": int(rng.integers(20)), "url": "", "video_id": v.name,
                           "start time": 0.0, "end time": v.duration,
                           "split": MSRVTT_SPLITS[split], "id": int(v.name[len("video"):])})
            for _ in range(4):
                sc = pick(rng, v.scenes)
                sentences.append({"caption": describe(pick(rng, MSRVTT), sc),
                                  "video_id": v.name, "sen_id": len(sentences)})
    return {"info": {"contributor": "toy corpus", "year": "2020"}, "videos": videos,
            "sentences": sentences}


def msrvtt_1ka_rows(info: dict) -> list[list[str]]:
    """One test sentence per test video (its first caption), as in the JSFusion csv."""
    test = [v["video_id"] for v in info["videos"] if v["split"] == "test"]
    first = {}
    for s in info["sentences"]:
        first.setdefault(s["video_id"], s["caption"])
    return [[f"ret{k}", f"msr{vid[len('video'):]}", vid, first[vid]]
            for k, vid in enumerate(test)]
