"""The ModelScope text-to-video UNet (UNetSD, "ModelScopeT2V", Wang et al. 2023, arXiv 2308.06571) in plain PyTorch.

A Stable-Diffusion-2 image UNet with two temporal additions after every spatial layer:
  * a temporal convolution (four 3x1x1 Conv3d over frames) after every ResBlock, and
  * a temporal transformer (self-attention over the frames at each pixel) after every spatial transformer.
Spatial layers see frames as independent images; only the temporal layers mix frames. NewMove fine-tunes exactly these
temporal layers plus the text key/value projections of the spatial cross-attention (method.md).

Tensors: videos are (B, C, F, H, W) at the model boundary. Inside, the running activation is kept as per-frame images
(B*F, C, H, W), frame index fastest within each video, exactly as upstream; temporal layers fold it to (B, C, F, H, W) or
(B*H*W, F, C) and back. Every fold carries a shape comment.

Parameter names are those of diffusers' `UNet3DConditionModel` (down_blocks.*.resnets / temp_convs / attentions /
temp_attentions, ...), so diffusers-layout files load with no renaming; `from_original` / `to_original` convert the
original `text2video_pytorch_model.pth` names (input_blocks.*, with the `temopral_conv` typo) one-to-one.

Sources: ModelScope `modelscope/models/multi_modal/video_synthesis/unet_sd.py` (the original); diffusers
`models/unets/unet_3d_condition.py`, `unet_3d_blocks.py`, `transformers/transformer_temporal.py`, `resnet.py` (the port);
facts in docs/modelscope.md.

Notable differences from upstream (none changes the released model's outputs):
  * Attention is torch's scaled_dot_product_attention (flash / memory-efficient kernels on CUDA).
  * Cross-attention keys/values are computed once per video and shared by its frames, not once per frame
    (upstream repeats the text context F times first; same numbers, F times fewer K/V FLOPs).
  * Upstream hard-codes context_dim=1024 in the decoder's spatial transformers; here `cross_attention_dim` is used
    everywhere, which only matters for non-released configs.
  * Temporal transformer projections are Linear (as in diffusers); the original file stores them as Conv1d(k=1), so
    `from_original` squeezes their last dim (34 tensors in the released model).
  * Training keeps fewer activations, at the same gradients: frozen 2-D convs keep no input for backward (only a
    weight gradient would need it), GroupNorm+SiLU and GEGLU keep only their input and recompute the rest in backward,
    dropout keeps a 1-byte mask on the CPU too (as torch does on CUDA).
    Optional gradient checkpointing of every layer, full or selective (recompute only the element-wise work);
    upstream has none.
  * No fps conditioning, image-dataset mode or masks: unused by the released config.
"""

import contextlib
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from weights import assign_state_dict, read_state_dict, save_state_dict

# -----------------------------------------------------------------------------------------------------------------------
# config


@dataclass
class UNet3DConfig:
    in_channels: int = 4  # latent channels of the KL-f8 VAE
    out_channels: int = 4  # eps prediction, same shape as the input
    block_out_channels: tuple = (320, 640, 1280, 1280)  # channels per resolution level (dim 320 x dim_mult [1,2,4,4])
    cross_attn_levels: tuple = (True, True, True, False)  # levels with spatial+temporal transformers (attn_scales 1,1/2,1/4)
    layers_per_block: int = 2  # ResBlocks per encoder level (decoder levels have one more)
    head_dim: int = 64  # every attention uses channels // head_dim heads of this width
    first_temporal_heads: int = 8  # heads of the temporal transformer after conv_in (inner width 8*64 = 512 != 320)
    cross_attention_dim: int = 1024  # width of the text embedding (OpenCLIP ViT-H-14)
    norm_num_groups: int = 32  # GroupNorm groups everywhere (upstream hard-codes 32)
    dropout: float = 0.1  # ResBlock dropout (configuration.json unet_dropout; the diffusers port uses 0.0)
    temporal_dropout: float = 0.1  # dropout inside every temporal conv (hard-coded 0.1 upstream and in diffusers)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.cross_attn_levels = tuple(bool(a) for a in self.cross_attn_levels)
        assert len(self.cross_attn_levels) == len(self.block_out_channels), "one cross_attn flag per level"
        for c in self.block_out_channels:
            assert c % self.norm_num_groups == 0, f"{c} channels not divisible by {self.norm_num_groups} groups"
            assert c % self.head_dim == 0, f"{c} channels not divisible by head_dim {self.head_dim}"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


