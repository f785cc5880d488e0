"""WanDiT: parity with the original Wan `WanModel` and with diffusers' `WanTransformer3DModel`, the full-size key set
and parameter count, the diffusers renames, gradient checkpointing, bf16 autocast.

The original's attention is flash-attn's varlen kernel (CUDA only; its wrapper asserts q is on CUDA), so on a CPU the
oracle runs with `_reference_flash_attention` in its place: the same call contract, computed exactly.
"""

import copy
import dataclasses
import unittest.mock

import pytest
import torch
import torch.nn.functional as F

import wan_dit
from oracles import max_abs_diff, randomize_, wan_module

# head_dim 40: RoPE pairs split 8 / 6 / 6 over (frames, height, width), so a wrong split formula changes shapes
TINY = wan_dit.WanDiTConfig(patch_size=(1, 2, 2), text_len=12, in_dim=4, dim=80, ffn_dim=80, freq_dim=32,
                            text_dim=24, out_dim=4, num_heads=2, num_layers=2)
# head_dim 48 (8 / 8 / 8 pairs), and the two optional norms off
TINY_48 = dataclasses.replace(TINY, dim=96)
TINY_NO_NORMS = dataclasses.replace(TINY, qk_norm=False, cross_attn_norm=False)
# the original's autocast('cuda', ...) regions warn on a machine without CUDA
pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")

GRID = (3, 6, 8)  # latent F, H, W: 3 x 3 x 4 tokens, non-square so an h/w swap shows
PROMPT_LENS = (7, 12)  # the first prompt is zero-padded with 5 tokens, the second fills text_len


