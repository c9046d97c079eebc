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


def marked_processes(marker):
    """pids of processes whose environment holds marker (the workers a test's script started)."""
    found = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in open(f"/proc/{d}/environ", "rb").read():
                found.append(int(d))
        except OSError:
            pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
@pytest.mark.parametrize("how", ["ctrl-c", "kill -9"])
def test_workers_stop_with_their_parent(tmp_path, how):
    """prepare.py and phantom.py run their volumes through common.in_processes: Ctrl-C stops the run
    within a second (it took 4-6 s, finishing most volumes), and kill -9 of the parent takes the workers
    with it (they lived on, re-parented to PID 1)."""
    import signal
    import subprocess
    import sys
    import time
    import uuid
    from conftest import ROOT
    (tmp_path / "slow.py").write_text("import time\n\ndef nap(x):\n    time.sleep(2)\n    return x\n")
    script = ("import common, slow\nfor r in common.in_processes(slow.nap, list(range(12)), 2):\n"
              "    print(r, flush=True)\n")
    marker = f"DALECT_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", marker: "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip().isdigit()  # the workers are up and working
    t0 = time.time()
    proc.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    proc.wait(timeout=30)
    while marked_processes(marker) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert marked_processes(marker) == [], "a worker outlived its parent"
    assert time.time() - t0 < 2.0, f"took {time.time() - t0:.1f} s to stop"
