"""The Wan 2.1 video VAE ("Wan-VAE" of the Wan report, arXiv 2503.20314) in plain PyTorch.

A causal 3-D convolutional autoencoder with 4x8x8 compression: a video of F = 1 + 4k RGB frames in [-1, 1],
(B, 3, 1 + 4k, H, W), becomes latents (B, 16, 1 + k, H/8, W/8), and back. Frame 0 gets a latent frame of its own (so a
still image is a 1-frame video); every later group of 4 frames shares one. The layers:
  * 3-D convolutions that are causal in time (an output frame sees its input frame and the 2 before it) and padded
    symmetrically in space;
  * RMS normalisation over the channels at each position (no GroupNorm: nothing mixes frames or positions but convs);
  * single-head self-attention within each frame, in the encoder's and decoder's middle blocks only;
  * 3 spatial halvings in the encoder (3x3 stride-2 convs per frame), 2 of them followed by a time halving (a
    stride-2 causal conv over frames); the decoder mirrors them with nearest x2 upsampling + a 3x3 conv that also
    halves the channels, and a causal conv to 2C channels unfolded into two frames per input frame.

Tensors: videos and activations are (B, C, T, H, W). Per-frame 2-D layers fold the frames into the batch,
(B, C, T, H, W) -> (B*T, C, H, W) with b major as upstream, and unfold again; every fold carries a shape comment.

Frame 0 and streaming (the chunk schedule is part of the model's definition). Upstream encodes frame 0 alone and then
chunks of 4 frames, and decodes one latent frame at a time; its time-resampling layers treat the first chunk
specially: in the encoder frame 0 bypasses both stride-2 time convs (1 + 4k frames -> 1 + k latents; two plain
unpadded stride-2 convs would leave k - 1), in the decoder latent frame 0 is not doubled (1 + k latents ->
1 + 4k frames). So the schedule, not only the weights, defines the outputs; upstream's layers called without their
cache even skip time resampling altogether. Here the rule is stated per layer: a time-resampling layer whose input
starts at frame 0 passes that frame through and processes the rest. Everything else crosses chunk boundaries through
a cache (one dict per encode/decode pass, keyed by layer): a causal conv carries its last 2 input frames, a time
downsampling its last input frame, which keeps the stride-2 windows on the same frame pairs as in one pass. Hence,
after frame 0, any chunk of a multiple of 4 frames (encoder) or of any number of latents (decoder) gives upstream's
numbers, and so does one pass over the whole video with no cache (tests/test_wan_vae.py proves both against
upstream's schedule); the default chunks are upstream's, which bound the activation memory to one chunk.

Parameter names are those of the original release, `Wan2.1_VAE.pth` (= upstream `WanVAE_.state_dict()`: encoder.*,
conv1, conv2, decoder.*; `residual.{0,2,3,6}` inside residual blocks), so it loads with no renaming. The diffusers
layout (AutoencoderKLWan: conv_in, down_blocks, mid_block, up_blocks, quant_conv, ...) is converted by the four
functions at the end of this file.

Sources: the original `wan/modules/vae2_1.py` (Wan2.1 / Wan2.2 repositories; the `wan22` wheel), classes WanVAE_,
Encoder3d, Decoder3d, Resample, ResidualBlock, AttentionBlock, and the wrapper Wan2_1_VAE (latent statistics,
clamping); the port: diffusers `models/autoencoders/autoencoder_kl_wan.py` (AutoencoderKLWan) and
`pipelines/wan/pipeline_wan.py` (latent (de)normalisation with `latents_mean` / `latents_std`).

Notable differences from upstream (none changes outputs):
  * The frame-0 rule is a property of each time-resampling layer, not of the first call of a chunked pass (upstream's
    'Rep' marker); with upstream's schedule the two coincide. The cache is a dict keyed by layer, not a list indexed
    by a counter threaded through every call; chunk lengths are parameters (defaults: upstream's 4 frames / 1 latent).
  * `encode` normalises and `decode` denormalises with the release's per-channel statistics (upstream passes them as
    `scale = [mean, 1/std]` from the Wan2_1_VAE wrapper); `decode` clamps to [-1, 1] as that wrapper does.
  * `encode` rejects frame counts other than 1 + 4k (upstream silently drops the trailing frames).
  * The decoder's first residual block of level i > 0 takes half the previous width for any number of levels
    (upstream hard-codes levels 1, 2, 3, so it cannot build more than 4 levels).
  * `attn_scales` must be empty, as released: upstream would build attention blocks inside the levels but its
    chunked encode/decode cannot call them (it passes them cache arguments they do not take).
  * No forward()/reparameterize/sample (upstream's forward calls encode without its required argument), no custom
    init (upstream zeroes the attention output projection; weights always come from the release).
"""

