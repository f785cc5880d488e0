"""TRN multi-scale Jester gesture classifier (the "motion accuracy" judge of NewMove), in plain PyTorch.

NewMove scores a generated video by whether a Jester classifier recognises the customised gesture. The classifier is the
public TRN release `TRN_jester_RGB_BNInception_TRNmultiscale_segment8_best.pth.tar` (+ `jester_categories.txt`):

    video (N, 3, F, H, W) uint8 RGB
      -> 8 segment-centre frames, short side 256, centre crop 224, BGR, 0..255 minus [104, 117, 128]   (preprocess)
      -> BN-Inception per frame -> global average pool -> (N*8, 1024)                                   (BNInception)
      -> new_fc Linear(1024, 256) -> (N, 8, 256)                                                          (TRN.new_fc)
      -> multi-scale temporal relations over 8..2 frames, logits summed -> (N, 27)           (RelationModuleMultiScale)

Sources (facts only; no code copied):
  * zhoubolei/TRN-pytorch@060509c: `models.py` (TSN wrapper: the backbone's `fc` becomes Dropout(0.8), `new_fc` =
    Linear(1024, img_feature_dim=256)), `TRNmodule.py` (RelationModuleMultiScale), `test_models.py` / `transforms.py`
    (GroupScale(256), GroupCenterCrop(224), Stack(roll=True) = RGB->BGR, ToTorchFormatTensor(div=False), mean subtraction).
  * yjxiong/tensorflow-model-zoo.torch `bninception/bn_inception.yaml` + `layer_factory.py` (layer names = state-dict
    keys, channel counts, kernels/strides/pads; convs have biases; BN = nn.BatchNorm2d defaults, eps 1e-5, affine; every
    pooling uses ceil_mode=True; ReLU is applied in place right after every BN, so the concatenations see ReLU'd maps).
    The same graph, written out, is Cadene/pretrained-models.pytorch `pretrainedmodels/models/bninception.py`.
  * docs/method.md sections 7.2 and 7.3.

Notable differences from upstream (all chosen so that loading the public checkpoint and evaluating stays exact):
  * Relation-frame choice is deterministic: upstream draws 3 frame combinations per scale < 8 with the global
    `np.random` on every forward (so its evaluation is stochastic); here a private torch.Generator seeded with `seed` draws
    them, the same way for every call with the same seed.
  * BatchNorm is an eval-only module (`FrozenBatchNorm2d`) with exactly weight/bias/running_mean/running_var, so the state
    dict has no `num_batches_tracked` keys -- the original (PyTorch 0.2/0.3-era) checkpoint has none. A checkpoint that
    does carry them (the `_v0.4` re-save) has them dropped on load. This module only evaluates; it is not for training.
  * `global_pool` is a mean over the whole final map instead of AvgPool2d(7, stride 1): identical at the 224 input the
    checkpoint was trained for (the map is 7x7), and it lets tests run the backbone on small inputs.
  * The backbone's `fc` slot (Dropout(0.8) in TSN, identity at test time) is omitted; the checkpoint has no keys for it.
  * Resize: torch `interpolate(bilinear, align_corners=False, antialias=True)` then rounding to uint8 values, standing in
    for PIL's bilinear `Image.resize` used by torchvision's (old) `Scale`. Measured on random uint8 frames (384x384 -> 256
    and 100x176 -> 256x450): max difference to PIL 1 grey level, mean ~0.15-0.2; not bit-identical to the PIL path.
  * Single centre crop (as `test_video.py`), not the 10-crop oversampling that `test_models.py` defaults to.
"""

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weights import WeightsError, assign_state_dict, read_state_dict, read_text

NUM_SEGMENTS = 8  # frames per video the checkpoint was trained with ("segment8")
IMG_FEATURE_DIM = 256  # per-frame feature size after new_fc
SCALE_SIZE, CROP_SIZE = 256, 224  # test-time short side and centre crop
BGR_MEAN = (104.0, 117.0, 128.0)  # BN-Inception (Caffe) means, BGR order, on the 0..255 scale; std is 1
RELATIONS_PER_SCALE = 3  # TRN's `subsample_num`: frame combinations summed per scale smaller than NUM_SEGMENTS

# -----------------------------------------------------------------------------------------------------------------------
# BN-Inception backbone


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d in eval mode only: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.

    Same four tensors as nn.BatchNorm2d(affine=True) but no `num_batches_tracked`, which the TRN checkpoint lacks.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps)


