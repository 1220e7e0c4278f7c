"""Speed and memory benchmark of MoRAM's memory layer: ``python -m moram_bench bench``.

    python -m moram_bench bench [--quick] [--out bench.json] [--threads N] [--device D]
                                [--no-vit] [--clock {wall,cpu}]

``--quick`` is a smoke test of every section (1 x 197 tokens, the ViT at 112 px, one or two
rounds): its numbers are not representative. ``--clock cpu`` times with the calling
thread's CPU time (CPU device, one thread), which other processes on a shared machine do
not inflate.

Sections (printed as tables and written to the JSON file):

``memory_layer``
    One adapted layer, ``d_in = d_out = 768``, a batch of 8 x 197 tokens (2 x 197 with
    ``--quick``), ``k = 16``, ``r = 16`` atoms per task, ``N`` in {16, 160, 1600} atoms (1, 10,
    100 tasks; the last task's atoms are trainable, the others frozen). For ``mode`` "eval"
    (``eval()``, ``no_grad``, delta gate on) and "train" (forward + backward to the input and
    the current atoms) it times the frozen ``nn.Linear`` alone, the adapted layer
    (``RankOneMemory``) and the same layer through ``reference_forward`` (the straightforward
    formula: concatenated memory, dense ``N``-wide value product). ``overhead`` is
    ``t(layer) / t(frozen) - 1``.

    * ``floor`` (eval): ``(N d_in + k d_out) / (d_in d_out)``, the key projection plus the
      selected values over the frozen product: what any exact top-k memory must compute.
    * ``floor`` (train): the multiply-adds no exact method avoids, over the frozen layer's
      forward + backward (``2 d_in d_out``): forward ``N d_in + k d_out``; backward
      ``min(N, d_in) d_in`` (the norm's gradient needs ``A^T p``, as ``A^T (c p)`` or with the
      Gram matrix), ``k (d_in + d_out)`` (selected keys and values) and ``2 r (d_in + d_out)``
      (current atoms' gradients).
    * targets (this suite's performance goals for the layer): eval overhead <= 3 x floor at N = 160 and
      <= 1.5 x floor at N = 1600; train at least 1.5 x faster than the straightforward formula
      at N = 1600 and never slower (speedup >= 1) at any N.

``vit_b16``
    A random-weight open_clip ViT-B-16 image tower (``pretrained=None``, attention unfused
    with ``moram_bench.adapters.attention.unfuse_attention``), eval forward of a few images:
    plain (every adapter replaced by a pass-through) vs MoRAM memories after 10 tasks
    (r = 16, all frozen, N = 160) on q/k/v/out_proj and both MLP linears of every block,
    vs the same memories through ``reference_forward``.

``moe_lora``
    The MoE-LoRA baseline layer (``moram_bench.adapters.moe.MoELoRA``, one rank-16 expert
    per task, top-2 router) in the same shapes: eval/train records for 1, 10 and 100 tasks
    (the same number of rank-1 components as MoRAM's N). Other layers plug in the same way: build the adapter (called as
    ``adapter(x, y0)``) and time it with ``bench_layer_record``.

Timing. All variants of one record run back to back in interleaved rounds (rotating order),
after warm-up rounds that are not counted; times are medians over rounds, overheads and
speedups are medians of the per-round ratios (robust to the machine's load drifting between
rounds). On CUDA every call is synchronised.

Peak memory. On CUDA: ``torch.cuda.max_memory_allocated`` during one call minus the memory
allocated before it. On CPU PyTorch has no allocator statistics, so one call runs under
``torch.profiler`` with ``profile_memory=True``; the allocator's alloc/free events carry the
running total of bytes allocated since profiling started, and its maximum is the call's peak
extra allocation (activations, temporaries and the output; the model's own weights are not
counted because they were allocated before).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .logs import drop_log_messages
from .memory import RankOneMemory

D_MODEL = 768
TOPK = 16
R = 16
N_ATOMS = (16, 160, 1600)
VIT_TASKS = 10
VIT_PATTERNS = (r"attn\.(q_proj|k_proj|v_proj|out_proj)$", r"mlp\.(c_fc|c_proj)$")

FULL = dict(batch=8, tokens=197, rounds_eval=25, rounds_train=15, warmup=3,
            vit_images=4, vit_image_size=224, vit_rounds=5, vit_warmup=1)
#: A smoke test of every section: small shapes, few rounds, numbers not representative.
QUICK = dict(batch=1, tokens=197, rounds_eval=3, rounds_train=2, warmup=1,
             vit_images=1, vit_image_size=112, vit_rounds=1, vit_warmup=0)


# ------------------------------------------------------------------------ measurement


@dataclass
class Setup:
    """Where and how to measure: the device, the clock (``time.perf_counter`` or, with
    ``--clock cpu``, ``time.thread_time``) and a progress logger."""

    device: torch.device
    clock: Callable[[], float] = time.perf_counter
    log: Callable[[str], None] = lambda msg: None

    def sync(self) -> None:
        """Wait for queued device work (CUDA), so that the clock measures it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fns: dict[str, Callable[[], Any]], rounds: int,
             warmup: int) -> dict[str, list[float]]:
        return time_interleaved(fns, rounds, warmup, self.sync, self.clock)


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int,
                     sync: Callable[[], None] = lambda: None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of every function, measured in interleaved rounds.

    Each round calls every function once, starting at a rotating position so that no
    variant always follows the same one; ``warmup`` extra rounds first are not recorded.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            t0 = clock()
            fns[name]()
            sync()
            if i >= warmup:
                times[name].append(clock() - t0)
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``."""
    return statistics.median(a / b for a, b in zip(num, den))


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` beyond what was allocated before it
    (see the module docstring for the method); ``None`` if it cannot be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        with _quiet_stderr():   # the profiler logs its start and stop on stderr
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
            prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    return int(max([0, *totals]))


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


# ------------------------------------------------------------------------ floors / targets


def eval_floor(n: int, k: int, d_in: int, d_out: int) -> float:
    """``(N d_in + k d_out) / (d_in d_out)``."""
    return (n * d_in + k * d_out) / (d_in * d_out)


def train_floor(n: int, k: int, r: int, d_in: int, d_out: int) -> float:
    """Unavoidable multiply-adds of forward + backward over the frozen layer's ``2 d_in d_out``."""
    work = (n * d_in + k * d_out + min(n, d_in) * d_in + k * (d_in + d_out)
            + 2 * r * (d_in + d_out))
    return work / (2 * d_in * d_out)


