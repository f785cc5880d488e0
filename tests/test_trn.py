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
    x = torch.randn(1, 24, 32, 32) * 50  # small: the check is the loaded weights, not the resolution
    with torch.no_grad():
        ref, got = model(x, seed=3), clf.model(x, seed=3)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


class Recorder(torch.nn.Module):
    """Stand-in for TRN in TRNClassifier: records each (input, seed) and returns logits read off the input, so the
    expected output is known without running BN-Inception at 224 (seconds per frame on this CPU): class k scores 1
    where k = (B value of segment 0's top-left pixel + 104) mod 27, every other class 0."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, seed=0):
        self.calls.append((x.clone(), seed))
        k = (x[:, 0, 0, 0] + 104).round().long() % 27
        return torch.nn.functional.one_hot(k, 27).float()


def hand_input(video):
    """uint8 (3, 16, 256, 288) RGB -> TRN input (24, 224, 224) built here, not by trn.preprocess: frames 1, 3, ..., 15
    (segment centres), rows 16..239, columns 32..255 (centre crop, no resize: the short side is already 256), channels
    B, G, R minus (104, 117, 128), stacked segment-major on channels."""
    v = video.numpy().astype("float32")
    planes = [torch.from_numpy(v[c, t, 16:240, 32:256] - mean)
              for t in range(1, 16, 2) for c, mean in ((2, 104.0), (1, 117.0), (0, 128.0))]
    return torch.stack(planes)


def test_predict_feeds_the_model_the_published_test_input():
    """TRNClassifier.predict: each batch is the hand-built TRN test input, the classifier's seed is passed, batches
    are concatenated in video order."""
    g = torch.Generator().manual_seed(0)
    videos = torch.randint(0, 256, (3, 3, 16, 256, 288), dtype=torch.uint8, generator=g)
    rec = Recorder()
    clf = trn.TRNClassifier(rec, NAMES, seed=3, batch_size=2)
    logits = clf.predict(videos)
    assert [tuple(x.shape) for x, _ in rec.calls] == [(2, 24, 224, 224), (1, 24, 224, 224)]
    assert [seed for _, seed in rec.calls] == [3, 3]
    got = torch.cat([x for x, _ in rec.calls])
    for i in range(3):
        torch.testing.assert_close(got[i], hand_input(videos[i]), rtol=0, atol=0)
    want = [int(videos[i, 2, 1, 16, 32]) % 27 for i in range(3)]  # Recorder: B of frame 1 at row 16, column 32
    assert logits.argmax(1).tolist() == want and logits.shape == (3, 27)


def test_num_batches_tracked_keys_are_dropped(model, tmp_path):
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    sd["module.base_model.conv1_7x7_s2_bn.num_batches_tracked"] = torch.tensor(5)
    path = tmp_path / "v04.pth.tar"
    torch.save({"epoch": 1, "arch": "BNInception", "state_dict": sd, "best_prec1": 1.0}, path)
    cats = tmp_path / "c.txt"
    cats.write_text("\n".join(NAMES))
    clf = trn.load_trn(path, cats)
    got = clf.model.state_dict()
    assert not any("num_batches_tracked" in k for k in got) and got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())  # the file's tensors, not a fresh init
    x = torch.randn(1, 24, 32, 32) * 50
    with torch.no_grad():
        assert torch.equal(clf.model(x), model(x))


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
    assert isinstance(clf, trn.TRNClassifier) and clf.class_names == NAMES
    assert all(torch.equal(clf.model.state_dict()[k], v) for k, v in model.state_dict().items())
    # top-1 through motion_predictions, with the model replaced by one whose answer is known (see Recorder): video i
    # is constant grey 20 + 10 i, so its class is (20 + 10 i) mod 27 -> 20, 3 (a full TRN at 224 takes ~10 s here)
    clf.model = Recorder()
    videos = torch.stack([torch.full((3, 8, 256, 256), 20 + 10 * i, dtype=torch.uint8) for i in range(2)])
    top1, probs = metrics.motion_predictions(clf, videos)
    assert top1.tolist() == [20, 3] and probs.shape == (2, 27)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert probs[0, 20] == probs.max() and probs[0, 20] > probs[0, 0]
    assert metrics.class_index(clf.class_names, "Drumming Fingers") == 1
    with pytest.raises(metrics.EvalError, match="only 5 frames"):
        metrics.motion_predictions(clf, videos[:, :, :5])


# -----------------------------------------------------------------------------------------------------------------------
# independent oracles: Cadene's pretrainedmodels BNInception (the graph of the Caffe model the TRN checkpoint
# came from, same layer names) for the backbone; the TRN paper's multi-scale relation (Zhou et al. 2018) for the head


def reference_bninception():
    """pretrainedmodels.models.bninception.BNInception, loaded from its file: the package's __init__ imports its
    dataset helpers, which need `six` (and more) that this venv does not have; the model file needs only torch."""
    import importlib.util

    spec = importlib.util.find_spec("pretrainedmodels")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pretrainedmodels is not installed (requirements-test.txt)")
    path = f"{next(iter(spec.submodule_search_locations))}/models/bninception.py"
    mod_spec = importlib.util.spec_from_file_location("_ref_bninception", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.BNInception(num_classes=1000)


def test_backbone_equals_pretrainedmodels_bninception(model):
    """trn.BNInception == pretrainedmodels' BNInception (independent transcription of bn_inception.yaml) on the same
    random weights and the same BGR, 0..255, mean-subtracted input: every one of our 414 tensors has a same-named,
    same-shaped tensor there (it adds only num_batches_tracked and its 1000-way last_linear); the 1024-d pooled
    features agree at 224 (its AvgPool2d(7) global pool vs our mean over the 7x7 map). One frame: ~2-5 s on 2 cores."""
    ref = reference_bninception().eval()
    ours = model.base_model.state_dict()
    theirs = ref.state_dict()
    extra = {k for k in theirs if k.endswith("num_batches_tracked") or k.startswith("last_linear.")}
    assert set(theirs) - extra == set(ours)
    for k, v in ours.items():
        assert theirs[k].shape == v.shape, k
    ref.load_state_dict({**theirs, **ours}, strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 224, 224, generator=g) * 255 - torch.tensor(trn.BGR_MEAN).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref.global_pool(ref.features(x.clone())).flatten(1)  # clone: its ReLUs are in place
        got = model.base_model(x)
        assert want.shape == got.shape == (1, 1024) and want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_relation_head_is_the_published_multiscale_relation():
    """MultiScaleTRN(V) = sum over scales d of sum over the chosen ordered d-frame tuples (i1 < ... < id) of
    h_d(g_d(f_i1, ..., f_id)), with g_d/h_d = ReLU -> Linear(d*k, bottleneck) -> ReLU -> Linear(bottleneck, classes)
    (TRNmodule.py's fc_fusion_scales). 3 frames of 1-d features, 2 classes: scale 3 = (0, 1, 2); scale 2 = all 3
    pairs (C(3, 2) = 3 = subsample_num). Expected value computed by hand in plain Python."""
    rel = trn.RelationModuleMultiScale(num_class=2, num_frames=3, feature_dim=1, bottleneck=1)
    assert rel.scales == [3, 2]
    chosen = rel.choose_relations(0)
    assert chosen[0] == [(0, 1, 2)] and sorted(chosen[1]) == [(0, 1), (0, 2), (1, 2)]
    w1 = {3: [1.0, 2.0, -3.0], 2: [2.0, -1.0]}  # asymmetric: frame order inside a tuple matters
    b1 = {3: 0.5, 2: 1.0}
    w2 = {3: [1.0, -2.0], 2: [0.5, 3.0]}
    b2 = {3: [0.0, 1.0], 2: [-1.0, 0.25]}
    with torch.no_grad():
        for fc, d in zip(rel.fc_fusion_scales, rel.scales):
            fc[1].weight.copy_(torch.tensor([w1[d]]))
            fc[1].bias.fill_(b1[d])
            fc[3].weight.copy_(torch.tensor(w2[d]).view(2, 1))
            fc[3].bias.copy_(torch.tensor(b2[d]))
    f = [1.0, -2.0, 0.5]
    # scale 3, (f0, f1, f2) -> ReLU (1, 0, 0.5) -> 1*1 + 2*0 - 3*0.5 + 0.5 = 0 -> ReLU 0 -> bias (0, 1)
    # scale 2, (0, 1): (1, 0) -> 2 - 0 + 1 = 3 -> (1.5 - 1, 9 + 0.25) = (0.5, 9.25)
    #          (0, 2): (1, 0.5) -> 2 - 0.5 + 1 = 2.5 -> (1.25 - 1, 7.5 + 0.25) = (0.25, 7.75)
    #          (1, 2): (0, 0.5) -> 0 - 0.5 + 1 = 0.5 -> (0.25 - 1, 1.5 + 0.25) = (-0.75, 1.75)
    want = [0.0 + 0.5 + 0.25 - 0.75, 1.0 + 9.25 + 7.75 + 1.75]  # (0.0, 19.75)
    plain = [0.0, 0.0]  # the same sum, computed generically in plain Python
    for d, tuples in zip(rel.scales, [[(0, 1, 2)], [(0, 1), (0, 2), (1, 2)]]):
        for t in tuples:
            h = max(sum(w * max(f[i], 0.0) for w, i in zip(w1[d], t)) + b1[d], 0.0)  # ReLU, Linear, ReLU
            plain = [p + w2[d][c] * h + b2[d][c] for c, p in enumerate(plain)]
    assert plain == want
    got = rel(torch.tensor(f).view(1, 3, 1), seed=0)
    assert got.tolist() == [want]
    # the full module: each scale's tuples are distinct ordered subsets of the 8 frames, 3 per scale below 8
    full = trn.RelationModuleMultiScale(num_class=27)
    for seed in range(3):
        for d, tuples in zip(full.scales, full.choose_relations(seed)):
            assert len(tuples) == (1 if d == 8 else 3) and len(set(tuples)) == len(tuples)
            assert all(len(t) == d and list(t) == sorted(set(t)) and 0 <= t[0] and t[-1] < 8 for t in tuples)
