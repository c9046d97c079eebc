"""
common.py: what every script shares, so that each stage file holds only its method.

- the CT-RATE facts that more than one stage needs (label columns, mask classes, split names);
- one `--key=value` parser for every script: types come from the script's config dataclass, the
  accepted values are declared once next to each field (`setting(default, check)`), presets are
  small JSON files under config/, and every bad value ends in one line naming the flag;
- worker processes that stop with their parent, device choice and torchrun set-up, the step log,
  reading weight files, atomic writes, deleting only what the code wrote.
"""
import ctypes
import json
import math
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import MISSING, dataclass, field, fields
from datetime import timedelta
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(ROOT, "config")

# -----------------------------------------------------------------------------
# CT-RATE facts (RECIPE.md 2)

# The 18 abnormality columns of CT-RATE's label CSVs, in their order.
LABELS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly",
    "Pericardial effusion", "Coronary artery wall calcification", "Hiatal hernia",
    "Lymphadenopathy", "Emphysema", "Atelectasis", "Lung nodule", "Lung opacity",
    "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]
# ReXGroundingCT's 14 finding categories; bit c of a stored abnormality mask = category c.
ABNORMALITY_CODES = ["1a", "1b", "1c", "1d", "1e", "1f", "2a", "2b", "2c", "2d", "2e", "2f", "2g", "2h"]
N_ANATOMY = 118  # TotalSegmentator "total": 117 structures + background 0
SPLITS = ("train", "val", "test")  # val: held-out CT-RATE train patients; test: CT-RATE valid

# -----------------------------------------------------------------------------
# Settings: a dataclass field per setting, its accepted values next to it


@dataclass(frozen=True)
class Check:
    ok: object      # value -> bool
    accepts: str    # what the flag accepts, for the error message


POSITIVE = Check(lambda v: v > 0, "a number > 0")
NONNEG = Check(lambda v: v >= 0, "a number >= 0")
FRACTION = Check(lambda v: 0 <= v <= 1, "a number in [0, 1]")
NONEMPTY = Check(lambda v: len(v) > 0, "a non-empty value")


def at_least(lo):
    return Check(lambda v: v >= lo, f"a number >= {lo}")


def one_of(*choices):
    return Check(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def setting(default, *checks):
    """A config field whose value must pass every check (a tuple's checks apply to each element)."""
    return field(default=default, metadata={"checks": checks})


class SettingError(Exception):
    """A bad setting; str(e) is the one line the user sees."""


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def convert(value, typ, example):
    """A command-line string or a JSON value -> typ, or ValueError. int accepts 1e4 (a whole number);
    float refuses nan and inf; a tuple is comma-separated, its elements typed like the default's."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() not in TRUE + FALSE:
            raise ValueError
        return str(value).lower() in TRUE
    if typ is int:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not number.is_integer():
            raise ValueError
        return int(number)
    if typ is float:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    if typ is tuple:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        elem = type(example[0]) if example else str
        return tuple(convert(v.strip() if isinstance(v, str) else v, elem, ()) for v in items)
    if not isinstance(value, str):
        raise ValueError
    return value


def apply(cfg, key, value, where):
    known = {f.name: f for f in fields(cfg)}
    key = key.replace("-", "_")
    if key not in known:
        raise SettingError(f"{where}: unknown setting --{key}; known: " + ", ".join(f"--{k}" for k in known))
    f = known[key]
    typ = f.type if isinstance(f.type, type) else type(getattr(cfg, key))
    default = f.default if f.default is not MISSING else getattr(cfg, key)
    try:
        new = convert(value, typ, default)
    except (TypeError, ValueError):
        raise SettingError(f"{where}: --{key}={value} is not a valid {typ.__name__}") from None
    for check in f.metadata.get("checks", ()):
        for v in (new if typ is tuple else (new,)):
            if not check.ok(v):
                raise SettingError(f"{where}: --{key}={value}: expected {check.accepts}")
    setattr(cfg, key, new)


def load_preset(name):
    """config/NAME.json: settings that differ from the defaults; "_why" holds a one-line reason per key."""
    path = os.path.join(CONFIG_DIR, f"{name}.json")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
        raise SettingError(f"--config={name}: no preset {path}; available: {', '.join(names)}")
    try:
        with open(path) as f:
            preset = json.load(f)
    except (OSError, ValueError) as e:
        raise SettingError(f"{path}: not a readable preset ({e})") from None
    return path, {k: v for k, v in preset.items() if not k.startswith("_")}


def parse_config(cls, argv, prog, bare=None, presets=False):
    """Defaults of `cls`, then (with presets) --config=NAME, then every --key=value in order.
    A bare --flag means true for a bool (or bare[flag] for the settings named there). The resolved
    config's own `problems()` (if any) names settings that are wrong together. Exits with one line."""
    try:
        return _parse(cls, argv, prog, bare or {}, presets)
    except SettingError as e:
        sys.exit(f"{prog}: {e}")


def _parse(cls, argv, prog, bare, presets):
    cfg, pairs = cls(), []
    bools = {f.name for f in fields(cls) if f.type is bool}
    for arg in argv:
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not arg.startswith("--") or not key:
            raise SettingError(f"argument {arg!r}: expected --key=value")
        if not eq:
            if key not in bools and key not in bare:
                raise SettingError(f"argument {arg!r}: expected --{key}=VALUE")
            value = bare.get(key, "true")
        pairs.append((key, value))
    for key, value in pairs:  # the preset first, wherever it sits on the command line
        if key == "config" and presets:
            path, preset = load_preset(value)
            for k, v in preset.items():
                apply(cfg, k, v, path)
    for key, value in pairs:
        if not (key == "config" and presets):
            apply(cfg, key, value, "command line")
    validate(cfg, "command line", fields_too=False)  # each field passed its checks as it was set
    return cfg


def validate(cfg, where, fields_too=True):
    """Every field's checks (for a config built in code, which no parser has seen), then the config's own
    problems() across fields; raises SettingError with the first one."""
    for f in fields(cfg) if fields_too else ():
        apply(cfg, f.name, getattr(cfg, f.name), where)
    problem = next(iter(cfg.problems()), None) if hasattr(cfg, "problems") else None
    if problem:
        raise SettingError(problem)


def describe(cfg):
    """The resolved config as one log line."""
    return "config: " + " ".join(f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg))


