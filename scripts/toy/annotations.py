"""Raw TV task files in the released formats (data.md §3.2-3.6): TVR, TVQA, TVC, subtitles.

One TVR query, one TVQA question and one TVC clip (two captions) per scene; ids are global
counters so they never collide across splits.  Query types follow the modality that answers
them: ``v`` (who/what/where: frames), ``t`` (who mentions which object: subtitles), ``vt``
(both).  TVQA asks who is on screen: its answer is a name, grounded in the frames (the face) and
spoken in the subtitles (the speaker prefix), the link that pre-training on unlabelled clips
teaches (docs/toy_qa.md: with where/what questions as well, HERO's QA head gained nothing from
pre-training); its distractor answers are names absent from the clip (see :func:`answers`).
``test_public`` lines omit the fields the released test files omit (TVR: ``vid_name``/``ts``;
TVQA: ``answer_idx``; TVC: ``descs``).
"""
from __future__ import annotations

import itertools

from scripts.toy.text import TVC, TVQA, TVR, describe
from scripts.toy.videos import pick
from scripts.toy.world import N_VALUES, Video, absent_values

TVR_TYPES = ("v", "v", "vt", "vt", "t")


def subtitle_lines(videos: list[Video]) -> list[dict]:
    """``tvqa_preprocessed_subtitles.jsonl`` lines (also the ASR files' format)."""
    return [{"vid_name": v.name,
             "sub": [{"text": s.text, "start": s.start, "end": s.end} for s in v.subs]}
            for v in videos]


def tvr_lines(rng, videos: list[Video], split: str, ids) -> list[dict]:
    lines = []
    for v in videos:
        for sc in v.scenes:
            qtype = pick(rng, TVR_TYPES)
            line = {"vid_name": v.name, "duration": v.duration, "ts": sc.seconds(v.fi),
                    "desc": describe(TVR[qtype], sc), "type": qtype, "desc_id": next(ids)}
            if split == "test_public":
                del line["vid_name"], line["ts"]
            lines.append(line)
    return lines


def answers(rng, template: str, video: Video, scene, field: str) -> tuple[list[str], int]:
    """Five candidates differing only in ``field``; returns them and the correct index.

    The four distractors name values that occur nowhere in the clip, so a candidate is right
    exactly when its value (character, place or action) can be found in the clip's frames.
    Why: telling which of several present values belongs to the asked moment is a two-hop
    problem that the demo's few CPU minutes of training cannot learn.
    """
    absent = set(absent_values(video, field))
    wrong = [int(x) for x in rng.permutation(N_VALUES[field]) if int(x) in absent][:4]
    values = [getattr(scene, field)] + wrong
    order = [int(i) for i in rng.permutation(5)]
    cands = [describe(template, scene, **{field: values[i]}) for i in order]
    return cands, order.index(0)


def tvqa_lines(rng, videos: list[Video], split: str, ids) -> list[dict]:
    lines = []
    for v in videos:
        for sc, (question, answer, field) in itertools.product(v.scenes, TVQA):
            cands, answer_idx = answers(rng, answer, v, sc, field)
            st, ed = sc.seconds(v.fi)
            line = {f"a{k}": cands[k] for k in range(5)}
            line.update(answer_idx=answer_idx, q=describe(question, sc), qid=next(ids),
                        ts=f"{st:.2f}-{ed:.2f}", vid_name=v.name, show_name="Toy Show")
            if split == "test_public":
                del line["answer_idx"]
            lines.append(line)
    return lines


def tvc_lines(videos: list[Video], split: str, clip_ids, cap_ids) -> list[dict]:
    lines = []
    for v in videos:
        for sc in v.scenes:
            line = {"vid_name": v.name, "clip_id": next(clip_ids), "ts": sc.seconds(v.fi),
                    "duration": v.duration,
                    "descs": [{"desc": describe(t, sc), "desc_id": next(cap_ids)} for t in TVC]}
            if split == "test_public":
                del line["descs"]
            lines.append(line)
    return lines


def dur_idx(splits: dict[str, list[Video]]) -> dict:
    """``tvr_video2dur_idx.json``: ``{split: {vid: [duration, global index]}}``, index over the
    sorted names of all splits."""
    names = sorted(v.name for vids in splits.values() for v in vids)
    index = {n: i for i, n in enumerate(names)}
    return {split: {v.name: [v.duration, index[v.name]] for v in vids}
            for split, vids in splits.items()}
