"""common.py: the one --key=value parser every script uses, and the atomic writes."""
import json
import os
from dataclasses import dataclass

import pytest

import common
from common import FRACTION, POSITIVE, at_least, one_of, parse_config, setting


@dataclass
class Demo:
    name: str = "x"
    steps: int = setting(10, at_least(1))
    lr: float = setting(0.1, POSITIVE)
    frac: float = setting(0.5, FRACTION)
    mode: str = setting("a", one_of("a", "b"))
    strict: bool = False
    lrs: tuple = setting((0.1, 0.01), POSITIVE)
    low: int = 1
    high: int = 2

    def problems(self):
        if self.low > self.high:
            yield f"--low={self.low} is above --high={self.high}"


def error(argv, **kw):
    with pytest.raises(SystemExit) as e:
        parse_config(Demo, argv, "demo.py", **kw)
    msg = str(e.value.code)
    assert msg.startswith("demo.py: ") and "\n" not in msg, msg
    return msg


def test_types_come_from_the_fields():
    cfg = parse_config(Demo, ["--steps=1e3", "--lr=3e-4", "--strict", "--lrs=0.3,0.03", "--name=y", "--mode=b"],
                       "demo.py")
    assert (cfg.steps, cfg.lr, cfg.strict, cfg.lrs, cfg.name, cfg.mode) == (1000, 3e-4, True, (0.3, 0.03), "y", "b")
    assert isinstance(cfg.steps, int) and isinstance(cfg.lrs[0], float)
    assert parse_config(Demo, ["--strict=false"], "demo.py").strict is False
    assert parse_config(Demo, ["--steps=2", "--steps=3"], "demo.py").steps == 3  # the last one wins


@pytest.mark.parametrize("argv, needle", [
    (["--steps=abc"], "--steps=abc"), (["--steps=1.5"], "--steps=1.5"), (["--steps=0"], "expected a number >= 1"),
    (["--lr=-1"], "expected a number > 0"), (["--lr=nan"], "--lr=nan"), (["--lr=inf"], "--lr=inf"),
    (["--frac=1.5"], "[0, 1]"), (["--mode=c"], "one of a, b"), (["--strict=maybe"], "--strict=maybe"),
    (["--lrs=0.1,-2"], "--lrs"), (["--nope=1"], "unknown setting --nope"), (["steps=3"], "--key=value"),
    (["--steps"], "--steps=VALUE"), (["--low=5", "--high=2"], "--low=5 is above --high=2"),
])
def test_bad_values_are_one_line_naming_the_flag(argv, needle):
    assert needle in error(argv)


def test_dashes_are_underscores_and_bare_values():
    @dataclass
    class Run:
        keep_staging: bool = False
        resume: str = ""
    cfg = parse_config(Run, ["--keep-staging", "--resume"], "run.py", bare={"resume": "auto"})
    assert (cfg.keep_staging, cfg.resume) == (True, "auto")


def test_presets_load_first_and_are_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CONFIG_DIR", str(tmp_path))
    (tmp_path / "small.json").write_text(json.dumps({"_why": {"steps": "a short run"}, "steps": 5, "lr": 0.5}))
    cfg = parse_config(Demo, ["--lr=0.2", "--config=small"], "demo.py", presets=True)
    assert (cfg.steps, cfg.lr) == (5, 0.2)  # the preset first, wherever it sits; the command line wins
    (tmp_path / "bad.json").write_text(json.dumps({"steps": -3}))
    assert "bad.json" in error(["--config=bad"], presets=True) and "--steps=-3" in error(["--config=bad"], presets=True)
    assert "available: bad, small" in error(["--config=nope"], presets=True)
    assert "unknown setting --config" in error(["--config=small"])  # a script without presets


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    common.atomic_write_text(str(path), "old")

    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        common.atomic_write_text(str(path), "new")
    assert path.read_text() == "old" and not (tmp_path / "results.json.tmp").exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02not a checkpoint" * 10, b"PK\x03\x04 half a zip"])
def test_unreadable_torch_files_are_one_line(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        common.load_torch(str(path))
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and "weights_only=False" not in msg, msg
