"""TVC caption metrics (eval/tvc.py) on hand-made captions whose scores are known.

Java is installed on this machine, so the PTB tokenizer and METEOR run for real; METEOR (about
10 s to load its paraphrase table) is exercised once.
"""
from __future__ import annotations

import json
import logging

import pytest

from eval.tvc import (
    METRIC_KEYS,
    CaptionEvalError,
    TVCEval,
    fallback_tokenize,
    remove_nonascii,
    score_captions,
    tokenize,
)

DISTINCT = {"1": "a man walks his small dog", "2": "two women eat red apples together"}


def write_refs(path, clip2descs, extra=None):
    with open(path, "w") as f:
        for n, (clip, descs) in enumerate(clip2descs.items()):
            line = {"vid_name": f"vid_{n // 2}", "clip_id": int(clip), "ts": [0.0, 3.0],
                    "descs": [{"desc": d, "desc_id": 10 * n + k} for k, d in enumerate(descs)]}
            f.write(json.dumps({**line, **(extra or {})}) + "\n")
    return path


def result_lines(clip2text):
    return [{"vid_name": "v", "clip_id": int(c), "ts": [0.0, 3.0], "descs": [{"desc": t}]}
            for c, t in clip2text.items()]


def java_scores(refs: dict, hyps: dict) -> dict:
    """×100 scores through the real PTB tokenizer, without METEOR."""
    both = tokenize({**{("ref", k): list(v) for k, v in refs.items()},
                     **{("hyp", k): [hyps[k]] for k in refs}}, use_java=True)
    gts = {k: both[("ref", k)] for k in refs}
    res = {k: both[("hyp", k)] for k in refs}
    return {k: 100 * v for k, v in score_captions(gts, res, meteor=False).items()}


