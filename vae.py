"""The frozen VAE of ModelScope text-to-video: the KL-f8 autoencoder of latent diffusion, applied frame by frame.

It is the same architecture as the Stable Diffusion 1.x/2.x VAE: a 2-D conv encoder that maps an RGB frame in [-1, 1]
to a diagonal Gaussian over 4-channel latents at 1/8 of the resolution, and a conv decoder back. Frames are independent:
there is nothing temporal in here. Facts and numbers: docs/modelscope.md §3 and §6.3.

Tensor layout: videos are (B, C, F, H, W) everywhere, as in unet3d.py. The VAE is a 2-D network, so every entry point
folds the frames into the batch, (B, C, F, H, W) -> (B*F, C, H, W), and unfolds again on the way out.

This file holds the config (VAEConfig, VAE_PRESETS) and the modules. The release layouts (config translation,
LDM <-> diffusers key names, `load_vae` / `save_vae`) are in layouts.py, whole model directories in models.py.

References:
  - ModelScope `modelscope/models/multi_modal/video_synthesis/autoencoder.py` (from CompVis latent-diffusion
    `ldm/modules/diffusionmodules/model.py`); the weights ship in `VQGAN_autoencoder.pth`, a Lightning checkpoint whose
    VAE keys carry the prefix `first_stage_model.`.
  - diffusers `AutoencoderKL` (`src/diffusers/models/autoencoders/autoencoder_kl.py`, `vae.py`, `unet_2d_blocks.py`),
    whose key names we use, and `convert_ldm_vae_checkpoint` for the key mapping.
  - Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", §3 (the 0.18215 scale: §4.3.2
    and Appendix G, latents rescaled to unit variance).

Notable differences from upstream:
  - Parameter names are diffusers' (`encoder.down_blocks.0.resnets.0.conv1`, ...), so a diffusers `vae/` file loads with
    no renaming; original ModelScope/LDM files are renamed on load by `layouts.vae_from_original` (and written back
    by `layouts.vae_to_original`). The attention q/k/v/out projections are `nn.Linear` (the original stores them as
    1x1 convs).
  - Only what the released model uses is built: no timestep-embedding path (LDM passes temb=None), no dropout (0.0 in
    the release, and the VAE is frozen), attention only in the middle blocks (`attn_resolutions=[]`), always a conv in
    Downsample/Upsample (`resamp_with_conv=True`), no tanh on the output. No loss, discriminator, KL or EMA code: this
    project never trains the VAE.
  - Attention calls `F.scaled_dot_product_attention` instead of bmm + softmax: same math, float rounding ~1e-6.
  - `encode` returns latents already multiplied by `scaling_factor` (0.18215) and `decode` divides by it first; the
    original leaves the scaling to its callers (`TextToVideoSynthesis.forward`).
  - The posterior sample draws its noise once for the whole (B, 4, F, h, w) latent from a caller-supplied generator on
    the latents' device, so the result does not depend on `chunk_size`; the original draws `torch.randn` on the CPU from
    the global RNG and moves it to the device.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# -----------------------------------------------------------------------------------------------------------------------
# config


@dataclass
class VAEConfig:
    in_channels: int = 3  # RGB
    out_channels: int = 3
    latent_channels: int = 4  # LDM `z_channels` == `embed_dim`
    block_out_channels: tuple = (128, 256, 512, 512)  # one entry per resolution level; LDM `ch * ch_mult`
    layers_per_block: int = 2  # ResnetBlocks per encoder level; the decoder has one more per level (LDM quirk)
    norm_num_groups: int = 32  # every GroupNorm; LDM hard-codes 32
    scaling_factor: float = 0.18215  # latents * this have ~unit variance (LDM §4.3.2); hard-coded in ModelScope

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)  # JSON gives a list
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)  # 8 for the KL-f8 VAE


VAE_PRESETS = {
    "modelscope": VAEConfig(),  # 83,653,863 params, 248 tensors (= SD 1.x/2.x VAE)
    # 658,375 params, 124 tensors. Two levels, so latents are at 1/2 of the frame size here, not 1/8.
    "tiny": VAEConfig(block_out_channels=(32, 64), layers_per_block=1),
}


# -----------------------------------------------------------------------------------------------------------------------
# modules


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)  # eps 1e-6 everywhere in LDM (not torch's 1e-5)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a (1x1-projected if the width changes) skip connection."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # LDM `nin_shortcut` (network-in-network = 1x1 conv), diffusers `conv_shortcut`.
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):  # (N, in_ch, H, W) -> (N, out_ch, H, W)
        h = self.conv1(F.silu(self.norm1(x)))  # silu == LDM's swish x*sigmoid(x)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of one frame, with a residual (only in the middle blocks)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(ch, groups)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        # A list only so the key is diffusers' `to_out.0` (their `to_out.1` is a parameter-free Dropout).
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):  # (N, C, H, W)
        n, c, h, w = x.shape
        t = self.group_norm(x).reshape(n, c, h * w).transpose(1, 2)  # (N, H*W, C): positions are the tokens
        # One head of width C; SDPA's default scale 1/sqrt(C) is LDM's `c**-0.5`.
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (N, 1, H*W, C)
        t = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (N, H*W, C)
        t = self.to_out[0](t).transpose(1, 2).reshape(n, c, h, w)  # back to (N, C, H, W)
        return x + t


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):  # (N, C, H, W) -> (N, C, H/2, W/2)
        # LDM pads right and bottom only (0,1,0,1), not 1 on every side; padding=1 would shift the grid by one pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):  # (N, C, H, W) -> (N, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> attention -> ResnetBlock at the lowest resolution (LDM `mid.block_1, attn_1, block_2`)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([AttnBlock(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownBlock(nn.Module):
    """One encoder level: `n` ResnetBlocks, then (except at the last level) a Downsample."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(n)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if downsample else [])  # a list for the key names

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    """One decoder level: `n` ResnetBlocks, then (except at the last level) an Upsample."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(n)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Frame (N, 3, H, W) -> mean and log-variance stacked, (N, 2*latent, H/2^(L-1), W/2^(L-1)) for L levels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        # Level i: chs[i-1] -> chs[i], downsampling at every level but the last (3 times for the released config).
        self.down_blocks = nn.ModuleList([
            DownBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, g, downsample=i < len(chs) - 1)
            for i in range(len(chs))])
        self.mid_block = MidBlock(chs[-1], g)
        self.conv_norm_out = group_norm(chs[-1], g)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)  # LDM `double_z`: mean and logvar

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (N, latent, h, w) -> frame (N, 3, h*2^(L-1), w*2^(L-1)); the encoder mirrored."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = cfg.block_out_channels[::-1], cfg.norm_num_groups  # widest first: (512, 512, 256, 128)
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], g)
        # Listed in execution order (diffusers); LDM's `decoder.up.{i}` counts from the other end: up_blocks.k is
        # up.{L-1-k}. Each level has layers_per_block + 1 ResnetBlocks, one more than the encoder level (LDM's choice).
        self.up_blocks = nn.ModuleList([
            UpBlock(chs[max(k - 1, 0)], chs[k], cfg.layers_per_block + 1, g, upsample=k < len(chs) - 1)
            for k in range(len(chs))])
        self.conv_norm_out = group_norm(chs[-1], g)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)  # no tanh: outputs may leave [-1, 1]

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Encoder + Decoder + the two 1x1 convs around the latent; video in, scaled latents out, and back."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # 1x1 convs on the moments and on the latent; redundant with the neighbouring 3x3 convs but part of the weights.
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    # -- per-frame, unscaled: the original model's API, used by the parity tests ---------------------------------------

    def encode_frames(self, x):
        """Frames (N, 3, H, W) in [-1, 1] -> posterior (mean, logvar), each (N, 4, H/8, W/8), unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)  # (N, 8, h, w) -> 2 x (N, 4, h, w)
        # LDM clamps before exp() so a wild logvar cannot overflow (or underflow to std 0).
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_frames(self, z):
        """Unscaled latents (N, 4, h, w) -> frames (N, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    # -- videos --------------------------------------------------------------------------------------------------------

    def encode(self, video, generator=None, sample: bool = True, chunk_size: int | None = 8):
        """Video (B, 3, F, H, W) in [-1, 1] -> latents (B, 4, F, H/8, W/8), multiplied by `scaling_factor`.

        sample=True draws z = mean + std * eps (what LDM-style training uses); sample=False returns the mean.
        `generator` (on the video's device) makes the draw reproducible. At most `chunk_size` frames go through the
        network at once (None: all); the result does not depend on it.
        """
        b, c, f, h, w = _check_video(video, self.cfg.in_channels, "video")
        frames = video.transpose(1, 2).reshape(b * f, c, h, w)  # fold: (B, 3, F, H, W) -> (B*F, 3, H, W), b-major
        # Frames are independent (no batch statistics anywhere), so chunks only bound the activation memory.
        moments = [self.encode_frames(x) for x in frames.split(chunk_size or b * f)]
        mean = torch.cat([m for m, _ in moments])  # (B*F, 4, h', w')
        mean = mean.reshape(b, f, *mean.shape[1:]).transpose(1, 2)  # unfold: -> (B, 4, F, h', w')
        if sample:
            logvar = torch.cat([lv for _, lv in moments])
            logvar = logvar.reshape(b, f, *logvar.shape[1:]).transpose(1, 2)  # (B, 4, F, h', w')
            # Noise drawn once, for the whole latent in its final layout, so chunking cannot change it.
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar) * eps
        return mean * self.cfg.scaling_factor

    def decode(self, latents, chunk_size: int | None = 8):
        """Scaled latents (B, 4, F, h, w) -> video (B, 3, F, 8h, 8w), roughly in [-1, 1] (not clamped).

        At most `chunk_size` frames are decoded at once (None: all); the result does not depend on it. The returned
        tensor is a (non-contiguous) permuted view.
        """
        b, c, f, h, w = _check_video(latents, self.cfg.latent_channels, "latents")
        z = (latents / self.cfg.scaling_factor).transpose(1, 2).reshape(b * f, c, h, w)  # fold: (B*F, 4, h, w)
        # Only the 3-channel outputs of all chunks are kept; the wide activations live one chunk at a time.
        frames = torch.cat([self.decode_frames(zc) for zc in z.split(chunk_size or b * f)])  # (B*F, 3, H, W)
        return frames.reshape(b, f, *frames.shape[1:]).transpose(1, 2)  # unfold: -> (B, 3, F, H, W)


def _check_video(x, channels: int, what: str):
    # Shape checks only: Python ints, no device sync.
    if x.ndim != 5 or x.shape[1] != channels:
        raise ValueError(f"{what} must be (B, {channels}, F, H, W), got {tuple(x.shape)}")
    return x.shape
