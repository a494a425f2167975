"""Build the toy tokenizer: a byte-level BPE trained offline on the toy lexicon, laid out
exactly like roberta-base (``vocab.json`` + ``merges.txt``) so that transformers'
``RobertaTokenizer`` loads it from a local folder and every special id matches roberta-base:

``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``.``=4, ``<|endoftext|>``=50260,
``<mask>``=50264, vocabulary size 50265 (the model's ``vocab_size``), so meta ``v_range`` is
``[4, 50261]`` as for roberta-base.  The ids between the learned tokens and 50260, and 50261-50263,
are filler entries ``<unusedN>`` that no merge can produce, so they never appear in the data.
Each lexicon word is learned both with and without its leading space (``Ġword`` and ``word``).
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from scripts.toy.text import lexicon

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
DOT_ID = 4
ENDOFTEXT_ID = 50260
MASK_ID = 50264
VOCAB_SIZE = 50265


def train_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    """Learned tokens (in training order, specials excluded) and merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=5000, min_frequency=1, show_progress=False,
                                  special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"{w} {w}" for w in lexicon()], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab if t not in SPECIALS]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return tokens, merges


def roberta_layout(tokens: list[str]) -> dict[str, int]:
    """Place specials, '.', the learned tokens and fillers at roberta-base's ids."""
    ordered = list(SPECIALS) + ["."] + [t for t in tokens if t != "."]
    if len(ordered) > ENDOFTEXT_ID:
        raise ValueError(f"toy vocabulary too large: {len(ordered)} tokens")
    ordered += [f"<unused{i}>" for i in range(len(ordered), ENDOFTEXT_ID)]
    ordered += ["<|endoftext|>"] + [f"<unused{i}>" for i in range(ENDOFTEXT_ID + 1, MASK_ID)]
    ordered.append("<mask>")
    return {tok: i for i, tok in enumerate(ordered)}


def build_tokenizer(out_dir) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``out_dir`` and return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens, merges = train_bpe()
    vocab = roberta_layout(tokens)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
