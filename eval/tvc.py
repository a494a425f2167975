"""TVC caption metrics (training.md §5.9): ``TVCEval(ref_jsonl_path)(results) -> scores``.

References are **all** ``descs[*].desc`` of every line of the reference jsonl (``val_ref`` /
``--target_clip``), keyed by ``clip_id``; the hypothesis of a clip is ``descs[0].desc`` of its
result line. Both sides get upstream's preprocessing: non-ASCII characters -> space and strip,
Stanford PTBTokenizer (``-preserveLines -lowerCase``, through Java) and removal of the 17 PTB
punctuation tokens, all done by the ``pycocoevalcap`` package (1.2, which bundles the CoreNLP
3.4.1 and METEOR 1.5 jars; nothing is vendored here). The scores are the coco-caption scorers
(BLEU with the closest reference length, METEOR 1.5, ROUGE-L with beta 1.2, CIDEr-D labelled
``CIDEr``), corpus level, multiplied by 100.

Decisions:
- Every reference clip needs exactly one prediction (upstream asserts equal counts): a missing,
  duplicated or unknown clip id is an error naming the ids and the reference file.
- A reference line without ``descs`` (test_public) or with an empty reference caption is an
  error naming the clip id and the file. An empty *prediction* is a valid model output: it is
  scored (as 0 for n-gram metrics) and counted in the log.
- Without Java, METEOR cannot run and the PTB tokenizer is replaced by a small Python
  approximation (lower-case, words, contractions and punctuation split); a warning says so and
  the returned dict lacks ``METEOR``. Numbers then differ slightly from upstream's.
- pycocoevalcap lower-cases before filtering, so ``-LRB-``/``-RRB-`` become ``-lrb-``/``-rrb-``
  and stay in the token stream, exactly as in the coco-caption code upstream used.
- pycocoevalcap runs METEOR with a fixed 2 GB Java heap (upstream dropped to 1 GB when less than
  2 GB was free).
- The clipped n-gram matches behind BLEU are logged (coco-caption only prints them).

Reading BLEU: Bleu_n is the geometric mean of the corpus n-gram precisions 1..n times the brevity
penalty, and coco-caption smooths a zero match count only by 1e-15. So when no hypothesis 4-gram
occurs in its clip's references, Bleu_4 is about 1e-3 (×100) however high Bleu_3 is. The toy demo
hit exactly this (issue 6): its under-trained TVC model blends the two caption templates the same
way for every clip ("in the kitchen the talks and mentions the while", only the room or action
varies): 0 of 821 4-grams matched, 129 of 958 3-grams (Bleu_3 29.1, Bleu_4 0.0013), while
other clips' real captions reach Bleu_4 ~28.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

LOGGER = logging.getLogger(__name__)

METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
PTB_PUNCTUATIONS = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!",
                    ",", ":", "-", "--", "...", ";")
_FALLBACK_TOKEN_RE = re.compile(r"\w+(?=n't)|n't|'\w+|\w+|\.\.\.|--|``|''|[^\w\s]")
_SHOW = 5


class CaptionEvalError(ValueError):
    """The reference file or the predictions cannot be scored as they are."""


def java_available() -> bool:
    """True when a working ``java`` is on PATH (PTB tokenizer and METEOR need it)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        subprocess.run([java, "-version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def remove_nonascii(text: str) -> str:
    """Upstream's step 1: every non-ASCII character becomes a space, then strip."""
    return "".join(c if ord(c) < 128 else " " for c in text).strip()


def _desc_text(desc, where: str) -> str:
    if not isinstance(desc, dict) or not isinstance(desc.get("desc"), str):
        raise CaptionEvalError(f"{where}: each entry of 'descs' must be {{\"desc\": str}}, "
                               f"got {desc!r}")
    return desc["desc"]


def _parse_line(line: str, where: str) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CaptionEvalError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(item, dict) or "clip_id" not in item:
        raise CaptionEvalError(f"{where}: a TVC line needs a 'clip_id'")
    return item


def read_references(path) -> dict:
    """``{str(clip_id): [reference captions]}`` from a TVC jsonl (every ``descs[*].desc``)."""
    refs = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            item = _parse_line(line, where)
            clip = str(item["clip_id"])
            descs = item.get("descs")
            if not descs:
                raise CaptionEvalError(f"{where}: clip {clip} has no 'descs' references (a "
                                       "test_public file cannot be scored)")
            if clip in refs:
                raise CaptionEvalError(f"{where}: clip {clip} appears twice")
            texts = [_desc_text(d, f"{where} (clip {clip})") for d in descs]
            if any(not remove_nonascii(t) for t in texts):
                raise CaptionEvalError(f"{where}: clip {clip} has an empty reference caption")
            refs[clip] = texts
    if not refs:
        raise CaptionEvalError(f"reference file {path} holds no clips")
    return refs


def collect_hypotheses(results, refs: dict, ref_path) -> dict:
    """``{str(clip_id): descs[0].desc}``; exactly one prediction per reference clip."""
    hyps = {}
    for n, res in enumerate(results):
        if not isinstance(res, dict) or "clip_id" not in res or not res.get("descs"):
            raise CaptionEvalError(f"prediction #{n} is not a TVC result line with 'clip_id' "
                                   f"and 'descs': {res!r}")
        clip = str(res["clip_id"])
        if clip in hyps:
            raise CaptionEvalError(f"clip {clip} is predicted more than once (a clip "
                                   "duplicated across rank shards?)")
        hyps[clip] = _desc_text(res["descs"][0], f"prediction for clip {clip}")
    missing = [c for c in refs if c not in hyps]
    extra = [c for c in hyps if c not in refs]
    if missing or extra:
        raise CaptionEvalError(
            f"predictions do not match the clips of {ref_path}: {len(missing)} reference clips "
            f"have no prediction (e.g. {missing[:_SHOW]}), {len(extra)} predicted clips are not "
            f"in it (e.g. {extra[:_SHOW]})")
    return hyps


def fallback_tokenize(text: str) -> str:
    """Java-free stand-in for the PTB tokenizer + punctuation removal (approximate)."""
    drop = set(PTB_PUNCTUATIONS) | {"(", ")", "{", "}", "[", "]"}
    return " ".join(t for t in _FALLBACK_TOKEN_RE.findall(text.lower()) if t not in drop)


def tokenize(captions: dict, use_java: bool) -> dict:
    """``{key: [text]}`` -> ``{key: [tokenised text]}`` after the non-ASCII step."""
    clean = {k: [remove_nonascii(c) for c in caps] for k, caps in captions.items()}
    if not use_java:
        return {k: [fallback_tokenize(c) for c in caps] for k, caps in clean.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in caps]
                                    for k, caps in clean.items()})


