"""Wan's umT5-XXL text encoder: parity with the original Wan `T5Encoder` and transformers' `UMT5EncoderModel`, the
prompt path (cleaning, tokenizer, trim + zero-pad), the full-size key sets and the transformers rename table, errors.

Run: cd /work/main && python -m pytest -q tests/test_wan_t5.py   (CPU, tiny random models, seconds)
"""

import dataclasses
import sys

import pytest
import torch
from oracles import max_abs_diff, randomize_, tiny_umt5_tokenizer, wan_module
from transformers import UMT5Config, UMT5EncoderModel

import wan_t5

TINY = wan_t5.UMT5_PRESETS["tiny"]  # vocab 64, dim 32, 4 heads, ffn 48, 2 layers, 8 buckets (per layer)
# the Diffusers release's text_encoder/config.json (Wan-AI/Wan2.1-T2V-1.3B-Diffusers), the fields that matter
DIFFUSERS_TEXT_ENCODER = {
    "architectures": ["UMT5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "dense_act_fn": "gelu_new",
    "feed_forward_proj": "gated-gelu", "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "umt5",
    "num_heads": 64, "num_layers": 24, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "vocab_size": 256384, "tie_word_embeddings": False, "dropout_rate": 0.1, "pad_token_id": 0, "eos_token_id": 1,
}
PROMPTS = [
    "a photo of a dog",
    "A  dog &amp; a cat\t on\n\nthe   mat.",  # upper case, HTML entity, tab / newlines / double spaces
    "cafÃ© dog",  # mojibake (UTF-8 read as Latin-1): ftfy repairs it to "café dog"
    "&amp;lt;the cat&amp;gt; \u201con\u201d the mat",  # doubly escaped HTML (unescaped twice), curly quotes
    "\uff54\uff48\uff45 \uff44\uff4f\uff47",  # full-width letters
    "the dog\x1cthe cat",  # a C0 control character (whitespace to `re`, not to `regex`): ftfy removes it
    " ".join(["the cat on the mat"] * 150),  # ~750 tokens: truncated to 511 + </s>
    "",  # the empty (unconditional) prompt: just </s>
    "zebra! \U0001f642 \u03a9mega",  # pieces outside the tiny vocabulary
]


@pytest.fixture(scope="module")
def t5():
    return wan_module("modules.t5")


def _original_tiny(t5, seed=0):
    """The original encoder, built as `umt5_xxl(encoder_only=True)` builds it, at the tiny size; random weights."""
    torch.manual_seed(seed)
    ref = t5.T5Encoder(vocab=TINY.vocab_size, dim=TINY.dim, dim_attn=TINY.dim_attn, dim_ffn=TINY.dim_ffn,
                       num_heads=TINY.num_heads, num_layers=TINY.num_layers, num_buckets=TINY.num_buckets,
                       shared_pos=False, dropout=0.1)
    return randomize_(ref, seed)  # eval(): upstream's dropout is the identity, as when Wan runs it


def _ours_from(ref):
    model = wan_t5.UMT5Encoder(TINY)
    model.load_state_dict(ref.state_dict(), strict=True)  # the original names: no renaming
    return model.eval()


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _batch(L=20, lengths=(20, 11, 1), seed=0):
    """3 right-padded sequences; L=20 reaches every bucket of the tiny table (exact, logarithmic, capped)."""
    ids = torch.randint(3, TINY.vocab_size, (len(lengths), L), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()  # (3, L)
    return ids * mask, mask  # pad id 0 after each sequence


# -----------------------------------------------------------------------------------------------------------------------
# tiny tokenizers: a small SentencePiece Unigram model in a tokenizer.json, like google/umt5-xxl's


@pytest.fixture(scope="module")
def umt5_tokenizer_dir(tmp_path_factory):
    return tiny_umt5_tokenizer(tmp_path_factory.mktemp("tok") / "umt5-xxl", "umt5")


# -----------------------------------------------------------------------------------------------------------------------
# 1. parity with the original Wan code


def test_buckets_match_original_full_size(t5):
    # the released geometry (32 buckets, max distance 128) over every distance a 512-token prompt has
    ref = t5.T5RelativeEmbedding(32, 64, bidirectional=True)
    L = 512
    rel = torch.arange(L)[None] - torch.arange(L)[:, None]
    ours = wan_t5.relative_position_buckets(L, 32, 128)
    assert torch.equal(ours, ref._relative_position_bucket(rel))
    assert ours.min() == 0 and ours.max() == 31 and ours[0, 1] == 17 and ours[1, 0] == 1  # later keys: upper half


def test_matches_original_encoder(t5):
    ref = _original_tiny(t5)
    model = _ours_from(ref)
    ids, mask = _batch()
    with torch.no_grad():
        out, expected = model(ids, mask), ref(ids, mask)
        diff = max_abs_diff(out, expected)  # every position, padding rows included: both compute them the same way
        diff_nomask = max_abs_diff(model(ids), ref(ids))
    print(f"original T5Encoder parity: max |diff| = {diff:.3g} (masked), {diff_nomask:.3g} (no mask)")
    assert out.shape == (3, 20, TINY.dim) and diff <= 1e-5 and diff_nomask <= 1e-5  # measured 1.0e-06, 1.0e-06
    # the test can see the mask and each layer's own bias table
    with torch.no_grad():
        assert max_abs_diff(model(ids), expected) > 1e-2
        model.blocks[1].pos_embedding.embedding.weight.copy_(model.blocks[0].pos_embedding.embedding.weight)
        assert max_abs_diff(model(ids, mask), expected) > 1e-2


def test_encode_prompts_matches_original_trim_and_pad(t5, umt5_tokenizer_dir):
    ref = _original_tiny(t5, seed=1)
    model = _ours_from(ref)
    ours = wan_t5.encode_prompts(model, wan_t5.UMT5Tokenizer(umt5_tokenizer_dir), PROMPTS, text_len=512)
    # upstream: T5EncoderModel.__call__ (tokenize, encode with the mask, trim to each length), then WanModel.forward
    # zero-pads every context back to text_len
    tok = wan_module("modules.tokenizers").HuggingfaceTokenizer(name=str(umt5_tokenizer_dir), seq_len=512,
                                                                clean="whitespace")
    ids, mask = tok(PROMPTS, return_mask=True, add_special_tokens=True)
    seq_lens = mask.gt(0).sum(dim=1).long()
    with torch.no_grad():
        trimmed = [u[:v] for u, v in zip(ref(ids, mask), seq_lens)]
    expected = torch.stack([torch.cat([u, u.new_zeros(512 - u.size(0), u.size(1))]) for u in trimmed])
    diff = max_abs_diff(ours, expected)
    print(f"encode_prompts vs original trim + pad: max |diff| = {diff:.3g}")
    # measured 5.6e-06, on the 512-token prompt (float32 sums over 512 keys); ~1e-6 on the others
    assert ours.shape == (len(PROMPTS), 512, TINY.dim) and diff <= 1e-5
    assert seq_lens.tolist()[-3:-1] == [512, 1]  # truncated prompt fills the context, the empty one is just </s>
    for row, n in zip(ours, seq_lens.tolist()):
        assert torch.all(row[n:] == 0) and row[n - 1].abs().sum() > 0  # exact zeros after </s>, features up to it


def test_bf16_follows_original(t5):
    # Wan runs the encoder in bfloat16 (t5_dtype). Both keep float32 norm statistics and a float32 softmax; they round
    # the scores and the tanh-GELU differently, so agreement is at bf16 resolution, not bit-exact.
    ref = _original_tiny(t5).to(torch.bfloat16)
    model = _ours_from(ref).to(torch.bfloat16)
    ids, mask = _batch()
    with torch.no_grad():
        out, expected, exact = model(ids, mask), ref(ids, mask), _ours_from(_original_tiny(t5))(ids, mask)
    rel = max_abs_diff(out.float(), expected.float()) / expected.float().abs().max().item()
    print(f"bf16 vs original bf16: max |diff| / max |out| = {rel:.3g}")
    assert out.dtype == expected.dtype == torch.bfloat16 and rel < 2e-2  # measured 1.2e-02
    # and near the float32 result: measured 8.3e-03 (upstream's bf16: 1.0e-02)
    assert max_abs_diff(out.float(), exact) / exact.abs().max().item() < 5e-2


def test_fp16_clamp_matches_original(t5):
    big = torch.finfo(torch.float16).max - 500  # inside the clamped band (max - 1000, max]
    for values in ([1.0, big, -big], [1.0, big, float("inf"), -float("inf")]):
        x = torch.tensor(values, dtype=torch.float16)
        assert torch.equal(wan_t5._clamp_fp16(x), t5.fp16_clamp(x.clone()))  # clamps only if there is an inf
    assert wan_t5._clamp_fp16(torch.tensor([float("inf")], dtype=torch.bfloat16)).isinf().all()  # bf16: untouched


# -----------------------------------------------------------------------------------------------------------------------
# 2. parity with transformers (the Diffusers release's text_encoder)


def _hf_model(cfg):
    return UMT5EncoderModel(UMT5Config(**wan_t5.umt5_config_to_hf(cfg)))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_transformers_umt5(t5, attn):
    model = _ours_from(_original_tiny(t5, seed=2))
    hf = _hf_model(TINY)
    hf.load_state_dict(wan_t5.umt5_to_hf(model.state_dict()), strict=True)
    hf.set_attn_implementation(attn)
    hf.eval()
    ids, mask = _batch(seed=2)
    with torch.no_grad():
        diff = max_abs_diff(model(ids, mask), hf(input_ids=ids, attention_mask=mask).last_hidden_state)
    # all positions: transformers masks padding keys only (bidirectional mask), so padded query rows agree too
    print(f"transformers UMT5EncoderModel ({attn}) parity: max |diff| = {diff:.3g}")
    assert diff <= 1e-5  # measured 4.8e-07 (sdpa), 7.8e-07 (eager)


def test_config_translation():
    assert wan_t5.umt5_config_from_hf(DIFFUSERS_TEXT_ENCODER) == wan_t5.UMT5Config()  # the release == our default
    for cfg in (wan_t5.UMT5Config(), TINY, dataclasses.replace(TINY, dim_attn=64, max_distance=64, eps=1e-5)):
        assert wan_t5.umt5_config_from_hf(wan_t5.umt5_config_to_hf(cfg)) == cfg
        hf = UMT5Config(**wan_t5.umt5_config_to_hf(cfg))  # transformers accepts it and derives the gated tanh-GELU
        assert hf.is_gated_act and hf.dense_act_fn == "gelu_new" and hf.d_kv * hf.num_heads == cfg.dim_attn
    with pytest.raises(ValueError, match="gated-gelu"):
        wan_t5.umt5_config_from_hf({**DIFFUSERS_TEXT_ENCODER, "feed_forward_proj": "relu"})


# -----------------------------------------------------------------------------------------------------------------------
# 3. full size, on the meta device


def test_full_size_keys_match_original_and_transformers(t5):
    with torch.device("meta"):
        ours = wan_t5.UMT5Encoder()
        hf = _hf_model(wan_t5.UMT5Config())
    # the original builder, as T5EncoderModel calls it (it builds inside `with torch.device(device)`)
    original = t5.umt5_xxl(encoder_only=True, return_tokenizer=False, device="meta")
    sd, ref_sd, hf_sd = ours.state_dict(), original.state_dict(), hf.state_dict()
    assert _shapes(sd) == _shapes(ref_sd)  # = the keys of models_t5_umt5-xxl-enc-bf16.pth: it loads strictly
    assert len(sd) == 242 and sum(v.numel() for v in sd.values()) == 5_680_910_336
    assert sum(p.numel() for p in original.parameters()) == 5_680_910_336 == sum(p.numel() for p in hf.parameters())
    assert list(ours.buffers()) == []  # nothing that could be left behind on the meta device

    # transformers: 243 keys, the tied input embedding listed under both names
    to_hf = wan_t5.umt5_to_hf(sd)
    assert _shapes(to_hf) == _shapes(hf_sd) and len(hf_sd) == 243 and hf.shared.weight is hf.encoder.embed_tokens.weight
    assert to_hf[wan_t5.HF_TIED] is to_hf["shared.weight"]
    # exact inverses: every tensor passes through untouched, in both directions
    back = wan_t5.umt5_from_hf(to_hf)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)
    again = wan_t5.umt5_to_hf(wan_t5.umt5_from_hf(hf_sd))
    assert set(again) == set(hf_sd) and all(again[k] is hf_sd[k] for k in hf_sd if k != wan_t5.HF_TIED)
    assert again[wan_t5.HF_TIED] is hf_sd["shared.weight"]
    # a saved file usually has only one of the tied names; an unknown key is an error
    only_shared = {k: v for k, v in hf_sd.items() if k != wan_t5.HF_TIED}
    only_tied = {k: v for k, v in hf_sd.items() if k != "shared.weight"}
    assert set(wan_t5.umt5_from_hf(only_shared)) == set(sd) == set(wan_t5.umt5_from_hf(only_tied))
    with pytest.raises(KeyError, match="lm_head"):
        wan_t5.umt5_from_hf({**hf_sd, "lm_head.weight": hf_sd["shared.weight"]})


# -----------------------------------------------------------------------------------------------------------------------
# 4. prompt cleaning and tokenizer


def test_clean_prompt_matches_original():
    tok = wan_module("modules.tokenizers")
    for text in PROMPTS:
        assert wan_t5.clean_prompt(text) == tok.whitespace_clean(tok.basic_clean(text))
    assert wan_t5.clean_prompt(PROMPTS[1]) == "A dog & a cat on the mat."
    assert wan_t5.clean_prompt(PROMPTS[2]) == "café dog"


@pytest.mark.parametrize("variant", ["umt5", "verbatim"])
def test_tokenizer_matches_original(tmp_path, variant):
    path = tiny_umt5_tokenizer(tmp_path / variant, variant)
    ref = wan_module("modules.tokenizers").HuggingfaceTokenizer(name=str(path), seq_len=512, clean="whitespace")
    expected_ids, expected_mask = ref(PROMPTS, return_mask=True, add_special_tokens=True)  # T5EncoderModel's call
    ids, mask = wan_t5.UMT5Tokenizer(path, seq_len=512)(PROMPTS)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (len(PROMPTS), 512)
    assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    # the cases are really exercised: truncation keeps </s> last, "" is </s> alone, most pieces are known
    n = mask.sum(1)
    assert n[6] == 512 and ids[6, -1] == 1 and n[7] == 1 and ids[7, 0] == 1 and (ids[n > 1] == 2).float().mean() < 0.1
    assert ids[0, :n[0]].tolist() == [4, 5, 6, 4, 7, 1]  # ▁a ▁photo ▁of ▁a ▁dog </s>
    # a file given directly, a single string, and a shorter length
    single, single_mask = wan_t5.UMT5Tokenizer(path / "tokenizer.json")(PROMPTS[0], seq_len=8)
    assert single.tolist() == [[4, 5, 6, 4, 7, 1, 0, 0]] and single_mask.tolist() == [[1] * 6 + [0] * 2]


def test_tokenizer_errors(monkeypatch, umt5_tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        wan_t5.UMT5Tokenizer(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the package were not installed
    with pytest.raises(ImportError, match="pip install tokenizers"):
        wan_t5.UMT5Tokenizer(umt5_tokenizer_dir)
