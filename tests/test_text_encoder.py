"""Text encoder: parity with open_clip and transformers, tokenizer, placeholder tokens, key maps, round trips, errors.

Run: cd /work/main && python -m pytest -q tests/test_text_encoder.py   (CPU, tiny random models, seconds)
"""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

import layouts
import text_encoder as te
from oracles import max_abs_diff, randomize_
from weights import WeightsError

ROOT = Path(__file__).resolve().parents[1]
TINY = te.TEXT_PRESETS["tiny"]  # width 64, 4 heads, 2 blocks that run, vocab 49408 so the real tokenizer works
PROMPTS = [
    "",  # the unconditional prompt
    "a photo of a dog",
    "A PLL dog runs &amp; jumps, 123! Café  🙂",  # upper case, HTML entity, digits, accents, emoji, double space
    " ".join(["a cat riding a skateboard down the street"] * 12),  # > 77 tokens: truncated
]
# diffusers' text-to-video-ms-1.7b/text_encoder/config.json (modelscope.md §6.1)
HF_MODELSCOPE = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    return te.Tokenizer()


def _tiny_open_clip():
    """A random open_clip CLIP with a 3-block text tower (ModelScope then runs 2) and a token vision tower."""
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=16, width=64, layers=1, head_width=32)
    text = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=3)
    return randomize_(open_clip.model.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text))


@torch.no_grad()
def _open_clip_text(model, tokens, n_blocks):
    """FrozenOpenCLIPEmbedder's encode_with_transformer with open_clip's own modules, written batch-first."""
    assert model.transformer.batch_first  # open_clip >= 2024-07: blocks take (B, T, D); ModelScope's permute is stale
    x = model.token_embedding(tokens) + model.positional_embedding  # (B, 77, D)
    for block in model.transformer.resblocks[:n_blocks]:
        x = block(x, attn_mask=model.attn_mask)  # the (77, 77) -inf-above-diagonal mask
    return model.ln_final(x)


def _tiny_hf():
    torch.manual_seed(0)
    cfg = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=49408, max_position_embeddings=77, hidden_act="gelu")
    return randomize_(CLIPTextModel(cfg))


# -----------------------------------------------------------------------------------------------------------------------
# 1-2. numerical parity


def test_matches_open_clip_penultimate_layer(tmp_path, tokenizer):
    ref = _tiny_open_clip()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ref.state_dict(), path)  # full CLIP: visual.*, text_projection, logit_scale, 3 text blocks
    model = layouts.load_text_encoder(path, TINY)
    tokens = tokenizer(PROMPTS)
    assert tokens[3, -1] == 49407 and (tokens[3] != 0).all()  # the long prompt really is truncated
    with torch.no_grad():
        ours = model(tokens)  # (4, 77, 64)
    diff = max_abs_diff(ours, _open_clip_text(ref, tokens, n_blocks=2))
    print(f"open_clip parity: max |diff| = {diff:.3g}")
    assert ours.shape == (4, 77, 64) and diff <= 1e-5
    # The comparison can tell the layers apart: running all 3 blocks (the 'last' layer) gives something else.
    assert max_abs_diff(ours, _open_clip_text(ref, tokens, n_blocks=3)) > 1e-2