class InceptionBlock(nn.Module):
    """One BN-Inception module. Branches (each conv is followed by BN and an in-place ReLU):

        1x1:        1x1 conv                                           (absent in the stride-2 blocks 3c and 4e)
        3x3:        1x1 reduce -> 3x3 conv (stride s)
        double_3x3: 1x1 reduce -> 3x3 conv -> 3x3 conv (stride s)
        pool:       3x3 pool (avg or max) -> 1x1 pool_proj             (stride-2 blocks: max pool, no projection)

    Outputs are concatenated on channels in that order. The submodules live on the *backbone* (not on this object) so the
    state-dict keys are the flat upstream names, e.g. `inception_3a_1x1.weight`, `inception_3a_1x1_bn.running_mean`.
    """

    def __init__(self, owner: nn.Module, name: str, c_in: int, c1: int, c3r: int, c3: int, cdr: int, cd: int,
                 pool: str, cp: int):
        super().__init__()
        self.name, self.stride = name, 1 if c1 else 2
        s = self.stride

        def conv_bn(suffix, cin, cout, k, stride=1):
            owner.add_module(f"{name}_{suffix}", nn.Conv2d(cin, cout, k, stride, padding=k // 2))
            owner.add_module(f"{name}_{suffix}_bn", FrozenBatchNorm2d(cout))

        if c1:
            conv_bn("1x1", c_in, c1, 1)
        conv_bn("3x3_reduce", c_in, c3r, 1)
        conv_bn("3x3", c3r, c3, 3, s)
        conv_bn("double_3x3_reduce", c_in, cdr, 1)
        conv_bn("double_3x3_1", cdr, cd, 3)
        conv_bn("double_3x3_2", cd, cd, 3, s)
        if s == 2:  # grid reduction: parameter-free max pool, channels pass through
            self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        elif pool == "avg":  # Caffe ave pooling divides by the full 3x3 window incl. padding = count_include_pad=True
            self.pool = nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
        else:  # only inception_5b uses a stride-1 max pool
            self.pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        if cp:
            conv_bn("pool_proj", c_in, cp, 1)
        self.has_1x1, self.has_proj = bool(c1), bool(cp)
        self.out_channels = c1 + c3 + cd + (cp if cp else c_in)

    def forward(self, owner: nn.Module, x):
        def cbr(suffix, h):  # conv -> BN -> ReLU (upstream's ReLU is in place on the BN output)
            h = getattr(owner, f"{self.name}_{suffix}")(h)
            return F.relu(getattr(owner, f"{self.name}_{suffix}_bn")(h))

        outs = []
        if self.has_1x1:
            outs.append(cbr("1x1", x))
        outs.append(cbr("3x3", cbr("3x3_reduce", x)))
        outs.append(cbr("double_3x3_2", cbr("double_3x3_1", cbr("double_3x3_reduce", x))))
        p = self.pool(x)
        outs.append(cbr("pool_proj", p) if self.has_proj else p)
        return torch.cat(outs, dim=1)


# (name, in, 1x1, 3x3_reduce, 3x3, double_3x3_reduce, double_3x3, pool type, pool_proj); 0 = branch absent.
# Read off bn_inception.yaml; the comment gives each block's output channels.
INCEPTION_BLOCKS = [
    ("inception_3a", 192, 64, 64, 64, 64, 96, "avg", 32),  # 256, 28x28
    ("inception_3b", 256, 64, 64, 96, 64, 96, "avg", 64),  # 320
    ("inception_3c", 320, 0, 128, 160, 64, 96, "max", 0),  # 576, stride 2 -> 14x14
    ("inception_4a", 576, 224, 64, 96, 96, 128, "avg", 128),  # 576
    ("inception_4b", 576, 192, 96, 128, 96, 128, "avg", 128),  # 576
    ("inception_4c", 576, 160, 128, 160, 128, 160, "avg", 128),  # 608
    ("inception_4d", 608, 96, 128, 192, 160, 192, "avg", 128),  # 608
    ("inception_4e", 608, 0, 128, 192, 192, 256, "max", 0),  # 1056, stride 2 -> 7x7
    ("inception_5a", 1056, 352, 192, 320, 160, 224, "avg", 128),  # 1024
    ("inception_5b", 1024, 352, 192, 320, 192, 224, "max", 128),  # 1024
]


class BNInception(nn.Module):
    """BN-Inception (Ioffe & Szegedy 2015) as converted from Caffe by yjxiong: (B, 3, 224, 224) BGR -> (B, 1024)."""

    def __init__(self):
        super().__init__()
        # stem: 224 -> 112 (conv s2) -> 56 (max pool, ceil) -> 56 -> 28 (max pool, ceil)
        self.conv1_7x7_s2 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.conv1_7x7_s2_bn = FrozenBatchNorm2d(64)
        self.pool1_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2_3x3_reduce = nn.Conv2d(64, 64, 1)
        self.conv2_3x3_reduce_bn = FrozenBatchNorm2d(64)
        self.conv2_3x3 = nn.Conv2d(64, 192, 3, padding=1)
        self.conv2_3x3_bn = FrozenBatchNorm2d(192)
        self.pool2_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        # Block objects hold only pooling config; kept in a plain list so they add no state-dict prefix.
        self.blocks = [InceptionBlock(self, *cfg) for cfg in INCEPTION_BLOCKS]
        self.out_channels = self.blocks[-1].out_channels  # 1024

    def forward(self, x):  # (B, 3, H, W)
        x = self.pool1_3x3_s2(F.relu(self.conv1_7x7_s2_bn(self.conv1_7x7_s2(x))))  # (B, 64, H/4, W/4)
        x = F.relu(self.conv2_3x3_reduce_bn(self.conv2_3x3_reduce(x)))
        x = self.pool2_3x3_s2(F.relu(self.conv2_3x3_bn(self.conv2_3x3(x))))  # (B, 192, H/8, W/8)
        for block in self.blocks:
            x = block(self, x)  # ... -> (B, 1024, H/32, W/32)
        return x.mean(dim=(2, 3))  # global_pool: 7x7 average at 224 input -> (B, 1024)


# -----------------------------------------------------------------------------------------------------------------------
# temporal relation consensus


class RelationModuleMultiScale(nn.Module):
    """Multi-scale temporal relations (Zhou et al. 2018, TRN, Eq. 3): sum over scales d = 8..2 of g_d applied to ordered
    d-frame subsets of the 8 frame features. Scale 8 uses all frames; each smaller scale sums 3 of its
    C(8, d) combinations, drawn afresh per call (upstream: np.random; here: a generator seeded with `seed`).

    fc_fusion_scales[i] = Sequential(ReLU, Linear(d*256, 256), ReLU, Linear(256, num_class)) for d = scales[i].
    """

    def __init__(self, num_class: int, num_frames: int = NUM_SEGMENTS, feature_dim: int = IMG_FEATURE_DIM,
                 bottleneck: int = 256):
        super().__init__()
        self.num_frames, self.feature_dim = num_frames, feature_dim
        self.scales = list(range(num_frames, 1, -1))  # [8, 7, 6, 5, 4, 3, 2]
        self.relations = [list(itertools.combinations(range(num_frames), d)) for d in self.scales]  # sorted tuples
        self.fc_fusion_scales = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Linear(d * feature_dim, bottleneck), nn.ReLU(), nn.Linear(bottleneck, num_class))
            for d in self.scales)

    def choose_relations(self, seed: int) -> list[list[tuple[int, ...]]]:
        """The frame combinations used per scale: all frames for the largest, 3 distinct random ones for the others."""
        gen = torch.Generator().manual_seed(int(seed))
        chosen = [self.relations[0][:1]]
        for rels in self.relations[1:]:
            idx = torch.randperm(len(rels), generator=gen)[:min(RELATIONS_PER_SCALE, len(rels))]
            chosen.append([rels[i] for i in idx.tolist()])
        return chosen

    def forward(self, feats, seed: int = 0):  # feats (B, num_frames, feature_dim)
        B = feats.shape[0]
        logits = 0
        for fc, rels in zip(self.fc_fusion_scales, self.choose_relations(seed)):
            for rel in rels:
                logits = logits + fc(feats[:, list(rel)].reshape(B, -1))  # (B, d*256) -> (B, num_class)
        return logits