def test_identical_captions_score_maximum_with_meteor(tmp_path):
    ref = write_refs(tmp_path / "ref.jsonl", {c: [t] for c, t in DISTINCT.items()})
    scores = TVCEval(ref)(result_lines(DISTINCT))
    assert list(scores) == list(METRIC_KEYS)
    assert all(isinstance(v, float) for v in scores.values())
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == pytest.approx(100.0, abs=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(100.0)
    assert scores["METEOR"] > 99.0
    # CIDEr-D: every n-gram occurs in one of the two clips (idf log 2), cosine 1, no length
    # penalty -> 10 per clip, x100
    assert scores["CIDEr"] == pytest.approx(1000.0, rel=1e-6)


def test_disjoint_captions_score_zero():
    hyps = {"1": "green trees grow quickly", "2": "blue cars drive slowly"}
    scores = java_scores({c: [t] for c, t in DISTINCT.items()}, hyps)
    for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert scores[key] == pytest.approx(0.0, abs=1e-6)


def test_hand_computed_bleu_and_rouge():
    # unigram 5/6, bigram 3/5 (the cat, on the, the mat), same length -> no brevity penalty;
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides -> ROUGE-L F = 5/6
    scores = java_scores({"7": ["the cat is on the mat"]}, {"7": "the cat sat on the mat"})
    assert scores["Bleu_1"] == pytest.approx(100 * 5 / 6, abs=1e-4)
    assert scores["Bleu_2"] == pytest.approx(100 * (5 / 6 * 3 / 5) ** 0.5, abs=1e-4)
    assert scores["ROUGE_L"] == pytest.approx(100 * 5 / 6, abs=1e-4)


def test_no_matching_4gram_gives_near_zero_bleu4_and_logs_the_counts(caplog):
    # issue 6: 1-grams 5/6 (the x2, cat, sat, mat), 2-grams 3/5 (the cat, cat sat, the mat),
    # 3-grams 1/4 (the cat sat), 4-grams 0/3, same length. Bleu_3 = (1/8)^(1/3) = 0.5 exactly;
    # Bleu_4 only has coco-caption's 1e-15 smoothing: (1/8 * 1e-15 / 3)^(1/4) ~ 8.0e-5
    with caplog.at_level(logging.INFO, logger="eval.tvc"):
        scores = java_scores({"7": ["the cat sat on the mat"]}, {"7": "the cat sat in the mat"})
    assert scores["Bleu_3"] == pytest.approx(50.0, abs=1e-4)
    assert scores["Bleu_4"] == pytest.approx(100 * (1 / 8 * 1e-15 / 3) ** 0.25, rel=1e-4)
    assert "1-gram 5/6, 2-gram 3/5, 3-gram 1/4, 4-gram 0/3" in caplog.text


def test_preprocessing_ignores_case_punctuation_and_non_ascii():
    refs = {c: [t] for c, t in DISTINCT.items()}
    hyps = {"1": "A man, walks his small dog!", "2": "Two women\u2014eat red apples together."}
    scores = java_scores(refs, hyps)
    assert scores["Bleu_4"] == pytest.approx(100.0, abs=1e-6)
    assert scores["CIDEr"] == pytest.approx(1000.0, rel=1e-6)
    assert remove_nonascii("  caf\u00e9 au lait\u2019s ") == "caf  au lait s"


def test_multi_reference_uses_best_reference():
    refs = {"1": ["completely unrelated words here", "the cat sat on the mat"]}
    scores = java_scores(refs, {"1": "the cat sat on the mat"})
    assert scores["ROUGE_L"] == pytest.approx(100.0)
    assert scores["Bleu_4"] == pytest.approx(100.0, abs=1e-6)


def test_empty_prediction_is_scored_not_dropped(tmp_path):
    ref = write_refs(tmp_path / "ref.jsonl", {c: [t] for c, t in DISTINCT.items()})
    hyps = {"1": DISTINCT["1"], "2": ""}
    scores = TVCEval(ref, use_java=False)(result_lines(hyps))
    # one of the two clips perfect, the other 0
    assert scores["ROUGE_L"] == pytest.approx(50.0)
    assert scores["CIDEr"] == pytest.approx(500.0, rel=1e-6)


def test_without_java_warns_and_omits_meteor(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("eval.tvc.shutil.which", lambda name: None)
    ref = write_refs(tmp_path / "ref.jsonl", {c: [t] for c, t in DISTINCT.items()})
    with caplog.at_level(logging.WARNING, logger="eval.tvc"):
        evaluator = TVCEval(ref)
    assert not evaluator.use_java
    assert "Java not found" in caplog.text
    scores = evaluator(result_lines(DISTINCT))
    assert "METEOR" not in scores
    assert scores["Bleu_4"] == pytest.approx(100.0, abs=1e-6)
    assert fallback_tokenize("It's (a) Test, isn't it?") == "it 's a test is n't it"


def test_missing_extra_and_duplicate_predictions_are_errors(tmp_path):
    ref = write_refs(tmp_path / "ref.jsonl", {c: [t] for c, t in DISTINCT.items()})
    evaluator = TVCEval(ref, use_java=False)
    with pytest.raises(CaptionEvalError, match=r"1 reference clips have no prediction.*'2'"):
        evaluator(result_lines({"1": "a man"}))
    with pytest.raises(CaptionEvalError, match=r"1 predicted clips are not in it.*'9'"):
        evaluator(result_lines({**DISTINCT, "9": "extra"}))
    with pytest.raises(CaptionEvalError, match="clip 1 is predicted more than once"):
        evaluator(result_lines(DISTINCT) + result_lines({"1": "again"}))
    with pytest.raises(CaptionEvalError, match="prediction #0"):
        evaluator([{"clip_id": 1, "descs": []}])
    with pytest.raises(CaptionEvalError, match=str(ref)):
        evaluator(result_lines({"1": "a man"}))


def test_bad_reference_files(tmp_path):
    empty = write_refs(tmp_path / "empty.jsonl", {"3": ["fine caption", "  \u00e9 "]})
    with pytest.raises(CaptionEvalError, match=r"empty.jsonl:1: clip 3 has an empty reference"):
        TVCEval(empty, use_java=False)
    no_descs = tmp_path / "test_public.jsonl"
    no_descs.write_text(json.dumps({"vid_name": "v", "clip_id": 4, "ts": [0, 1]}) + "\n")
    with pytest.raises(CaptionEvalError, match=r"test_public.jsonl:1: clip 4 has no 'descs'"):
        TVCEval(no_descs, use_java=False)
    dup = tmp_path / "dup.jsonl"
    line = json.dumps({"clip_id": 5, "descs": [{"desc": "a b"}]})
    dup.write_text(line + "\n" + line + "\n")
    with pytest.raises(CaptionEvalError, match=r"dup.jsonl:2: clip 5 appears twice"):
        TVCEval(dup, use_java=False)
    with pytest.raises(CaptionEvalError, match="not found"):
        TVCEval(tmp_path / "absent.jsonl")