import re
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

# -----------------------------------------------------------------------------------------------------------------------
# config

# Per-channel mean and std of the released encoder's latent means, by which `encode` normalises its output (and `decode`
# undoes it): Wan2_1_VAE.__init__ in vae2_1.py; diffusers' AutoencoderKLWan config has the same 16 + 16 numbers as
# latents_mean / latents_std (tests/test_wan_vae.py checks that all three agree).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass
class WanVAEConfig:
    """Defaults are the released Wan 2.1 VAE (vae2_1.py `_video_vae` with z_dim=16 from Wan2_1_VAE)."""

    dim: int = 96  # channels of the full-resolution level; level i has dim * dim_mult[i]
    z_dim: int = 16  # latent channels; the encoder outputs 2 * z_dim (mean and log-variance)
    dim_mult: tuple = (1, 2, 4, 4)  # one entry per resolution level
    num_res_blocks: int = 2  # residual blocks per encoder level; the decoder has one more per level
    attn_scales: tuple = ()  # upstream's attention inside the levels: must stay empty (see __post_init__)
    temporal_downsample: tuple = (False, True, True)  # per level transition: halve T too (upstream `temperal_...`)
    dropout: float = 0.0
    latents_mean: tuple = WAN21_LATENTS_MEAN  # z_dim entries each
    latents_std: tuple = WAN21_LATENTS_STD

    def __post_init__(self):
        # JSON and upstream's kwargs give lists
        self.dim_mult = tuple(self.dim_mult)
        self.attn_scales = tuple(float(s) for s in self.attn_scales)
        self.temporal_downsample = tuple(bool(t) for t in self.temporal_downsample)
        self.latents_mean = tuple(float(m) for m in self.latents_mean)
        self.latents_std = tuple(float(s) for s in self.latents_std)
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one flag per level transition (len(dim_mult) - 1)")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim={self.z_dim} entries each")
        # Upstream builds an AttentionBlock after each residual block of a level whose scale is listed, but its
        # encoder and decoder then call it with the cache arguments it does not take: no such model can run upstream
        # (nor in diffusers), so none exists to be compatible with.
        if self.attn_scales:
            raise ValueError("attn_scales must be empty: upstream's chunked encode/decode cannot run level attention")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)  # 4 for the release

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)  # 8 for the release

    @property
    def downsample_factor(self) -> int:  # the name the KL VAE's config uses (sample.pixel_multiple reads it)
        return self.spatial_factor


WAN_VAE_PRESETS = {
    # the released Wan 2.1 VAE (Wan2.1_VAE.pth): 126,892,531 params (encoder 53,595,872, decoder 73,295,331), 194 tensors
    "wan2.1": WanVAEConfig(),
    # 293,599 params: the release's structure (4 levels, time halving at the last two transitions) at width 8; tests
    "tiny": WanVAEConfig(dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), latents_mean=WAN21_LATENTS_MEAN[:4],
                         latents_std=WAN21_LATENTS_STD[:4]),
}


# -----------------------------------------------------------------------------------------------------------------------
# building blocks
#
# Every block takes (x, cache=None). `cache` is the state of one streaming pass: a dict that a layer reads and writes
# under its own module as key. None means the input is a whole video starting at frame 0 (one pass, no state).


