"""``HeroModel`` (the trunk shared by every task model) and weight loading (model.md §10–§11).

Loading follows upstream's ``load_pretrained_weight`` (gamma/beta renames, the ``roberta.``
prefix rule, dtype-converting copy, ``vocab_padded`` and other non-tensor entries ignored) but is
strict where upstream was silent: a shape mismatch (:class:`WeightShapeError`) or a missing key
that the task class does not list in ``expected_missing_keys`` (:class:`MissingWeightsError`)
raises an error naming the key and the source (model.md §11.1, §15.20). Only training starts a
head from random init (``expected_missing_keys``, §11.3); evaluation loads strictly
(``allowed_missing=()``): a fine-tuned checkpoint holds every weight, and a missing head would be
scored at random init (issue 13).

Decisions on open questions (model.md §14):
- §14.1: the tied LM-head decoder key may be absent when the word table is present (it is the
  same tensor), and so may any buffer (the two zero ``pad`` buffers, TVC's ``decoder.tri_mask``
  and ``loss_func.one_hot``): buffers are built by the constructor, never learned (§11.3).
  These are tolerated even by a strict load; no learned parameter may be missing.
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
from utils.errors import HeroError

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


class WeightsError(HeroError):
    """A state dict does not fit the model it is loaded into."""


class MissingWeightsError(WeightsError, KeyError):
    """The state dict lacks learned weights the model needs (they would stay at random init).

    ``missing`` lists the keys. A ``KeyError`` whose message prints without quotes."""

    def __init__(self, message: str, missing=()):
        super().__init__(message)
        self.missing = sorted(missing)

    def __str__(self) -> str:
        return str(self.args[0])


class WeightShapeError(WeightsError, ValueError):
    """A checkpoint tensor has another shape than the model's, or is not a tensor."""


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


def _match_keys(module: nn.Module, state_dict: dict, source: str = "state dict"):
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
        raise WeightShapeError(f"cannot load {source}: {len(errors)} entr(ies) do not fit "
                               f"{type(module).__name__}:\n  " + "\n  ".join(errors))
    return pairs, missing, [k for k in sd if k not in used]


def always_optional_keys(module: nn.Module, missing) -> set:
    """Keys any load may lack (§14.1): buffers (built by the constructor, never learned) and
    the tied LM-head decoder when the word table it shares is loaded."""
    optional = set(OPTIONAL_KEYS) | {name for name, _ in module.named_buffers()}
    if WORD_KEY not in missing:
        optional.add(DECODER_KEY)
    return optional


def load_weights(module: nn.Module, state_dict: dict, allowed_missing=(),
                 source: str = "state dict"):
    """Copy matching tensors into ``module`` (dtype converted, fp16 -> fp32 is fine).

    Every missing key must start with one of ``allowed_missing`` (training's
    ``expected_missing_keys``; ``()`` = strict, as evaluation loads) or be always optional
    (:func:`always_optional_keys`), else :class:`MissingWeightsError`; a tensor of another
    shape raises :class:`WeightShapeError`. Unexpected keys are logged once.
    Returns ``(missing, unexpected)``.
    """
    pairs, missing, unexpected = _match_keys(module, state_dict, source)
    optional = always_optional_keys(module, missing)
    allowed = tuple(allowed_missing)
    unknown = [k for k in missing if k not in optional and not k.startswith(allowed)]
    if unknown:
        raise MissingWeightsError(
            f"{source} lacks {len(unknown)} key(s) that {type(module).__name__} needs: "
            f"{_short(unknown)}. Is the checkpoint for another model class or config?", unknown)
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
                        max_frm_seq_len: int = MAX_FRM_SEQ_LEN, *, allowed_missing=None,
                        source: str | None = None, **kwargs):
        """Build ``cls`` and load ``state_dict`` (mapping or path; empty = fresh init).

        ``allowed_missing`` defaults to ``cls.expected_missing_keys`` (training from a
        pretrained checkpoint, §11.3); evaluation passes ``()`` so that a checkpoint without
        the task head is refused (issue 13). ``source`` names the weights in errors (default:
        the path, if one is given).
        """
        model = cls(config, vfeat_dim, max_frm_seq_len, **kwargs)
        if source is None:
            source = str(state_dict) if isinstance(state_dict, (str, Path)) else "state dict"
        if allowed_missing is None:
            allowed_missing = cls.expected_missing_keys
        state_dict = read_state_dict(state_dict)
        if state_dict:
            load_weights(model, state_dict, allowed_missing, f"{cls.__name__} from {source}")
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
    fresh.train(v_enc.training)  # a new module is in train mode: keep the model's mode
    v_enc.f_encoder = fresh
    pad_vocab(fresh)
    init_type_embedding(fresh)
    with torch.no_grad():
        v_enc.mask_embedding.weight[0].zero_()
    return model