def test_matches_hf_clip_text_model(tmp_path, tokenizer):
    hf = _tiny_hf()
    hf.save_pretrained(tmp_path / "text_encoder")  # transformers 5: config.json + model.safetensors, no prefix
    model = layouts.load_text_encoder(tmp_path / "text_encoder")  # a directory; config from its config.json
    assert model.cfg == TINY
    tokens = tokenizer(PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=tokens).last_hidden_state
        diff = max_abs_diff(model(tokens), ref)
    print(f"HF parity: max |diff| = {diff:.3g}")
    assert diff <= 1e-5
    # A transformers 4 file (diffusers' port): `text_model.` prefix and the old persistent position_ids buffer.
    legacy = {"text_model." + k: v for k, v in hf.state_dict().items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    (tmp_path / "legacy").mkdir()
    torch.save(legacy, tmp_path / "legacy" / "pytorch_model.bin")
    (tmp_path / "legacy" / "config.json").write_text((tmp_path / "text_encoder" / "config.json").read_text())
    with torch.no_grad():
        diff_legacy = max_abs_diff(layouts.load_text_encoder(tmp_path / "legacy" / "pytorch_model.bin")(tokens), ref)
    print(f"HF parity (text_model. prefix): max |diff| = {diff_legacy:.3g}")
    assert diff_legacy <= 1e-5


def test_runs_under_bf16(tokenizer):
    model = randomize_(te.TextEncoder(TINY))
    tokens = tokenizer(PROMPTS[:2])
    with torch.no_grad():
        ref = model(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(tokens)
        half = model.to(torch.bfloat16)(tokens)  # bf16 weights, no autocast
    for out in (auto, half):
        assert out.isfinite().all() and 0 < max_abs_diff(out.float(), ref) < 0.1  # bf16 rounding, not garbage


# -----------------------------------------------------------------------------------------------------------------------
# 3. tokenizer


def test_tokenizer_matches_open_clip(tokenizer):
    empty = tokenizer([""])[0]
    assert empty[:2].tolist() == [49406, 49407] and (empty[2:] == 0).all() and empty.shape == (77,)
    texts = PROMPTS + ["x" * 500, "  many   SPACES\tand\nnewlines ", "<start_of_text> is special", "日本語のテキスト"]
    ours = tokenizer(texts)
    assert ours.dtype == torch.long and ours.shape == (len(texts), 77)
    assert torch.equal(ours, open_clip.tokenize(texts))
    assert torch.equal(tokenizer("a photo of a dog"), tokenizer(["a photo of a dog"]))  # a str is a batch of 1


# -----------------------------------------------------------------------------------------------------------------------
# 4. placeholder tokens


def test_placeholder_token():
    tok = te.Tokenizer()  # not the shared fixture: this test adds words
    model = randomize_(te.TextEncoder(TINY)).requires_grad_(False)
    plain = ["a photo of a dog", ""]
    with torch.no_grad():
        before_tokens, before = tok(plain), model(tok(plain))

    pll = te.add_placeholder_token(tok, model, "<pll>", init_from="dog")
    sks = te.add_placeholder_token(tok, model, "sks")  # a word-like placeholder, initialised from the mean row
    assert (pll, sks) == (49408, 49409) and model.placeholder_embeddings.shape == (2, 64)
    assert tok(["a <PLL> dog"])[0, :5].tolist() == [49406, 320, 49408, 1929, 49407]  # case-insensitive, like BPE text
    assert tok(["sks, asks"])[0, :5].tolist()[:3] == [49406, 49409, 267] and 49409 not in tok(["asks"])[0]
    with pytest.raises(ValueError):
        te.add_placeholder_token(tok, model, "<PLL>")  # already there
    # Prompts without the placeholders: same tokens, bit-identical output.
    with torch.no_grad():
        assert torch.equal(tok(plain), before_tokens) and torch.equal(model(tok(plain)), before)
        # init_from="dog" (one BPE token, id 1929): "<pll>" starts out encoding exactly like "dog".
        assert max_abs_diff(model(tok(["a <pll> runs"])), model(tok(["a dog runs"]))) == 0

    # Gradients reach only the placeholder rows, and only the rows whose id occurs in the batch.
    out = model(tok(["a <pll> dog"]))
    out.square().sum().backward()
    grad = model.placeholder_embeddings.grad
    assert model.token_embedding.weight.grad is None and model.positional_embedding.grad is None
    assert grad[0].abs().sum() > 0 and torch.all(grad[1] == 0)

    # A different row gives a different output for prompts that use it, and nothing else moves.
    with torch.no_grad():
        # (random, not a constant: a constant shift of all D entries is removed by every LayerNorm downstream)
        model.placeholder_embeddings[0] += torch.randn(64, generator=torch.Generator().manual_seed(0))
        assert max_abs_diff(model(tok(["a <pll> dog"])), out) > 1e-3
        assert torch.equal(model(tok(plain)), before)

    # Save / restore: words + rows, onto a fresh pair with the same base weights.
    state = te.placeholder_state(tok, model)
    assert state["words"] == ["<pll>", "sks"] and torch.equal(state["embeddings"], model.placeholder_embeddings)
    tok2, model2 = te.Tokenizer(), te.TextEncoder(TINY)
    base = {k: v for k, v in model.state_dict().items() if k != "placeholder_embeddings"}
    model2.load_state_dict(base, strict=True)  # a fresh model has no placeholder key: base files load strictly
    assert te.load_placeholder_state(state, tok2, model2) == [49408, 49409]
    with torch.no_grad():
        prompt = ["sks and <pll>"]
        assert torch.equal(tok2(prompt), tok(prompt)) and torch.equal(model2(tok2(prompt)), model(tok(prompt)))


# -----------------------------------------------------------------------------------------------------------------------
# 5. full-size model on the meta device


def test_full_size_meta_build_and_key_maps():
    with torch.device("meta"):
        ours = te.TextEncoder(te.TextEncoderConfig())
        clip = open_clip.model.CLIP(**open_clip.get_model_config("ViT-H-14"))
        hf = CLIPTextModel(CLIPTextConfig(**HF_MODELSCOPE))
    sd = ours.state_dict()
    assert sum(v.numel() for v in sd.values()) == 340_387_840 and len(sd) == 280
    assert list(ours.buffers()) == []  # nothing that could be left behind on the meta device
    # Both config sources describe the released model.
    assert open_clip.get_model_config("ViT-H-14")["text_cfg"]["layers"] == 24
    assert (layouts.text_config_from_open_clip("ViT-H-14") == te.TextEncoderConfig()
            == layouts.text_config_from_hf(HF_MODELSCOPE))
    # open_clip file (24 blocks + vision) -> ours: exactly our key set and shapes, the last block dropped.
    clip_sd = clip.state_dict()
    assert sum(v.numel() for v in clip_sd.values()) == 986_109_441  # the released file (modelscope.md §1.1)
    mapped = layouts.text_from_open_clip(clip_sd, 23)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in sd.items()}
    assert any(k.startswith("transformer.resblocks.23.") for k in clip_sd)
    # Ours -> HF: exactly CLIPTextModel's key set and shapes (modulo the `text_model.` prefix), and back.
    hf_sd = hf.state_dict()
    as_hf = layouts.text_to_hf(sd)
    assert all(k.startswith("text_model.") for k in as_hf)
    assert {k.removeprefix("text_model."): v.shape for k, v in as_hf.items()} == {k: v.shape for k, v in hf_sd.items()}
    assert sum(v.numel() for v in hf_sd.values()) == 340_387_840
    assert {k: v.shape for k, v in layouts.text_from_hf(hf_sd).items()} == {k: v.shape for k, v in sd.items()}


# -----------------------------------------------------------------------------------------------------------------------
# 6. round trips


@pytest.mark.parametrize("layout, name", [("hf", "model.safetensors"), ("open_clip", "open_clip_pytorch_model.bin")])
def test_save_load_round_trip(tmp_path, tokenizer, layout, name):
    model = randomize_(te.TextEncoder(TINY))
    te.add_placeholder_token(te.Tokenizer(), model, "<pll>")  # must not end up in the base-weight file
    path = layouts.save_text_encoder(model, tmp_path / name, layout=layout)
    back = layouts.load_text_encoder(path, None if layout == "hf" else TINY)  # hf: config.json written beside the file
    assert back.placeholder_embeddings is None and back.cfg == TINY
    original = layouts.text_to_open_clip(model.state_dict())
    assert back.state_dict().keys() == original.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in original.items())
    with pytest.raises(WeightsError, match="already exists"):
        layouts.save_text_encoder(model, path, layout=layout)
    if layout == "hf":  # the written folder is a real CLIPTextModel folder for transformers too
        hf, info = CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        tokens = tokenizer(PROMPTS[:2])
        with torch.no_grad():
            assert max_abs_diff(hf(input_ids=tokens).last_hidden_state, back(tokens)) <= 1e-5


