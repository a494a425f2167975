"""Model-architecture configs (model.md §2): one JSON with ``f_config``/``c_config``/
``q_config``[/``d_config``] sub-configs, each read into a BERT-style object.

Each sub-config starts from BERT's constructor defaults and the JSON values overwrite them, so
keys that no released JSON sets keep their defaults (notably ``layer_norm_eps = 1e-12``).
Keys added by this project: ``attn_impl`` ("sdpa" fast path or "math" reference),
``gradient_checkpointing`` (off), and for the F-TRM ``row_layout`` ("packed" rows without
padding, or the "padded" reference, issue 17) and ``packed_attn`` ("bucket" / "jagged", None =
by device).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

SUB_CONFIGS = ("f_config", "c_config", "q_config", "d_config")

BERT_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "output_attentions": False,
    "output_hidden_states": False,
    "attn_impl": "sdpa",
    "gradient_checkpointing": False,
    "row_layout": "packed",
    "packed_attn": None,
}


class BertConfig:
    """Attribute bag with BERT defaults; unknown JSON keys are kept as attributes."""

    def __init__(self, **kwargs):
        for key, value in {**BERT_DEFAULTS, **kwargs}.items():
            setattr(self, key, value)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)

    def __repr__(self) -> str:
        return f"BertConfig({json.dumps(self.to_dict(), sort_keys=True)})"


class HeroConfig:
    """Top-level config holding the sub-configs present in the JSON."""

    def __init__(self, config: dict):
        if not isinstance(config, dict):
            raise TypeError(f"model config must be a dict, got {type(config).__name__}")
        if "f_config" not in config or "c_config" not in config:
            raise KeyError("model config needs at least 'f_config' and 'c_config' "
                           f"(got keys {sorted(config)})")
        self.raw = copy.deepcopy(config)
        for name in SUB_CONFIGS:
            setattr(self, name, BertConfig(**config[name]) if name in config else None)
        self.initializer_range = self.f_config.initializer_range

    @classmethod
    def from_any(cls, config) -> HeroConfig:
        """Accept a HeroConfig, a dict, or a path to a JSON file."""
        if isinstance(config, HeroConfig):
            return config
        if isinstance(config, (str, Path)):
            path = Path(config)
            if not path.is_file():
                raise FileNotFoundError(f"model config JSON not found: {path}")
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"model config {path} is not valid JSON: {exc}") from exc
        return cls(config)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.raw)
