"""Local RoBERTa tokenizer loading and upstream's ``roberta_tokenize`` (data.md §1.1, §5.1).

Nothing is downloaded: ``--toker`` must be a folder with RoBERTa's ``vocab.json`` and
``merges.txt``; the ids are those transformers' ``RobertaTokenizer`` gives on that folder.
Open question 6 (transformers 2.0.0's handling of leading spaces) is not emulated: the current
``RobertaTokenizer`` is the reference, so regenerated DBs may differ in rare ids from the
released ones; consume the released DBs to reproduce published numbers.
"""
from __future__ import annotations

import html
import os

TOKER_FILES = ("vocab.json", "merges.txt")
# Insertion order = upstream's key order in meta.json (data.md §3.1), which writes these ids
# right after the argparse namespace and ``tokenizer``, then ``v_range``.
SPECIAL_TOKENS = {"BOS": "<s>", "EOS": "</s>", "SEP": "</s>", "CLS": "<s>", "PAD": "<pad>",
                  "MASK": "<mask>", "UNK": "<unk>"}


def load_toker(toker_dir: str):
    """Load a RobertaTokenizer from a local folder; an absent folder or file raises."""
    from transformers import RobertaTokenizer

    missing = [f for f in TOKER_FILES if not os.path.isfile(os.path.join(toker_dir, f))]
    if missing:
        raise FileNotFoundError(
            f"--toker {toker_dir!r} must be a local folder holding {list(TOKER_FILES)} "
            f"(missing: {missing}); nothing is downloaded")
    return RobertaTokenizer.from_pretrained(toker_dir, local_files_only=True)


def _vocab_id(toker, token: str) -> int:
    vocab = toker.get_vocab()
    if token not in vocab:
        raise KeyError(f"token {token!r} is not in the tokenizer vocabulary "
                       f"({toker.name_or_path}/vocab.json)")
    return vocab[token]


def toker_meta(toker) -> dict:
    """Special ids and the MLM replacement range ``[id('.'), id('<|endoftext|>') + 1)``."""
    meta = {key: _vocab_id(toker, tok) for key, tok in SPECIAL_TOKENS.items()}
    meta["v_range"] = [_vocab_id(toker, "."), _vocab_id(toker, "<|endoftext|>") + 1]
    return meta


def build_meta(opts, toker) -> dict:
    """``meta.json`` of every prepro script: argparse namespace (in ``add_argument`` order),
    ``tokenizer`` (= ``--toker``), the special ids and ``v_range``, in upstream's key order."""
    meta = dict(vars(opts))
    meta["tokenizer"] = opts.toker
    meta.update(toker_meta(toker))
    return meta


def roberta_tokenize(toker, text: str, unescape: bool = False, lower_upper: bool = True) -> list:
    """Token ids without special tokens, as upstream's prepro scripts store them.

    ``unescape`` HTML-unescapes first (subtitles only); ``lower_upper`` lower-cases a text
    whose cased characters are all upper case (everything except TVC captions).
    """
    if unescape:
        text = html.unescape(text)
    if lower_upper and text.isupper():
        text = text.lower()
    return toker.convert_tokens_to_ids(toker.tokenize(text))
