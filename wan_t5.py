"""The frozen text encoder of Wan 2.1: the encoder half of umT5-XXL, and the prompt path that feeds it.

umT5 (Chung et al. 2023, "UniMax") is T5 v1.1 with one relative-position bias table per layer instead of one shared
table. The encoder is a pre-norm transformer over token embeddings, with no absolute positions:

    ids, mask = tokenizer(prompts)        # (B, 512) int64 each: SentencePiece ids + </s>, padded with <pad>=0
    x = token_embedding(ids)              # (B, 512, 4096)
    24 x: x += attn(norm1(x), rel_bias + key mask); x += ffn(norm2(x))
    context = norm(x)                     # (B, 512, 4096)

Attention has 64 heads of 64, no biases, and no 1/sqrt(d) scaling of the scores (T5 folds it into the init). The
relative bias of a (query, key) pair is a learned per-head scalar looked up by a bucket of the signed distance
key - query (16 buckets per direction: 8 exact, 8 logarithmic up to 128). The feed-forward is gated:
fc2(fc1(x) * gelu_tanh(gate(x))). Every norm is T5's RMS norm without mean subtraction or bias.

`encode_prompts` is the whole prompt path of Wan's text-to-video pipeline: clean the text (ftfy, HTML unescape,
whitespace collapse), tokenize to 512 with padding and truncation, run the encoder with the padding mask, then keep
each prompt's features up to its true length (its last token is </s>) and zero the rest. That zero-padded
(B, 512, 4096) tensor is what the DiT's text embedding receives; the unconditional context is the encoding of the
negative prompt (Wan's default negative prompt or ""), never zeros.

Tensors: (B, L, D) activations, (B, H, L, L) attention biases, (B, L) masks with 1 = real token, 0 = padding.

Parameter names are those of the original `T5Encoder`, so Wan's release file `models_t5_umt5-xxl-enc-bf16.pth`
(its state dict, bf16) loads strictly with no renaming:
    token_embedding.weight, norm.weight,
    blocks.{i}.norm1.weight, blocks.{i}.attn.{q,k,v,o}.weight, blocks.{i}.pos_embedding.embedding.weight,
    blocks.{i}.norm2.weight, blocks.{i}.ffn.{gate.0,fc1,fc2}.weight.
The Diffusers release (`text_encoder/` = transformers `UMT5EncoderModel`) is renamed by the table at the bottom
(`umt5_from_hf` / `umt5_to_hf`, `umt5_config_from_hf` / `umt5_config_to_hf`). Full size: 5,680,910,336 parameters in
242 tensors (transformers' state dict lists 243: its input embedding appears under two tied names).

The tokenizer is Hugging Face's `google/umt5-xxl` (`tokenizer.json`: a SentencePiece Unigram model), run with the
`tokenizers` library, an optional dependency imported only when a tokenizer is built. Prompt cleaning needs ftfy and
regex (both come with open_clip_torch).

Sources:
  - Wan2.1 `wan/modules/t5.py` (`T5Encoder`, `T5SelfAttention`, `T5RelativeEmbedding`, `T5EncoderModel`, `umt5_xxl`),
    `wan/modules/tokenizers.py` (`HuggingfaceTokenizer`, `basic_clean`, `whitespace_clean`), `wan/text2video.py` and
    `wan/modules/model.py` (how the output is trimmed and zero-padded to text_len 512); the same files ship in the
    wan22 wheel, which the tests load.
  - transformers `models/umt5/modeling_umt5.py` (`UMT5EncoderModel`) and `models/t5/tokenization_t5.py`; diffusers
    `pipelines/wan/pipeline_wan.py` (`prompt_clean`, `_get_t5_prompt_embeds`): the port.

Notable differences from upstream (none changes outputs):
  - Attention is `F.scaled_dot_product_attention(scale=1.0)` with one additive bias (relative bias where the key is a
    real token, the dtype's most negative number where it is padding, as upstream writes it), not two einsums and a
    float32 softmax; float32 results agree to ~1e-6 (5e-6 over 512 tokens).
  - The bucket index (L, L) is computed once per forward and shared by the 24 layers, each of which looks up its own
    table; upstream recomputes it in every layer. Same integers.
  - No dropout modules: Wan only runs this encoder frozen, in eval mode, where upstream's dropout is the identity.
  - fp16 clamping (upstream clamps to +-(65504 - 1000) after each residual add when the tensor holds an inf) is written
    with torch.where, so there is no host sync; same values. It only ever acts in float16: under bfloat16 (Wan's
    t5_dtype) and float32 nothing is clamped, upstream and here.
  - Kept from upstream: the RMS norm takes its mean square in float32 and normalizes in float32 (half-precision x
    is promoted), then casts to the weight dtype before the scale; the relative bias is rounded to the activation
    dtype and added to the scores in it; the softmax is float32 (upstream casts, SDPA kernels accumulate in float32).
    Under bf16 (Wan's t5_dtype) the two agree at bf16 resolution (~1e-2 relative on a 2-layer test, as each is from
    float32). transformers additionally keeps every `wo` (= ffn.fc2) in float32 when loaded in half precision; Wan's
    code does not, and neither does this one.
  - Tokenization loads `tokenizer.json` exactly as shipped, as transformers 4.x (`T5TokenizerFast`, current when Wan
    was released) does. transformers >= 5 instead rebuilds a T5 pipeline around the file's vocabulary (normalizer =
    the file's SentencePiece charsmap only, pre-tokenizer WhitespaceSplit + Metaspace, Unigram without byte fallback,
    `$A </s>` template); after Wan's whitespace cleaning the two can only differ on rare characters: ones the charsmap
    turns into extra spaces, or ones the file's model would byte-encode.
"""