def _frames(x):  # fold: (B, C, T, H, W) -> (B*T, C, H, W), b major (upstream's '(b t)')
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _video(x, b: int):  # unfold: (B*T, C, H, W) -> (B, C, T, H, W)
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time (all 2*p_t padding frames in front, none behind) and symmetrically in space.

    With a cache, the front padding is replaced by the last 2*p_t input frames of the previous chunk (fewer zeros while
    fewer exist), so consecutive chunks compute exactly what one pass over their concatenation computes.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0)  # padded by hand in forward
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.past = 2 * pt  # frames of left context; 2 for every 3x3x3 conv, 0 for the 1x1x1 ones
        self.space_pad = (pw, pw, ph, ph)  # F.pad order: W, then H

    def forward(self, x, cache=None):  # (B, C, T, H, W) -> (B, C', T, H', W')
        n_prev = 0
        if cache is not None and self.past:
            prev = cache.get(self)
            if prev is not None:
                n_prev = prev.shape[2]
                x = torch.cat([prev, x], dim=2)  # (B, C, n_prev + T, H, W)
            # clone: a view would keep this whole chunk's activation alive until the next chunk
            cache[self] = x[:, :, -self.past:].clone()
        x = F.pad(x, (*self.space_pad, self.past - n_prev, 0))  # zeros only for frames before frame 0
        return super().forward(x)


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(C) * gamma, the norm taken over the channels at each position (upstream RMS_norm, no bias).

    Computed as upstream with F.normalize, whose ||x|| is clamped at 1e-12 (no eps inside a square root).
    """

    def __init__(self, dim: int, ndim: int = 5):
        super().__init__()
        self.scale = dim**0.5
        # (C, 1, 1, 1) on videos, (C, 1, 1) on folded frames: upstream's shapes, so the release loads as is
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (ndim - 2)))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """RMSNorm -> SiLU -> causal 3x3x3 conv, twice (dropout before the second conv), plus a 1x1x1-projected skip."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        # A Sequential only for upstream's key names (residual.0 / .2 / .3 / .6); forward unpacks it by name.
        self.residual = nn.Sequential(RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
                                      RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout),
                                      CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache=None):  # (B, in_dim, T, H, W) -> (B, out_dim, T, H, W)
        norm1, act1, conv1, norm2, act2, dropout, conv2 = self.residual
        h = conv1(act1(norm1(x)), cache)
        h = conv2(dropout(act2(norm2(h))), cache)
        return h + self.shortcut(x)  # 1x1x1: no time context, no cache


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, with a residual; frames do not attend to
    each other, so the block needs no cache."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, ndim=4)  # applied to folded frames
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, cache=None):  # (B, C, T, H, W) -> same
        b, c, t, h, w = x.shape
        y = self.norm(_frames(x))  # (B*T, C, H, W)
        # (B*T, 3C, H*W) -> (B*T, 1, H*W, 3C): positions are the tokens; q, k, v are channels [0,C), [C,2C), [2C,3C)
        qkv = self.to_qkv(y).reshape(b * t, 1, 3 * c, h * w).transpose(2, 3).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)  # each (B*T, 1, H*W, C): one head of width C, SDPA's scale 1/sqrt(C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, H*W, C)
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)  # back to (B*T, C, H, W)
        # upstream's operand order: the sum takes the first operand's (folded, permuted) memory layout, and the next
        # RMSNorm's reduction order follows it, so this order keeps results bit-identical to upstream's
        return _video(self.proj(y), b) + x


