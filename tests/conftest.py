"""Shared test set-up: the repository root on the path, phantom datasets built once per session,
and the helpers more than one test file needs (written once, here)."""
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import phantom  # noqa: E402
import prepare  # noqa: E402

# The tests' phantoms, by name: each is written (and prepared) at most once per session.
PHANTOMS = {
    "tiny": dict(train_patients=6, valid_patients=4, size=32, slices=12, seed=0, rex_frac=0.5),
    "small": dict(train_patients=8, valid_patients=3, size=48, slices=16, seed=3, rex_frac=0.3),
    "train": dict(train_patients=6, valid_patients=2, size=48, slices=24, seed=0, rex_frac=0.5),
    "probe": dict(train_patients=10, valid_patients=4, size=48, slices=16, seed=0),
}
PREPARED = {  # name: (phantom, prepare.py settings)
    "small": ("small", dict(z_mm=4.0, size=40, mask_size=20)),
    "train": ("train", dict(z_mm=2.0, size=48, mask_size=24)),
    "probe": ("probe", dict(z_mm=4.0, size=32, mask_size=16)),
}


class Datasets:
    """Session cache of phantom sources and prepared folders (read-only for the tests that use them:
    a test that changes a dataset copies it first)."""

    def __init__(self, factory):
        self.factory, self.done = factory, {}

    def phantom(self, name):
        key = ("phantom", name)
        if key not in self.done:
            out = self.factory.mktemp(f"phantom_{name}") / "src"
            phantom.write_phantom(str(out), **PHANTOMS[name], workers=1)
            self.done[key] = out
        return self.done[key]

    def prepared(self, name):
        key = ("prepared", name)
        if key not in self.done:
            src_name, kw = PREPARED[name]
            out = self.factory.mktemp(f"prepared_{name}") / "prepared"
            prepare.prepare(prepare.Config(src=str(self.phantom(src_name)), out=str(out), workers=1, **kw),
                            progress=False)
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="session")
def datasets(tmp_path_factory):
    return Datasets(tmp_path_factory)


def free_port():
    """A TCP port nobody listens on now (for a test's process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(**extra):
    """Environment for a test's subprocess: one thread, the repository importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env
