"""RoBERTa tokenizer resolution and loading, and upstream's ``roberta_tokenize`` (data.md §1.1,
§5.1).

``--toker`` (every prepro script, ``train_tvc.py``, ``inf_tvc.py``, and the ``toker`` a DB's
``meta.json`` records) is either a local folder holding RoBERTa's ``vocab.json`` and
``merges.txt`` or a Hugging Face model name (``roberta-base``, upstream's default, or
``roberta-large``). A name is looked up in the local Hugging Face cache first (``HF_HUB_CACHE``,
else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), so it works offline once cached; only
when it is not cached and ``HF_HUB_OFFLINE`` is unset are those two files downloaded, as upstream's
``from_pretrained('roberta-base')`` did. The ids are those transformers' ``RobertaTokenizer``
gives on the resolved folder, so a name and the folder holding the same two files write
identical DBs; ``meta.json`` records ``--toker`` as given (upstream-built DBs say
``roberta-base``), which is their only difference.

Open question 6 (transformers 2.0.0's handling of leading spaces) is not emulated: the current
``RobertaTokenizer`` is the reference, so regenerated DBs may differ in rare ids from the
released ones; consume the released DBs to reproduce published numbers.
"""
from __future__ import annotations

import html
import os

from utils.errors import HeroError

TOKER_FILES = ("vocab.json", "merges.txt")
TOKER_HELP = ("RoBERTa tokenizer: a Hugging Face model name (roberta-base, roberta-large; read "
              "from the local Hugging Face cache) or a local folder holding vocab.json and "
              "merges.txt")
# Insertion order = upstream's key order in meta.json (data.md §3.1), which writes these ids
# right after the argparse namespace and ``tokenizer``, then ``v_range``.
SPECIAL_TOKENS = {"BOS": "<s>", "EOS": "</s>", "SEP": "</s>", "CLS": "<s>", "PAD": "<pad>",
                  "MASK": "<mask>", "UNK": "<unk>"}
_TRUE = {"1", "ON", "YES", "TRUE"}


class TokenizerError(HeroError):
    """``--toker`` names neither a usable local folder nor an available model."""


def hub_cache_dir() -> str:
    """The Hugging Face hub cache as the environment says *now* (``HF_HUB_CACHE``, else
    ``$HF_HOME/hub``), else huggingface_hub's own default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) forbids network."""
    return any(os.environ.get(k, "").upper() in _TRUE
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _is_model_name(toker: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if toker.startswith((".", "~", os.sep)) or os.path.exists(toker):
        return False
    try:
        validate_repo_id(toker)
    except HFValidationError:
        return False
    return True


def _cached_folder(name: str, cache: str) -> str | None:
    """The cached snapshot folder holding both files of model ``name``; no network."""
    from huggingface_hub import try_to_load_from_cache

    paths = [try_to_load_from_cache(name, f, cache_dir=cache) for f in TOKER_FILES]
    if not all(isinstance(p, str) for p in paths):
        return None
    folders = {os.path.dirname(p) for p in paths}
    return folders.pop() if len(folders) == 1 else None


def _download_folder(name: str, cache: str) -> tuple[str | None, str]:
    """(snapshot folder, '') after fetching the two files into ``cache``, or (None, why not)."""
    from huggingface_hub import hf_hub_download

    if hub_offline():
        return None, "HF_HUB_OFFLINE is set, so nothing was downloaded"
    try:
        paths = [hf_hub_download(name, f, cache_dir=cache) for f in TOKER_FILES]
    except Exception as exc:  # no network, unknown name, HTTP error: all end in one message
        return None, f"downloading it failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return os.path.dirname(paths[0]), ""


def resolve_toker(toker, what: str = "--toker") -> str:
    """The local folder holding ``vocab.json`` and ``merges.txt`` for ``toker``, a folder or a
    model name (module doc); ``what`` names where the value came from in the error."""
    toker = str(toker)
    if os.path.isdir(toker):
        missing = [f for f in TOKER_FILES if not os.path.isfile(os.path.join(toker, f))]
        if missing:
            raise TokenizerError(
                f"{what} {toker!r} is a folder without {missing}; put RoBERTa's "
                f"{' and '.join(TOKER_FILES)} there, or pass a model name such as roberta-base")
        return toker
    if not _is_model_name(toker):
        raise TokenizerError(
            f"{what} {toker!r}: no such folder; pass a local folder holding "
            f"{' and '.join(TOKER_FILES)}, or a model name such as roberta-base")
    cache = hub_cache_dir()
    folder = _cached_folder(name=toker, cache=cache)
    why = ""
    if folder is None:
        folder, why = _download_folder(toker, cache)
    if folder is None:
        raise TokenizerError(
            f"{what} {toker!r}: no such local folder, and the Hugging Face model {toker!r} is "
            f"not in the local cache {cache}; {why}. Fetch it once, where there is network, "
            f"with `huggingface-cli download {toker} vocab.json merges.txt` (huggingface_hub "
            f">= 1.0: `hf download {toker} vocab.json merges.txt`; set HF_HOME or HF_HUB_CACHE "
            f"to the cache used here), or pass a local folder holding vocab.json and merges.txt")
    return folder


def load_toker(toker, what: str = "--toker"):
    """A RobertaTokenizer for ``toker`` (a folder or a model name, see :func:`resolve_toker`)."""
    from transformers import RobertaTokenizer

    return RobertaTokenizer.from_pretrained(resolve_toker(toker, what), local_files_only=True)


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
