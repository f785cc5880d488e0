"""The frozen text encoder of ModelScope text-to-video: the OpenCLIP ViT-H-14 text tower, cut after its 23rd block.

A prompt becomes the cross-attention context of the UNet (facts and numbers: docs/modelscope.md §4, §6):

    tokens  = tokenizer(prompts)     # (B, 77) int64: [SOT] + BPE ids + [EOT], zero-padded
    context = encoder(tokens)        # (B, 77, 1024): token + position embedding -> 23 causal blocks -> ln_final

The unconditional context for classifier-free guidance is `encoder(tokenizer([""]))`, the encoding of the empty string
(not zeros). Every one of the 77 positions is used, padding included: there is no pooling and no attention mask on the
padding, exactly as upstream.

This file holds the config (TextEncoderConfig, TEXT_PRESETS), the modules, the tokenizer and the placeholder-token
functions. The release layouts (config translation, open_clip <-> Hugging Face key names, `load_text_encoder` /
`save_text_encoder`) are in layouts.py, whole model directories in models.py.

References:
  - ModelScope `modelscope/models/multi_modal/video_synthesis/text_to_video_synthesis_model.py`:
    `FrozenOpenCLIPEmbedder(layer='penultimate')`, weights in `open_clip_pytorch_model.bin` (full ViT-H-14 CLIP).
  - open_clip 3.3.0 (github.com/mlfoundations/open_clip): `transformer.py` (`TextTransformer`,
    `ResidualAttentionBlock`), `tokenizer.py` (`SimpleTokenizer`), `model_configs/ViT-H-14.json`; Radford et al. 2021
    (CLIP) for the causal text transformer.
  - diffusers `convert_open_clip_checkpoint` (open_clip -> Hugging Face `CLIPTextModel` names, used by the diffusers
    port `text-to-video-ms-1.7b/text_encoder/`).
  - Gal et al. 2022, "An Image is Worth One Word" (Textual Inversion), for the placeholder-token rows.

Notable differences from upstream:
  - Only the 23 blocks that run are built. The released file has 24; ModelScope keeps the last one and stops the loop
    before it, we drop its weights when loading (`layouts.text_from_open_clip`).
  - No `text_projection`, `logit_scale`, EOT pooling or vision tower: only the token sequence is ever used.
  - Attention is `F.scaled_dot_product_attention(is_causal=True)` on batch-first tensors, instead of
    `nn.MultiheadAttention` with a (77, 77) `-inf` mask buffer. There are no buffers at all, so a model built on the
    meta device is complete once its weights are assigned. (ModelScope's own code permutes to sequence-first before
    calling the blocks, which attends over the wrong axis with open_clip >= 2024-07: the intended math is this one.)
  - Plain `nn.LayerNorm` (open_clip's subclass casts the output back to the input dtype; same values in fp32).
  - Parameter names are open_clip's (`transformer.resblocks.{i}.attn.in_proj_weight`, ...), so the original file loads
    after dropping unused keys; the diffusers/HF layout is renamed on load, fusing q/k/v (`layouts.text_from_hf`).
  - Added for this project: placeholder tokens with their own trainable embedding rows (`add_placeholder_token`), for
    the text-token ablation and the Textual Inversion baseline. The method itself uses its rare word as plain text.
  - The tokenizer runs open_clip's `tokenizer.py` on its own: `import open_clip` would also import timm, torchvision
    and transformers (about 7 s), none of which the tokenizer needs.
"""

import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# -----------------------------------------------------------------------------------------------------------------------
# config


@dataclass
class TextEncoderConfig:
    vocab_size: int = 49408  # BPE vocabulary; ids 49406/49407 are <start_of_text>/<end_of_text>, pad is 0
    context_length: int = 77  # tokens per prompt = rows of positional_embedding
    width: int = 1024  # model dim D (head dim 64)
    heads: int = 16
    layers: int = 23  # blocks that RUN: ViT-H-14 has 24, ModelScope takes the penultimate block's output
    intermediate: int = 4096  # MLP hidden dim (open_clip mlp_ratio 4)
    eps: float = 1e-5  # every LayerNorm

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


TEXT_PRESETS = {
    "modelscope": TextEncoderConfig(),  # 340,387,840 params in 280 tensors (HF splits q/k/v: same params, 372 tensors)
    "tiny": TextEncoderConfig(width=64, heads=4, layers=2, intermediate=256),  # 3,267,136 params, 97% the vocab table
}