def score_captions(gts: dict, res: dict, meteor: bool) -> dict:
    """Corpus-level coco-caption scores (not yet ×100) of tokenised references/hypotheses;
    METEOR (Java) only when ``meteor``."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores = bleu_scores(gts, res)
    if meteor:
        scores["METEOR"] = meteor_score(gts, res)
    scores["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    scores["CIDEr"], _ = Cider().compute_score(gts, res)
    return scores


def bleu_scores(gts: dict, res: dict, n: int = 4) -> dict:
    """Corpus BLEU-1..n as ``Bleu(n).compute_score`` (closest reference length), logging the
    clipped n-gram matches per order that explain a near-zero Bleu_n (module docstring)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=n)
    for key in gts:
        scorer += (res[key][0], gts[key])
    bleu, _ = scorer.compute_score(option="closest")
    matched = [sum(c["correct"][k] for c in scorer.ctest) for k in range(n)]
    total = [sum(c["guess"][k] for c in scorer.ctest) for k in range(n)]
    LOGGER.info("BLEU n-gram matches (clipped / hypothesis n-grams): %s",
                ", ".join(f"{k + 1}-gram {m}/{t}" for k, (m, t) in enumerate(zip(matched, total))))
    return {f"Bleu_{k + 1}": b for k, b in enumerate(bleu)}


def meteor_score(gts: dict, res: dict) -> float:
    """METEOR 1.5 through pycocoevalcap's Java wrapper, with an actionable error."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    except ValueError as exc:
        # compute_score keeps its lock when the jar dies; free it so the wrapper can clean up
        if scorer.lock.locked():
            scorer.lock.release()
        scorer.meteor_p.kill()
        err = scorer.meteor_p.stderr.read().decode(errors="replace").strip()
        raise CaptionEvalError(f"METEOR (java -jar meteor-1.5.jar, 2 GB heap) failed: {exc}; "
                               f"java said: {err[-500:]}") from exc
    finally:
        del scorer
    return score


class TVCEval:
    """Scores TVC submission lines against a reference jsonl (see the module docstring).

    ``use_java`` None detects Java once; False forces the Java-free fallback.
    """

    def __init__(self, ref_jsonl_path, use_java: bool | None = None):
        self.ref_path = Path(ref_jsonl_path)
        if not self.ref_path.is_file():
            raise CaptionEvalError(f"TVC reference file not found: {self.ref_path}")
        self.refs = read_references(self.ref_path)
        self.use_java = java_available() if use_java is None else use_java
        self._gts = None
        if not self.use_java:
            LOGGER.warning("Java not found on PATH: METEOR is skipped and the Stanford PTB "
                           "tokenizer is replaced by a Python approximation, so Bleu/ROUGE_L/"
                           "CIDEr may differ slightly from upstream. Install a Java runtime "
                           "(e.g. apt-get install default-jre-headless) for exact scores.")

    def __call__(self, results) -> dict:
        hyps = collect_hypotheses(results, self.refs, self.ref_path)
        empty = sum(1 for h in hyps.values() if not remove_nonascii(h))
        if empty:
            LOGGER.info("%d of %d predicted captions are empty; they are scored as such",
                        empty, len(hyps))
        if self._gts is None:  # references are tokenised once per evaluator
            self._gts = tokenize(self.refs, self.use_java)
        res = tokenize({k: [hyps[k]] for k in self.refs}, self.use_java)
        scores = score_captions(self._gts, res, self.use_java)
        return {k: float(scores[k]) * 100 for k in METRIC_KEYS if k in scores}