UNET_PRESETS = {
    # the released ModelScope T2V / ZeroScope v2 UNet: 1,411,233,860 params, 1480 tensors
    "modelscope-1.7b": UNet3DConfig(),
    # smallest config that exercises every kind of layer (tests); 2 levels, attention at both
    "tiny": UNet3DConfig(block_out_channels=(32, 64), cross_attn_levels=(True, True), layers_per_block=1, head_dim=16,
                         first_temporal_heads=8, cross_attention_dim=64, norm_num_groups=8, dropout=0.0),
    # CPU-scale toy world (toy-calibration.md: 8x8 latents, attention at both levels, ~2 M params)
    "toy": UNet3DConfig(block_out_channels=(32, 64, 64), cross_attn_levels=(True, True, False), layers_per_block=1,
                        head_dim=8, first_temporal_heads=8, cross_attention_dim=64, norm_num_groups=8, dropout=0.0),
}


def config_from_original(model_cfg: dict) -> UNet3DConfig:
    """UNet3DConfig from the `model.model_cfg` block of the original `configuration.json`."""
    if str(model_cfg.get("temporal_attention", "True")) != "True":  # a string in the released file
        raise ValueError("configuration.json: temporal_attention must be 'True' (image-only UNets are not supported)")
    dim, mult = model_cfg["unet_dim"], model_cfg["unet_dim_mult"]
    scales = [float(s) for s in model_cfg["unet_attn_scales"]]
    return UNet3DConfig(
        in_channels=model_cfg["unet_in_dim"],
        out_channels=model_cfg["unet_out_dim"],
        block_out_channels=tuple(dim * m for m in mult),
        # level i runs at scale 1/2^i; upstream gives it attention iff that scale is listed in attn_scales
        cross_attn_levels=tuple(any(math.isclose(0.5 ** i, s) for s in scales) for i in range(len(mult))),
        layers_per_block=model_cfg["unet_res_blocks"],
        head_dim=model_cfg["unet_head_dim"],
        first_temporal_heads=model_cfg["unet_num_heads"],
        cross_attention_dim=model_cfg["unet_context_dim"],
        norm_num_groups=model_cfg.get("unet_norm_num_groups", 32),  # our extension: upstream hard-codes 32
        dropout=model_cfg.get("unet_dropout", 0.1),
    )


def config_to_original(cfg: UNet3DConfig) -> dict:
    c0 = cfg.block_out_channels[0]
    return {
        "unet_in_dim": cfg.in_channels, "unet_dim": c0, "unet_y_dim": 768, "unet_context_dim": cfg.cross_attention_dim,
        "unet_out_dim": cfg.out_channels, "unet_dim_mult": [c // c0 for c in cfg.block_out_channels],
        "unet_num_heads": cfg.first_temporal_heads, "unet_head_dim": cfg.head_dim, "unet_res_blocks": cfg.layers_per_block,
        "unet_attn_scales": [0.5 ** i for i, a in enumerate(cfg.cross_attn_levels) if a],
        "unet_dropout": cfg.dropout, "temporal_attention": "True",
        **({"unet_norm_num_groups": cfg.norm_num_groups} if cfg.norm_num_groups != 32 else {}),
    }


def config_from_diffusers(d: dict) -> UNet3DConfig:
    """UNet3DConfig from a diffusers `unet/config.json` (UNet3DConditionModel)."""
    if d.get("num_attention_heads") is not None or not isinstance(d.get("attention_head_dim", 64), int):
        raise ValueError("unet/config.json: per-level or explicit num_attention_heads are not supported")
    down = d.get("down_block_types", ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"])
    up = d.get("up_block_types", ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3)
    levels = tuple(t == "CrossAttnDownBlock3D" for t in down)
    if tuple(t == "CrossAttnUpBlock3D" for t in reversed(up)) != levels:
        raise ValueError("unet/config.json: up_block_types must mirror down_block_types")
    if d.get("act_fn", "silu") != "silu" or d.get("norm_eps", 1e-5) != 1e-5 or d.get("time_cond_proj_dim"):
        raise ValueError("unet/config.json: only act_fn silu, norm_eps 1e-5 and no time_cond_proj_dim are supported")
    return UNet3DConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        block_out_channels=tuple(d.get("block_out_channels", (320, 640, 1280, 1280))),
        cross_attn_levels=levels,
        layers_per_block=d.get("layers_per_block", 2),
        head_dim=d.get("attention_head_dim", 64),
        first_temporal_heads=8,  # diffusers hard-codes transformer_in to 8 heads
        cross_attention_dim=d.get("cross_attention_dim", 1024),
        norm_num_groups=d.get("norm_num_groups", 32),
        dropout=0.0,  # diffusers builds its ResNets with dropout 0
    )


def config_to_diffusers(cfg: UNet3DConfig) -> dict:
    if cfg.first_temporal_heads != 8:
        raise ValueError("the diffusers layout cannot store first_temporal_heads != 8 (UNet3DConditionModel hard-codes "
                         "8 heads in transformer_in); save this model in the original layout")
    return {
        "_class_name": "UNet3DConditionModel", "act_fn": "silu", "attention_head_dim": cfg.head_dim,
        "block_out_channels": list(cfg.block_out_channels), "cross_attention_dim": cfg.cross_attention_dim,
        "down_block_types": ["CrossAttnDownBlock3D" if a else "DownBlock3D" for a in cfg.cross_attn_levels],
        "up_block_types": ["CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(cfg.cross_attn_levels)],
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "layers_per_block": cfg.layers_per_block,
        "norm_eps": 1e-05, "norm_num_groups": cfg.norm_num_groups,
        "sample_size": 32,
    }


# -----------------------------------------------------------------------------------------------------------------------
# building blocks


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of raw integer timesteps, [cos | sin] with frequencies 10000^(-k/half) (unet_sd.py).

    Computed exactly as upstream (float32 pow, outer product) so the embedding matches bit for bit.
    """
    half = dim // 2
    freqs = torch.pow(10000, -torch.arange(half, device=t.device, dtype=torch.float32).div(half))  # (half,)
    args = torch.outer(t.float(), freqs)  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, dim)


class TimestepEmbedding(nn.Module):
    """sinusoid(320) -> Linear -> SiLU -> Linear(1280): the per-video time embedding added in every ResBlock."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, t):
        emb = timestep_embedding(t, self.channels).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))  # (B, embed_dim)