import html
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# -----------------------------------------------------------------------------------------------------------------------
# config


@dataclass
class UMT5Config:
    vocab_size: int = 256384  # rows of the token embedding table; <pad> 0, </s> 1, <unk> 2
    dim: int = 4096  # model width D
    dim_attn: int = 4096  # q/k/v width = num_heads * head_dim (64 x 64)
    dim_ffn: int = 10240  # gated feed-forward hidden width
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32  # relative-position buckets per layer table, half for each direction
    max_distance: int = 128  # distances >= this share the last bucket of their direction
    eps: float = 1e-6  # every RMS norm (upstream hard-codes it)

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        if self.num_buckets % 4:  # bidirectional halves, each split into exact and logarithmic quarters
            raise ValueError(f"num_buckets must be a multiple of 4, got {self.num_buckets}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads


UMT5_PRESETS = {
    "umt5-xxl": UMT5Config(),  # Wan 2.1's text encoder: 5,680,910,336 params in 242 tensors, 18% of them the vocab
    "tiny": UMT5Config(vocab_size=64, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, num_layers=2, num_buckets=8),
}


# -----------------------------------------------------------------------------------------------------------------------
# modules


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """Bidirectional T5 bucket of every (query, key) pair of a length-L sequence: (L, L) int64 in [0, num_buckets)."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # (Lq, Lk): key position - query position
    half = num_buckets // 2  # keys after the query use buckets [half, num_buckets), the others [0, half)
    side = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2  # distances 0 .. exact-1 get a bucket each
    # Beyond that, logarithmic bins reaching max_distance; float32 and the same formula as upstream, so the integer
    # bins agree at every edge. The clamp only keeps log() finite where torch.where picks the exact bucket anyway.
    scaled = torch.log(dist.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + scaled.long()).clamp(max=half - 1)
    return side + torch.where(dist < exact, dist, far)


class RMSNorm(nn.Module):
    """T5 "LayerNorm": x / rms(x) * weight, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (..., D)
        # the mean square in float32 whatever the activation dtype (upstream's float32 island); the product promotes a
        # half-precision x to float32, and the result goes back to the weight dtype (bf16 in Wan) before the scale
        y = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.o = nn.Linear(cfg.dim_attn, cfg.dim, bias=False)

    def forward(self, x, bias):  # (B, L, D), additive (B or 1, H, L, L) -> (B, L, D)
        q, k, v = (p(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for p in (self.q, self.k, self.v))
        # T5 does not scale the scores by 1/sqrt(head_dim): scale=1.0. (B, H, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(y.transpose(1, 2).flatten(2))


class GatedFeedForward(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        # a one-element Sequential only so that the key reads `gate.0.weight`, as in the released file
        self.gate = nn.Sequential(nn.Linear(cfg.dim, cfg.dim_ffn, bias=False))
        self.fc1 = nn.Linear(cfg.dim, cfg.dim_ffn, bias=False)
        self.fc2 = nn.Linear(cfg.dim_ffn, cfg.dim, bias=False)

    def forward(self, x):  # (B, L, D)
        # tanh-approximate GELU on the gate branch (upstream's GELU; transformers' "gelu_new"), times the linear branch
        return self.fc2(self.fc1(x) * F.gelu(self.gate(x), approximate="tanh"))


class RelativePositionBias(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        shape = (cfg.num_buckets, cfg.num_heads)  # one learned scalar per bucket and head
        self.embedding = nn.Embedding(*shape, _weight=torch.empty(shape))

    def forward(self, buckets):  # (L, L) int64 -> (1, H, L, L)
        # contiguous: the fused attention kernels want a unit stride along the key axis of the bias
        return self.embedding(buckets).permute(2, 0, 1).contiguous()[None]


def _clamp_fp16(x):
    """Upstream's guard for float16 only: if anything overflowed to inf, clamp everything to +-(max - 1000)."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return torch.where(torch.isinf(x).any(), x.clamp(-limit, limit), x)  # the condition stays on the device: no sync


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + ffn(norm2(x)); its own relative-position table (umT5)."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = GatedFeedForward(cfg)
        self.pos_embedding = RelativePositionBias(cfg)

    def forward(self, x, buckets, keep):  # (B, L, D), (L, L) int64, (B, 1, 1, L) bool or None
        bias = self.pos_embedding(buckets).to(x.dtype)  # (1, H, L, L), rounded to the activation dtype as upstream
        if keep is not None:
            # padding keys get the dtype's most negative finite value (upstream's masked_fill); (B, H, L, L)
            bias = torch.where(keep, bias, torch.finfo(x.dtype).min)
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    def __init__(self, cfg: UMT5Config | None = None):
        super().__init__()
        cfg = cfg or UMT5Config()
        self.cfg = cfg
        # _weight: no init in the constructor (normal_ on the meta device imports torch._dynamo); see init below
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        if not self.token_embedding.weight.is_meta:  # a plausible scale for untrained tests; real weights are loaded
            nn.init.normal_(self.token_embedding.weight, std=1.0)
            for block in self.blocks:
                nn.init.normal_(block.pos_embedding.embedding.weight, std=(2 * cfg.num_buckets * cfg.num_heads) ** -0.5)

    def forward(self, ids, mask=None):  # (B, L) int64, (B, L) nonzero = real token, or None -> (B, L, D)
        x = self.token_embedding(ids)  # (B, L, D)
        buckets = relative_position_buckets(ids.shape[1], self.cfg.num_buckets, self.cfg.max_distance, ids.device)
        keep = None if mask is None else (mask != 0)[:, None, None, :]  # (B, 1, 1, L): which keys may be attended
        for block in self.blocks:
            x = block(x, buckets, keep)
        return self.norm(x)


# -----------------------------------------------------------------------------------------------------------------------
# prompt cleaning, tokenizer, encode path


@cache
def _text_libs():
    try:
        import ftfy
        import regex
    except ImportError as e:
        raise ImportError("Wan's prompt cleaning needs ftfy and regex (pip install ftfy regex)") from e
    return ftfy, regex


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: ftfy repair, HTML unescaped twice, each whitespace run -> one space, stripped."""
    ftfy, regex = _text_libs()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    # `regex` as upstream; its \s differs from `re`'s only on U+001C..U+001F, control characters ftfy already removed
    return regex.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    """The umT5 SentencePiece tokenizer from its `tokenizer.json`, returning Wan's (ids, mask) for a batch of prompts.

    `path` is the tokenizer folder (`google/umt5-xxl/` in the Wan release, `tokenizer/` in the Diffusers release) or
    the `tokenizer.json` itself. Prompts are cleaned with `clean_prompt`, encoded with </s> appended, truncated to
    `seq_len` tokens (the last kept one is then </s>) and right-padded with <pad>; mask is 1 on real tokens.
    """

    def __init__(self, path, seq_len: int = 512, pad_token: str = "<pad>"):
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError("UMT5Tokenizer needs the `tokenizers` package (pip install tokenizers)") from e
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path} (Wan: <ckpt>/google/umt5-xxl, Diffusers: tokenizer/)")
        self.tok = tokenizers.Tokenizer.from_file(str(file))
        self.seq_len = seq_len
        self.context_length = seq_len  # the name train.py's caption checks read (te.Tokenizer's)
        self.placeholders = {}  # no learned words for umT5 (te.Tokenizer's interface)
        self.pad_token = pad_token
        self.pad_id = self.tok.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"{file} has no pad token {pad_token!r}")
        if self.tok.post_processor is None:  # T5 always ends a sequence with </s>; transformers installs this template
            eos = self.tok.token_to_id("</s>")
            self.tok.post_processor = tokenizers.processors.TemplateProcessing(
                single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])

    def encode(self, text: str) -> list:
        """The ids of `text` after Wan's cleaning, without </s> (te.Tokenizer.encode's contract)."""
        self.tok.no_padding()  # __call__ turns both on for its fixed-length batches
        self.tok.no_truncation()
        return self.tok.encode(clean_prompt(text), add_special_tokens=False).ids

    def __call__(self, prompts, seq_len: int | None = None):  # str or B str -> ids (B, L) int64, mask (B, L) int64
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        L = seq_len or self.seq_len
        # The Rust tokenizer counts the appended </s> when it truncates, so a cut prompt still ends with </s>.
        self.tok.enable_truncation(max_length=L)
        self.tok.enable_padding(length=L, pad_id=self.pad_id, pad_token=self.pad_token)
        out = self.tok.encode_batch([clean_prompt(p) for p in prompts], add_special_tokens=True)
        ids = torch.tensor([e.ids for e in out], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in out], dtype=torch.long)
        return ids, mask