# -----------------------------------------------------------------------------
# Devices and processes


def pick_device(name):
    """"auto" -> cuda when present, else cpu. A CUDA device always carries an index, because
    torch.cuda.set_device refuses a bare "cuda": the local rank under torchrun, else the current GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device={name}: this machine has no CUDA device; use --device=cpu or --device=auto")
    if device.type != "cuda" or device.index is not None:
        return device
    local = os.environ.get("LOCAL_RANK")
    return torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())


def setup_distributed(device_name):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one process.
    Returns (ddp, rank, world, device)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = pick_device(device_name)
    if ddp:
        backend = "nccl" if device.type == "cuda" else "gloo"
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=restart_store(rank, world), rank=rank, world_size=world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    return ddp, rank, world, device


def in_processes(fn, items, workers, ordered=False):
    """fn over items in `workers` spawned processes (here, for one worker), yielding results as they
    finish (ordered=True: in item order). The workers ignore Ctrl-C and die with this process, kill -9
    included, so an interrupt stops everything at once and no worker outlives its run; one the kernel
    kills (out of memory) raises BrokenProcessPool instead of hanging."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(),))
    finished = False
    try:
        futures = [pool.submit(fn, item) for item in items]
        for future in (futures if ordered else as_completed(futures)):
            yield future.result()
        finished = True
    finally:
        workers_now = list(pool._processes.values())  # the executor's own handles: none is public
        pool.shutdown(wait=finished, cancel_futures=True)
        if not finished:  # interrupted or failed: the volumes in flight are redone by the next run
            for p in workers_now:
                p.kill()