class Downsample(nn.Module):
    """Halve H and W (zero pad right and bottom, 3x3 stride-2 conv per frame); if `temporal`, then halve T with a
    stride-2 conv over frames 0-1-2, 2-3-4, ..., frame 0 itself passing through (upstream Resample 'downsample2d' /
    'downsample3d')."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        # ZeroPad2d sits at index 0 so the conv keeps upstream's key `resample.1`
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        # upstream's CausalConv3d with no padding, i.e. a plain strided Conv3d
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x, cache=None):  # (B, C, T, H, W) -> (B, C, T', H/2, W/2)
        x = _video(self.resample(_frames(x)), x.shape[0])  # per frame: (B*T, C, H, W) -> (B*T, C, H/2, W/2)
        if self.time_conv is None:
            return x
        prev = None if cache is None else cache.get(self)
        if cache is not None:
            cache[self] = x[:, :, -1:].clone()  # the next chunk's first window starts on this frame
        if prev is not None:
            # A later chunk of even length 2m: with the carried frame, windows (prev,1,2), (2,3,4), ... -> m frames.
            return self.time_conv(torch.cat([prev, x], dim=2))
        # The chunk starts at frame 0 (T = 1 + 2m): frame 0 passes through unchanged and is the first window's left
        # frame, so output frame j >= 1 = conv(frames 2j-2, 2j-1, 2j); T -> 1 + m.
        if x.shape[2] == 1:
            return x
        return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)


class NearestUpsample2x(nn.Module):
    """Nearest-neighbour x2 in H and W, computed in float32 as upstream (nearest lacked bfloat16 kernels)."""

    def forward(self, x):  # (N, C, H, W) -> (N, C, 2H, 2W)
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Upsample(nn.Module):
    """If `temporal`, first double T (a causal conv to 2C channels, split into two frames per input frame; frame 0
    stays single), then double H and W (nearest x2, 3x3 conv per frame), halving the channels (upstream Resample
    'upsample3d' / 'upsample2d')."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x, cache=None):  # (B, C, T, H, W) -> (B, C/2, T', 2H, 2W)
        b = x.shape[0]
        if self.time_conv is not None:
            x = self._double_frames(x, cache)
        return _video(self.resample(_frames(x)), b)  # per frame: (B*T', C, H, W) -> (B*T', C/2, 2H, 2W)

    def _double_frames(self, x, cache):  # (B, C, T, H, W) -> (B, C, T', H, W), T' = 2T or 2T - 1
        starts_video = cache is None or self not in cache
        if cache is not None:
            cache[self] = True  # frame 0 seen (upstream's 'Rep' marker)
        first = None
        if starts_video:
            # Frame 0 passes through; the time conv starts at frame 1 with zeros before it (not frame 0).
            first, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, cache)  # (B, 2C, t, H, W): its own cache carries frames across chunks
            # (B, 2, C, t, H, W) -> (B, C, t, 2, H, W) -> (B, C, 2t, H, W): output frame 2s + i is channels [iC, (i+1)C)
            x = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return x if first is None else torch.cat([first, x], dim=2)


# -----------------------------------------------------------------------------------------------------------------------
# encoder, decoder, the VAE


class Encoder3d(nn.Module):
    """Video (B, 3, T, H, W) -> moments (B, 2*z_dim, T', H/8, W/8): mean and log-variance stacked on channels."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]  # (96, 96, 192, 384, 384) released
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        # One flat list as upstream (keys downsamples.{i}): per level, residual blocks, then a Downsample except after
        # the last level.
        layers = []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for j in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim, cfg.dropout))
            if i < len(cfg.dim_mult) - 1:
                layers.append(Downsample(out_dim, cfg.temporal_downsample[i]))
        self.downsamples = nn.ModuleList(layers)
        self.middle = _middle(dims[-1], cfg.dropout)
        self.head = _head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x, cache=None):
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


class Decoder3d(nn.Module):
    """Latent (B, z_dim, T', h, w) -> video (B, 3, T, 8h, 8w), unclamped: the encoder mirrored."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]  # (384, 384, 384, 192, 96) released
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], cfg.dropout)
        # per level: num_res_blocks + 1 residual blocks, then an Upsample except after the last level
        layers = []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            if i > 0:
                in_dim //= 2  # the previous level's Upsample halved the channels
            for j in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim, cfg.dropout))
            if i < len(mult) - 1:
                layers.append(Upsample(out_dim, temporal_upsample[i]))
        self.upsamples = nn.ModuleList(layers)
        self.head = _head(out_dim, 3)

    def forward(self, x, cache=None):
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


def _middle(d: int, dropout: float) -> nn.ModuleList:
    """The bottleneck of both halves: residual block, spatial self-attention, residual block (keys middle.0/1/2)."""
    return nn.ModuleList([ResidualBlock(d, d, dropout), AttentionBlock(d), ResidualBlock(d, d, dropout)])


def _head(d: int, out: int) -> nn.Sequential:
    """RMS norm, SiLU and a causal 3x3x3 conv to `out` channels (keys head.0 and head.2)."""
    return nn.Sequential(RMSNorm(d), nn.SiLU(), CausalConv3d(d, out, 3, padding=1))