class ResBlock(nn.Module):
    """The SD ResBlock on per-frame images; the time embedding is added (upstream use_scale_shift_norm is unused)."""

    def __init__(self, in_ch: int, out_ch: int, embed_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-5)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(embed_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-5)
        self.dropout = Dropout(dropout)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        # 1x1 projection of the skip only where the channel count changes (upstream `skip_connection`)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, emb):  # x (B*F, C, H, W), emb (B*F, E)
        h = self.conv1(group_norm_silu(self.norm1, x))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # broadcast over H, W
        h = self.conv2(self.dropout(group_norm_silu(self.norm2, h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class TemporalConv(nn.Module):
    """Four (GroupNorm, SiLU, [Dropout], Conv3d 3x1x1) layers over the frame axis, added to the input.

    Upstream `TemporalConvBlock_v2`, stored in the original file under the misspelt name `temopral_conv`. These are the
    only layers that tell an earlier frame from a later one (their three taps have separate weights; the temporal
    transformers have no position encoding), and their zero padding is the only hint of where a clip starts and ends.
    The Sequential indices (conv1.0 / conv1.2, convN.0 / convN.3) are kept because they are the checkpoint's key names.
    """

    def __init__(self, ch: int, groups: int, dropout: float):
        super().__init__()
        k, p = (3, 1, 1), (1, 0, 0)
        self.conv1 = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv3d(ch, ch, k, padding=p))
        self.conv2 = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), Dropout(dropout), nn.Conv3d(ch, ch, k, padding=p))
        self.conv3 = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), Dropout(dropout), nn.Conv3d(ch, ch, k, padding=p))
        self.conv4 = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), Dropout(dropout), nn.Conv3d(ch, ch, k, padding=p))

    def forward(self, x, num_frames: int):  # x (B*F, C, H, W)
        BF, C, H, W = x.shape
        v = x.reshape(BF // num_frames, num_frames, C, H, W).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)
        h = v
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4):  # [GroupNorm, SiLU, (Dropout,) Conv3d]
            h = group_norm_silu(layer[0], h)
            for m in layer[2:]:
                h = m(h)
        h = h.permute(0, 2, 1, 3, 4).reshape(BF, C, H, W)  # back to (B*F, C, H, W)
        return x + h


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v and a biased output projection (upstream `CrossAttention`).

    Self-attention when `context` is None. Heads are the outer factor of the feature dim, (h d), as upstream.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))  # a Sequential only to keep the checkpoint name to_out.0

    def forward(self, x, context=None, frames_per_context: int = 1):
        # x (N, L, dim); context (N / frames_per_context, S, context_dim), shared by that many consecutive rows of x
        N, L, _ = x.shape
        q = self.to_q(x)  # (N, L, h*d)
        src = x if context is None else context
        k, v = self.to_k(src), self.to_v(src)  # (N / frames_per_context, S, h*d)
        q = q.view(N, L, self.heads, -1).transpose(1, 2)  # (N, h, L, d)
        k = k.view(k.shape[0], k.shape[1], self.heads, -1).transpose(1, 2)  # (N / fpc, h, S, d)
        v = v.view(v.shape[0], v.shape[1], self.heads, -1).transpose(1, 2)
        if frames_per_context > 1:
            # one text context per video, shared by its F frames: (B, h, S, d) -> (B*F, h, S, d)
            k = k.repeat_interleave(frames_per_context, dim=0)
            v = v.repeat_interleave(frames_per_context, dim=0)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, h, L, d), softmax(q k^T / sqrt(d)) v
        return self.to_out(out.transpose(1, 2).reshape(N, L, -1))  # (N, L, dim)


