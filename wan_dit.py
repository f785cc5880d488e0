"""The Wan 2.1 text-to-video diffusion transformer (WanModel, T2V 1.3B by default) in plain PyTorch.

A DiT over video latents: the VAE's (16, F, H/8, W/8) latents are cut into 1x2x2 patches (one token per patch, token
order frame-major then row then column), run through `num_layers` identical blocks and projected back. Each block is
  adaLN(shift, scale) -> self-attention (RMS q/k-norm over the full width, 3-axis RoPE) -> gated residual
  -> LayerNorm(affine) -> cross-attention to the umT5 text features -> plain residual
  -> adaLN(shift, scale) -> GELU(tanh) MLP -> gated residual,
the six modulation vectors being the shared timestep projection plus the block's own `modulation` parameter. The head
has its own 2-vector modulation. The net predicts the flow-matching velocity; it is called with t = sigma * 1000.

Sources: the ORIGINAL `wan/modules/model.py` (`WanModel`; the wan22 wheel's copy is Wan2.2's file, whose per-token
timestep path fed with a (B,) timestep computes exactly Wan 2.1's per-sample path), and its port diffusers
`models/transformers/transformer_wan.py` (`WanTransformer3DModel`).

Parameter names are the original's, so an original checkpoint (`diffusion_pytorch_model*.safetensors` of
Wan-AI/Wan2.1-T2V-1.3B) loads with strict=True and no renaming; `dit_from_diffusers` / `dit_to_diffusers` at the bottom
convert the diffusers layout (pure renames, no tensor changes shape).

Differences from the original (none changes its outputs):
  * One latent size per batch: inputs are (B, C, F, H, W) tensors, not lists, so no sequence is padded and the
    self-attention needs no key-length mask (the original pads every sample to `seq_len` and masks with k_lens).
  * The timestep is (B,): the adaLN vectors are computed once per sample, not once per token (the Wan2.2 file
    expands t to (B, L) and computes the same numbers L times).
  * Attention is torch's scaled_dot_product_attention, not flash-attn (which the original requires, CUDA only).
  * RoPE is applied in float32 with a cached (F*H*W, head_dim/2) cos/sin table per grid size (angles computed in
    float64 like upstream, then rounded once), not as float64 complex products in a loop over the batch.
  * Only text-to-video: no `y` (image-to-video) input, no `img_emb`, no windowed attention (window_size is always
    (-1, -1) in every released Wan 2.1 config).
  * Optional gradient checkpointing of each block (`set_checkpointing`).

Mixed precision is the original's under autocast (how Wan runs: float32 weights, autocast bf16): the time embedding,
time projection, modulation sums and head run in float32 with autocast off, the float32 gates promote every residual
add to float32, and q/k go through float32 for RoPE before attention casts them to v's dtype. Rounding happens at the
same points as upstream (tests: 1e-7 relative apart under bf16 autocast). bf16 weights run under autocast too; without
autocast, as upstream, float32 activations would meet bf16 Linears.
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------------------------------------------------
# config


@dataclass
class WanDiTConfig:
    """Defaults: Wan 2.1 T2V 1.3B (wan/configs/wan_t2v_1_3B.py). The 14B: dim 5120, ffn_dim 13824, num_heads 40,
    num_layers 40. window_size is not a field: it is global attention, (-1, -1), in every released T2V config."""

    patch_size: tuple = (1, 2, 2)  # (frames, height, width) of one patch
    text_len: int = 512  # umT5 tokens the net attends to (prompt features zero-padded to this length)
    in_dim: int = 16  # latent channels of the Wan 2.1 VAE
    dim: int = 1536  # transformer width
    ffn_dim: int = 8960  # MLP hidden width
    freq_dim: int = 256  # sinusoidal timestep embedding width
    text_dim: int = 4096  # umT5-XXL feature width
    out_dim: int = 16  # velocity channels
    num_heads: int = 12  # head_dim = dim // num_heads = 128
    num_layers: int = 30
    qk_norm: bool = True  # RMSNorm on q and k over the full width (before the split into heads)
    cross_attn_norm: bool = True  # affine LayerNorm (norm3) before the cross-attention
    eps: float = 1e-6

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        assert len(self.patch_size) == 3, self.patch_size
        assert self.dim % self.num_heads == 0 and (self.dim // self.num_heads) % 2 == 0, \
            "dim must split into heads of an even width (RoPE rotates pairs)"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


# -----------------------------------------------------------------------------------------------------------------------
# helpers


def _fp32_region(device_type: str):
    """Autocast off: the original's `torch.amp.autocast('cuda', dtype=torch.float32)` regions (the same on fp32
    weights)."""
    # meta tensors (the memory estimator's trace) have no autocast state of their own: the CPU's stands in
    return torch.autocast(device_type="cpu" if device_type == "meta" else device_type, enabled=False)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) [cos | sin] embedding, computed in float64 exactly as upstream, returned float32."""
    assert dim % 2 == 0
    half = dim // 2
    t = t.to(torch.float64)
    sinusoid = torch.outer(t, torch.pow(10000, -torch.arange(half, device=t.device).to(t).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1).float()


def rope_split(head_dim: int) -> tuple:
    """Complex pairs of a head given to (frames, height, width): c - 2*(c//3), c//3, c//3 with c = head_dim // 2
    (44, 42, 42 channels = 22, 21, 21 pairs at head_dim 128). Each axis has its own frequency ladder over its own
    width."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_table(grid: tuple, head_dim: int, device=None, theta: float = 10000.0) -> tuple:
    """(cos, sin), each (F*H*W, head_dim/2) float32, for tokens in (frame, row, column) order.

    Pair j of an axis with n pairs rotates by pos * theta^(-2j / (2n)) (the original's `rope_params(1024, 2n)`)."""
    angles = []
    for size, n in zip(grid, rope_split(head_dim)):
        freqs = 1.0 / torch.pow(theta, torch.arange(0, 2 * n, 2, dtype=torch.float64, device=device).div(2 * n))
        angles.append(torch.outer(torch.arange(size, dtype=torch.float64, device=device), freqs))  # (size, n)
    f, h, w = grid
    a = torch.cat([angles[0][:, None, None, :].expand(f, h, w, -1),
                   angles[1][None, :, None, :].expand(f, h, w, -1),
                   angles[2][None, None, :, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, head_dim // 2)
    return torch.cos(a).float(), torch.sin(a).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, heads, head_dim) with channels (2j, 2j+1) as the pair j; cos/sin (L, head_dim/2). Returns float32."""
    x = x.float().unflatten(-1, (-1, 2))  # (B, L, n, d/2, 2)
    a, b = x[..., 0], x[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (L, 1, d/2): the same rotation for every head
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    """The original's WanRMSNorm: normalise in float32, cast back, then scale (so bf16 * fp32 weight gives float32)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.Module):
    """The original's WanLayerNorm: LayerNorm computed in float32, cast back to the input's dtype. No parameters unless
    affine (only norm3, the cross-attention norm, is)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps).type_as(x)


def _attention(q, k, v, heads: int):
    """q (B, Lq, dim), k/v (B, Lk, dim) -> (B, Lq, dim) in v's dtype. Like the original's flash_attention call, q and k
    are cast to v's dtype first (under autocast: bf16), and no mask: every key is attended to."""
    q, k = q.to(v.dtype), k.to(v.dtype)
    q, k, v = (u.unflatten(-1, (heads, -1)).transpose(1, 2) for u in (q, k, v))  # (B, heads, L, head_dim)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2).to(v.dtype)


# -----------------------------------------------------------------------------------------------------------------------
# blocks


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x, cos, sin):
        """x (B, L, dim); cos/sin (L, head_dim/2)."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))  # (B, L, heads, head_dim)
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x)
        q = apply_rope(q, cos, sin).flatten(2)  # float32, (B, L, dim)
        k = apply_rope(k, cos, sin).flatten(2)
        return self.o(_attention(q, k, v, self.num_heads))


class CrossAttention(SelfAttention):
    def forward(self, x, context):
        """x (B, L, dim) attends to every one of the text_len context tokens (B, text_len, dim): no mask."""
        q = self.norm_q(self.q(x))
        k = self.norm_k(self.k(context))
        v = self.v(context)
        return self.o(_attention(q, k, v, self.num_heads))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps)  # no parameters
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(dim, cfg.eps, affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(dim, cfg.eps)  # no parameters
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e, context, cos, sin):
        """x (B, L, dim); e (B, 6, dim) float32 timestep projection; context (B, text_len, dim) embedded text."""
        assert e.dtype == torch.float32
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e).chunk(6, dim=1)  # (B, 1, dim)
        y = self.self_attn(self.norm1(x).float() * (1 + scale1) + shift1, cos, sin)
        x = x + y * gate1  # float32 from here on (the gate is float32)
        x = x + self.cross_attn(self.norm3(x), context)
        y = self.ffn(self.norm2(x).float() * (1 + scale2) + shift2)
        return x + y * gate2


class Head(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps)  # no parameters
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        """x (B, L, dim); e (B, dim) float32 time embedding. Runs in float32 with autocast off, like the original."""
        assert e.dtype == torch.float32
        with _fp32_region(x.device.type):
            shift, scale = (self.modulation + e.unsqueeze(1)).chunk(2, dim=1)  # each (B, 1, dim)
            h = self.norm(x) * (1 + scale) + shift
            return self.head(h.to(self.head.weight.dtype))


# -----------------------------------------------------------------------------------------------------------------------
# model


class WanDiT(nn.Module):
    """Wan 2.1 text-to-video DiT. `forward(x, t, context) -> velocity`, see there."""

    def __init__(self, cfg: WanDiTConfig | None = None):
        super().__init__()
        cfg = cfg or WanDiTConfig()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.checkpointing = False
        self._rope_cache = {}  # (F, H, W, device) -> (cos, sin); not state, not moved by .to()
        self.init_weights()

    def set_checkpointing(self, enabled: bool = True):
        """Recompute each block in backward instead of keeping its activations (torch.utils.checkpoint, non-reentrant):
        the same loss and gradients, about one more forward of compute, activations of one block at a time."""
        self.checkpointing = bool(enabled)
        return self

    @torch.no_grad()
    def init_weights(self):
        """The original's init_weights: xavier-uniform Linears with zero biases, xavier patch embedding, N(0, 0.02)
        text/time embedding weights, a zero output layer. (Pretrained weights replace all of it.)"""
        if self.patch_embedding.weight.device.type == "meta":
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in list(self.text_embedding.modules()) + list(self.time_embedding.modules()):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def rope(self, grid: tuple, device) -> tuple:
        key = (*grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_table(grid, self.cfg.head_dim, device)
        return self._rope_cache[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Velocity prediction.

        x: (B, in_dim, F, H, W) latents, F, H, W divisible by the patch size (one latent size per batch).
        t: (B,) float timesteps on the 0..1000 scale (Wan calls the net with sigma * 1000).
        context: (B, text_len, text_dim) umT5 features ALREADY zero-padded to text_len (use `pad_context`): like the
            original (which pads each prompt's trimmed features with zeros to 512 and passes context_lens=None), the
            net attends to all text_len positions, the padding included (zeros embed to the text MLP's bias path,
            not to nothing), so the padding length changes the output and must be exactly text_len.
        Returns (B, out_dim, F, H, W) float32.
        """
        cfg = self.cfg
        B, C, Fr, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        assert C == cfg.in_dim, (C, cfg.in_dim)
        assert Fr % pt == 0 and H % ph == 0 and W % pw == 0, f"latent {(Fr, H, W)} not divisible by {cfg.patch_size}"
        assert t.shape == (B,), f"t must be (B,) = ({B},), got {tuple(t.shape)}"
        assert context.shape[0] == B and context.shape[1] == cfg.text_len and context.shape[2] == cfg.text_dim, \
            f"context must be (B, text_len={cfg.text_len}, {cfg.text_dim}) zero-padded, got {tuple(context.shape)}"
        grid = (Fr // pt, H // ph, W // pw)

        x = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, f*h*w, dim), tokens in (frame, row, col) order
        with _fp32_region(x.device.type):
            wdtype = self.time_embedding[0].weight.dtype  # float32 unless the weights were cast
            e = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, t).to(wdtype)).float()  # (B, dim)
            e0 = self.time_projection(e.to(wdtype)).float().unflatten(1, (6, cfg.dim))  # (B, 6, dim)
        context = self.text_embedding(context)  # (B, text_len, dim)
        cos, sin = self.rope(grid, x.device)

        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, context, cos, sin, use_reentrant=False)
            else:
                x = block(x, e0, context, cos, sin)

        x = self.head(x, e)  # (B, L, pt*ph*pw*out_dim), channel fastest
        x = x.view(B, *grid, pt, ph, pw, cfg.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, cfg.out_dim, Fr, H, W)  # the original's 'fhwpqrc->cfphqwr'
        return x.float()