@torch.no_grad()  # not inference_mode: the context is later saved for backward by the DiT's cross-attention
def encode_prompts(model: UMT5Encoder, tokenizer: UMT5Tokenizer, prompts, text_len: int = 512) -> torch.Tensor:
    """Wan's text context: (B, text_len, D) in the model's dtype, each prompt's features up to and including its </s>,
    exact zeros after it (upstream trims to the prompt's length, then the DiT zero-pads back to text_len)."""
    ids, mask = tokenizer(prompts, seq_len=text_len)  # (B, L) each, right-padded
    device = model.token_embedding.weight.device
    ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    x = model(ids, mask)  # (B, L, D); the padded rows hold values, but no real row has attended to them
    # Real tokens form a prefix of every row (right padding), so masking equals trim + zero-pad; where(), not a product,
    # so the padding is exactly zero even if a padded row overflowed.
    return torch.where(mask.bool()[..., None], x, 0)


# -----------------------------------------------------------------------------------------------------------------------
# ---- the transformers layout
# The Diffusers release stores the encoder as transformers' UMT5EncoderModel (text_encoder/*.safetensors). Same tensors,
# other names; the gated FFN's GELU branch is wi_0 and its linear branch wi_1.

HF_TOP = {  # ours -> transformers
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
HF_BLOCK = {  # ours under blocks.{i}. -> transformers under encoder.block.{i}.
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
HF_TIED = "encoder.embed_tokens.weight"  # transformers' second name for shared.weight (one tensor, two state-dict keys)


def umt5_config_to_hf(cfg: UMT5Config) -> dict:
    """A transformers UMT5Config dict (config.json fields) for the encoder."""
    return {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "vocab_size": cfg.vocab_size,
            "d_model": cfg.dim, "d_kv": cfg.head_dim, "d_ff": cfg.dim_ffn, "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads, "relative_attention_num_buckets": cfg.num_buckets,
            "relative_attention_max_distance": cfg.max_distance, "layer_norm_epsilon": cfg.eps,
            "feed_forward_proj": "gated-gelu", "pad_token_id": 0, "eos_token_id": 1}


def umt5_config_from_hf(d: dict) -> UMT5Config:
    """UMT5Config from a transformers config.json dict (e.g. the Diffusers release's text_encoder/config.json)."""
    if d.get("feed_forward_proj", "gated-gelu") != "gated-gelu":  # the only FFN this module implements
        raise ValueError(f"only feed_forward_proj='gated-gelu' is supported, got {d['feed_forward_proj']!r}")
    return UMT5Config(vocab_size=d["vocab_size"], dim=d["d_model"], dim_attn=d["num_heads"] * d["d_kv"],
                      dim_ffn=d["d_ff"], num_heads=d["num_heads"], num_layers=d["num_layers"],
                      num_buckets=d.get("relative_attention_num_buckets", 32),
                      max_distance=d.get("relative_attention_max_distance", 128),
                      eps=d.get("layer_norm_epsilon", 1e-6))


def _rename(sd: dict, top: dict, block: dict, src_prefix: str, dst_prefix: str) -> dict:
    out = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        # "blocks.3.attn.q.weight" -> ("3", "attn.q.weight"); "encoder.block.3.layer.0..." -> ("3", "layer.0...")
        index, _, name = key[len(src_prefix):].partition(".") if key.startswith(src_prefix) else ("", "", "")
        if not index.isdigit() or name not in block:
            raise KeyError(f"unexpected key {key!r}")
        out[f"{dst_prefix}{index}.{block[name]}"] = value
    return out


def umt5_to_hf(sd: dict) -> dict:
    """Our (= the original Wan) state dict -> transformers UMT5EncoderModel names, incl. the tied embedding name."""
    out = _rename(sd, HF_TOP, HF_BLOCK, "blocks.", "encoder.block.")
    out[HF_TIED] = out["shared.weight"]  # the same tensor, as in transformers' own state_dict()
    return out


def umt5_from_hf(sd: dict) -> dict:
    """transformers UMT5EncoderModel names -> ours. The tied `encoder.embed_tokens.weight` is dropped (saved files
    usually omit it); it stands in for `shared.weight` only when that is missing."""
    sd = dict(sd)
    tied = sd.pop(HF_TIED, None)
    if "shared.weight" not in sd and tied is not None:
        sd["shared.weight"] = tied
    return _rename(sd, {v: k for k, v in HF_TOP.items()}, {v: k for k, v in HF_BLOCK.items()},
                   "encoder.block.", "blocks.")