class GEGLU(nn.Module):
    """Linear to 2x the hidden width, first half = value, second half = gate: value * gelu(gate) (exact erf GELU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    recompute = True  # UNet3D.set_elementwise_recompute

    def forward(self, x):  # keeps proj's output (..., 2 * hidden) only, not also gelu(gate), unless recompute is off
        return recomputed(_geglu, self.proj(x), enabled=self.recompute)


def _geglu(h):
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x hidden width; [GEGLU, Dropout, Linear] indices are the checkpoint names net.0.proj / net.2."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, then attention to `context` (text; or a second self-attention), then GEGLU FF."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None):
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim)
        # NewMove trains attn2.to_k / attn2.to_v of the SPATIAL blocks (text -> appearance); in a temporal block attn2
        # is a second self-attention, trained as part of the temporal layer (train.param_group)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context=None, frames_per_context: int = 1):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, frames_per_context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the H*W pixels of each frame, with cross-attention to the text (Transformer2DModel)."""

    def __init__(self, ch: int, head_dim: int, context_dim: int, groups: int):
        super().__init__()
        heads = ch // head_dim
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, heads * head_dim)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(heads * head_dim, heads, head_dim, context_dim)])
        self.proj_out = nn.Linear(heads * head_dim, ch)

    def forward(self, x, context, num_frames: int):  # x (B*F, C, H, W), context (B, S, D)
        BF, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(BF, H * W, C)  # (B*F, H*W, C): tokens = pixels of one frame
        h = self.proj_in(h)
        h = self.transformer_blocks[0](h, context, frames_per_context=num_frames)
        h = self.proj_out(h).reshape(BF, H, W, C).permute(0, 3, 1, 2)  # back to (B*F, C, H, W)
        return x + h


class TemporalTransformer(nn.Module):
    """Transformer over the F frames at each pixel: two self-attentions + FF, no position encoding, no mask.

    Upstream `TemporalTransformer` (only_self_att) = diffusers `TransformerTemporalModel`. The GroupNorm normalises
    over all frames jointly, so outputs depend on the number of frames.
    """

    def __init__(self, ch: int, heads: int, head_dim: int, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner)  # Conv1d(k=1) in the original file: squeezed on load
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, None)])
        self.proj_out = nn.Linear(inner, ch)

    def forward(self, x, num_frames: int):  # x (B*F, C, H, W)
        BF, C, H, W = x.shape
        B = BF // num_frames
        v = x.reshape(B, num_frames, C, H, W).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)
        h = self.norm(v)  # statistics over (C/groups, F, H, W)
        h = h.permute(0, 3, 4, 2, 1).reshape(B * H * W, num_frames, C)  # (B*H*W, F, C): tokens = frames of one pixel
        h = self.proj_out(self.transformer_blocks[0](self.proj_in(h)))  # (B*H*W, F, C)
        h = h.reshape(B, H, W, num_frames, C).permute(0, 3, 4, 1, 2).reshape(BF, C, H, W)  # back to (B*F, C, H, W)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with symmetric padding 1 (upstream `op`)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# -----------------------------------------------------------------------------------------------------------------------
# the UNet