def pad_context(contexts, text_len: int = 512) -> torch.Tensor:
    """A list of (L_i, text_dim) trimmed prompt features -> (B, text_len, text_dim), zero-padded as the original
    does."""
    out = []
    for u in contexts:
        assert u.shape[0] <= text_len, (u.shape, text_len)
        out.append(torch.cat([u, u.new_zeros(text_len - u.shape[0], u.shape[1])]))
    return torch.stack(out)


# -----------------------------------------------------------------------------------------------------------------------
# diffusers layout (WanTransformer3DModel): pure renames, every tensor keeps its shape
# (modulation (1, 6, dim) = scale_shift_table (1, 6, dim), same chunk order shift/scale/gate x2; head.modulation
# (1, 2, dim) = scale_shift_table (1, 2, dim), shift then scale; time_projection.1 (6*dim, dim) = time_proj.)

_TOP_RENAMES = [  # (ours, diffusers): module prefixes or exact parameter names
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
]
_BLOCK_RENAMES = [  # inside blocks.N.
    *[(f"{a}.{p}", f"{b}.{q}") for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for p, q in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                   ("norm_q", "norm_q"), ("norm_k", "norm_k"))],
    ("norm3", "norm2"),  # the cross-attention norm (diffusers numbers the norms in call order)
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("modulation", "scale_shift_table"),
]
_BLOCK_KEY = re.compile(r"^(blocks\.\d+)\.(.+)$")


