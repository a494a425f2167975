"""Retrieval metrics (utils/tvr_standalone_eval.py) and temporal NMS (eval/nms.py) on
hand-made predictions whose answers are known."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from eval.nms import (
    nms_svmr_predictions,
    nms_vcmr_predictions,
    post_process_nms,
    temporal_iou,
    temporal_iou_f32,
    temporal_nms,
)
from utils.tvr_standalone_eval import eval_main, eval_retrieval, main

VIDEO2IDX = {"a": 0, "b": 1, "c": 2}
KEYS = [f"{t}-r{k}" for t in (0.5, 0.7) for k in (1, 5, 10, 100)]


def gt_line(qid, vid, ts, typ="v", duration=60.0):
    return {"desc_id": qid, "vid_name": vid, "ts": ts, "type": typ, "duration": duration}


def entry(qid, preds):
    return {"desc_id": qid, "desc": "", "predictions": preds}


def submission(**lists):
    return {"video2idx": VIDEO2IDX, **lists}


# GT moments lie on the 1.5 s grid; query 1 is in video a, 2 in b, 3 in c.
GT = [gt_line(1, "a", [3.0, 9.0], "v"), gt_line(2, "b", [0.0, 6.0], "t"),
      gt_line(3, "c", [12.0, 18.0], "vt")]


def test_perfect_shifted_and_wrong_video():
    """Query 1 perfect, query 2 shifted by one frame (IoU 0.6), query 3 wrong video."""
    vcmr = [entry(1, [[0, 3.0, 9.0, 0.9]]),
            entry(2, [[1, 1.5, 7.5, 0.9]]),
            entry(3, [[0, 12.0, 18.0, 0.9]])]
    m = eval_retrieval(submission(VCMR=vcmr), GT)
    assert m["VCMR"] == {"0.5-r1": 66.67, "0.5-r5": 66.67, "0.5-r10": 66.67,
                         "0.5-r100": 66.67, "0.7-r1": 33.33, "0.7-r5": 33.33,
                         "0.7-r10": 33.33, "0.7-r100": 33.33}
    assert m["VCMR_by_type"]["v-0.7-r1"] == 100.0
    assert m["VCMR_by_type"]["t-0.5-r1"] == 100.0 and m["VCMR_by_type"]["t-0.7-r1"] == 0.0
    assert m["VCMR_by_type"]["vt-0.5-r100"] == 0.0
    assert m["VCMR_by_type"]["desc_type_ratio"] == "v 33.33 t 33.33 vt 33.33"
    assert list(m) == ["VCMR", "VCMR_by_type"]


def test_desc_type_ratio_is_upstreams_string_in_every_by_type_dict():
    """23/11/17 of 51 queries: str(round(100 * share, 2)) drops trailing zeros (45.1)."""
    types = ["v"] * 23 + ["t"] * 17 + ["vt"] * 11
    gt = [gt_line(q, "a", [3.0, 9.0], typ) for q, typ in enumerate(types)]
    lists = {t: [entry(q, [[0, 3.0, 9.0, 1.0]]) for q in range(51)]
             for t in ("VCMR", "SVMR", "VR")}
    m = eval_retrieval(submission(**lists), gt)
    assert list(m) == ["VCMR", "VCMR_by_type", "SVMR", "SVMR_by_type", "VR", "VR_by_type"]
    for task in ("VCMR", "SVMR", "VR"):
        by_type = m[f"{task}_by_type"]
        assert by_type["desc_type_ratio"] == "v 45.1 t 33.33 vt 21.57"
        assert list(by_type)[-1] == "desc_type_ratio" and "desc_type_ratio" not in m[task]
    assert m["VR_by_type"]["v-r1"] == 100.0
    half = [gt_line(q, "a", [3.0, 9.0], typ) for q, typ in enumerate(["v", "vt"] * 2)]
    m = eval_retrieval(submission(VR=[entry(q, [[0, 0, 0, 1.0]]) for q in range(4)]), half)
    assert m["VR_by_type"]["desc_type_ratio"] == "v 50.0 t 0.0 vt 50.0"


def test_recall_at_k_counts_rank():
    """The correct moment at rank 6 counts for R@10 and R@100 only."""
    wrong = [[1, 30.0, 36.0, 0.5]] * 5
    vcmr = [entry(1, wrong + [[0, 3.0, 9.0, 0.1]])] + [entry(q, wrong) for q in (2, 3)]
    m = eval_retrieval(submission(VCMR=vcmr), GT, use_desc_type=False)
    assert [m["VCMR"][k] for k in ("0.5-r1", "0.5-r5", "0.5-r10", "0.5-r100")] == \
        [0.0, 0.0, 33.33, 33.33]
    assert "VCMR_by_type" not in m and "desc_type_ratio" not in m


def test_only_first_100_predictions_count():
    wrong = [[1, 30.0, 36.0, 0.5]] * 100
    vcmr = [entry(1, wrong + [[0, 3.0, 9.0, 0.1]]), entry(2, []), entry(3, [])]
    assert eval_retrieval(submission(VCMR=vcmr), GT)["VCMR"]["0.5-r100"] == 0.0


def test_svmr_ignores_other_videos_and_vr_recall():
    svmr = [entry(1, [[2, 3.0, 9.0, 0.9], [0, 4.5, 10.5, 0.5]]),
            entry(2, [[1, 0.0, 6.0, 0.9]]), entry(3, [[2, 0.0, 3.0, 0.9]])]
    vr = [entry(1, [[1, 0, 0, 0.9], [0, 0, 0, 0.8]]), entry(2, [[1, 0, 0, 0.9]]),
          entry(3, [[0, 0, 0, 0.9]])]
    m = eval_retrieval(submission(SVMR=svmr, VR=vr), GT)
    # query 1: first same-video prediction has IoU 0.6; query 2 exact; query 3 IoU 0
    assert m["SVMR"]["0.5-r1"] == 66.67 and m["SVMR"]["0.7-r1"] == 33.33
    assert m["VR"] == {"r1": 33.33, "r5": 66.67, "r10": 66.67, "r100": 66.67}
    assert m["VR_by_type"]["v-r5"] == 100.0 and m["VR_by_type"]["vt-r100"] == 0.0


def test_padded_rows_never_match_video_zero():
    """A short list is padded; the padding must not match GT video index 0."""
    vr = [entry(1, [[1, 0, 0, 0.9]]), entry(2, [[1, 0, 0, 0.9]]), entry(3, [[2, 0, 0, 0.9]])]
    assert eval_retrieval(submission(VR=vr), GT)["VR"]["r100"] == 66.67


def test_iou_is_float32_on_threshold():
    """IoU([0.6, 4.1], [0, 7]) is 0.49999999999999994 in float64 but 0.5 in float32."""
    assert temporal_iou([0.6, 4.1], [0.0, 7.0]) < 0.5
    assert temporal_iou_f32([[0.6, 4.1]], [0.0, 7.0])[0] >= np.float32(0.5)
    gt = [gt_line(1, "a", [0.0, 7.0])]
    m = eval_retrieval(submission(VCMR=[entry(1, [[0, 0.6, 4.1, 1.0]])]), gt)
    assert m["VCMR"]["0.5-r1"] == 100.0


def test_didemo_needs_two_of_four_annotators():
    ts = [[0.0, 5.0], [0.0, 5.0], [5.0, 10.0], [10.0, 15.0]]
    gt = [gt_line(1, "a", ts), gt_line(2, "a", ts), gt_line(3, "a", [[0.0, 5.0]] * 4)]
    vcmr = [entry(1, [[0, 0.0, 5.0, 1.0]]),  # matches 2 intervals
            entry(2, [[0, 5.0, 10.0, 1.0]]),  # matches 1 interval only
            entry(3, [[1, 0.0, 5.0, 1.0]])]  # wrong video
    m = eval_retrieval(submission(VCMR=vcmr), gt, use_desc_type=False)
    assert m["VCMR"]["0.7-r1"] == 33.33


def test_flat_four_numbers_ts_is_refused():
    gt = [gt_line(1, "a", [0.0, 5.0, 5.0, 10.0])]
    with pytest.raises(ValueError, match="list of pairs"):
        eval_retrieval(submission(VCMR=[entry(1, [[0, 0.0, 5.0, 1.0]])]), gt)


def test_bad_inputs_give_clear_errors():
    good = [entry(q, [[0, 3.0, 9.0, 1.0]]) for q in (1, 2, 3)]
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['ts'\]"):
        eval_retrieval(submission(VCMR=good), [{**GT[0], "ts": None}, *GT[1:]])
    with pytest.raises(ValueError, match="lacks field.*type"):
        eval_retrieval(submission(VCMR=good), [{k: v for k, v in g.items() if k != "type"}
                                               for g in GT])
    with pytest.raises(ValueError, match="1 unknown query id.*99"):
        eval_retrieval(submission(VCMR=good + [entry(99, [])]), GT)
    with pytest.raises(ValueError, match="outside the video"):
        eval_retrieval(submission(VCMR=[entry(1, [[0, 9.0, 3.0, 1.0]])] + good[1:]), GT)
    with pytest.raises(ValueError, match="outside the video"):
        eval_retrieval(submission(VCMR=good), [gt_line(1, "a", [70.0, 80.0])] + GT[1:])
    with pytest.raises(ValueError, match="none of the task lists"):
        eval_retrieval(submission(), GT)


def test_match_number_false_scores_overlap(caplog):
    vcmr = [entry(1, [[0, 3.0, 9.0, 1.0]]), entry(99, [])]
    with caplog.at_level(logging.WARNING):
        m = eval_retrieval(submission(VCMR=vcmr), GT, match_number=False)
    assert m["VCMR"]["0.7-r1"] == 100.0
    assert "1 submission-only and 2 GT-only" in caplog.text


def test_gt_video_absent_from_index_is_a_counted_miss(caplog):
    gt = GT + [gt_line(4, "zzz", [0.0, 3.0])]
    vr = [entry(q, [[0, 0, 0, 1.0], [1, 0, 0, 0.5], [2, 0, 0, 0.1]]) for q in (1, 2, 3, 4)]
    with caplog.at_level(logging.WARNING):
        m = eval_retrieval(submission(VR=vr), gt)
    assert m["VR"]["r100"] == 75.0
    assert "1 of 4 GT queries name a video absent" in caplog.text


def test_standalone_cli(tmp_path):
    sub = submission(VCMR=[entry(q, [[VIDEO2IDX[g["vid_name"]], *g["ts"], 1.0]])
                           for q, g in zip((1, 2, 3), GT)])
    sub_path, gt_path, out = tmp_path / "sub.json", tmp_path / "gt.jsonl", tmp_path / "m.json"
    sub_path.write_text(json.dumps(sub))
    gt_path.write_text("\n".join(json.dumps(g) for g in GT) + "\n")
    main(["--submission_path", str(sub_path), "--gt_path", str(gt_path), "--save_path",
          str(out), "--not_verbose"])
    saved = json.loads(out.read_text())
    assert saved["VCMR"] == {k: 100.0 for k in KEYS}
    assert list(saved) == ["VCMR", "VCMR_by_type"]
    assert saved["VCMR_by_type"]["desc_type_ratio"] == "v 33.33 t 33.33 vt 33.33"


def test_eval_main_is_upstreams_cli_on_files(tmp_path, monkeypatch, capsys):
    """``eval_main()`` reads sys.argv like upstream's; verbose mode prints the metrics."""
    sub = submission(VR=[entry(1, [[0, 0, 0, 1.0]]), entry(2, [[0, 0, 0, 1.0]]),
                         entry(3, [[2, 0, 0, 1.0]])])
    sub_path, gt_path, out = tmp_path / "sub.json", tmp_path / "gt.jsonl", tmp_path / "m.json"
    sub_path.write_text(json.dumps(sub))
    gt_path.write_text("\n".join(json.dumps(g) for g in GT) + "\n")
    monkeypatch.setattr("sys.argv", ["tvr_standalone_eval.py", "--submission_path",
                                     str(sub_path), "--gt_path", str(gt_path),
                                     "--save_path", str(out)])
    returned = eval_main()
    saved = json.loads(out.read_text())
    assert saved == returned and json.loads(capsys.readouterr().out) == saved
    assert saved["VR"] == {"r1": 66.67, "r5": 66.67, "r10": 66.67, "r100": 66.67}
    assert saved["VR_by_type"] == {"v-r1": 100.0, "v-r5": 100.0, "v-r10": 100.0,
                                   "v-r100": 100.0, "t-r1": 0.0, "t-r5": 0.0, "t-r10": 0.0,
                                   "t-r100": 0.0, "vt-r1": 100.0, "vt-r5": 100.0,
                                   "vt-r10": 100.0, "vt-r100": 100.0,
                                   "desc_type_ratio": "v 33.33 t 33.33 vt 33.33"}