class Level(nn.Module):
    """One resolution level: `n` x [ResBlock, TemporalConv, (SpatialTransformer, TemporalTransformer)], then resampling.

    Used for the encoder (down_blocks), the middle (mid_block) and the decoder (up_blocks); the lists are named as in
    the diffusers checkpoint. Encoder levels return one skip per layer (+ one after downsampling); decoder levels take
    one skip per layer, concatenated after the activation on the channel axis ([x, skip], as upstream).
    """

    def __init__(self, in_chs: list, out_ch: int, cfg: UNet3DConfig, attention: bool, resample: str | None):
        super().__init__()
        E, G = 4 * cfg.block_out_channels[0], cfg.norm_num_groups
        # NewMove trains temp_convs and temp_attentions whole, and the K/V projections of `attentions`' cross-attention;
        # resnets, the rest of `attentions` and the resamplers stay frozen (train.PRESETS["newmove"])
        self.resnets = nn.ModuleList([ResBlock(c, out_ch, E, G, cfg.dropout) for c in in_chs])
        self.temp_convs = nn.ModuleList([TemporalConv(out_ch, G, cfg.temporal_dropout) for _ in in_chs])
        if attention:
            self.attentions = nn.ModuleList(
                [SpatialTransformer(out_ch, cfg.head_dim, cfg.cross_attention_dim, G) for _ in in_chs])
            self.temp_attentions = nn.ModuleList(
                [TemporalTransformer(out_ch, out_ch // cfg.head_dim, cfg.head_dim, G) for _ in in_chs])
        else:
            self.attentions = self.temp_attentions = None
        # a one-element list only so the keys read downsamplers.0.conv / upsamplers.0.conv as in the checkpoint
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if resample == "down" else None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if resample == "up" else None
        self.gradient_checkpointing = False

    def _run(self, fn, *args):
        """Call one layer, recomputing (some of) its activations in the backward pass when checkpointing is on."""
        if not self.gradient_checkpointing or not torch.is_grad_enabled():
            return fn(*args)
        if self.gradient_checkpointing == "selective":
            return checkpoint(fn, *args, use_reentrant=False, context_fn=_keep_matmul_outputs)
        return checkpoint(fn, *args, use_reentrant=False)

    def layer(self, j: int, x, emb, context, num_frames: int):
        x = self._run(self.resnets[j], x, emb)
        x = self._run(self.temp_convs[j], x, num_frames)
        if self.attentions is not None:
            x = self._run(self.attentions[j], x, context, num_frames)
            x = self._run(self.temp_attentions[j], x, num_frames)
        return x

    def forward(self, x, emb, context, num_frames: int, skips: list | None = None):
        """Encoder/middle: `skips` is None and (x, skips produced) is returned. Decoder: pops from `skips`."""
        produced = []
        for j in range(len(self.resnets)):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)  # (B*F, C + C_skip, H, W)
            x = self.layer(j, x, emb, context, num_frames)
            produced.append(x)
        if self.downsamplers is not None:
            x = self._run(self.downsamplers[0], x)
            produced.append(x)
        if self.upsamplers is not None:
            x = self._run(self.upsamplers[0], x)
        return x, produced


class MidLevel(Level):
    """The bottleneck: ResBlock, TemporalConv, SpatialTransformer, TemporalTransformer, ResBlock, TemporalConv."""

    def __init__(self, ch: int, cfg: UNet3DConfig):
        super().__init__([ch], ch, cfg, attention=True, resample=None)
        # a second ResBlock + TemporalConv after the transformers
        self.resnets.append(ResBlock(ch, ch, 4 * cfg.block_out_channels[0], cfg.norm_num_groups, cfg.dropout))
        self.temp_convs.append(TemporalConv(ch, cfg.norm_num_groups, cfg.temporal_dropout))

    def forward(self, x, emb, context, num_frames: int, skips=None):
        x = self.layer(0, x, emb, context, num_frames)
        x = self._run(self.resnets[1], x, emb)
        return self._run(self.temp_convs[1], x, num_frames)


class UNet3D(nn.Module):
    """eps-prediction UNet: (noisy latent video (B, 4, F, H, W), timesteps (B,), text (B, 77, 1024)) -> (B, 4, F, H, W)."""

    def __init__(self, cfg: UNet3DConfig = UNet3DConfig()):
        super().__init__()
        self.cfg = cfg
        chs, n = cfg.block_out_channels, cfg.layers_per_block
        c0, G = chs[0], cfg.norm_num_groups
        self.time_embedding = TimestepEmbedding(c0, 4 * c0)
        self.conv_in = Conv2d(cfg.in_channels, c0, 3, padding=1)
        # (trained by NewMove, with the temporal layers)
        self.transformer_in = TemporalTransformer(c0, cfg.first_temporal_heads, cfg.head_dim, G)

        # encoder: level i maps chs[i-1] -> chs[i]; every layer output (and every downsample output) is a skip
        skip_chs = [c0]
        self.down_blocks = nn.ModuleList()
        for i, ch in enumerate(chs):
            last = i == len(chs) - 1
            in_chs = [chs[max(i - 1, 0)]] + [ch] * (n - 1)
            self.down_blocks.append(Level(in_chs, ch, cfg, cfg.cross_attn_levels[i], None if last else "down"))
            skip_chs += [ch] * (n + (0 if last else 1))
        self.mid_block = MidLevel(chs[-1], cfg)

        # decoder: mirror image with n+1 layers per level, each consuming one skip (popped last-in first-out)
        self.up_blocks = nn.ModuleList()
        prev = chs[-1]
        for i, ch in enumerate(reversed(chs)):
            last = i == len(chs) - 1
            in_chs = []
            for _ in range(n + 1):
                in_chs.append(prev + skip_chs.pop())
                prev = ch
            self.up_blocks.append(Level(in_chs, ch, cfg, cfg.cross_attn_levels[::-1][i], None if last else "up"))
        self.conv_norm_out = nn.GroupNorm(G, c0, eps=1e-5)
        self.conv_out = Conv2d(c0, cfg.out_channels, 3, padding=1)

    def set_gradient_checkpointing(self, enabled: bool | str = True):
        """True: recompute each layer's activations in backward (~7x less activation memory for ~1.3x the step time);
        "selective": recompute only the element-wise work between the matmuls/convolutions/attention kernels."""
        if enabled not in (True, False, "selective"):
            raise ValueError(f"gradient checkpointing must be True, False or 'selective', not {enabled!r}")
        for m in self.modules():
            if isinstance(m, Level):
                m.gradient_checkpointing = enabled

    def set_elementwise_recompute(self, enabled: bool = True):
        """False: GroupNorm -> SiLU and GEGLU keep their intermediates for backward instead of recomputing them
        (_Recomputed): bit-identical gradients, more activation memory (the 1.7B model's step peak at 16 x 256^2, 1+1:
        12.66 -> 15.31 GB estimated), fewer ops (toy training on the CPU: ~1.2x faster steps, toy/speed.md)."""
        for m in self.modules():
            if isinstance(m, (nn.GroupNorm, GEGLU)):
                m.recompute = enabled

    def forward(self, x, t, context):
        """x (B, C, F, H, W) noisy latents; t (B,) or scalar integer timesteps; context (B, S, D) text embeddings."""
        B, C, num_frames, H, W = x.shape
        f = self.cfg.downsample_factor
        if H % f or W % f:
            raise ValueError(f"latent size {H}x{W} must be divisible by {f} (pixel size a multiple of {8 * f})")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        emb = self.time_embedding(t).repeat_interleave(num_frames, dim=0)  # (B*F, E): one embedding per video
        h = x.permute(0, 2, 1, 3, 4).reshape(B * num_frames, C, H, W)  # (B*F, C, H, W), frame index fastest

        h = self.conv_in(h)
        h = self.transformer_in(h, num_frames)
        skips = [h]
        for level in self.down_blocks:
            h, produced = level(h, emb, context, num_frames)
            skips += produced
        h = self.mid_block(h, emb, context, num_frames)
        for level in self.up_blocks:
            h, _ = level(h, emb, context, num_frames, skips=skips)
        assert not skips, "every encoder skip must be consumed by the decoder"

        h = self.conv_out(group_norm_silu(self.conv_norm_out, h))  # (B*F, C_out, H, W)
        return h.reshape(B, num_frames, -1, H, W).permute(0, 2, 1, 3, 4)  # (B, C_out, F, H, W)


# -----------------------------------------------------------------------------------------------------------------------
# memory-saving layers: the same math and gradients as torch's own layers (tested), fewer bytes kept for backward.
# The model above uses them through Conv2d, Dropout, group_norm_silu and GEGLU; a reader of the method can skip this.


class _FrozenConv2dFn(torch.autograd.Function):
    """conv2d whose backward keeps only the weight. torch's conv node also keeps the input, which only the weight
    gradient needs; with the weight frozen (the spatial convs under NewMove) that is a whole activation per conv kept
    for nothing. The input gradient is the same convolution_backward call torch makes (torch.nn.grad.conv2d_input)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        # The (frozen, leaf) weight is held on ctx, not saved: then a checkpointed layer need not re-run this conv's
        # forward just to re-save it (non-reentrant checkpointing stops recomputing once every saved tensor is back).
        ctx.weight, ctx.x_shape, ctx.stride, ctx.padding = weight, x.shape, stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        weight = ctx.weight.to(grad_out.dtype)  # under autocast the product ran in the output's dtype
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad_out, ctx.stride, ctx.padding)
        return grad_x, None, None, None, None  # autograd casts grad_x to x's dtype


class _Recomputed(torch.autograd.Function):
    """y = fn(*tensors) that keeps only its inputs for backward and re-runs fn under autograd there.

    For element-wise chains whose intermediates would otherwise each be kept: GroupNorm -> SiLU keeps the norm's input
    AND output, GEGLU keeps the gate AND gelu(gate). Recomputing them costs one cheap element-wise pass in backward and
    gives the very same gradients (same ops, same order). Autocast is replayed as it was in forward."""

    @staticmethod
    def forward(ctx, fn, *tensors):
        ctx.fn, ctx.device = fn, tensors[0].device.type
        ctx.autocast = ((torch.is_autocast_enabled(ctx.device), torch.get_autocast_dtype(ctx.device))
                        if torch.amp.is_autocast_available(ctx.device) else (False, None))  # e.g. the meta device
        ctx.save_for_backward(*tensors)
        return fn(*tensors)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), (torch.autocast(ctx.device, dtype=dtype) if enabled else contextlib.nullcontext()):
            out = ctx.fn(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (None, *(next(grads) if t.requires_grad else None for t in inputs))


def recomputed(fn, *tensors, enabled: bool = True):
    """fn(*tensors), keeping only `tensors` for backward when autograd records it (see _Recomputed); enabled=False
    (UNet3D.set_elementwise_recompute): plain autograd, which keeps fn's intermediates."""
    if enabled and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _Recomputed.apply(fn, *tensors)
    return fn(*tensors)


def group_norm_silu(norm: nn.GroupNorm, x):
    """silu(norm(x)); in training only x is kept for backward (unless set_elementwise_recompute(False))."""
    def fn(x, w, b):
        return F.silu(F.group_norm(x, norm.num_groups, w, b, norm.eps))
    return recomputed(fn, x, norm.weight, norm.bias, enabled=getattr(norm, "recompute", True))


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and key names) that saves no input for backward while its parameters are frozen."""

    def forward(self, x):
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if not (frozen and x.requires_grad and torch.is_grad_enabled()):
            return super().forward(x)
        return _FrozenConv2dFn.apply(x, self.weight, self.bias, self.stride, self.padding)


class Dropout(nn.Dropout):
    """nn.Dropout that keeps a 1-byte mask for backward on every device: torch's fused dropout (native_dropout, a bool
    mask), which F.dropout already runs on CUDA; on the CPU F.dropout multiplies by a float mask and keeps that, 4 bytes
    per element. Same random stream as F.dropout for the same seed."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


