"""Device hygiene and mixed precision of every task head and evaluation path (issue 15, item 1).

There is no GPU here, and ``FakeTensorMode`` with a fake ``cuda`` device aborts a CPU-only
build, so a tensor made on the wrong device is caught another way: :class:`FactoryCheck`, a
``TorchFunctionMode``, sees every call of a tensor factory (``torch.arange``, ``zeros``,
``tensor`` ...) and records those whose immediate Python caller is a file under ``model/`` or
``eval/`` and that pass no ``device=``. Such a tensor lands on the CPU whatever device the model
runs on; ``*_like``, ``Tensor.new_*`` and ``device=x.device`` follow the inputs and pass. Every
head runs forward and backward and every evaluation path (full-corpus VCMR/VR ranking, QA and
VIOLIN validation, TVC greedy decoding) runs under the mode, which must then hold no offence.

The mixed-precision half runs every head under CPU ``torch.autocast`` (fp16 and bf16) and
checks the output dtypes the callers rely on, finiteness, and closeness to fp32.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers_model import (
    PADDED_VIDEOS,
    add_fom_keys,
    add_mfm_keys,
    make_mlm_batch,
    make_txt_batch,
    make_video_batch,
    small_config,
)
from torch.overrides import TorchFunctionMode

from data.loader import move_to_device
from eval.captioning import decode_tvc
from eval.qa import validate_videoQA, validate_violin
from eval.retrieval import FullEvalSetting, run_queries
from eval.vcmr_ranking import encode_video_corpus
from model import (
    HeroForPretraining,
    HeroForTvc,
    HeroForVcmr,
    HeroForVideoQA,
    HeroForViolin,
    HeroForVr,
)
from model.layers import set_dropout
from model.tvc import BOS_ID, EOS_ID

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
WATCHED = tuple(str(ROOT / d) + "/" for d in ("model", "eval"))
DV, VOCAB = 12, 64
FACTORY_NAMES = ("arange", "zeros", "ones", "full", "empty", "tensor", "as_tensor", "rand",
                 "randn", "randint", "randperm", "eye", "linspace", "logspace", "empty_strided",
                 "scalar_tensor", "tril_indices", "triu_indices", "normal", "from_numpy")
FACTORIES = {getattr(torch, n): n for n in FACTORY_NAMES}
DATA_FACTORIES = (torch.tensor, torch.as_tensor, torch.normal)  # a tensor argument keeps its device


class FactoryCheck(TorchFunctionMode):
    """Records tensor factories called from model/ or eval/ code without a ``device``.

    ``offences`` holds ``"file:line torch.name"``; ``placed`` counts the factories those files
    called with a device, so a test can show the mode saw the code it checks.
    """

    def __init__(self):
        super().__init__()
        self.offences, self.placed = [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = FACTORIES.get(func)
        if name is not None:
            caller = sys._getframe(1)
            path = caller.f_code.co_filename
            if path.startswith(WATCHED):
                if self._placed(func, args, kwargs):
                    self.placed += 1
                else:
                    where = Path(path).relative_to(ROOT)
                    self.offences.append(f"{where}:{caller.f_lineno} torch.{name}")
        return func(*args, **kwargs)

    @staticmethod
    def _placed(func, args, kwargs) -> bool:
        if func is torch.from_numpy:
            return False
        if kwargs.get("device") is not None:
            return True
        return func in DATA_FACTORIES and bool(args) and torch.is_tensor(args[0])


def check_devices(fn, *args, **kwargs):
    """Run ``fn`` under :class:`FactoryCheck`; fail listing every offending call."""
    with FactoryCheck() as mode:
        out = fn(*args, **kwargs)
    if mode.offences:
        pytest.fail("tensor factories called without device= (the tensor would stay on the "
                    "CPU):\n  " + "\n  ".join(sorted(set(mode.offences))), pytrace=False)
    assert mode.placed > 0, "no model/eval factory call was seen: the check ran on nothing"
    return out


# ------------------------------------------------------------------------------ models, batches
def build(cls, d_layers=0, **kwargs):
    torch.manual_seed(0)
    cfg = small_config(hidden=32, heads=4, f_layers=1, c_layers=1, vocab=VOCAB,
                       with_q=cls is not HeroForTvc, d_layers=d_layers)
    return set_dropout(cls(cfg, vfeat_dim=DV, **kwargs), 0.0)


def video_batch(videos=PADDED_VIDEOS, seed=0):
    return make_video_batch(videos, vfeat_dim=DV, vocab_size=VOCAB, seed=seed)


def with_queries(batch, k):
    """``k`` queries per video, grouped per video (the ranking losses' layout)."""
    n = len(batch["num_subs"]) * k
    q = make_txt_batch([3, 5, 4, 2, 6, 3][:n], vocab_size=VOCAB, seed=1)
    spans = torch.tensor([[0, 1], [1, 3], [2, 3], [0, 2], [3, 3], [0, 3]][:n])  # inside video
    batch.update(query_input_ids=q["input_ids"], query_pos_ids=q["pos_ids"],
                 query_attn_masks=q["attn_masks"], targets=spans,
                 q_vidx=torch.arange(n) // k)
    return batch


QA_VIDEOS = [(6, [(0, [0, 1], 3), (1, [2, 3, 4], 4), (2, [], 3)])] * 5 + \
    [(4, [(0, [0, 1], 3), (1, [2, 3], 2)])] * 5


def qa_batch():
    b = video_batch(QA_VIDEOS)
    t = make_txt_batch((5, 7, 4, 6, 5, 3, 8, 4, 4, 6), vocab_size=VOCAB, seed=2,
                       first_id=EOS_ID)
    b.update(qa_input_ids=t["input_ids"], qa_pos_ids=t["pos_ids"], qa_attn_masks=t["attn_masks"],
             targets=torch.tensor([[3], [1]]), ts_targets=torch.tensor([[1, 4], [0, 2]]),
             qids=["q0", "q1"])
    return b


def violin_batch():
    b = video_batch([QA_VIDEOS[0], QA_VIDEOS[5]])
    t = make_txt_batch((4, 6), vocab_size=VOCAB, seed=3, first_id=EOS_ID)
    b.update(q_input_ids=t["input_ids"], q_pos_ids=t["pos_ids"], q_attn_masks=t["attn_masks"],
             targets=torch.tensor([[1], [0]]), qids=["s0", "s1"])
    return b


CLIP_RANGES = (((0, 3), (2, 6)), ((1, 2),))
CAPTIONS = ([5, 9, 13, 7], [21, 4], [30, 31, 32, 33, 34, 35])


def tvc_batch():
    b = video_batch()
    width = max(len(c) for c in CAPTIONS) + 1
    inputs, targets = torch.ones(3, width, dtype=torch.long), torch.full((3, width), -1)
    for i, cap in enumerate(CAPTIONS):
        inputs[i, :len(cap) + 1] = torch.tensor([BOS_ID] + cap)
        targets[i, :len(cap) + 1] = torch.tensor(cap + [EOS_ID])
    seg = [ed - st for clips in CLIP_RANGES for st, ed in clips]
    mask = (torch.arange(max(seg))[None] < torch.tensor(seg)[:, None]).long()
    b.update(cap_input_ids=inputs, cap_pos_ids=torch.arange(width)[None], cap_tgt_ids=targets,
             cap_attn_mask=mask, clip_ranges=CLIP_RANGES, vid_names=["v0", "v0", "v1"],
             clip_ids=[0, 1, 2], all_ts=[(0, 3), (2, 6), (1, 2)])
    return b


def pretrain_batches():
    mfm = add_mfm_keys(video_batch(), {0: [1, 5], 1: [3]})
    return {"mlm": make_mlm_batch(PADDED_VIDEOS, vfeat_dim=DV, vocab_size=VOCAB, n_masked=2),
            "mffr": mfm, "mfm-nce": mfm,
            "fom": add_fom_keys(video_batch(), {0: {1: 3, 3: 1}, 1: {0: 2, 2: 0}}),
            "vsm": with_queries(video_batch(), 2)}


VSM_KW = dict(lw_neg_ctx=1.0, lw_neg_q=1.0, lw_st_ed=0.5)

# name -> (model factory, [(task, batch factory)])
HEADS = {
    "pretrain": (lambda: build(HeroForPretraining, **VSM_KW),
                 [(t, lambda t=t: pretrain_batches()[t])
                  for t in ("mlm", "mffr", "mfm-nce", "fom", "vsm")]),
    "vcmr": (lambda: build(HeroForVcmr, **VSM_KW),
             [("tvr", lambda: with_queries(video_batch(), 1))]),
    "vcmr_sampled_hard": (lambda: build(HeroForVcmr, use_all_neg=False, use_hard_negative=True,
                                        hard_pool_size=1, **VSM_KW),
                          [("tvr", lambda: with_queries(video_batch(), 1))]),
    "vr": (lambda: build(HeroForVr, lw_neg_ctx=1.0, lw_neg_q=1.0),
           [("msrvtt_video_sub", lambda: with_queries(video_batch(), 1))]),
    "videoQA": (lambda: build(HeroForVideoQA), [("tvqa", qa_batch)]),
    "violin": (lambda: build(HeroForViolin), [("violin", violin_batch)]),
    "tvc": (lambda: build(HeroForTvc, d_layers=2), [("tvc", tvc_batch)]),
}


def flat(out):
    """The tensors of a forward's output (a tensor or a tuple of tensors), in order."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def total_loss(out):
    """Sum of every loss term a forward returned."""
    return sum(t.float().mean() for t in flat(out))


# ------------------------------------------------------------------------------ the checker
def test_factory_check_flags_only_unplaced_factories_in_model_and_eval_code():
    """The mode must see factories called from model/eval files and judge their placement."""
    src = ("x = torch.arange(3)\n"
           "y = torch.zeros(2, device=x.device)\n"
           "z = x.new_zeros(2) + torch.zeros_like(x)[:2]\n"
           "w = torch.as_tensor(x)\n"
           "v = torch.tensor([1, 2], dtype=torch.long)\n")
    code = compile(src, str(ROOT / "model" / "not_a_module.py"), "exec")
    with FactoryCheck() as mode:
        exec(code, {"torch": torch})
        torch.ones(2)  # from a test file: not model/eval code
    assert mode.offences == ["model/not_a_module.py:1 torch.arange",
                             "model/not_a_module.py:5 torch.tensor"]
    assert mode.placed == 2


# ------------------------------------------------------------------------------ device: models
@pytest.mark.parametrize("head", sorted(HEADS))
def test_forward_backward_and_inference_make_no_unplaced_tensor(head):
    make_model, tasks = HEADS[head]
    model = make_model()
    batches = [(task, make_batch()) for task, make_batch in tasks]

    def run():
        model.train()
        for task, batch in batches:
            total_loss(model(batch, task)).backward()
        model.eval()
        with torch.no_grad():
            for task, batch in batches:
                model(batch, task, compute_loss=False)
                if task in HeroForVcmr.vsm_tasks:
                    model(batch, task)  # eval-mode losses: per-query vectors, sum reduction

    check_devices(run)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_vcmr_cross_scoring_makes_no_unplaced_tensor():
    model = build(HeroForVcmr, **VSM_KW).eval()
    b = with_queries(video_batch(), 3)
    with torch.no_grad():
        frames = model.v_encoder(b, "repr")
        scores, st, ed = check_devices(
            model.get_pred_from_raw_query, frames, b["c_attn_masks"], b["query_input_ids"],
            b["query_pos_ids"], b["query_attn_masks"], cross=True)
    assert scores.shape == (6, 2) and st.shape == ed.shape == (6, 2, frames.size(1))


class FakeToker:
    """The two tokenizer calls ``decode_tvc`` makes; ids >= 60 are 'outside the vocabulary'."""

    def convert_ids_to_tokens(self, ids):
        return [f"w{i}" if i < 60 else None for i in ids]

    def convert_tokens_to_string(self, tokens):
        return " ".join(tokens)


def test_tvc_decoding_makes_no_unplaced_tensor():
    model = build(HeroForTvc, d_layers=2).eval()
    batch = tvc_batch()
    lines = check_devices(decode_tvc, model, [batch], FakeToker(), max_gen_step=5)
    full = check_devices(model.decode_full_recompute, batch, 5)
    assert len(lines) == 3 and len(full) == 3
    assert [ln["clip_id"] for ln in lines] == [0, 1, 2]


# ------------------------------------------------------------------------------ device: eval
class ListLoader(list):
    """A list of batches with the ``dataset`` attribute the evaluation loops read."""

    def __init__(self, batches, **dataset):
        super().__init__(batches)
        self.dataset = SimpleNamespace(**dataset)


def corpus_loader():
    first = video_batch(PADDED_VIDEOS, seed=4)
    second = video_batch([(5, [(0, [0, 1, 2], 3), (1, [3, 4], 2)])], seed=5)
    first["vids"], second["vids"] = ["va", "vb"], ["vc"]
    return ListLoader([first, second], vids=["va", "vb", "vc"])


def query_loader(n_batches=2):
    batches = []
    for i in range(n_batches):
        q = make_txt_batch([3, 5, 4], vocab_size=VOCAB, seed=10 + i)
        batches.append({"query_input_ids": q["input_ids"], "query_pos_ids": q["pos_ids"],
                        "query_attn_masks": q["attn_masks"],
                        "targets": torch.tensor([[0, 2], [1, 3], [2, 4]]),
                        "vids": ["va", "vc", "vz"], "qids": [f"{3 * i + j}" for j in range(3)]})
    return batches


def eval_setting(tasks, **kwargs):
    return FullEvalSetting(tasks=tasks, k_videos=3, video_batch_size=2, max_clip_len=8,
                           min_l=1, max_l=4, max_before_nms=20, max_after_nms=10, **kwargs)


def full_corpus_eval(model, setting):
    """Steps A-C of the full-corpus evaluation: encode the corpus, score and rank the queries."""
    with torch.no_grad():
        frames, masks, vids = encode_video_corpus(model, corpus_loader(), torch.device("cpu"),
                                                  setting.max_clip_len)
    video2idx = {v: i + 10 for i, v in enumerate(vids)}
    return run_queries(model, query_loader(), frames, masks, vids, video2idx, setting)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_full_corpus_vcmr_ranking_makes_no_unplaced_tensor(impl):
    model = build(HeroForVcmr, **VSM_KW).eval()
    col = check_devices(full_corpus_eval, model,
                        eval_setting(("VCMR", "SVMR", "VR"), impl=impl))
    assert col.n_queries == 6 and col.n_absent == 2
    assert all(len(col.lists[t]) == 6 for t in ("VCMR", "SVMR", "VR"))
    assert sum(bool(e["predictions"]) for e in col.lists["SVMR"]) == 4


def test_full_corpus_vr_makes_no_unplaced_tensor():
    model = build(HeroForVr, lw_neg_ctx=1.0).eval()
    col = check_devices(full_corpus_eval, model, eval_setting(("VR",), use_exp=False))
    assert [len(e["predictions"]) for e in col.lists["VR"]] == [3] * 6


def test_qa_and_violin_validation_make_no_unplaced_tensor():
    qa = build(HeroForVideoQA)
    log, results, logits = check_devices(validate_videoQA, qa, [qa_batch()], "tvqa", True)
    assert set(results) == {"q0", "q1"} and len(logits["q0"]) == 5 and "valid/acc" in log
    violin = build(HeroForViolin)
    log, results, _ = check_devices(validate_violin, violin, [violin_batch()], "test")
    assert set(results) == {"s0", "s1"} and "valid/test_loss" in log


# ------------------------------------------------------------------------------ device: meta
# The meta device also catches a CPU tensor from any other source (an attribute that is not a
# registered buffer, torch.from_numpy ...) meeting the model's tensors. It cannot run ops whose
# output shape depends on the data (boolean indexing: MLM/MFM targets, ranking-loss masks, TVC
# token selection), so it covers these (head, task, compute_loss) runs.
META_CASES = [("pretrain", "fom", True), ("pretrain", "fom", False), ("pretrain", "vsm", False),
              ("vcmr", "tvr", False), ("vr", "msrvtt_video_sub", False),
              ("videoQA", "tvqa", True), ("videoQA", "tvqa", False), ("violin", "violin", False),
              ("tvc", "tvc", False)]


@pytest.mark.parametrize("head,task,loss", META_CASES)
def test_runs_on_the_meta_device(head, task, loss):
    make_model, tasks = HEADS[head]
    batch = move_to_device(dict(tasks)[task](), torch.device("meta"))
    model = make_model().to("meta").train(loss)
    out = model(batch, task, compute_loss=loss)
    assert all(t is None or t.device.type == "meta" for t in flat(out))
    if loss:
        total_loss(out).backward()
        assert all(p.grad is None or p.grad.device.type == "meta" for p in model.parameters())


def test_tvc_greedy_decoding_runs_on_the_meta_device():
    model = build(HeroForTvc, d_layers=2).to("meta").eval()
    batch = move_to_device(tvc_batch(), torch.device("meta"))
    for use_cache in (True, False):
        ids = model.greedy_ids(batch, 4, use_cache=use_cache)
        assert ids.device.type == "meta" and ids.shape == (3, 4)


# ------------------------------------------------------------------------------ mixed precision
# CPU autocast (fp16 and bf16) against fp32 on the same weights, dropout off. Tolerance: the
# relative error ||amp - fp32|| / ||fp32|| of each output is at most 16 units of roundoff of
# the autocast dtype (bf16 2^-8 -> 0.0625, fp16 2^-11 -> 0.0078); the tiny models measure
# <= 0.014 (bf16) and <= 0.002 (fp16). Loose on purpose: it catches an overflow, a lost cast or
# a wrong operand, not the rounding of matmuls. CPU autocast casts fewer ops than CUDA's (e.g.
# LayerNorm stays in the low dtype), so only the dtypes the code sets itself are asserted.
AMP_TOL = {torch.bfloat16: 16 * 2.0 ** -8, torch.float16: 16 * 2.0 ** -11}
F32, AMP = "fp32", "amp"
# (head, task) -> (dtypes of the loss outputs, dtypes of the compute_loss=False outputs).
# Losses are fp32 (computed on fp32 logits / scores); the LM head's logits (MLM, TVC) are fp32
# because its fp32 bias is added to the low-precision decoder output; the rest is autocast.
AMP_DTYPES = {
    ("pretrain", "mlm"): ((F32,), (F32,)),
    ("pretrain", "mffr"): ((F32,), (AMP,)),
    ("pretrain", "mfm-nce"): ((F32,), (AMP, AMP)),
    ("pretrain", "fom"): ((F32,), (AMP,)),
    ("pretrain", "vsm"): ((F32, F32, F32), (AMP, AMP, AMP)),
    ("vcmr", "tvr"): ((F32, F32, F32), (AMP, AMP, AMP)),
    ("vcmr_sampled_hard", "tvr"): ((F32, F32, F32), (AMP, AMP, AMP)),
    ("vr", "msrvtt_video_sub"): ((F32, F32), (AMP,)),
    ("videoQA", "tvqa"): ((F32, F32), (AMP,)),
    ("violin", "violin"): ((F32,), (AMP,)),
    ("tvc", "tvc"): ((F32,), (F32,)),
}


def rel_err(out, ref) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-12))


def outputs(model, batch, task, loss, dtype=None):
    """The forward's tensors; same RNG for every run (the sampled negatives draw)."""
    torch.manual_seed(0)
    model.train(loss)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                         enabled=dtype is not None):
        return flat(model(batch, task, compute_loss=loss))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_autocast_output_dtypes_finite_and_close_to_fp32(head, dtype):
    make_model, tasks = HEADS[head]
    model = make_model()
    for task, make_batch in tasks:
        batch = make_batch()
        for loss, expected in zip((True, False), AMP_DTYPES[head, task]):
            ref = outputs(model, batch, task, loss)
            got = outputs(model, batch, task, loss, dtype)
            where = f"{head}/{task} {'loss' if loss else 'inference'}"
            assert [t.dtype for t in got] == [torch.float32 if e == F32 else dtype
                                              for e in expected], where
            for i, (out, r) in enumerate(zip(got, ref)):
                assert torch.isfinite(out).all(), f"{where} output {i} not finite"
                assert rel_err(out, r) <= AMP_TOL[dtype], f"{where} output {i}"


def video_scores_of(col):
    """(queries, videos) cosine scores recovered from the VR lists (score = exp(20 s))."""
    rows = [dict((v, s) for v, _, _, s in e["predictions"]) for e in col.lists["VR"]]
    return torch.log(torch.tensor([[r[v] for v in sorted(r)] for r in rows])) / 20.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_full_corpus_eval_under_autocast_matches_fp32(dtype):
    model = build(HeroForVcmr, **VSM_KW).eval()
    flags = {"bf16": dtype is torch.bfloat16, "fp16": dtype is torch.float16}
    ref = full_corpus_eval(model, eval_setting(("VCMR", "SVMR", "VR")))
    got = full_corpus_eval(model, eval_setting(("VCMR", "SVMR", "VR"), **flags))
    assert rel_err(video_scores_of(got), video_scores_of(ref)) <= AMP_TOL[dtype]
    for task in ("VCMR", "SVMR"):
        assert [len(e["predictions"]) for e in got.lists[task]] == \
            [len(e["predictions"]) for e in ref.lists[task]]
        scores = torch.tensor([p[-1] for e in got.lists[task] for p in e["predictions"]])
        assert scores.dtype == torch.float32 and torch.isfinite(scores).all() and len(scores)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_qa_violin_and_tvc_evaluation_under_autocast(dtype):
    flags = {"bf16": dtype is torch.bfloat16, "fp16": dtype is torch.float16}
    qa, violin = build(HeroForVideoQA), build(HeroForViolin)
    for model, validate, batch in ((qa, validate_videoQA, qa_batch()),
                                   (violin, validate_violin, violin_batch())):
        task = "tvqa" if model is qa else "test"
        ref_log, _, ref_logits = validate(model, [batch], task, True)
        log, _, logits = validate(model, [batch], task, True, **flags)
        loss_key = next(k for k in log if k.endswith("loss"))
        assert abs(log[loss_key] - ref_log[loss_key]) <= AMP_TOL[dtype] * ref_log[loss_key]
        assert rel_err(torch.tensor(list(logits.values())),
                       torch.tensor(list(ref_logits.values()))) <= AMP_TOL[dtype]
    lines = decode_tvc(build(HeroForTvc, d_layers=2).eval(), [tvc_batch()], FakeToker(),
                       max_gen_step=5, **flags)
    assert [ln["clip_id"] for ln in lines] == [0, 1, 2]