# ------------------------------------------------------------------------------------- NMS
def test_temporal_nms_suppresses_strictly_above_threshold():
    preds = [[0.0, 6.0, 0.9], [1.5, 7.5, 0.8],  # IoU 0.6 with the first -> removed
             [3.0, 9.0, 0.7],  # IoU exactly 0.5 with the first -> kept (strictly >)
             [30.0, 33.0, 0.95]]
    kept = temporal_nms(preds, 0.5)
    assert kept == [[30.0, 33.0, 0.95], [0.0, 6.0, 0.9], [3.0, 9.0, 0.7]]
    assert temporal_nms([[1.0, 2.0, 0.1]], 0.5) == [[1.0, 2.0, 0.1]]
    assert len(temporal_nms([[float(i), i + 1.0, 1.0 / (i + 1)] for i in range(0, 300, 2)],
                            0.5, max_after_nms=100)) == 100


def test_vcmr_nms_is_per_video_and_svmr_keeps_video():
    preds = [[5, 0.0, 6.0, 0.9], [7, 0.0, 6.0, 0.85], [5, 1.5, 7.5, 0.8], [7, 9.0, 12.0, 0.1]]
    assert nms_vcmr_predictions(preds, 0.5, 200) == [
        [5, 0.0, 6.0, 0.9], [7, 0.0, 6.0, 0.85], [7, 9.0, 12.0, 0.1]]
    assert nms_vcmr_predictions(preds, 0.5, max_before_nms=1) == [[5, 0.0, 6.0, 0.9]]
    svmr = [[3, 0.0, 6.0, 0.9], [3, 1.5, 7.5, 0.8], [3, 9.0, 12.0, 0.5]]
    assert nms_svmr_predictions(svmr, 0.5, 200) == [[3, 0.0, 6.0, 0.9], [3, 9.0, 12.0, 0.5]]
    res = [entry(1, svmr)]
    out = post_process_nms(res, "SVMR", 0.5, 200)
    assert len(out[0]["predictions"]) == 2 and len(res[0]["predictions"]) == 3  # not mutated
    with pytest.raises(ValueError, match="VCMR and SVMR only"):
        post_process_nms(res, "VR", 0.5, 200)