def _rename(key: str, forward: bool) -> str:
    def apply(rest, rules):
        for ours, theirs in rules:
            src, dst = (ours, theirs) if forward else (theirs, ours)
            if rest == src or rest.startswith(src + "."):
                return dst + rest[len(src):]
        return None

    m = _BLOCK_KEY.match(key)
    if m is None:
        new = apply(key, _TOP_RENAMES)
    else:
        inner = apply(m.group(2), _BLOCK_RENAMES)
        new = None if inner is None else f"{m.group(1)}.{inner}"
    if new is None:
        layout = "WanDiT (original)" if forward else "diffusers WanTransformer3DModel (T2V)"
        raise KeyError(f"{key!r} is not a {layout} key (image-to-video and VACE weights are not supported)")
    return new


def dit_to_diffusers(sd: dict) -> dict:
    """Our (= the original's) state dict -> diffusers WanTransformer3DModel names. The tensors are not copied."""
    return {_rename(k, True): v for k, v in sd.items()}


def dit_from_diffusers(sd: dict) -> dict:
    """A diffusers WanTransformer3DModel (T2V) state dict -> our (= the original's) names. The tensors are not
    copied."""
    return {_rename(k, False): v for k, v in sd.items()}


def dit_config_to_diffusers(cfg: WanDiTConfig) -> dict:
    """Our config -> diffusers WanTransformer3DModel config (text_len has no field there: its pipeline pads to 512)."""
    if not cfg.qk_norm:
        raise ValueError("diffusers' WanAttention always applies q/k RMSNorm: qk_norm=False has no diffusers form")
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def dit_config_from_diffusers(d: dict, text_len: int = 512) -> WanDiTConfig:
    """A diffusers WanTransformer3DModel config dict (transformer/config.json) -> WanDiTConfig. Text-to-video only."""
    for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if d.get(k) is not None:
            raise ValueError(f"{k}={d[k]!r}: image-to-video / Wan2.2 variants are not supported (text-to-video only)")
    if d.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"qk_norm={d['qk_norm']!r}: only 'rms_norm_across_heads' is the Wan 2.1 norm")
    heads = d.get("num_attention_heads", 40)
    in_dim = d.get("in_channels", 16)
    return WanDiTConfig(
        patch_size=tuple(d.get("patch_size", (1, 2, 2))),
        text_len=text_len,
        in_dim=in_dim,
        dim=heads * d.get("attention_head_dim", 128),
        ffn_dim=d.get("ffn_dim", 13824),
        freq_dim=d.get("freq_dim", 256),
        text_dim=d.get("text_dim", 4096),
        out_dim=d.get("out_channels") or in_dim,
        num_heads=heads,
        num_layers=d.get("num_layers", 40),
        qk_norm=True,
        cross_attn_norm=d.get("cross_attn_norm", True),
        eps=d.get("eps", 1e-6),
    )
