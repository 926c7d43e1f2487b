"""The RNG state of a checkpoint: plain tensors (weights_only=True), the current device only."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from ppllm import checkpoint
from ppllm.errors import UserError

pytestmark = pytest.mark.timeout(60)


def draws():
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.standard_normal(), random.random(),
            random.gauss(0, 1))


def test_round_trip_restores_every_generator(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # cached second gaussians are part of the state
    path = tmp_path / "rng_rank0.pt"
    torch.save(checkpoint.rng_state(), path)
    expected = draws()
    draws()
    checkpoint.set_rng_state(checkpoint.load_rng_state(str(path)))
    assert draws() == expected
    torch.load(path, weights_only=True)  # plain tensors and numbers only


class Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "rng_rank0.pt"
    with open(path, "wb") as f:
        pickle.dump({"torch": Marker(str(marker))}, f)
    with pytest.raises(UserError) as e:
        checkpoint.load_rng_state(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


class FakeCuda:
    """torch.cuda's RNG calls over `visible` devices; a device index that is not visible raises as
    CUDA does ("invalid device ordinal")."""

    def __init__(self, visible, current):
        self.visible, self.current = visible, current
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(visible)}

    def _index(self, device):
        index = self.current if device in (None, "cuda") else int(str(device).split(":")[-1])
        if not 0 <= index < self.visible:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[self._index(device)] = state.clone()

    def get_rng_state_all(self):
        return [self.get_rng_state(i) for i in range(self.visible)]

    def set_rng_state_all(self, states):
        for i, state in enumerate(states):
            self.set_rng_state(state, i)

    def install(self, monkeypatch):
        monkeypatch.setattr("ppllm.engine.accelerator", lambda: "cuda")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.visible)
        for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))


def test_resume_on_a_node_with_fewer_visible_gpus(tmp_path, monkeypatch):
    """Saved by local rank 3 of a node showing 4 GPUs, resumed by a rank that sees only its own GPU
    (per-rank CUDA_VISIBLE_DEVICES): the saved state is that of device 3 alone and lands on device 0."""
    path = tmp_path / "rng_rank3.pt"
    FakeCuda(visible=4, current=3).install(monkeypatch)
    torch.save(checkpoint.rng_state(), path)
    later = FakeCuda(visible=1, current=0)
    later.install(monkeypatch)
    checkpoint.set_rng_state(checkpoint.load_rng_state(str(path)))
    assert later.states[0].tolist() == [3] * 16


def test_cpu_training_keeps_no_device_state(monkeypatch):
    monkeypatch.setattr("ppllm.engine.accelerator", lambda: "cpu")
    assert "device" not in checkpoint.rng_state()