# ---------------------------------------------------------------------------- rank merging
def test_merge_and_rank_weighted_average():
    """Exact re-scoring of merged shards vs upstream's weighted average of rounded metrics."""
    from eval.retrieval import merge_submissions, rank_weighted_average

    shard0 = submission(VR=[entry(1, [[0, 0, 0, 1.0]]), entry(2, [[0, 0, 0, 1.0]])])
    shard1 = {"video2idx": {}, "VR": [entry(3, [[2, 0, 0, 1.0]])]}
    merged = merge_submissions([shard0, shard1])
    assert [e["desc_id"] for e in merged["VR"]] == [1, 2, 3]
    assert merged["video2idx"] == VIDEO2IDX
    per_rank = [eval_retrieval(shard0, GT[:2], use_desc_type=False),
                eval_retrieval({**shard1, "video2idx": VIDEO2IDX}, GT[2:],
                               use_desc_type=False)]
    exact = eval_retrieval(merged, GT, use_desc_type=False)
    assert per_rank[0]["VR"]["r1"] == 50.0 and per_rank[1]["VR"]["r1"] == 100.0
    assert exact["VR"]["r1"] == 66.67
    avg = rank_weighted_average(per_rank, [2, 1])
    assert avg["VR"]["r1"] == pytest.approx(200 / 3)
    typed = [eval_retrieval(shard0, GT[:2]),
             eval_retrieval({**shard1, "video2idx": VIDEO2IDX}, GT[2:])]
    avg = rank_weighted_average(typed, [2, 1])  # §5.4: desc_type_ratio is not averaged
    assert "desc_type_ratio" not in avg["VR_by_type"]
    assert avg["VR_by_type"]["vt-r1"] == pytest.approx(100 / 3)  # rank 0 has no vt query
    assert avg["VR_by_type"]["v-r1"] == pytest.approx(200 / 3)