def open_clip_dir() -> Path:
    """The installed open_clip package (its tokenizer.py and model_configs/), found without importing it."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
    if spec is None:
        raise ImportError("the tokenizer and the open_clip configs need open_clip_torch (pip install open_clip_torch)")
    return Path(spec.submodule_search_locations[0])


# -----------------------------------------------------------------------------------------------------------------------
# modules


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        # q, k, v stacked in one (3D, D) matrix, as nn.MultiheadAttention stores them: open_clip keys load unchanged
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init

    def forward(self, x):  # (B, T, D)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, T, D)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        # Causal: token t sees tokens <= t only, as CLIP was trained; so the output at t does not depend on the padding
        # after it, and the EOT position is the one that has seen the whole prompt.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.out_proj(y.transpose(1, 2).flatten(2))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.intermediate)
        self.c_proj = nn.Linear(cfg.intermediate, cfg.width)

    def forward(self, x):  # (B, T, D)
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU, open_clip's nn.GELU(); not OpenAI's quick_gelu


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x):  # (B, T, D)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        # _weight: no init in the constructor (normal_ on the meta device, where the loaders build, imports
        # torch._dynamo: seconds per process); the random init below is for real tensors only
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, _weight=torch.empty(cfg.vocab_size, cfg.width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))  # learned, (77, D)
        # A ModuleDict only so that the keys read `transformer.resblocks.{i}.*`, as in open_clip files.
        self.transformer = nn.ModuleDict({"resblocks": nn.ModuleList(ResidualAttentionBlock(cfg)
                                                                     for _ in range(cfg.layers))})
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.eps)  # applied to the penultimate output (ModelScope does)
        # Rows for placeholder ids vocab_size, vocab_size + 1, ... (see add_placeholder_token). None until one is added,
        # so the state dict of a fresh model is exactly the released key set and loading stays strict.
        self.register_parameter("placeholder_embeddings", None)
        if not self.positional_embedding.is_meta:  # open_clip's init (only matters for untrained tests)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)

    def embed(self, tokens):  # (B, T) int64 -> (B, T, D)
        if self.placeholder_embeddings is None:
            return self.token_embedding(tokens)  # out-of-range ids fail here, as they should
        V = self.cfg.vocab_size
        x = self.token_embedding(tokens.clamp(max=V - 1))  # placeholder positions read a dummy row, replaced below
        new = self.placeholder_embeddings[(tokens - V).clamp(min=0)]  # (B, T, D); only where tokens >= V is it real
        # torch.where, not a concatenated (V + n, D) table: the 49408-row table is neither copied nor given gradients,
        # and each placeholder row gets gradient only from the positions where its id occurs.
        return torch.where((tokens >= V)[..., None], new.to(x.dtype), x)

    def forward(self, tokens):  # (B, T) int64, T <= context_length -> (B, T, D)
        x = self.embed(tokens) + self.positional_embedding[: tokens.shape[1]]  # (B, T, D)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_final(x)

    def add_placeholder_rows(self, rows):  # (n, D)
        """Append trainable rows for new placeholder ids. Creates a new Parameter: build the optimizer afterwards."""
        # fp32 even when the frozen encoder runs in bf16/fp16: these are the weights being optimized
        rows = rows.detach().float().to(self.token_embedding.weight.device)
        old = self.placeholder_embeddings
        self.placeholder_embeddings = nn.Parameter(rows if old is None else torch.cat([old.detach(), rows]))


# -----------------------------------------------------------------------------------------------------------------------
# tokenizer


@lru_cache(maxsize=None)
def _simple_tokenizer_class():
    # open_clip's tokenizer.py imports only ftfy, regex, numpy and torch and has no package-relative imports, so it runs
    # as a standalone module; `import open_clip` would pull in timm, torchvision and transformers as well.
    spec = importlib.util.spec_from_file_location("open_clip_simple_tokenizer", open_clip_dir() / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer  # its BPE merges ship inside the wheel (bpe_simple_vocab_16e6.txt.gz): no network


class Tokenizer:
    """open_clip's `tokenize`: [SOT] + BPE(ftfy-fixed, lower-cased text) + [EOT], zero-padded or truncated to 77.

    Placeholder words (added with `add_placeholder_token`) are cut out of the text before BPE and map to their own ids
    >= vocab_size; the text between them is tokenized exactly as without placeholders.
    """

    def __init__(self, context_length: int = 77):
        self.bpe = _simple_tokenizer_class()(context_length=context_length)
        self.context_length = context_length
        self.sot, self.eot = self.bpe.sot_token_id, self.bpe.eot_token_id  # 49406, 49407
        self.placeholders = {}  # lower-cased word -> id
        self._split = None  # regex with one capture group matching any placeholder

    def add_placeholder(self, word: str, token_id: int):
        key = word.strip().lower()  # open_clip lower-cases all text, so "<PLL>" and "<pll>" are the same word
        if not key or any(c.isspace() for c in key):  # the text is matched before whitespace is normalized
            raise ValueError(f"a placeholder must be one non-empty word without spaces, got {word!r}")
        if key in self.placeholders:
            raise ValueError(f"placeholder {word!r} already has id {self.placeholders[key]}")
        self.placeholders[key] = token_id
        # Longest first so that "<pll2>" is not cut as "<pll>" + "2"; a word-like placeholder ("pll") only matches as a
        # whole word, so "apple" keeps its own tokens.
        alts = [(r"(?<!\w)" if w[0].isalnum() else "") + re.escape(w) + (r"(?!\w)" if w[-1].isalnum() else "")
                for w in sorted(self.placeholders, key=len, reverse=True)]
        self._split = re.compile("(" + "|".join(alts) + ")", re.IGNORECASE)

    def encode(self, text: str) -> list:
        """Token ids of one text without SOT/EOT."""
        if self._split is None:
            return self.bpe.encode(text)
        ids = []
        for i, piece in enumerate(self._split.split(text)):  # text, placeholder, text, placeholder, ..., text
            ids += [self.placeholders[piece.lower()]] if i % 2 else self.bpe.encode(piece)
        return ids

    def __call__(self, texts) -> torch.Tensor:  # str or list of B str -> (B, context_length) int64
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)  # pad id 0 (the BPE token "!"), as upstream
        for i, text in enumerate(texts):
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > self.context_length:  # too long: cut, and make the last kept token EOT (open_clip does)
                ids = ids[: self.context_length - 1] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    tokenize = __call__


# -----------------------------------------------------------------------------------------------------------------------
# placeholder tokens (text-token ablation, Textual Inversion baseline)


def _add(tokenizer: Tokenizer, encoder: TextEncoder, word: str, row) -> int:
    n = 0 if encoder.placeholder_embeddings is None else encoder.placeholder_embeddings.shape[0]
    token_id = encoder.cfg.vocab_size + n  # ids follow the vocabulary: 49408, 49409, ...
    if len(tokenizer.placeholders) != n:
        raise ValueError(f"tokenizer has {len(tokenizer.placeholders)} placeholders, encoder {n}: not a matching pair")
    tokenizer.add_placeholder(word, token_id)  # validates the word before the encoder changes
    encoder.add_placeholder_rows(row[None])
    return token_id


def add_placeholder_token(tokenizer: Tokenizer, encoder: TextEncoder, word: str, init_from: str | None = None) -> int:
    """Give `word` its own new embedding row, trainable; returns its id (>= vocab_size).

    The row starts as the mean embedding of the BPE tokens of `init_from` (Textual Inversion's initializer word), or
    of the whole vocabulary if None. Nothing else changes: prompts without `word` encode exactly as before. Freeze the
    encoder before (`layouts.load_text_encoder` does) and build the optimizer after this call.
    """
    table = encoder.token_embedding.weight.detach()  # (V, D)
    if init_from is None:
        row = table.float().mean(0)
    else:
        ids = tokenizer.bpe.encode(init_from)  # base vocabulary only, never other placeholders
        if not ids:
            raise ValueError(f"init_from={init_from!r} has no tokens")
        row = table[ids].float().mean(0)  # (D,)
    return _add(tokenizer, encoder, word, row)


def reencode_placeholders(text: TextEncoder, tokens, ctx):
    """Re-encode (with grad) the prompts whose token ids (B, 77) hold a placeholder; the others keep their cached
    embeddings `ctx` (B, 77, D). The token ablation trains the placeholder row through this."""
    has = (tokens >= text.cfg.vocab_size).any(dim=1)  # (B,)
    if not bool(has.any()):
        return ctx
    fresh = text(tokens[has])  # (b, 77, D), differentiable w.r.t. the placeholder row
    out = ctx.clone()
    out[has] = fresh.to(out.dtype)
    return out


def placeholder_state(tokenizer: Tokenizer, encoder: TextEncoder) -> dict:
    """{'words': [...], 'embeddings': (n, D)} in id order: what a trained delta must carry to restore the placeholders."""
    words = sorted(tokenizer.placeholders, key=tokenizer.placeholders.get)
    rows = encoder.placeholder_embeddings
    n = 0 if rows is None else rows.shape[0]
    if len(words) != n:
        raise ValueError(f"tokenizer has {len(words)} placeholders, encoder {n}")
    return {"words": words, "embeddings": rows.detach().cpu().clone() if n else torch.zeros(0, encoder.cfg.width)}


def load_placeholder_state(state: dict, tokenizer: Tokenizer, encoder: TextEncoder) -> list:
    """Re-add the placeholders of `placeholder_state` (after loading the base weights); returns their ids."""
    if len(state["words"]) != len(state["embeddings"]):
        raise ValueError(f"{len(state['words'])} placeholder words but {len(state['embeddings'])} rows")
    return [_add(tokenizer, encoder, w, row) for w, row in zip(state["words"], state["embeddings"])]