def _worker_init(parent):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:  # Linux: the kernel kills this worker when its parent dies
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def restart_store(rank, world):
    """The process group's key-value store, with its own key space for each restart of the worker group.
    torchrun's store outlives the workers it restarts (--max-restarts): a restarted rank could otherwise
    read the address a dead peer published and fail to connect, or wait on keys of the last attempt
    (README: fault tolerance). Returns None outside torchrun (init_process_group's own env:// store)."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts_it, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"dalect/restart_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# Dense bf16 tensor FLOP/s from the vendors' datasheets, for MFU: {name fragment: FLOP/s}, the first match wins.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


class StepLog:
    """A training loop's log: sums the loss parts between log lines, then writes one line (and one
    log.jsonl row) with their means, the learning rate, samples/s, ETA and, on CUDA, MFU and peak memory."""

    def __init__(self, batch_size, sample_flops, device, start, stop, world, write, logf, shown=()):
        self.batch_size, self.sample_flops, self.device = batch_size, sample_flops, device
        self.stop, self.world = stop, world
        self.write, self.logf, self.shown = write, logf, shown  # shown: the parts printed beside the loss
        self.peak = peak_flops(device)
        self.t_start = self.t_last = time.time()
        self.step_last, self.sums, self.record = start, {}, None

    def add(self, parts, accum):
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0) + v / accum

    def log(self, done, lr, grad_norm):
        sums = self.sums
        keys = sorted(sums)
        vals = torch.stack([sums[k] for k in keys]) / (done - self.step_last)  # mean over the logged steps
        if self.world > 1:
            dist.all_reduce(vals)
            vals /= self.world
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - self.t_last
        sps = self.batch_size * (done - self.step_last) / dt
        record = {"step": done, **{k: round(float(v), 5) for k, v in zip(keys, vals)}, "lr": lr,
                  "grad_norm": round(float(grad_norm), 4), "slabs_per_s": round(sps, 2),
                  "eta_s": round((self.stop - done) * dt / (done - self.step_last)),
                  "elapsed_s": round(time.time() - self.t_start, 1)}  # this run (a resume starts again at 0)
        if self.peak:
            record["mfu"] = round(self.sample_flops * sps / (self.peak * self.world), 4)
            record["mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 1e9, 2)
        parts_txt = " ".join(f"{k} {record[k]:.4f}" for k in self.shown if k in record)
        self.write(f"step {done}/{self.stop} | loss {record['loss']:.4f} ({parts_txt}) | lr {lr:.2e} | "
                   f"{sps:.1f} slabs/s | eta {record['eta_s'] // 60}m{record['eta_s'] % 60:02d}s"
                   + (f" | mfu {100 * record['mfu']:.1f}% | mem {record['mem_gb']:.1f} GB" if self.peak else ""))
        if self.logf:
            self.logf.write(json.dumps(record) + "\n")
            self.logf.flush()
        self.t_last, self.step_last, self.sums, self.record = time.time(), done, {}, record


# -----------------------------------------------------------------------------
# Files


def remove_owned(folder, own):
    """Delete a folder that this code wrote (it holds only files named in `own`), and nothing else:
    a folder with any other file stops the run, so no setting can delete data the code did not create."""
    if not os.path.lexists(folder):
        return
    foreign = sorted(set(os.listdir(folder)) - set(own)) if os.path.isdir(folder) else [os.path.basename(folder)]
    if foreign:
        raise SystemExit(f"{folder}: holds files this code did not write ({', '.join(foreign[:3])}); "
                         f"it would replace this folder, so pick another output folder")
    shutil.rmtree(folder)


def write_output_folder(folder, flag, files, need):
    """files {name: text} into folder (made if missing), which must also have `need` bytes free: said when
    a run starts, not hours later. Otherwise one line naming the flag."""
    try:
        os.makedirs(folder, exist_ok=True)
        for name, text in files.items():
            atomic_write_text(os.path.join(folder, name), text)
    except OSError as e:
        raise SystemExit(f"{flag}={folder}: cannot write there ({e.strerror}); pick a writable folder")
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(f"{flag}={folder}: {free / 1e9:.2f} GB free, {need / 1e9:.2f} GB needed; free some space "
                         f"or pick another folder")


def writable(folder):
    """Whether files can be created in folder (made if missing): tried, not read off permission bits,
    which a read-only mount or a root user would make lie."""
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f".write_test_{os.getpid()}"), "w"):
            pass
        os.remove(os.path.join(folder, f".write_test_{os.getpid()}"))
        return True
    except OSError:
        return False


def atomic_write_text(path, text):
    """Write to path.tmp, then rename: a crash leaves the old file or the new one, never half of one."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _atomic(path, write)


def load_torch(path):
    """A .pt/.pth file read with torch.load(weights_only=True): tensors and plain containers only, so a
    file from elsewhere cannot run code when opened. Any failure is a ValueError of one line that names
    the file (torch's own message is a page long and suggests weights_only=False, which we never use)."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a checkpoint: an interrupted copy or write?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        news = [ln for ln in lines if "Unsupported global" in ln]  # the one line that says what is in it
        if news:
            raise ValueError(f"{path}: torch.load(weights_only=True) cannot read it ({news[0].split(' was not')[0]}): "
                             "it holds Python objects beyond tensors and plain containers; save only tensors, "
                             "e.g. model.state_dict()") from None
        plain = [ln for ln in lines if "weights_only" not in ln.lower() and "trust" not in ln.lower()]
        raise ValueError(f"{path}: not a readable torch file ({(plain or [type(e).__name__])[0]}): "
                         "truncated, or not a checkpoint") from None


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DDP and by torch.compile
NESTED_ENTRIES = ("backbone", "model", "state_dict")  # where train.py-style checkpoints keep weights


def strip_wrappers(key):
    while key.startswith(WRAPPER_PREFIXES):  # DDP around a compiled model stacks both
        key = key.split(".", 1)[1]
    return key


def read_state_dict(path):
    """The tensors of a .safetensors or .pt/.pth file, unnested and with wrapper prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}: reading .safetensors needs the safetensors package: "
                              "pip install safetensors") from None
        obj = load_file(str(path), device="cpu")
    elif path.suffix in (".pt", ".pth", ".bin"):  # .bin: transformers' pytorch_model.bin, a torch.save file
        obj = load_torch(path)  # weights_only: a checkpoint from the internet must not run code when opened
    else:
        raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors, .pt or .pth")
    while isinstance(obj, dict) and not all(torch.is_tensor(v) for v in obj.values()):
        entry = next((k for k in NESTED_ENTRIES if isinstance(obj.get(k), dict)), None)
        if entry is None:
            raise ValueError(f"{path}: found no state dict; top-level entries are {sorted(obj)[:8]}, "
                             f"expected tensors or one of {NESTED_ENTRIES}")
        obj = obj[entry]
    sd = {strip_wrappers(k): v for k, v in obj.items()}
    # a whole pretraining model saved in one dict: keep what sits under "backbone."
    if "cls_token" not in sd and any(k.startswith("backbone.") for k in sd):
        sd = {strip_wrappers(k[len("backbone."):]): v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def atomic_torch_save(obj, path):
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def _atomic(path, write):
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # disk full, Ctrl-C: no half file is left for anything to mistake
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
