"""``python -m moram_bench doctor [data_dir=PATH] [--no-estimate] [--quick]``: a self-test for a new machine.

In about a minute it prints a readable report and exits with 1 when a check failed (0 when
all passed or were skipped, 2 for bad arguments):

- versions (Python, torch, CUDA, cuDNN, Lightning, open_clip, transformers) and the devices
  found (CPU cores, every CUDA device with its memory and bf16 support);
- the memory layer (``RankOneMemory``): the fast path's output and gradients against the
  straightforward formula on CPU (float32, ``MEMORY_TOL``), and on each CUDA device the same
  computation against the CPU result (float32 with TF32 off, ``MEMORY_TOL``);
- bf16 autocast on the CLIP protocol (MoRAM on ``synthetic-tiny`` with the tiny CLIP) and on
  the text protocol (MoRAM on ``trace-mini`` with the tiny Llama): the loss and its gradients
  are finite and the loss is within ``BF16_LOSS_RTOL`` of float32's, on every device
  (CPU included: Lightning's ``bf16-mixed`` runs there too);
- with 2 or more GPUs: ``synthetic-tiny`` fitted by 2 DDP processes against 1 process (same
  matrix up to ``DDP_TOL`` points; exact equality is reported when it holds);
- with ``data_dir=PATH``: ``check-data`` of every real stream (a stream of which nothing is
  there is reported, not failed; a stream found in part is a failure);
- on a GPU, an estimate of X-TAIL's wall time on this hardware from a short rehearsal of
  its first task on the real architecture with the whole label space
  (``moram_bench.rehearse.estimate_report``; ``--no-estimate`` skips it, ``--estimate``
  runs it on CPU too, where a ViT-B/16 step takes minutes).

Without a GPU it says so and runs the CPU checks.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

#: memory layer, float32: |a - b| <= atol + rtol * |b| elementwise (output and gradients).
#: The fast path and the reference sum the same products in another order (float32 rounding,
#: ~1e-6 relative); CUDA vs CPU adds the device's own summation order (TF32 is turned off).
MEMORY_TOL = {"rtol": 1e-4, "atol": 1e-5}
#: bf16 autocast vs float32: relative difference of the loss. bf16 keeps 8 significant bits
#: (~0.4% per rounding); a few dozen layers of rounded matmuls stay well inside 5%, while a
#: broken autocast path (a routing softmax in bf16 with tau = 0.01, an overflow) is far off.
BF16_LOSS_RTOL = 0.05
#: DDP vs one process on GPU: matrix entries (0-100 points) may differ by a flipped prediction
#: (GPU kernels are not bit-deterministic across process layouts); synthetic-tiny has 36 test
#: images per task, so one flip is 2.8 points.
DDP_TOL = 6.0

USAGE_ERROR = 2
PACKAGES = ("torch", "torchvision", "lightning", "open_clip_torch", "transformers", "omegaconf", "numpy", "submitit")


@dataclass
class Check:
    name: str
    ok: Optional[bool]  # None: skipped / informational
    detail: str = ""
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "skip"}[self.ok]
        return f"  [{mark}] {self.name}: {self.detail} ({self.seconds:.1f}s)"


def versions() -> dict[str, str]:
    import torch

    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["cuda (torch build)"] = str(torch.version.cuda)
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"
    return out


def devices() -> list[str]:
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    lines = [f"cpu: {platform.processor() or platform.machine()}, {cores} usable cores"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        bf16 = torch.cuda.is_bf16_supported() if i == 0 else "?"
        lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}"
                     + (f", bf16 {'yes' if bf16 else 'no'}" if i == 0 else ""))
    return lines


def cuda_devices() -> list[str]:
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


# ---- the memory layer ------------------------------------------------------------------------
def _memory_case(device: str, seed: int = 0):
    """A memory with one frozen and one current grow, inputs and an upstream gradient."""
    import torch

    from .memory import RankOneMemory

    g = torch.Generator().manual_seed(seed)
    mem = RankOneMemory(48, 40, topk=4, tau=0.01, delta=0.2, scale=2.0, r=6)
    mem.grow()
    with torch.no_grad():
        mem.values.copy_(torch.randn(mem.values.shape, generator=g) * 0.1)
    mem.grow()  # freezes the first 6 atoms, adds 6 current ones
    with torch.no_grad():
        mem.values.copy_(torch.randn(mem.values.shape, generator=g) * 0.1)
    x = torch.randn(3, 7, 48, generator=g)
    y0 = torch.randn(3, 7, 40, generator=g)
    up = torch.randn(3, 7, 40, generator=g)
    return mem.to(device), x.to(device), y0.to(device), up.to(device)


def _memory_result(mem, x, y0, up, reference: bool = False) -> dict:
    x = x.clone().requires_grad_(True)
    mem.train()
    y = (mem.reference_forward if reference else mem)(x, y0)
    (y * up).sum().backward()
    out = {"output": y.detach().cpu(), "grad x": x.grad.cpu(), "grad keys": mem.keys.grad.cpu(),
           "grad values": mem.values.grad.cpu()}
    mem.zero_grad(set_to_none=True)
    return out


def _compare(a: dict, b: dict, rtol: float, atol: float) -> tuple[bool, str]:
    """Elementwise ``|a - b| <= atol + rtol * |b|`` for every tensor; the message gives the
    largest absolute difference and where."""
    import torch

    worst, where, ok = 0.0, "output", True
    for k in a:
        if not torch.isfinite(a[k]).all():
            return False, f"{k} is not finite"
        d = (a[k] - b[k]).abs()
        ok = ok and bool((d <= atol + rtol * b[k].abs()).all())
        if d.max().item() > worst:
            worst, where = d.max().item(), k
    return ok, f"largest difference {worst:.1e} (in {where}); tolerance {atol:g} + {rtol:g}*|value|"


def check_memory_cpu() -> Check:
    mem, x, y0, up = _memory_case("cpu")
    fast = _memory_result(mem, x, y0, up)
    ref = _memory_result(mem, x, y0, up, reference=True)
    ok, msg = _compare(fast, ref, **MEMORY_TOL)
    return Check("memory layer on cpu (fast path vs formula, float32)", ok, msg)


def check_memory_device(device: str) -> Check:
    import torch

    mem, x, y0, up = _memory_case("cpu")
    cpu = _memory_result(mem, x, y0, up)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        mem_d, x_d, y0_d, up_d = _memory_case(device)
        dev = _memory_result(mem_d, x_d, y0_d, up_d)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    ok, msg = _compare(dev, cpu, **MEMORY_TOL)
    return Check(f"memory layer on {device} vs cpu (float32, output and gradients)", ok, msg)


# ---- bf16 autocast on the protocols ------------------------------------------------------------
def protocol_case(kind: str, cache_dir: Optional[str] = None, method: str = "moram"):
    """A MoRAM module on a tiny stream after ``begin_task(0)`` and one training batch:
    ``kind`` is ``clip`` (synthetic-tiny, tiny CLIP) or ``text`` (trace-mini, tiny Llama)."""
    from . import registry
    from .config import resolve_config
    from .data import TaskStreamDataModule

    over = [f"method={method}"]
    over += ["stream=synthetic-tiny"] if kind == "clip" else ["stream=trace-mini", "backbone=tiny-llama"]
    if cache_dir:
        over.append(f"cache_dir={cache_dir}")
    cfg = resolve_config(over)
    stream = registry.STREAMS[cfg.stream.name](cfg)
    backbone = registry.BACKBONES[cfg.backbone.name](cfg)
    module = registry.METHODS[cfg.method.name](cfg, stream, backbone)
    dm = TaskStreamDataModule(stream, batch_size=4, steps_per_task=[1] * len(stream), seed=0, eval_batch_size=4,
                              transform=getattr(backbone, "preprocess", None))
    module.meta_begin_task(0, dm, restoring=False)
    dm.set_task(0)
    batch = next(iter(dm.train_dataloader()))
    return module, batch


def _to(batch, device):
    import torch

    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _loss_and_grads(module, batch, device: str, bf16: bool):
    import torch

    module.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        loss, _ = module.protocol.loss(batch, 0)
    loss.backward()
    grads = [p.grad for p in module.trainable_parameters() if p.grad is not None]
    return loss.detach().float().item(), grads


def check_bf16(kind: str, device: str, cache_dir: Optional[str] = None) -> Check:
    import math

    import torch

    module, batch = protocol_case(kind, cache_dir)
    module.to(device)
    module.train()
    batch = _to(batch, device)
    torch.manual_seed(0)
    ref, _ = _loss_and_grads(module, batch, device, bf16=False)
    torch.manual_seed(0)
    low, grads = _loss_and_grads(module, batch, device, bf16=True)
    finite = math.isfinite(low) and all(torch.isfinite(g).all() for g in grads)
    rel = abs(low - ref) / max(abs(ref), 1e-8)
    name = f"bf16 autocast, {'CLIP' if kind == 'clip' else 'text'} protocol on {device} (moram)"
    if not grads:
        return Check(name, False, "no gradient reached the trainable parameters")
    ok = finite and rel <= BF16_LOSS_RTOL
    return Check(name, ok, f"loss float32 {ref:.4f}, bf16 {low:.4f} (relative difference {rel:.2%}, "
                            f"tolerance {BF16_LOSS_RTOL:.0%}); gradients {'finite' if finite else 'NOT finite'}")


# ---- DDP on 2 GPUs -------------------------------------------------------------------------------
def _fit_matrix(out: Path, devices: int, timeout: int = 900):
    from . import results_io

    cmd = [sys.executable, "-m", "moram_bench", "fit", "stream=synthetic-tiny", "method=moram", "method.r=2",
           "stream.iterations=6", f"output_dir={out}", f"cache_dir={out.parent}/cache",
           "trainer.enable_progress_bar=false", "trainer.accelerator=gpu", f"trainer.devices={devices}",
           "trainer.strategy=ddp"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"fit with {devices} GPU(s) exited {p.returncode}: {tail}")
    return results_io.read_matrix_csv(out / "matrix.csv")[0]


def check_ddp() -> Check:
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="moram-doctor-ddp-") as tmp:
        one = _fit_matrix(Path(tmp) / "one", 1)
        two = _fit_matrix(Path(tmp) / "two", 2)
    if one.shape != two.shape:
        return Check("DDP, 2 GPUs vs 1 (synthetic-tiny)", False, f"matrix shapes differ: {one.shape} vs {two.shape}")
    diff = float(np.abs(one - two).max())
    exact = "identical matrices" if diff == 0 else f"largest difference {diff:.2f} points"
    return Check("DDP, 2 GPUs vs 1 (synthetic-tiny)", diff <= DDP_TOL, f"{exact} (tolerance {DDP_TOL} points)")


# ---- data ----------------------------------------------------------------------------------------
def check_data_dir(data_dir: str) -> list[Check]:
    from . import registry
    from .check_data import DATA_CHECKS, check_stream
    from .config import resolve_config

    registry.discover()
    out = []
    for name in sorted(DATA_CHECKS):
        t0 = time.time()
        try:
            cfg = resolve_config([f"stream={name}", f"data_dir={data_dir}"])
            report = check_stream(cfg)
        except Exception as e:  # one line per stream, never a traceback
            out.append(Check(f"data for {name}", False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                             time.time() - t0))
            continue
        n_found = sum(d.ok for d in report.domains)
        if report.error:
            c = Check(f"data for {name}", False, report.error)
        elif n_found == 0:
            c = Check(f"data for {name}", None, f"not in {data_dir} (none of its {len(report.domains)} parts found)")
        elif report.ok:
            c = Check(f"data for {name}", True, f"all {len(report.domains)} parts found")
        else:
            c = Check(f"data for {name}", False, f"{n_found}/{len(report.domains)} parts found; first problem: "
                                                 f"{report.first_problem()}", lines=report.format().splitlines())
        c.seconds = time.time() - t0
        out.append(c)
    return out


# ---- the report ----------------------------------------------------------------------------------
def timed(fn: Callable[[], "Check | list[Check]"], name: str) -> list[Check]:
    t0 = time.time()
    try:
        res = fn()
    except Exception as e:
        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        res = Check(name, False, f"raised {type(e).__name__}: {first}")
    checks = res if isinstance(res, list) else [res]
    if not isinstance(res, list):
        res.seconds = time.time() - t0
    return checks


def run_checks(data_dir: Optional[str] = None, estimate: Optional[bool] = None, cache_dir: Optional[str] = None,
               ddp: bool = True, echo: Callable[[str], None] = print) -> list[Check]:
    """Run every check that applies to this machine, printing each result as it comes."""
    import torch

    torch.manual_seed(0)
    checks: list[Check] = []

    def add(fn, name):
        for c in timed(fn, name):
            checks.append(c)
            echo(c.line())
            for ln in c.lines:
                echo("      " + ln)

    gpus = cuda_devices()
    add(check_memory_cpu, "memory layer on cpu")
    for d in gpus:
        add(lambda d=d: check_memory_device(d), f"memory layer on {d}")
    for dev in ["cpu", *gpus]:
        for kind in ("clip", "text"):
            add(lambda k=kind, d=dev: check_bf16(k, d, cache_dir), f"bf16 autocast {kind} on {dev}")
    if len(gpus) >= 2 and ddp:
        add(check_ddp, "DDP, 2 GPUs vs 1")
    elif len(gpus) >= 2:
        checks.append(Check("DDP, 2 GPUs vs 1", None, "skipped (--no-ddp)"))
        echo(checks[-1].line())
    else:
        checks.append(Check("DDP, 2 GPUs vs 1", None, f"needs 2 GPUs, found {len(gpus)} (the CPU test suite proves "
                                                      "2-process DDP equals 1 process)"))
        echo(checks[-1].line())
    if data_dir:
        add(lambda: check_data_dir(data_dir), "data")
    else:
        checks.append(Check("real data", None, "no data_dir=PATH given"))
        echo(checks[-1].line())
    if estimate is None:
        estimate = bool(gpus)
        if not gpus:
            checks.append(Check("wall-time estimate", None, "skipped on CPU (a ViT-B/16 step takes minutes here); "
                                                             "`rehearse stream=xtail` measures it, or pass --estimate"))
            echo(checks[-1].line())
    if estimate:
        def est():
            from .rehearse import estimate_report

            lines = estimate_report(device=gpus[0] if gpus else "cpu")
            return Check("wall-time estimate of the real streams", True, "from measured steps (below)", lines=lines)
        add(est, "wall-time estimate")
    return checks


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m moram_bench doctor",
                                     description="self-test of this machine: versions, devices, numerics, DDP, data, "
                                                 "wall-time estimate (exit 1 when a check fails)")
    parser.add_argument("overrides", nargs="*", help="data_dir=PATH (check the real streams' data), cache_dir=PATH")
    parser.add_argument("--no-estimate", action="store_true", help="skip the wall-time estimate")
    parser.add_argument("--estimate", action="store_true", help="estimate the wall time on CPU too (slow)")
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-GPU DDP check")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    opts = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in ("data_dir", "cache_dir"):
            print(f"error: doctor takes data_dir=PATH and cache_dir=PATH, not {item!r}", file=sys.stderr)
            return USAGE_ERROR
        opts[key] = value
    if opts.get("data_dir") and not os.path.isdir(os.path.expanduser(opts["data_dir"])):
        print(f"error: data_dir not found: {opts['data_dir']}", file=sys.stderr)
        return USAGE_ERROR
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.time()
    print("moram_bench doctor")
    print("versions:")
    for k, v in versions().items():
        print(f"  {k:<20} {v}")
    print("devices:")
    for ln in devices():
        print(f"  {ln}")
    if not cuda_devices():
        print("  no CUDA GPU found: running the CPU checks only")
    print("checks:")
    estimate = False if args.no_estimate else (True if args.estimate else None)
    checks = run_checks(opts.get("data_dir"), estimate=estimate, cache_dir=opts.get("cache_dir"),
                        ddp=not args.no_ddp, echo=lambda s: print(s, flush=True))
    failed = [c for c in checks if c.ok is False]
    passed = sum(c.ok is True for c in checks)
    skipped = sum(c.ok is None for c in checks)
    print(f"\ndoctor: {passed} passed, {len(failed)} failed, {skipped} skipped ({time.time() - t0:.0f}s)")
    for c in failed:
        print(f"  FAILED {c.name}: {c.detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