@pytest.mark.slow
def test_module_does_not_import_transformers():
    code = ("import sys, text_encoder; text_encoder.Tokenizer(); "
            "bad = [m for m in ('transformers', 'diffusers', 'modelscope', 'open_clip') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# -----------------------------------------------------------------------------------------------------------------------
# 7. bad input


def test_errors(tmp_path):
    missing = tmp_path / "nowhere" / "open_clip_pytorch_model.bin"
    with pytest.raises(WeightsError, match=re.escape(str(missing))):
        layouts.load_text_encoder(missing)
    with pytest.raises(ValueError, match="quick_gelu"):
        layouts.text_config_from_hf({**HF_MODELSCOPE, "hidden_act": "quick_gelu"})
    with pytest.raises(ValueError, match="quick_gelu"):  # no hidden_act: CLIPTextConfig's default
        layouts.text_config_from_hf({k: v for k, v in HF_MODELSCOPE.items() if k != "hidden_act"})
    # ... also when it comes from the config.json beside HF weights: the error names that file.
    hf_dir = tmp_path / "hf"
    layouts.save_text_encoder(te.TextEncoder(TINY), hf_dir / "model.safetensors")
    cfg_path = hf_dir / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "hidden_act": "quick_gelu"}))
    with pytest.raises(WeightsError, match=re.escape(str(cfg_path)) + ".*quick_gelu"):
        layouts.load_text_encoder(hf_dir)
    # Not a text encoder at all.
    torch.save({"input_blocks.0.0.weight": torch.zeros(1)}, tmp_path / "unet.pth")
    with pytest.raises(WeightsError, match="not a CLIP text encoder"):
        layouts.load_text_encoder(tmp_path / "unet.pth")
    # The right layout but the wrong config: the strict loader says which key and which shapes.
    torch.save(_tiny_open_clip().state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(WeightsError, match="shape mismatch"):
        layouts.load_text_encoder(tmp_path / "open_clip_pytorch_model.bin", dataclasses.replace(TINY, width=128))
    with pytest.raises(WeightsError, match="missing"):  # a 3-block file cannot feed 4 running blocks
        layouts.load_text_encoder(tmp_path / "open_clip_pytorch_model.bin", dataclasses.replace(TINY, layers=4))