# -----------------------------------------------------------------------------------------------------------------------
# TRN = TSN wrapper (backbone per frame + new_fc) + relation consensus


class TRN(nn.Module):
    """(B, 8*3, H, W) preprocessed segments -> (B, num_class) logits. Key names match the checkpoint minus `module.`."""

    def __init__(self, num_class: int = 27, num_segments: int = NUM_SEGMENTS):
        super().__init__()
        self.num_segments = num_segments
        self.base_model = BNInception()
        # upstream: base_model.fc = Dropout(0.8) (identity at test time), then this per-frame bottleneck
        self.new_fc = nn.Linear(self.base_model.out_channels, IMG_FEATURE_DIM)
        self.consensus = RelationModuleMultiScale(num_class, num_segments)

    def forward(self, x, seed: int = 0):
        B = x.shape[0]
        frames = x.reshape(B * self.num_segments, 3, *x.shape[-2:])  # segment-major channel stacking, as Stack()
        feats = self.new_fc(self.base_model(frames))  # (B*8, 256)
        return self.consensus(feats.view(B, self.num_segments, -1), seed=seed)  # (B, num_class)


# -----------------------------------------------------------------------------------------------------------------------
# test-time preprocessing


def segment_indices(num_frames: int, num_segments: int = NUM_SEGMENTS) -> list[int]:
    """0-based centre frame of each of `num_segments` equal segments (TRN `_get_test_indices` minus its +1)."""
    if num_frames < num_segments:
        raise ValueError(f"TRN needs at least {num_segments} frames per video, got {num_frames}")
    tick = num_frames / num_segments
    return [int(tick / 2.0 + tick * k) for k in range(num_segments)]