# Selective recomputation: keep what the matmuls, convolutions and attention kernels produced (the expensive part of a
# layer) and recompute the cheap element-wise work on top of them in backward (GroupNorm, SiLU, GELU, LayerNorm,
# dropout, adds, layout copies), whose saved inputs are most of a UNet's activation memory.
_EXPENSIVE = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten.convolution.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
              torch.ops.aten._scaled_dot_product_flash_attention.default,
              torch.ops.aten._scaled_dot_product_efficient_attention.default,
              torch.ops.aten._scaled_dot_product_cudnn_attention.default}


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _EXPENSIVE else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_matmul_outputs():
    return create_selective_checkpoint_contexts(_policy)


# -----------------------------------------------------------------------------------------------------------------------
# LoRA: low-rank adapters on chosen Linear weights (the paper's ablation (f); NewMove itself trains full weights)


class LoRA(nn.Module):
    """weight -> weight + scale * up @ down, as a parametrization of a frozen nn.Linear (Hu et al. 2021). `up` starts
    at zero so training starts from the base model."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float):
        super().__init__()
        out_f, in_f = weight.shape
        self.down = nn.Parameter(torch.randn(rank, in_f, device=weight.device) / math.sqrt(in_f))
        self.up = nn.Parameter(torch.zeros(out_f, rank, device=weight.device))
        self.scale = scale

    def forward(self, weight):
        return weight + (self.scale * self.up @ self.down).to(weight.dtype)


def add_lora(model: nn.Module, params: list, rank: int, scale: float) -> list:
    """A LoRA on every 2-D weight among `params` [(name, parameter)], in module order; returns the adapters'
    [(name, parameter)] (the only ones that then train)."""
    from torch.nn.utils import parametrize

    linear = {n[: -len(".weight")] for n, p in params if n.endswith(".weight") and p.ndim == 2}
    for name, module in model.named_modules():
        if name in linear:
            parametrize.register_parametrization(module, "weight", LoRA(module.weight, rank, scale))
    return [(n, p) for n, p in model.named_parameters() if ".parametrizations.weight.0." in n]


def merge_lora(model: nn.Module):
    """Fold every LoRA into the weight it adapts (W + scale * up @ down): plain weights again, same outputs."""
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


# -----------------------------------------------------------------------------------------------------------------------
# the original checkpoint's key names (text2video_pytorch_model.pth, modelscope.md §2.5 and §6.2)


_RES_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _original_prefixes(cfg: UNet3DConfig) -> list:
    """(our prefix, original prefix) pairs, module by module, in the order upstream registers them."""
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("transformer_in.", "input_blocks.0.1.")]

    def layer(ours: str, j: int, orig: str, attention: bool):
        # one upstream ModuleList entry [ResBlock(+temopral_conv), SpatialTransformer, TemporalTransformer]
        out = [(f"{ours}.resnets.{j}.{a}.", f"{orig}.0.{b}.") for a, b in _RES_NAMES.items()]
        out.append((f"{ours}.temp_convs.{j}.", f"{orig}.0.temopral_conv."))  # sic: the typo is in the file
        if attention:
            out += [(f"{ours}.attentions.{j}.", f"{orig}.1."), (f"{ours}.temp_attentions.{j}.", f"{orig}.2.")]
        return out

    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    k = 1  # input_blocks.0 is conv_in + transformer_in
    for i, attn in enumerate(cfg.cross_attn_levels):
        for j in range(n):
            pairs += layer(f"down_blocks.{i}", j, f"input_blocks.{k}", attn)
            k += 1
        if i < levels - 1:  # the Downsample is a bare module: input_blocks.{k}.op
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.op."))
            k += 1
    # middle_block = [ResBlock, SpatialTransformer, TemporalTransformer, ResBlock]
    pairs += layer("mid_block", 0, "middle_block", True)
    pairs += [(f"mid_block.resnets.1.{a}.", f"middle_block.3.{b}.") for a, b in _RES_NAMES.items()]
    pairs.append(("mid_block.temp_convs.1.", "middle_block.3.temopral_conv."))
    k = 0
    for i, attn in enumerate(cfg.cross_attn_levels[::-1]):
        for j in range(n + 1):
            pairs += layer(f"up_blocks.{i}", j, f"output_blocks.{k}", attn)
            if j == n and i < levels - 1:  # Upsample sits after the layer's other modules: index 3, or 1 without attn
                pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k}.{3 if attn else 1}.conv."))
            k += 1
    pairs += [("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    return pairs


def _is_temporal_proj(key: str) -> bool:
    """Temporal-transformer proj_in/proj_out weights: Linear here, Conv1d(k=1) in the original file."""
    return ("temp_attentions" in key or key.startswith("transformer_in.")) and key.endswith(
        ("proj_in.weight", "proj_out.weight"))


def original_key_map(cfg: UNet3DConfig, our_keys) -> dict:
    """{our key: original key} for every tensor of a UNet3D with this config."""
    pairs = sorted(_original_prefixes(cfg), key=lambda p: -len(p[0]))  # longest prefix first
    out = {}
    for key in our_keys:
        hit = next((p for p in pairs if key.startswith(p[0])), None)
        assert hit is not None, f"no original name for {key}"
        out[key] = hit[1] + key[len(hit[0]):]
    assert len(set(out.values())) == len(out), "original key map must be one-to-one"
    return out


def _our_keys(cfg: UNet3DConfig):
    with torch.device("meta"):
        return list(UNet3D(cfg).state_dict().keys())


def from_original(sd: dict, cfg: UNet3DConfig) -> dict:
    """Rename an original `text2video_pytorch_model.pth` state dict to our names (views, no copies)."""
    inverse = {v: k for k, v in original_key_map(cfg, _our_keys(cfg)).items()}
    out = {}
    for key, v in sd.items():
        ours = inverse.get(key, key)  # unknown keys pass through; the strict load names them
        out[ours] = v.squeeze(-1) if _is_temporal_proj(ours) and v.ndim == 3 else v
    return out


def to_original(sd: dict, cfg: UNet3DConfig) -> dict:
    """Our state dict in the original file's names and shapes (Conv1d temporal projections)."""
    names = original_key_map(cfg, sd.keys())
    return {names[k]: v.unsqueeze(-1) if _is_temporal_proj(k) else v for k, v in sd.items()}


