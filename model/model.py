"""``HeroModel`` (the trunk shared by every task model) and weight loading (model.md §10–§11).

Loading follows upstream's ``load_pretrained_weight`` (gamma/beta renames, the ``roberta.``
prefix rule, dtype-converting copy, ``vocab_padded`` and other non-tensor entries ignored) but is
strict where upstream was silent: a shape mismatch or a missing key that the task class does not
list in ``expected_missing_keys`` raises an error naming the key (model.md §11.1, §15.20).

Decisions on open questions (model.md §14):
- §14.1: the tied LM-head decoder key may be absent when the word table is present (it is the
  same tensor), and the two zero ``pad`` buffers may be absent; nothing else may be missing.
- §14.2: :func:`load_roberta` accepts upstream's converted layout (``roberta.lm_head.{dense,
  LayerNorm,bias}``) and a HuggingFace ``RobertaForMaskedLM`` dict; by default the HF head
  (``lm_head.{dense,layer_norm,bias}``) is mapped onto HERO's names so it is loaded instead of
  left at random init (upstream would leave it random for such a file; pass
  ``hf_lm_head=False`` for that).  ``roberta.pooler.*`` is optional.
- §14.5: token type 1 is used for text and frames, as upstream does.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from model.config import HeroConfig
from model.encoder import CrossModalTrm, HierarchicalVlModel

logger = logging.getLogger(__name__)

VFEAT_DIM = 4352
MAX_FRM_SEQ_LEN = 100
FRAME_POS_KEY = "v_encoder.f_encoder.img_embeddings.position_embeddings.weight"
WORD_KEY = "v_encoder.f_encoder.embeddings.word_embeddings.weight"
DECODER_KEY = "v_encoder.f_encoder.lm_head.decoder.weight"
OPTIONAL_KEYS = ("v_encoder.pad", "v_encoder.f_encoder.pad")
ROBERTA_LAYERS = 12  # upstream's skip_layers gap is 12 / n_layers (roberta-base depth)
ROBERTA_LAYER_PREFIX = "roberta.encoder.layer."
ROBERTA_OPTIONAL = ("img_embeddings.", "pad", "lm_head.", "pooler.")


def max_frm_seq_len_from_state_dict(state_dict, default: int = MAX_FRM_SEQ_LEN) -> int:
    """Rows of the F-TRM frame position table in a checkpoint, or ``default`` (§11.2)."""
    weight = state_dict.get(FRAME_POS_KEY) if state_dict else None
    return default if weight is None else int(weight.shape[0])


def read_state_dict(source) -> dict:
    """A state dict from a mapping, a file path, or ``None``/``{}`` (= no weights)."""
    if source is None:
        return {}
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"could not read checkpoint {path} as a torch state dict: "
                             f"{exc}") from exc
        if not isinstance(loaded, Mapping):
            raise TypeError(f"checkpoint {path} holds a {type(loaded).__name__}, expected a "
                            "state dict (mapping of key -> tensor)")
        return dict(loaded)
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a state dict (mapping) or a checkpoint path, got "
                        f"{type(source).__name__}")
    return dict(source)


def _short(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _shape_hint(key: str) -> str:
    if key.endswith("img_embeddings.position_embeddings.weight"):
        return (" (build the model with max_frm_seq_len="
                "max_frm_seq_len_from_state_dict(state_dict))")
    if "word_embeddings" in key or "token_type_embeddings" in key or key.endswith("lm_head.bias"):
        return (" (HERO checkpoints need the hero_finetune.json / hero_tvc.json sizes: "
                "vocab 50272, 2 token types)")
    return ""


def _match_keys(module: nn.Module, state_dict: dict):
    """Pair every model key with its checkpoint tensor; returns (pairs, missing, unexpected)."""
    sd = {k.replace("gamma", "weight").replace("beta", "bias"): v for k, v in state_dict.items()}
    prefix = ""
    if not hasattr(module, "roberta") and any(k.startswith("roberta.") for k in sd):
        prefix = "roberta."
    pairs, missing, used, errors = [], [], set(), []
    for key, target in module.state_dict(keep_vars=True).items():
        src = sd.get(prefix + key)
        if src is None:
            missing.append(key)
            continue
        used.add(prefix + key)
        if not torch.is_tensor(src):
            errors.append(f"{prefix + key}: checkpoint holds a {type(src).__name__}, not a tensor")
        elif src.shape != target.shape:
            errors.append(f"{prefix + key}: checkpoint shape {tuple(src.shape)} vs model shape "
                          f"{tuple(target.shape)}{_shape_hint(key)}")
        else:
            pairs.append((target, src))
    if errors:
        raise ValueError("cannot load checkpoint:\n  " + "\n  ".join(errors))
    return pairs, missing, [k for k in sd if k not in used]


def load_weights(module: nn.Module, state_dict: dict, allowed_missing=(),
                 source: str = "state dict"):
    """Copy matching tensors into ``module`` (dtype converted, fp16 -> fp32 is fine).

    Every missing key must start with one of ``allowed_missing`` (or be an always-optional key,
    see the module docstring), else ``KeyError``.  Unexpected keys are logged once.
    Returns ``(missing, unexpected)``.
    """
    pairs, missing, unexpected = _match_keys(module, state_dict)
    optional = set(OPTIONAL_KEYS)
    if WORD_KEY not in missing:
        optional.add(DECODER_KEY)
    unknown = [k for k in missing
               if k not in optional and not any(k.startswith(p) for p in allowed_missing)]
    if unknown:
        raise KeyError(f"{source} lacks {len(unknown)} key(s) that {type(module).__name__} "
                       f"needs: {_short(unknown)}. Is the checkpoint for another model class "
                       "or config?")
    with torch.no_grad():
        for target, src in pairs:
            target.copy_(src)
    if missing:
        logger.info("%s: %d key(s) not in the checkpoint keep their init: %s", source,
                    len(missing), _short(missing))
    if unexpected:
        logger.info("%s: %d unexpected checkpoint entr(ies) ignored: %s", source,
                    len(unexpected), _short(unexpected))
    return missing, unexpected


class HeroModel(nn.Module):
    """The common trunk: ``self.v_encoder`` (model.md §3.1), initialised as in §10.

    Task subclasses add their heads in their own ``__init__`` after ``super().__init__`` and set
    ``expected_missing_keys`` to the key prefixes a pretrained HERO checkpoint lacks (§11.3).
    """

    expected_missing_keys: tuple = ()

    def __init__(self, config, vfeat_dim: int = VFEAT_DIM,
                 max_frm_seq_len: int = MAX_FRM_SEQ_LEN):
        super().__init__()
        self.config = HeroConfig.from_any(config)
        self.v_encoder = HierarchicalVlModel(self.config, vfeat_dim, max_frm_seq_len)
        self.v_encoder.initialize()

    def forward(self, batch, task="repr", compute_loss=True):
        return self.v_encoder(batch, task, compute_loss)

    @classmethod
    def from_pretrained(cls, config, state_dict, vfeat_dim: int = VFEAT_DIM,
                        max_frm_seq_len: int = MAX_FRM_SEQ_LEN, **kwargs):
        """Build ``cls`` and load ``state_dict`` (mapping or path; empty = fresh init)."""
        model = cls(config, vfeat_dim, max_frm_seq_len, **kwargs)
        source = str(state_dict) if isinstance(state_dict, (str, Path)) else "state dict"
        state_dict = read_state_dict(state_dict)
        if state_dict:
            load_weights(model, state_dict, cls.expected_missing_keys,
                         f"{cls.__name__} from {source}")
        return model

    def load_roberta(self, state_dict, skip_layers: bool = True, hf_lm_head: bool = True):
        """Initialise the F-TRM from RoBERTa (§11.4); see :func:`load_roberta`."""
        return load_roberta(self, state_dict, skip_layers, hf_lm_head)


def map_hf_lm_head(state_dict: dict) -> dict:
    """Rename a HuggingFace RoBERTa LM head onto HERO's ``roberta.lm_head.*`` names."""
    sd = dict(state_dict)
    renames = {"lm_head.dense.weight": "roberta.lm_head.dense.weight",
               "lm_head.dense.bias": "roberta.lm_head.dense.bias",
               "lm_head.layer_norm.weight": "roberta.lm_head.LayerNorm.weight",
               "lm_head.layer_norm.bias": "roberta.lm_head.LayerNorm.bias",
               "lm_head.bias": "roberta.lm_head.bias",
               "roberta.lm_head.layer_norm.weight": "roberta.lm_head.LayerNorm.weight",
               "roberta.lm_head.layer_norm.bias": "roberta.lm_head.LayerNorm.bias"}
    for old, new in renames.items():
        if old in sd and new not in sd:
            sd[new] = sd.pop(old)
    return sd