def eval_target(n: int, floor: float) -> float | None:
    """Largest acceptable eval overhead (None where no target is set)."""
    return {160: 3.0 * floor, 1600: 1.5 * floor}.get(n)


def train_target(n: int) -> float:
    """Smallest acceptable speedup over the straightforward formula in training."""
    return 1.5 if n >= 1600 else 1.0


# ----------------------------------------------------------------------- layer records


def build_memory(n_tasks: int, r: int = R, d_in: int = D_MODEL, d_out: int = D_MODEL,
                 topk: int = TOPK, device: torch.device | str = "cpu",
                 freeze_last: bool = False) -> RankOneMemory:
    """A memory after ``n_tasks`` grow calls of ``r`` atoms, with non-zero (trained-looking)
    values; the last task's atoms stay trainable unless ``freeze_last``."""
    mem = RankOneMemory(d_in, d_out, topk=topk).to(device)
    for _ in range(n_tasks):
        mem.grow(r)
        with torch.no_grad():
            mem.values.normal_(0.0, 0.02)
    if freeze_last:
        mem.freeze()
    return mem


class _Reference(nn.Module):
    """Adapter calling a memory's straightforward ``reference_forward``."""

    def __init__(self, mem: RankOneMemory):
        super().__init__()
        self.mem = mem

    def forward(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        return self.mem.reference_forward(x, y0)


class _PassThrough(nn.Module):
    """Adapter returning the frozen output (the model without adapters)."""

    def forward(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        return y0


def _layer_callables(adapter: nn.Module, base: nn.Linear, x: torch.Tensor, gy: torch.Tensor,
                     mode: str) -> Callable[[], Any]:
    """One call of the adapted layer (eval forward, or train forward + backward)."""
    if mode == "eval":
        def run():
            with torch.no_grad():
                return adapter(x, base(x))
        return run
    xg = x.detach().requires_grad_(True)
    params = [p for p in adapter.parameters() if p.requires_grad]

    def run_train():
        y = adapter(xg, base(xg))
        return torch.autograd.grad(y, [xg, *params], gy)
    return run_train


def bench_layer_record(adapters: dict[str, nn.Module], base: nn.Linear, x: torch.Tensor,
                       gy: torch.Tensor, mode: str, rounds: int, warmup: int,
                       setup: Setup) -> dict[str, Any]:
    """Times ``frozen`` (the base layer alone) and each adapter around ``base``.

    Returns ``{name: {"ms": median, "ratio": median of t/t_frozen, "peak_bytes": ...}}``.
    """
    for a in adapters.values():
        a.train(mode == "train")
    fns = {"frozen": _layer_callables(_PassThrough(), base, x, gy, mode)}
    fns.update({name: _layer_callables(a, base, x, gy, mode) for name, a in adapters.items()})
    times = setup.time(fns, rounds, warmup)
    out = {}
    for name, fn in fns.items():
        out[name] = {
            "ms": 1e3 * statistics.median(times[name]),
            "ratio": median_ratio(times[name], times["frozen"]),
            "peak_bytes": peak_extra_bytes(fn, setup.device),
            "times": times[name],
        }
    return out


def bench_memory_layer(cfg: dict, setup: Setup) -> list[dict]:
    """The ``memory_layer`` records (see the module docstring)."""
    device, log = setup.device, setup.log
    torch.manual_seed(0)
    base = nn.Linear(D_MODEL, D_MODEL).to(device).requires_grad_(False)
    x = torch.randn(cfg["batch"], cfg["tokens"], D_MODEL, device=device)
    gy = torch.randn(cfg["batch"], cfg["tokens"], D_MODEL, device=device)
    records = []
    for n in N_ATOMS:
        mem = build_memory(n // R, device=device)
        k = min(max(TOPK, 2), n)
        for mode in ("eval", "train"):
            log(f"  memory layer N={n} {mode} ...")
            rounds = cfg["rounds_eval"] if mode == "eval" else cfg["rounds_train"]
            res = bench_layer_record({"memory": mem, "straightforward": _Reference(mem)}, base,
                                     x, gy, mode, rounds, cfg["warmup"], setup)
            m, s, f = res["memory"], res["straightforward"], res["frozen"]
            overhead = m["ratio"] - 1.0
            speedup = median_ratio(s["times"], m["times"])
            if mode == "eval":
                floor = eval_floor(n, k, D_MODEL, D_MODEL)
                target = eval_target(n, floor)
                meets = None if target is None else overhead <= target
                target_desc = None if target is None else f"overhead <= {target:.3f}"
            else:
                floor = train_floor(n, k, R, D_MODEL, D_MODEL)
                target = train_target(n)
                meets = speedup >= target
                target_desc = f"speedup >= {target:.1f}"
            records.append({
                "n_atoms": n, "n_tasks": n // R, "mode": mode, "k": k,
                "frozen_ms": f["ms"], "memory_ms": m["ms"], "straightforward_ms": s["ms"],
                "overhead": overhead, "floor": floor, "overhead_over_floor": overhead / floor,
                "straightforward_overhead": s["ratio"] - 1.0,
                "speedup_vs_straightforward": speedup,
                "target": target_desc, "meets_target": meets,
                "peak_extra_bytes": {"frozen": f["peak_bytes"], "memory": m["peak_bytes"],
                                     "straightforward": s["peak_bytes"]},
                "rounds": len(m["times"]),
            })
        del mem
    return records


# ------------------------------------------------------------------------------ ViT-B/16


def bench_vit(cfg: dict, setup: Setup) -> dict[str, Any]:
    """The ``vit_b16`` section (``--no-vit``: ``{"available": False, "note": ...}``)."""
    import open_clip

    device, log = setup.device, setup.log
    from .adapters.attention import unfuse_attention
    from .adapters.inject import inject_adapters

    log("  building a random-weight ViT-B-16 ...")
    torch.manual_seed(0)
    with drop_log_messages("No pretrained weights loaded"):  # random by design
        model = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=cfg["vit_image_size"])
    visual = model.visual.to(device).eval().requires_grad_(False)
    del model
    n_unfused = unfuse_attention(visual)
    memories: dict[str, RankOneMemory] = {}

    def factory(name: str, lin: nn.Linear) -> nn.Module:
        mem = build_memory(VIT_TASKS, d_in=lin.in_features, d_out=lin.out_features,
                           device=device, freeze_last=True)
        memories[name] = mem
        return mem

    wrapped = inject_adapters(visual, VIT_PATTERNS, factory)
    size = cfg["vit_image_size"]
    images = torch.randn(cfg["vit_images"], 3, size, size, device=device)
    passthrough, refs = _PassThrough(), {n: _Reference(m) for n, m in memories.items()}

    last: dict[str, torch.Tensor] = {}

    def variant(kind: str) -> Callable[[], Any]:
        def run():
            for name, w in wrapped.items():
                w.adapter = passthrough if kind == "plain" else (
                    memories[name] if kind == "moram" else refs[name])
            with torch.no_grad():
                last[kind] = visual(images)
            return last[kind]
        return run

    fns = {k: variant(k) for k in ("plain", "moram", "straightforward")}
    log("  timing ViT-B-16 forwards ...")
    times = setup.time(fns, cfg["vit_rounds"], cfg["vit_warmup"])
    diff = (last["moram"] - last["straightforward"]).abs().max().item()
    rec: dict[str, Any] = {
        "available": True, "images": cfg["vit_images"], "image_size": cfg["vit_image_size"],
        "tokens_per_image": (cfg["vit_image_size"] // 16) ** 2 + 1,
        "unfused_attention_modules": n_unfused,
        "adapted_layers": len(wrapped), "atoms_per_layer": VIT_TASKS * R, "tasks": VIT_TASKS,
        "max_abs_diff_memory_vs_straightforward": diff, "rounds": len(times["plain"]),
    }
    for k in fns:
        rec[f"{k}_ms"] = 1e3 * statistics.median(times[k])
        rec[f"{k}_peak_extra_bytes"] = peak_extra_bytes(fns[k], device)
    rec["moram_overhead"] = median_ratio(times["moram"], times["plain"]) - 1.0
    rec["straightforward_overhead"] = median_ratio(times["straightforward"], times["plain"]) - 1.0
    return rec


# ------------------------------------------------------------------------------ MoE-LoRA


def build_moe_lora(n_tasks: int, r: int = R, d_in: int = D_MODEL, d_out: int = D_MODEL,
                   device: torch.device | str = "cpu") -> nn.Module:
    """A ``moram_bench.adapters.moe.MoELoRA`` layer (default top-2 router) after ``n_tasks``
    ``grow`` calls, with non-zero expert values and router rows; the last expert
    trainable."""
    from .adapters.moe import MoELoRA

    layer = MoELoRA(d_in, d_out, r).to(device)
    for _ in range(n_tasks):
        layer.grow()
        with torch.no_grad():
            layer.B[-1].normal_(0.0, 0.02)
            layer.router[-1].normal_(0.0, 0.02)
    return layer


def bench_moe_lora(cfg: dict, setup: Setup) -> dict[str, Any]:
    """The ``moe_lora`` section: the same eval/train layer records as ``memory_layer`` for
    MoE-LoRA with one rank-16 expert per task (1, 10, 100 tasks)."""
    device, log = setup.device, setup.log
    torch.manual_seed(0)
    base = nn.Linear(D_MODEL, D_MODEL).to(device).requires_grad_(False)
    x = torch.randn(cfg["batch"], cfg["tokens"], D_MODEL, device=device)
    gy = torch.randn_like(x)
    records = []
    for n in N_ATOMS:
        tasks = n // R
        layer = build_moe_lora(tasks, device=device)
        for mode in ("eval", "train"):
            log(f"  moe-lora {tasks} experts {mode} ...")
            rounds = cfg["rounds_eval"] if mode == "eval" else cfg["rounds_train"]
            res = bench_layer_record({"moe_lora": layer}, base, x, gy, mode, rounds,
                                     cfg["warmup"], setup)
            records.append({
                "n_tasks": tasks, "n_experts": layer.n_experts, "rank": R, "mode": mode,
                "frozen_ms": res["frozen"]["ms"], "layer_ms": res["moe_lora"]["ms"],
                "overhead": res["moe_lora"]["ratio"] - 1.0,
                "peak_extra_bytes": res["moe_lora"]["peak_bytes"],
                "rounds": len(res["moe_lora"]["times"]),
            })
    return {"available": True, "records": records}


# ---------------------------------------------------------------------------------- report


def format_report(result: dict[str, Any]) -> str:
    """The human-readable tables."""
    c = result["config"]
    lines = [
        f"MoRAM memory layer: d_in=d_out={D_MODEL}, {c['batch']}x{c['tokens']} tokens, k={TOPK}, "
        f"r={R}, device={c['device']}, threads={c['threads']}, clock={c['clock']}, quick={c['quick']}",
        f"{'N':>5} {'mode':<5} {'frozen':>8} {'layer':>8} {'overhead':>8} {'floor':>6} "
        f"{'x floor':>7} {'straight':>9} {'s.ovh':>6} {'speedup':>7} {'peak MiB':>15} {'target':<20} ok",
    ]
    for r in result["memory_layer"]:
        pk = r["peak_extra_bytes"]
        ok = {True: "yes", False: "NO", None: "-"}[r["meets_target"]]
        lines.append(
            f"{r['n_atoms']:>5} {r['mode']:<5} {r['frozen_ms']:>6.1f}ms {r['memory_ms']:>6.1f}ms "
            f"{r['overhead']:>8.3f} {r['floor']:>6.3f} {r['overhead_over_floor']:>7.2f} "
            f"{r['straightforward_ms']:>7.1f}ms {r['straightforward_overhead']:>6.2f} "
            f"{r['speedup_vs_straightforward']:>6.2f}x "
            f"{_mib(pk['memory']):>7}/{_mib(pk['straightforward']):<7} {r['target'] or '-':<20} {ok}")
    lines.append("  (ms: medians; overhead = layer/frozen - 1; speedup = straightforward/layer; "
                 "peak MiB: extra allocation of one call, memory layer / straightforward)")
    v = result["vit_b16"]
    lines.append("")
    if v.get("available"):
        lines.append(
            f"ViT-B-16 image tower, {v['images']} images of {v['image_size']}px, "
            f"{v['adapted_layers']} adapted layers x "
            f"{v['atoms_per_layer']} atoms ({v['tasks']} tasks):")
        lines.append(
            f"  plain {v['plain_ms']:.0f} ms | MoRAM {v['moram_ms']:.0f} ms "
            f"(overhead {v['moram_overhead']:.3f}) | straightforward {v['straightforward_ms']:.0f} ms "
            f"(overhead {v['straightforward_overhead']:.3f}) | peak MiB plain/MoRAM/straightforward "
            f"{_mib(v['plain_peak_extra_bytes'])}/{_mib(v['moram_peak_extra_bytes'])}/"
            f"{_mib(v['straightforward_peak_extra_bytes'])} | max |diff| {v['max_abs_diff_memory_vs_straightforward']:.2e}")
    else:
        lines.append(f"ViT-B-16: not available ({v['note']})")
    mo = result["moe_lora"]
    if mo.get("available"):
        lines.append(f"MoE-LoRA layer (one rank-{R} expert per task, top-2 router, same shapes):")
        for r in mo["records"]:
            lines.append(f"  {r['n_experts']:>4} experts {r['mode']:<5} frozen {r['frozen_ms']:6.1f} ms"
                         f"  layer {r['layer_ms']:6.1f} ms  overhead {r['overhead']:.3f}  "
                         f"peak {_mib(r['peak_extra_bytes'])} MiB")
    else:
        lines.append(f"MoE-LoRA: not available ({mo['note']})")
    return "\n".join(lines)


def _finite_json(obj: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_json(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables, write the JSON file; returns an exit code."""
    parser = argparse.ArgumentParser(prog="python -m moram_bench bench",
                                     description="Speed/memory benchmark of the MoRAM memory layer.")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    parser.add_argument("--out", default="bench.json", help="JSON output path")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--no-vit", action="store_true", help="skip the ViT-B-16 section")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time (default); cpu: this thread's CPU time, "
                             "immune to other processes on a shared machine (CPU, 1 thread only)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        parser.error("--clock cpu needs --device cpu and --threads 1 (the CPU time of "
                     "the calling thread misses work done by other threads)")
    cfg = dict(QUICK if args.quick else FULL)

    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    setup = Setup(device, time.thread_time if args.clock == "cpu" else time.perf_counter, log)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result: dict[str, Any] = {"config": {
        **cfg, "quick": args.quick, "device": str(device), "threads": torch.get_num_threads(),
        "clock": args.clock,
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "d_in": D_MODEL, "d_out": D_MODEL, "topk": TOPK, "r": R, "dtype": "float32",
        "load_average_at_start": load,
    }}
    log("benchmarking the memory layer ...")
    result["memory_layer"] = bench_memory_layer(cfg, setup)
    if args.no_vit:
        result["vit_b16"] = {"available": False, "note": "skipped (--no-vit)"}
    else:
        result["vit_b16"] = bench_vit(cfg, setup)
    result["moe_lora"] = bench_moe_lora(cfg, setup)
    result["config"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["config"]["seconds"] = time.perf_counter() - started
    print(format_report(result), flush=True)
    with open(args.out, "w") as f:
        json.dump(_finite_json(result), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