# -----------------------------------------------------------------------------------------------------------------------
# loading and saving


def load_unet(path, cfg: UNet3DConfig, dtype: torch.dtype | None = torch.float32) -> UNet3D:
    """Build on the meta device and assign the weights of `path` (original or diffusers names), strictly.

    The file is memory-mapped where its format allows and its tensors become the parameters, so the weights are never
    held twice. `dtype=None` keeps the file's dtype.
    """
    sd = read_state_dict(path, "UNet weights (text2video_pytorch_model.pth or diffusion_pytorch_model.*)")
    if any(k.startswith("input_blocks.") for k in sd):
        sd = from_original(sd, cfg)
    with torch.device("meta"):
        model = UNet3D(cfg)
    return assign_state_dict(model, sd, source=str(path), dtype=dtype).eval()


def save_unet(model: UNet3D, path, layout: str = "diffusers", overwrite: bool = False):
    """Write the weights in the diffusers names (safetensors by suffix) or the original names (`layout="original"`)."""
    sd = model.state_dict()
    if layout == "original":
        sd = to_original(sd, model.cfg)
    elif layout != "diffusers":
        raise ValueError(f"layout must be 'original' or 'diffusers', not {layout!r}")
    return save_state_dict(sd, path, metadata={"config": json.dumps(asdict(model.cfg))}, overwrite=overwrite)