def _reference_flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                               causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16,
                               version=None):
    """The original's `flash_attention(q, k, v, k_lens=...)` for a CPU: q (B, Lq, N, C), k/v (B, Lk, N, C), keys past
    k_lens[b] masked out. As in the wrapper, q and k are cast to v's dtype and the result to q's dtype; unlike it,
    all-float32 inputs stay float32 (flash-attn takes only fp16/bf16 and would round them to bf16)."""
    assert q_lens is None and dropout_p == 0 and softmax_scale is None and q_scale is None and not causal
    assert tuple(window_size) == (-1, -1)
    out_dtype = q.dtype
    q, k = q.to(v.dtype), k.to(v.dtype)
    mask = None
    if k_lens is not None:
        mask = (torch.arange(k.shape[1])[None, :] < k_lens[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).type(out_dtype)


@pytest.fixture
def wan_model(monkeypatch):
    """The original `wan/modules/model.py`, its flash_attention replaced by the CPU reference."""
    module = wan_module("modules.model")
    monkeypatch.setattr(module, "flash_attention", _reference_flash_attention)
    return module


def original(module, cfg: wan_dit.WanDiTConfig, seed: int = 0):
    ref = module.WanModel(model_type="t2v", patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_dim,
                          dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim,
                          out_dim=cfg.out_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                          window_size=(-1, -1), qk_norm=cfg.qk_norm, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps)
    return randomize_(ref, seed)


def run_original(ref, x, t, contexts):
    """The original's list interface on a batch. The Wan2.2 file expands a (B,) timestep with t.expand(B, seq_len),
    which only works for B == 1, so a batch gets its per-token form (B, seq_len) directly: the same numbers."""
    B, _, Fr, H, W = x.shape
    pt, ph, pw = ref.patch_size
    seq_len = (Fr // pt) * (H // ph) * (W // pw)
    out = ref(list(x), t[:, None].expand(B, seq_len), list(contexts), seq_len=seq_len)
    return torch.stack(out)


def inputs(cfg, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_dim, *GRID, generator=g)
    t = torch.tensor([37.5, 912.25])
    contexts = [torch.randn(n, cfg.text_dim, generator=g) for n in PROMPT_LENS]
    return x, t, contexts


@pytest.mark.parametrize("cfg", [TINY, TINY_48, TINY_NO_NORMS], ids=["head40", "head48", "no-norms"])
def test_parity_with_original(wan_model, cfg):
    ref = original(wan_model, cfg)
    ours = wan_dit.WanDiT(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # the original's names, no renaming
    x, t, contexts = inputs(cfg)
    context = wan_dit.pad_context(contexts, cfg.text_len)
    assert context.shape == (2, cfg.text_len, cfg.text_dim) and context[0, PROMPT_LENS[0]:].abs().max() == 0
    with torch.no_grad():
        want = run_original(ref, x, t, contexts)
        got = ours(x, t, context)
        # batch of one: the original's own (B,) timestep path
        want1 = torch.stack(ref([x[0]], t[:1], [contexts[0]], seq_len=36))
        got1 = ours(x[:1], t[:1], context[:1])
    assert got.dtype == torch.float32 and got.shape == (2, cfg.out_dim, *GRID)
    assert want.abs().mean() > 0.1  # the head is not zero: the comparison sees the whole net
    assert max_abs_diff(got, want) < 1e-5
    assert max_abs_diff(got1, want1) < 1e-5
    assert max_abs_diff(got1[0], got[0]) < 1e-5  # samples do not mix


def test_parity_with_diffusers():
    from diffusers import WanTransformer3DModel

    ours = randomize_(wan_dit.WanDiT(TINY))
    d = wan_dit.dit_config_to_diffusers(TINY)
    theirs = WanTransformer3DModel.from_config(d).eval()
    theirs.load_state_dict(wan_dit.dit_to_diffusers(ours.state_dict()), strict=True)
    assert wan_dit.dit_config_from_diffusers(dict(theirs.config), text_len=TINY.text_len) == TINY
    x, t, contexts = inputs(TINY)
    # diffusers' transformer does not pad the text (its pipeline pads to 512 before the call): give it the padded one
    context = wan_dit.pad_context(contexts, TINY.text_len)
    with torch.no_grad():
        want = theirs(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
        got = ours(x, t, context)
    assert want.abs().mean() > 0.1
    # (diffusers builds the timestep sinusoid in float32, the original and we in float64: no visible difference here)
    assert max_abs_diff(got, want) < 1e-5  # measured 6e-7


# the released 1.3B diffusers transformer config (diffusers scripts/convert_wan_to_diffusers.py, "Wan-T2V-1.3B")
DIFFUSERS_1_3B = {"added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
                  "ffn_dim": 8960, "freq_dim": 256, "in_channels": 16, "num_attention_heads": 12, "num_layers": 30,
                  "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096}


def test_full_size_keys_shapes_and_parameter_count(wan_model):
    from diffusers import WanTransformer3DModel

    cfg = wan_dit.WanDiTConfig()
    with torch.device("meta"):
        sd = wan_dit.WanDiT(cfg).state_dict()
        ref = wan_model.WanModel(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30).state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.items()}
    assert len(sd) == 825
    assert sum(v.numel() for v in sd.values()) == 1_418_996_800

    converted = wan_dit.dit_to_diffusers(sd)
    back = wan_dit.dit_from_diffusers(converted)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)  # identity, nothing copied or reshaped

    d = wan_dit.dit_config_to_diffusers(cfg)
    assert {k: d[k] for k in DIFFUSERS_1_3B} == DIFFUSERS_1_3B
    assert wan_dit.dit_config_from_diffusers(DIFFUSERS_1_3B) == cfg
    with torch.device("meta"):
        theirs = WanTransformer3DModel.from_config(d).state_dict()
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.items()}


def test_diffusers_layout_errors():
    with pytest.raises(KeyError, match="not a diffusers"):
        wan_dit.dit_from_diffusers({"blocks.0.attn2.add_k_proj.weight": torch.zeros(1)})  # image-to-video
    with pytest.raises(KeyError, match="not a WanDiT"):
        wan_dit.dit_to_diffusers({"img_emb.proj.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="image_dim"):
        wan_dit.dit_config_from_diffusers({**DIFFUSERS_1_3B, "image_dim": 1280, "added_kv_proj_dim": 5120})
    with pytest.raises(ValueError, match="qk_norm"):
        wan_dit.dit_config_to_diffusers(TINY_NO_NORMS)


def test_input_checks():
    model = wan_dit.WanDiT(TINY)
    x, t, contexts = inputs(TINY)
    context = wan_dit.pad_context(contexts, TINY.text_len)
    with pytest.raises(AssertionError, match="zero-padded"):
        model(x, t, context[:, :PROMPT_LENS[0]])  # not padded to text_len
    with pytest.raises(AssertionError, match="not divisible"):
        model(x[..., :7], t, context)
    with pytest.raises(AssertionError, match=r"t must be \(B,\)"):
        model(x, t[:1], context)


def test_rope_table_cached_per_grid():
    model = wan_dit.WanDiT(TINY)
    cos, sin = model.rope((3, 3, 4), torch.device("cpu"))
    assert cos.shape == sin.shape == (36, TINY.head_dim // 2) and cos.dtype == torch.float32
    assert model.rope((3, 3, 4), torch.device("cpu"))[0] is cos
    assert model.rope((3, 4, 3), torch.device("cpu"))[0] is not cos
    assert "_rope_cache" not in str(list(model.state_dict()))


def test_gradient_checkpointing_same_loss_and_grads(monkeypatch):
    plain = randomize_(wan_dit.WanDiT(TINY)).train()
    ckpt = copy.deepcopy(plain).set_checkpointing(True)
    x, t, contexts = inputs(TINY)
    context = wan_dit.pad_context(contexts, TINY.text_len)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    n = [0]
    block_forward = wan_dit.WanBlock.forward

    def counted(self, *args):  # (forward hooks do not fire in checkpoint's recomputation: count the calls)
        n[0] += 1
        return block_forward(self, *args)

    monkeypatch.setattr(wan_dit.WanBlock, "forward", counted)
    calls = []
    for model in (plain, ckpt):
        n[0] = 0
        loss = F.mse_loss(model(x, t, context), target)
        loss.backward()
        calls.append((loss.detach(), n[0]))
    (loss_plain, n_plain), (loss_ckpt, n_ckpt) = calls
    assert n_plain == TINY.num_layers and n_ckpt == 2 * TINY.num_layers  # every block recomputed in backward
    assert torch.equal(loss_plain, loss_ckpt)
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert a.grad is not None and a.grad.abs().max() > 0, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-9, msg=name)


def _cuda_autocast_on_cpu(real=torch.amp.autocast):
    """torch.amp.autocast with the original's CUDA regions moved to the CPU: autocast('cuda', dtype=float32) becomes
    autocast off (what it does on a GPU with float32 weights), any other 'cuda' context its CPU twin."""
    def autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
        if device_type == "cuda":
            if dtype == torch.float32:
                return real("cpu", enabled=False)
            device_type = "cpu"
        return real(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
    return autocast


def test_bf16_autocast_close_to_original(wan_model):
    """Under autocast bf16 (how Wan runs: float32 weights, bf16 compute) we stay close to the original.

    The original's float32 regions are `torch.amp.autocast('cuda', ...)` contexts, inert on a CPU: under a plain CPU
    autocast its time embedding comes out bf16 and its own `assert e.dtype == torch.float32` fails (checked first), so
    it cannot be compared as it is. Its CUDA contexts are mapped to the CPU instead (`_cuda_autocast_on_cpu`), which
    runs it with the mixed precision it has on a GPU."""
    ref = original(wan_model, TINY)
    ours = wan_dit.WanDiT(TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, contexts = inputs(TINY)
    context = wan_dit.pad_context(contexts, TINY.text_len)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(AssertionError):
            run_original(ref, x, t, contexts)  # the original as it is: no CPU autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with unittest.mock.patch.object(torch.amp, "autocast", _cuda_autocast_on_cpu()):
                want = run_original(ref, x, t, contexts)
            got = ours(x, t, context)
        exact = ours(x, t, context)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert got.dtype == torch.float32
    assert rel(got, exact) > 1e-3  # bf16 really was used (measured 3e-3: 8-bit mantissas over 2 blocks)
    # The same ops round to bf16 at the same points, so the two bf16 runs agree far more closely than either agrees
    # with float32 (measured 1e-7 relative; only our float32 RoPE, upstream's is float64, can flip a bf16 rounding).
    assert rel(got, want) < 1e-3

    # bf16 weights also run, under autocast (without it, as upstream, float32 activations meet bf16 Linears)
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got_bf16 = ours_bf16(x, t, context)
    assert got_bf16.dtype == torch.float32 and rel(got_bf16, exact) < 2e-2  # measured 4e-3