def preprocess(videos: torch.Tensor) -> torch.Tensor:
    """uint8 RGB videos (N, 3, F, H, W) -> TRN input (N, 8*3, 224, 224) float, BGR, 0..255 minus the BGR means."""
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[1] != 3:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"expected videos as a (N, 3, F, H, W) tensor, got {shape}")
    if videos.dtype != torch.uint8:
        raise ValueError(f"expected uint8 RGB videos with values 0..255, got dtype {videos.dtype}")
    N, _, T, H, W = videos.shape
    x = videos[:, :, segment_indices(T)]  # (N, 3, 8, H, W)
    x = x.permute(0, 2, 1, 3, 4).reshape(N * NUM_SEGMENTS, 3, H, W).float()
    # short side -> 256, long side int(256 * long / short) (torchvision Scale); PIL would return uint8, so round
    if min(H, W) != SCALE_SIZE:
        oh, ow = (SCALE_SIZE, int(SCALE_SIZE * W / H)) if H <= W else (int(SCALE_SIZE * H / W), SCALE_SIZE)
        x = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255)
    h, w = x.shape[-2:]
    if min(h, w) < CROP_SIZE:
        raise ValueError(f"frame {h}x{w} is smaller than the {CROP_SIZE} crop after resizing")
    top, left = int(round((h - CROP_SIZE) / 2.0)), int(round((w - CROP_SIZE) / 2.0))  # torchvision CenterCrop
    x = x[:, :, top:top + CROP_SIZE, left:left + CROP_SIZE]
    x = x.flip(1) - torch.tensor(BGR_MEAN).view(1, 3, 1, 1)  # RGB -> BGR (Stack(roll=True)), minus means
    return x.reshape(N, NUM_SEGMENTS * 3, CROP_SIZE, CROP_SIZE)


# -----------------------------------------------------------------------------------------------------------------------
# loading and the classifier interface used by metrics.py (load_classifier, motion_predictions)


class TRNClassifier:
    """`class_names` (checkpoint output order) and `predict(uint8 (N, 3, F, H, W) RGB) -> logits (N, num_classes)`."""

    def __init__(self, model: TRN, class_names: list[str], seed: int = 0, device="cpu", batch_size: int = 4):
        self.model = model.to(device).eval()
        self.class_names, self.seed, self.device, self.batch_size = list(class_names), seed, device, batch_size

    @torch.no_grad()
    def predict(self, videos: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, videos.shape[0], self.batch_size):  # 8 frames per video through BN-Inception: keep it small
            x = preprocess(videos[i:i + self.batch_size]).to(self.device)
            out.append(self.model(x, seed=self.seed).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.class_names))


def read_categories(path) -> list[str]:
    """One class name per line (blank lines ignored), in the checkpoint's output order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; expected the TRN categories file (one class name per line)")
    names = [line.strip() for line in read_text(path, "TRN categories file").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names found; expected one class name per line")
    return names


def load_trn(checkpoint_path, categories_path, seed: int = 0, device="cpu") -> TRNClassifier:
    """Load the public TRN Jester checkpoint ({'epoch','arch','state_dict','best_prec1'}, `module.`-prefixed keys)."""
    class_names = read_categories(categories_path)
    sd = read_state_dict(checkpoint_path, what="TRN checkpoint (TRN_jester_RGB_BNInception_TRNmultiscale_segment8)")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    head = sd.get("consensus.fc_fusion_scales.0.3.weight")  # last Linear of the 8-frame relation: (num_class, 256)
    if head is not None and head.dim() == 2 and head.shape[0] != len(class_names):
        raise WeightsError(f"{checkpoint_path} predicts {head.shape[0]} classes but {categories_path} lists "
                           f"{len(class_names)} names; use the categories file shipped with this checkpoint")
    model = TRN(num_class=len(class_names))
    assign_state_dict(model, sd, source=str(checkpoint_path), dtype=torch.float32)
    return TRNClassifier(model, class_names, seed=seed, device=device)