def skip_roberta_layers(state_dict: dict, n_layers: int) -> dict:
    """Keep RoBERTa layers gap−1, 2·gap−1, … (gap = 12 / n_layers) renamed to 0..n_layers−1."""
    if n_layers <= 0 or ROBERTA_LAYERS % n_layers:
        raise ValueError(f"skip_layers needs f_config.num_hidden_layers to divide "
                         f"{ROBERTA_LAYERS}, got {n_layers}")
    gap = ROBERTA_LAYERS // n_layers
    keep = {src: i for i, src in enumerate(range(gap - 1, ROBERTA_LAYERS, gap))}
    out, dropped = {}, 0
    for key, value in state_dict.items():
        if ROBERTA_LAYER_PREFIX not in key:
            out[key] = value
            continue
        parts = key.split(".")
        src = int(parts[3])
        if src in keep:
            parts[3] = str(keep[src])
            out[".".join(parts)] = value
        else:
            dropped += 1
    logger.info("skip_layers: kept RoBERTa layers %s as 0..%d, dropped %d keys",
                sorted(keep), n_layers - 1, dropped)
    return out


def pad_vocab(f_encoder: CrossModalTrm, multiple: int = 8) -> int:
    """Append zero rows to the word table (and LM bias) up to a multiple of 8; keep the tie."""
    emb, head = f_encoder.embeddings.word_embeddings, f_encoder.lm_head
    vocab, dim = emb.weight.shape
    pad = (-vocab) % multiple
    if pad:
        with torch.no_grad():
            emb.weight = nn.Parameter(torch.cat([emb.weight, emb.weight.new_zeros(pad, dim)]))
            head.bias = nn.Parameter(torch.cat([head.bias, head.bias.new_zeros(pad)]))
        emb.num_embeddings = vocab + pad
        head.decoder.weight = emb.weight
        head.decoder.out_features = vocab + pad
    f_encoder.vocab_pad = pad
    return pad