def _chunk_bounds(n: int, chunk: int | None) -> list:
    """[0, 1, 1 + chunk, 1 + 2*chunk, ..., n]: element 0 alone, then chunks (None: all the rest at once)."""
    return [0, *range(1, n, chunk or n), n] if n > 1 else [0, n]


class WanVAE(nn.Module):
    """The Wan 2.1 VAE: `encode` video -> normalised latent mean, `decode` normalised latents -> video.

    The VAE stays frozen when the diffusion model is trained or sampled: call it under torch.no_grad() (nothing
    here disables autograd). Training uses `encode` (the normalised posterior mean, no sampling) for the clean
    latents x0; sampling ends with `decode`.
    """

    def __init__(self, cfg: WanVAEConfig | None = None):
        super().__init__()
        cfg = cfg or WanVAEConfig()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # 1x1x1 on the moments (diffusers quant_conv)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # 1x1x1 on the latent (post_quant_conv)
        self.decoder = Decoder3d(cfg)
        # Upstream's `scale = [mean, 1/std]`: kept as 1/std so (z - mean) * (1/std) and z / (1/std) + mean round as
        # upstream's. Not persistent (absent from the release's state dict); they follow .to(dtype) like upstream's,
        # which are built in the wrapper's compute dtype.
        # Made on the CPU even when the network is built on the meta device (the loaders do): no file holds them.
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean, std = (torch.tensor(v, device="cpu").view(shape) for v in (cfg.latents_mean, cfg.latents_std))
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_inv_std", 1.0 / std, persistent=False)

    def encode_moments(self, video, chunk_frames: int | None = 4):
        """Video (B, 3, 1 + 4k, H, W) in [-1, 1] -> unnormalised (mu, log_var), each (B, z_dim, 1 + k, H/8, W/8).

        Frame 0 goes through the encoder alone, then `chunk_frames` frames at a time (upstream: 4; None: all at once):
        any multiple of 4 gives the same numbers, larger chunks only trade memory for fewer, bigger kernels.
        """
        _, c, f, h, w = video.shape
        tf, sf = self.cfg.temporal_factor, self.cfg.spatial_factor
        # shape checks only: Python ints, no device sync
        if c != 3 or (f - 1) % tf or h % sf or w % sf:
            raise ValueError(f"video must be (B, 3, 1 + {tf}k, {sf}i, {sf}j), got {tuple(video.shape)}")
        if chunk_frames is not None and (chunk_frames <= 0 or chunk_frames % tf):
            raise ValueError(f"chunk_frames must be a positive multiple of {tf} (time windows must not straddle)")
        cache = {}  # this pass's per-layer state; a fresh dict starts the next video at frame 0
        bounds = _chunk_bounds(f, chunk_frames)
        moments = torch.cat([self.encoder(video[:, :, i:j], cache) for i, j in pairwise(bounds)], dim=2)
        mu, log_var = self.conv1(moments).chunk(2, dim=1)  # (B, 2z, 1 + k, h, w) -> 2 x (B, z, 1 + k, h, w)
        return mu, log_var

    def encode(self, video, chunk_frames: int | None = 4):
        """Video (B, 3, 1 + 4k, H, W) in [-1, 1] -> latents (B, z_dim, 1 + k, H/8, W/8): the posterior mean, normalised
        per channel, (mu - mean) / std.

        This is what upstream's WanVAE_.encode(x, scale) and Wan2_1_VAE.encode return (log_var is computed and dropped;
        nothing is sampled) and what the Wan diffusion model is trained on and samples.
        """
        mu, _ = self.encode_moments(video, chunk_frames)
        return (mu - self.latents_mean) * self.latents_inv_std

    def decode(self, latents, chunk_latents: int | None = 1, clamp: bool = True):
        """Normalised latents (B, z_dim, 1 + k, h, w) -> video (B, 3, 1 + 4k, 8h, 8w), clamped to [-1, 1] like
        upstream's Wan2_1_VAE.decode (clamp=False: WanVAE_.decode's raw output).

        Latent 0 is decoded alone, then `chunk_latents` at a time (upstream: 1; None: all at once); any length gives
        the same numbers.
        """
        if latents.ndim != 5 or latents.shape[1] != self.cfg.z_dim:
            raise ValueError(f"latents must be (B, {self.cfg.z_dim}, T, h, w), got {tuple(latents.shape)}")
        z = latents.to(self.latents_mean.dtype) / self.latents_inv_std + self.latents_mean  # undo encode's normalisation
        x = self.conv2(z)  # 1x1x1: the whole sequence at once, as upstream
        cache = {}
        bounds = _chunk_bounds(x.shape[2], chunk_latents)
        video = torch.cat([self.decoder(x[:, :, i:j], cache) for i, j in pairwise(bounds)], dim=2)
        return video.clamp(-1.0, 1.0) if clamp else video


