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
temp_attentions, ...), so diffusers-layout files load with no renaming; layouts.py converts the original
`text2video_pytorch_model.pth` names (input_blocks.*, with the `temopral_conv` typo) one-to-one and loads both.

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
    `layouts.unet_from_original` squeezes their last dim (34 tensors in the released model).
  * Training keeps fewer activations, at the same gradients (memory.py): frozen 2-D convs keep no input for backward,
    GroupNorm+SiLU and GEGLU keep only their input, dropout keeps a 1-byte mask; optional gradient checkpointing of
    every layer, full or selective (`set_recompute`). Upstream has none of these.
  * No fps conditioning, image-dataset mode or masks: unused by the released config.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# the same math as nn.Conv2d, GroupNorm -> SiLU and nn.Dropout, keeping fewer bytes for backward (memory.py)
from memory import CHECKPOINTING, Conv2d, Dropout, GroupNormSiLU, checkpointed, recomputed

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
        self.norm1 = GroupNormSiLU(groups, in_ch, eps=1e-5)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(embed_dim, out_ch)
        self.norm2 = GroupNormSiLU(groups, out_ch, eps=1e-5)
        self.dropout = Dropout(dropout)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        # 1x1 projection of the skip only where the channel count changes (upstream `skip_connection`)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, emb):  # x (B*F, C, H, W), emb (B*F, E)
        h = self.conv1(self.norm1(x))  # norm1, norm2: GroupNorm -> SiLU
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # broadcast over H, W
        h = self.conv2(self.dropout(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class TemporalConv(nn.Module):
    """Four (GroupNorm, SiLU, [Dropout], Conv3d 3x1x1) layers over the frame axis, added to the input.

    Upstream `TemporalConvBlock_v2`, stored in the original file under the misspelt name `temopral_conv`. These are the
    only layers that tell an earlier frame from a later one (their three taps have separate weights; the temporal
    transformers have no position encoding), and their zero padding is the only hint of where a clip starts and ends.
    The Sequential indices (conv1.0 / conv1.2, convN.0 / convN.3) are kept because they are the checkpoint's key names;
    the SiLU runs inside GroupNormSiLU, so its slot (index 1) holds an Identity.
    """

    def __init__(self, ch: int, groups: int, dropout: float):
        super().__init__()
        k, p = (3, 1, 1), (1, 0, 0)
        self.conv1 = nn.Sequential(GroupNormSiLU(groups, ch), nn.Identity(), nn.Conv3d(ch, ch, k, padding=p))
        self.conv2, self.conv3, self.conv4 = (
            nn.Sequential(GroupNormSiLU(groups, ch), nn.Identity(), Dropout(dropout), nn.Conv3d(ch, ch, k, padding=p))
            for _ in range(3))

    def forward(self, x, num_frames: int):  # x (B*F, C, H, W)
        BF, C, H, W = x.shape
        v = x.reshape(BF // num_frames, num_frames, C, H, W).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)
        h = self.conv4(self.conv3(self.conv2(self.conv1(v))))  # (B, C, F, H, W), 3 frames wide each
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

    recompute = True  # UNet3D.set_recompute

    def forward(self, x):  # keeps proj's output (..., 2 * hidden) only, not also gelu(gate), unless recompute is off
        return recomputed(geglu, self.proj(x), enabled=self.recompute)


def geglu(h):
    value, gate = h.chunk(2, dim=-1)  # (..., hidden) each
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
        self.checkpointing = "none"  # UNet3D.set_recompute

    def _run(self, fn, *args):
        """Call one layer, recomputing (some of) its activations in the backward pass when checkpointing is on."""
        return checkpointed(fn, *args, mode=self.checkpointing)

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
        self.conv_norm_out = GroupNormSiLU(G, c0, eps=1e-5)
        self.conv_out = Conv2d(c0, cfg.out_channels, 3, padding=1)

    def set_recompute(self, checkpointing: str = "none", elementwise: bool = True):
        """What backward recomputes instead of keeping (memory.py); the gradients are the same bit for bit.
        checkpointing "full": each layer's activations (~7x less activation memory for ~1.3x the step time);
        "selective": only the element-wise work between the matmul/convolution/attention kernels; "none": nothing.
        elementwise False: GroupNorm -> SiLU and GEGLU keep their intermediates (more memory: the 1.7B model's step
        peak at 16 x 256^2, 1+1, without checkpointing 12.66 -> 15.31 GB estimated; fewer ops: ~1.2x faster toy steps
        on the CPU, toy/speed.md). Under checkpointing the layer's recomputation covers that work either way."""
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {', '.join(CHECKPOINTING)}, not {checkpointing!r}")
        for m in self.modules():
            if isinstance(m, Level):
                m.checkpointing = checkpointing
            if isinstance(m, (GroupNormSiLU, GEGLU)):
                m.recompute = elementwise

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

        h = self.conv_out(self.conv_norm_out(h))  # (B*F, C_out, H, W)
        return h.reshape(B, num_frames, -1, H, W).permute(0, 2, 1, 3, 4)  # (B, C_out, F, H, W)