def init_type_embedding(f_encoder: CrossModalTrm) -> None:
    """A 2-row type table whose rows both copy the (single) RoBERTa row 0."""
    old = f_encoder.embeddings.token_type_embeddings.weight
    new = nn.Embedding(2, old.size(1)).to(device=old.device, dtype=old.dtype)
    with torch.no_grad():
        new.weight.copy_(old[0].expand(2, -1))
    f_encoder.embeddings.token_type_embeddings = new


def load_roberta(model: HeroModel, state_dict, skip_layers: bool = True,
                 hf_lm_head: bool = True) -> HeroModel:
    """RoBERTa init of a model built with ``hero_pretrain.json`` (model.md §11.4).

    The F-TRM is replaced by a fresh one loaded from ``roberta.*`` keys (not re-initialised);
    then the vocabulary is padded to 50272 (``vocab_pad`` = 7, MLM logits sliced back),
    the type table grows to two copies of row 0, and ``v_encoder.mask_embedding`` row 0 is
    zeroed.  Missing ``img_embeddings.*``, ``pad``, ``lm_head.*`` and ``pooler.*`` keys keep
    their init; any other missing key (a non-RoBERTa file) raises.
    """
    source = str(state_dict) if isinstance(state_dict, (str, Path)) else "RoBERTa state dict"
    sd = read_state_dict(state_dict)
    if not any(k.startswith("roberta.") for k in sd):
        raise KeyError(f"{source} has no 'roberta.*' keys; expected a RoBERTa checkpoint "
                       "(HF RobertaForMaskedLM layout or upstream's converted file)")
    if hf_lm_head:
        sd = map_hf_lm_head(sd)
    f_cfg = model.config.f_config
    if skip_layers:
        sd = skip_roberta_layers(sd, f_cfg.num_hidden_layers)
    v_enc = model.v_encoder
    old_img = v_enc.f_encoder.img_embeddings
    fresh = CrossModalTrm(f_cfg, old_img.img_linear.in_features,
                          old_img.position_embeddings.num_embeddings)
    load_weights(fresh, sd, ROBERTA_OPTIONAL, f"F-TRM from {source}")
    fresh.to(device=v_enc.pad.device, dtype=v_enc.pad.dtype)
    v_enc.f_encoder = fresh
    pad_vocab(fresh)
    init_type_embedding(fresh)
    with torch.no_grad():
        v_enc.mask_embedding.weight[0].zero_()
    return model