# -----------------------------------------------------------------------------------------------------------------------
# ---- the diffusers layout
#
# AutoencoderKLWan (diffusers) holds the same tensors under other module paths; the renames, ours -> diffusers:
#   conv1, conv2                          -> quant_conv, post_quant_conv
#   {en,de}coder.conv1 / head.0 / head.2  -> {en,de}coder.conv_in / norm_out / conv_out
#   {en,de}coder.middle.0 / 1 / 2         -> {en,de}coder.mid_block.resnets.0 / attentions.0 / resnets.1
#   encoder.downsamples.{j}               -> encoder.down_blocks.{j}  (the same flat list)
#   decoder.upsamples.{j}                 -> decoder.up_blocks.{level}.resnets.{k} / up_blocks.{level}.upsamplers.0
# and inside every residual block residual.0 / 2 / 3 / 6, shortcut -> norm1, conv1, norm2, conv2, conv_shortcut.
# Attention (norm, to_qkv, proj) and resampling (resample.1, time_conv) blocks keep their inner names.

_LEAVES = {"conv1": "quant_conv", "conv2": "post_quant_conv",
           "encoder.conv1": "encoder.conv_in", "encoder.head.0": "encoder.norm_out", "encoder.head.2": "encoder.conv_out",
           "decoder.conv1": "decoder.conv_in", "decoder.head.0": "decoder.norm_out", "decoder.head.2": "decoder.conv_out"}
_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
             "shortcut": "conv_shortcut"}
_INV_LEAVES = {v: k for k, v in _LEAVES.items()}
_INV_MIDDLE = {v: k for k, v in _MIDDLE.items()}
_INV_RESIDUAL = {v: k for k, v in _RESIDUAL.items()}

_OUR_BLOCK = r"(encoder|decoder)\.(downsamples|middle|upsamples)\.(\d+)\.(.+)"  # side, group, index, inner module
_THEIR_BLOCK = (r"(encoder|decoder)\.(down_blocks\.\d+|mid_block\.(?:resnets|attentions)\.\d+"
                r"|up_blocks\.\d+\.(?:resnets\.\d+|upsamplers\.0))\.(.+)")  # side, block, inner module


def _split(key: str):  # "a.b.weight" -> ("a.b", "weight")
    module, _, param = key.rpartition(".")
    return module, param


def _decoder_levels(sd: dict) -> dict:
    """Our flat decoder.upsamples index -> diffusers' up_blocks.{level}.resnets.{k} / upsamplers.0, read off the
    keys: an Upsample (it has `resample.` tensors) closes a level."""
    modules = {}
    for key in sd:
        m = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", _split(key)[0])
        if m:
            modules.setdefault(int(m[1]), set()).add(m[2])
    table, level, k = {}, 0, 0
    for j in sorted(modules):
        if any(inner.startswith("resample.") for inner in modules[j]):
            table[j], level, k = f"up_blocks.{level}.upsamplers.0", level + 1, 0
        else:
            table[j], k = f"up_blocks.{level}.resnets.{k}", k + 1
    return table


def vae_to_diffusers(sd: dict) -> dict:
    """Our (= the original Wan2.1_VAE.pth) state dict -> AutoencoderKLWan's; the same tensors, renamed."""
    levels = _decoder_levels(sd)
    out = {}
    for key, value in sd.items():
        module, param = _split(key)
        if module in _LEAVES:
            new = _LEAVES[module]
        elif m := re.fullmatch(_OUR_BLOCK, module):
            side, group, j, inner = m.groups()
            block = {"downsamples": f"down_blocks.{j}", "middle": _MIDDLE.get(j), "upsamples": levels.get(int(j))}[group]
            if block is None:
                raise KeyError(f"no diffusers name for {key}")
            new = f"{side}.{block}.{_RESIDUAL.get(inner, inner)}"
        else:
            raise KeyError(f"not a Wan 2.1 VAE key: {key}")
        out[f"{new}.{param}"] = value
    return out


