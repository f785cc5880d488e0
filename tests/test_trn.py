"""Tests for trn.py (TRN multi-scale Jester classifier). Run: python -m pytest -q tests/test_trn.py

Expected numbers were derived from the public bn_inception.yaml (yjxiong/tensorflow-model-zoo.torch) and TRN-pytorch:
69 conv layers (3 stem + 8 four-branch blocks x 7 + 2 reduction blocks x 5), each with bias and a BN
(weight, bias, running_mean, running_var) -> 69 * 6 = 414 backbone tensors; BN-Inception without its 1000-way fc has
10,270,240 parameters (+ 1,025,000 for the fc = the familiar 11.3 M).
"""

import pytest
import torch

import trn

NAMES = ["Doing other things", "Drumming Fingers", "No gesture"] + [f"Class {i}" for i in range(24)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = trn.TRN(num_class=27).eval()
    with torch.no_grad():  # non-trivial BN statistics so a wrong buffer mapping would show up
        for mod in m.modules():
            if isinstance(mod, trn.FrozenBatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
    return m


def save_like_public(model, tmp_path, names=NAMES):
    ckpt = tmp_path / "TRN_jester_RGB_BNInception_TRNmultiscale_segment8_best.pth.tar"
    sd = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": 17, "arch": "BNInception", "state_dict": sd, "best_prec1": 95.3}, ckpt)
    cats = tmp_path / "jester_categories.txt"
    cats.write_text("\n".join(names) + "\n")
    return ckpt, cats


def test_state_dict_matches_upstream_layout(model):
    sd = model.state_dict()
    base = {k: v for k, v in sd.items() if k.startswith("base_model.")}
    assert len(base) == 414 and len(sd) == 414 + 2 + 7 * 4
    assert not any("num_batches_tracked" in k or k.startswith("base_model.fc") for k in sd)
    expected = {
        "base_model.conv1_7x7_s2.weight": (64, 3, 7, 7),
        "base_model.conv1_7x7_s2_bn.running_var": (64,),
        "base_model.conv2_3x3.weight": (192, 64, 3, 3),
        "base_model.inception_3a_1x1.weight": (64, 192, 1, 1),
        "base_model.inception_3a_1x1_bn.running_mean": (64,),
        "base_model.inception_3a_pool_proj.weight": (32, 192, 1, 1),
        "base_model.inception_3c_3x3.weight": (160, 128, 3, 3),
        "base_model.inception_3c_double_3x3_2.bias": (96,),
        "base_model.inception_4a_1x1.weight": (224, 576, 1, 1),
        "base_model.inception_4e_double_3x3_2.weight": (256, 256, 3, 3),
        "base_model.inception_5a_1x1.weight": (352, 1056, 1, 1),
        "base_model.inception_5b_double_3x3_1.weight": (224, 192, 3, 3),
        "base_model.inception_5b_pool_proj.weight": (128, 1024, 1, 1),
        "base_model.inception_5b_pool_proj_bn.weight": (128,),
        "new_fc.weight": (256, 1024),
        "consensus.fc_fusion_scales.0.1.weight": (256, 8 * 256),
        "consensus.fc_fusion_scales.6.1.weight": (256, 2 * 256),
        "consensus.fc_fusion_scales.3.3.weight": (27, 256),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "base_model.inception_3c_1x1.weight" not in sd and "base_model.inception_4e_pool_proj.weight" not in sd
    n_base = sum(p.numel() for p in model.base_model.parameters())
    assert n_base == 10_270_240
    n_head = 1024 * 256 + 256 + sum((d * 256 * 256 + 256) + (256 * 27 + 27) for d in range(8, 1, -1))
    assert sum(p.numel() for p in model.parameters()) == n_base + n_head == 12_876_765


def test_backbone_spatial_sizes(model):
    x = torch.zeros(1, 3, 224, 224)
    bb = model.base_model
    with torch.no_grad():
        h = bb.pool1_3x3_s2(bb.conv1_7x7_s2(x))
        assert h.shape[-2:] == (56, 56)  # ceil-mode max pool: 112 -> 56
    # the 224 path itself is exercised by the end-to-end test below; the feature size:
    with torch.no_grad():
        assert bb(torch.zeros(2, 3, 64, 64)).shape == (2, 1024)


def test_load_public_layout_matches_direct_forward(model, tmp_path):
    ckpt, cats = save_like_public(model, tmp_path)
    clf = trn.load_trn(ckpt, cats, seed=3)
    assert clf.class_names == NAMES
    x = torch.randn(2, 24, 64, 64) * 50
    with torch.no_grad():
        ref, got = model(x, seed=3), clf.model(x, seed=3)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # end to end at the real 224 resolution: predict == model(preprocess(videos))
    videos = torch.randint(0, 256, (1, 3, 8, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    logits = clf.predict(videos)
    assert logits.shape == (1, 27) and torch.isfinite(logits).all()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(trn.preprocess(videos), seed=3))


def test_num_batches_tracked_keys_are_dropped(model, tmp_path):
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    sd["module.base_model.conv1_7x7_s2_bn.num_batches_tracked"] = torch.tensor(5)
    path = tmp_path / "v04.pth.tar"
    torch.save({"epoch": 1, "arch": "BNInception", "state_dict": sd, "best_prec1": 1.0}, path)
    cats = tmp_path / "c.txt"
    cats.write_text("\n".join(NAMES))
    trn.load_trn(path, cats)


def test_relations_are_deterministic(model):
    rel = model.consensus
    assert rel.scales == [8, 7, 6, 5, 4, 3, 2]
    a, b = rel.choose_relations(0), rel.choose_relations(0)
    assert a == b and a[0] == [tuple(range(8))]
    assert all(len(r) == 3 and len(set(r)) == 3 for r in a[1:])
    assert any(rel.choose_relations(1)[i] != a[i] for i in range(1, 7))
    x = torch.randn(2, 24, 64, 64) * 50
    with torch.no_grad():
        y0, y0b, y1 = model(x, seed=0), model(x, seed=0), model(x, seed=1)
    assert torch.equal(y0, y0b)
    assert not torch.allclose(y0, y1)


def test_segment_indices():
    assert trn.segment_indices(16) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert trn.segment_indices(8) == list(range(8))
    assert trn.segment_indices(36) == [2, 6, 11, 15, 20, 24, 29, 33]  # int(2.25 + 4.5k)


def test_preprocess_picks_frames_bgr_and_means():
    # frame t has value t in every channel except R=200, G=100 -> picks + channel order are visible
    v = torch.zeros(1, 3, 16, 256, 256, dtype=torch.uint8)
    v[:, 0], v[:, 1] = 200, 100
    v[:, 2] = torch.arange(16, dtype=torch.uint8).view(16, 1, 1)
    x = trn.preprocess(v)
    assert x.shape == (1, 24, 224, 224) and x.dtype == torch.float32
    x = x.view(8, 3, 224, 224)
    assert torch.equal(x[:, 0, 0, 0], torch.tensor([1, 3, 5, 7, 9, 11, 13, 15.]) - 104)  # B channel first
    assert (x[:, 1] == 100 - 117).all() and (x[:, 2] == 200 - 128).all()


def test_preprocess_resize_and_center_crop():
    v = torch.full((2, 3, 8, 100, 176), 50, dtype=torch.uint8)  # Jester-sized: short side 100 -> 256x450 -> crop
    x = trn.preprocess(v)
    assert x.shape == (2, 24, 224, 224)
    assert torch.allclose(x.view(2, 8, 3, 224, 224)[:, :, 0], torch.tensor(50 - 104.))  # constant stays constant
    # a left-right ramp: the centre crop of a 256x512 frame starts at column 144
    w = torch.arange(512).view(1, 1, 1, 1, 512).expand(1, 3, 8, 256, 512).div(2).to(torch.uint8)
    x = trn.preprocess(w).view(8, 3, 224, 224)
    assert x[0, 0, 0, 0] == 144 // 2 - 104 and x[0, 0, 0, -1] == (144 + 223) // 2 - 104


def test_bad_inputs(model, tmp_path):
    ckpt, cats = save_like_public(model, tmp_path)
    with pytest.raises(ValueError, match="at least 8 frames.*got 5"):
        trn.preprocess(torch.zeros(1, 3, 5, 256, 256, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        trn.preprocess(torch.zeros(1, 3, 8, 256, 256))
    missing = tmp_path / "nope.pth.tar"
    with pytest.raises(ValueError, match="nope.pth.tar"):
        trn.load_trn(missing, cats)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        trn.load_trn(ckpt, tmp_path / "nope.txt")
    bad_cats = tmp_path / "ten.txt"
    bad_cats.write_text("\n".join(NAMES[:10]))
    with pytest.raises(ValueError, match=r"27 classes.*ten.txt.*10 names"):
        trn.load_trn(ckpt, bad_cats)
    unet = tmp_path / "unet.pth"  # a foreign state dict (UNet-like keys)
    torch.save({"conv_in.weight": torch.zeros(320, 4, 3, 3), "time_embedding.linear_1.weight": torch.zeros(1280, 320)},
               unet)
    with pytest.raises(ValueError, match=r"(?s)unet.pth.*not fit TRN.*missing"):
        trn.load_trn(unet, cats)


def test_metrics_uses_trn_through_its_classifier_interface(model, tmp_path):
    """metrics.load_classifier (evaluate.py --classifier-type auto) picks TRN for a .pth.tar, matches the target class
    by name and reports the same top-1 as the model's own predict."""
    import metrics

    ckpt, cats = save_like_public(model, tmp_path)
    clf = metrics.load_classifier(str(ckpt), str(cats), "auto", device="cpu")
    videos = torch.randint(0, 256, (2, 3, 8, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    top1, probs = metrics.motion_predictions(clf, videos)
    assert top1.tolist() == model_top1(clf, videos)
    assert metrics.class_index(clf.class_names, "Drumming Fingers") == 1
    with pytest.raises(metrics.EvalError, match="only 5 frames"):
        metrics.motion_predictions(clf, videos[:, :, :5])


def model_top1(clf, videos):
    return clf.predict(videos).argmax(1).tolist()
