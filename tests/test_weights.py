"""Safe weight reading: legacy Lightning pickles load without pytorch_lightning, malicious pickles run nothing."""

import os
import sys
import types

import numpy as np
import pytest
import torch

from weights import WeightsError, read_state_dict, save_state_dict


class _Payload:
    """Pickles to a call of os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _fake_lightning_checkpoint(path):
    """A checkpoint shaped like VQGAN_autoencoder.pth: Lightning callback + numpy scalar globals around the tensors."""
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = np.float64(0.5)  # pickles via numpy.core.multiarray.scalar + _codecs.encode

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__]
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[mod.__name__] = mod
    try:
        sd = {"first_stage_model.conv.weight": torch.arange(6.0).reshape(2, 3), "model.x": torch.ones(2)}
        torch.save({"state_dict": sd, "callbacks": {"ModelCheckpoint": ModelCheckpoint()}, "epoch": 3}, path)
    finally:
        for name in names:
            sys.modules.pop(name, None)
    return sd


def test_weights_only_refuses_it_but_we_read_lightning_checkpoint(tmp_path):
    path = tmp_path / "VQGAN_autoencoder.pth"
    sd = _fake_lightning_checkpoint(path)
    assert "pytorch_lightning" not in sys.modules
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # the reason a restricted unpickler is needed at all
    got = read_state_dict(path)
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert "pytorch_lightning" not in sys.modules  # nothing was imported


def test_malicious_reduce_is_neutralised(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(3)}, "hook": _Payload(marker)}, path)
    got = read_state_dict(path)
    assert not marker.exists(), "the payload ran"
    assert torch.equal(got["w"], torch.ones(3))
    # a pickle that is only a payload: refused with a message naming the file, still nothing runs
    torch.save(_Payload(marker), tmp_path / "only_evil.bin")
    with pytest.raises(WeightsError, match="only_evil.bin"):
        read_state_dict(tmp_path / "only_evil.bin")
    assert not marker.exists()


def test_legacy_non_zip_pickle_and_bad_files(tmp_path):
    sd = {"a": torch.randn(2, 2)}
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(tmp_path / "legacy.bin")["a"], sd["a"])
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty.pth: file is empty"):
        read_state_dict(tmp_path / "empty.pth")
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(WeightsError, match="junk.pth"):
        read_state_dict(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(WeightsError, match="junk.safetensors: not a valid safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")


def test_save_is_atomic_and_never_overwrites(tmp_path):
    sd = {"a": torch.randn(3)}
    path = save_state_dict(sd, tmp_path / "w.safetensors", metadata={"step": 3})
    with pytest.raises(WeightsError, match="refusing to overwrite"):
        save_state_dict({"a": torch.zeros(3)}, path)
    assert torch.equal(read_state_dict(path)["a"], sd["a"])  # the original survived
    save_state_dict({"a": torch.zeros(3)}, path, overwrite=True)
    assert torch.equal(read_state_dict(path)["a"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no temp files left behind


def test_weights_id_is_the_same_for_a_half_precision_copy_and_changes_with_the_weights():
    """weights_id (a delta's base_weights) names the weights, not their copy: the fp16 file of the same fp32 weights
    (a release's fp16 variant), and any key order, give the same id; another first or last value of one tensor, a
    renamed tensor, or the same values in another shape give another. Values away from fp16's grid (0.1 + 1e-4 k), so
    an id over the raw bytes could not match its half-precision copy."""
    from weights import cast, weights_id

    sd = {"b.weight": 0.1 + 1e-4 * torch.arange(24.0).reshape(4, 6), "a.bias": torch.linspace(-1, 1, 20),
          "steps": torch.tensor([3])}
    base = weights_id(sd)
    assert len(base) == 16 and int(base, 16) >= 0  # 16 hex digits
    assert weights_id(cast(sd, "fp16")) == base
    assert weights_id(cast(sd, "bf16")) != base  # bf16 keeps fewer bits than fp16: its values are others
    assert weights_id(dict(reversed(sd.items()))) == base
    first, last = dict(sd), dict(sd)
    first["a.bias"] = sd["a.bias"].clone().index_fill_(0, torch.tensor([0]), 0.5)  # a value fp16 tells apart
    last["b.weight"] = sd["b.weight"].clone()
    last["b.weight"][-1, -1] = 0.5  # the last value only: the id reads both ends of each tensor
    renamed = {("c.bias" if k == "a.bias" else k): v for k, v in sd.items()}
    reshaped = {**sd, "b.weight": sd["b.weight"].reshape(6, 4)}
    ids = [weights_id(d) for d in (first, last, renamed, reshaped)]
    assert len({base, *ids}) == 5, ids