def vae_from_diffusers(sd: dict) -> dict:
    """AutoencoderKLWan's state dict -> ours (= the original Wan2.1_VAE.pth names); the same tensors, renamed."""
    # diffusers' up_blocks.{level}.resnets.{k} / upsamplers.0 -> our flat index, in execution order
    up_blocks = set()
    for key in sd:
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\..+", key):
            up_blocks.add((int(m[1]), m[3] is None, int(m[3] or 0), m[2]))
    flat = {f"up_blocks.{lvl}.{name}": j for j, (lvl, _, _, name) in enumerate(sorted(up_blocks))}
    out = {}
    for key, value in sd.items():
        module, param = _split(key)
        if module in _INV_LEAVES:
            new = _INV_LEAVES[module]
        elif m := re.fullmatch(_THEIR_BLOCK, module):
            side, block, inner = m.groups()
            if block.startswith("down_blocks."):
                ours = f"downsamples.{block.split('.')[1]}"
            elif block.startswith("mid_block."):
                ours = f"middle.{_INV_MIDDLE[block]}"
            else:
                ours = f"upsamples.{flat[block]}"
            new = f"{side}.{ours}.{_INV_RESIDUAL.get(inner, inner)}"
        else:
            raise KeyError(f"not an AutoencoderKLWan (Wan 2.1) key: {key}")
        out[f"{new}.{param}"] = value
    return out


# diffusers config fields that describe other VAEs (Wan 2.2's residual / patchified one); their Wan 2.1 values
_DIFFUSERS_FIXED = {"is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None}


def vae_config_to_diffusers(cfg: WanVAEConfig) -> dict:
    """AutoencoderKLWan's config (vae/config.json) for our config."""
    return dict(base_dim=cfg.dim, decoder_base_dim=None, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                num_res_blocks=cfg.num_res_blocks, attn_scales=[], temperal_downsample=list(cfg.temporal_downsample),
                dropout=cfg.dropout, latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std),
                **_DIFFUSERS_FIXED, scale_factor_temporal=cfg.temporal_factor, scale_factor_spatial=cfg.spatial_factor)


def vae_config_from_diffusers(d: dict) -> WanVAEConfig:
    """Our config from AutoencoderKLWan's (vae/config.json); missing fields take diffusers' defaults (= the release)."""
    d = {k: v for k, v in d.items() if not k.startswith("_")}  # _class_name, _diffusers_version
    for key, value in _DIFFUSERS_FIXED.items():
        if (got := d.pop(key, value)) != value:
            raise ValueError(f"{key}={got!r}: not a Wan 2.1 VAE (Wan 2.2's VAE is not supported)")
    if d.pop("decoder_base_dim", None) not in (None, d.get("base_dim", 96)):
        raise ValueError("decoder_base_dim != base_dim: not a Wan 2.1 VAE")
    names = {"base_dim": "dim", "z_dim": "z_dim", "dim_mult": "dim_mult", "num_res_blocks": "num_res_blocks",
             "attn_scales": "attn_scales", "temperal_downsample": "temporal_downsample", "dropout": "dropout",
             "latents_mean": "latents_mean", "latents_std": "latents_std"}
    cfg = WanVAEConfig(**{names[k]: v for k, v in d.items() if k in names})
    # derived in ours; checked so a config that disagrees with its own structure is not loaded silently
    for key, ours in (("scale_factor_temporal", cfg.temporal_factor), ("scale_factor_spatial", cfg.spatial_factor)):
        if d.get(key) not in (None, ours):
            raise ValueError(f"{key}={d[key]} disagrees with dim_mult / temperal_downsample ({ours})")
    unknown = set(d) - set(names) - {"scale_factor_temporal", "scale_factor_spatial"}
    if unknown:
        raise ValueError(f"unknown AutoencoderKLWan config fields: {sorted(unknown)}")
    return cfg
