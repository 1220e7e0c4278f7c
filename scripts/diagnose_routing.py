#!/usr/bin/env python
"""Where does MoRAM's routing go while it learns a domain? A compact 2-task diagnosis.

Trains one method through a few domains of the embedded ``xtail-mini`` stream (default:
fashion_mnist, then digits; seed 42) with the package's own pieces and prints Markdown:

* accuracy (%) on ``--test-items`` test images per domain, before training and after
  each task (task-agnostic, the whole stream's label space, as ``fit`` scores);
* MoRAM only, per layer group (the 36 MiniLM linears, ``text.proj``,
  ``visual.head.conv_head``, ``visual.head.proj``), while training the LAST task: the
  share of the training tokens whose winning atom (largest routing weight) is one of the
  current task's new atoms, the new atoms' share of the routing weight and of the top-k
  slots, the winner's mean weight, and the mean input norm;
* MoRAM only: the mean key norm of each task's atoms when fresh and after the stream, and
  their mean value norm;
* methods that route (MoRAM, MoE-LoRA): the routing report after the last task, as
  ``routing.csv`` computes it (image-side layers, since only images are routed while the
  test inputs are recorded): row = test domain, column = the atoms or experts of a task,
  share of the routing weight.

How the pieces are built and trained (nothing is re-implemented):

* the config is resolved as ``python -m moram_bench fit`` resolves it
  (``moram_bench.config.resolve_config`` with ``key=value`` overrides), and stream,
  backbone (with its frozen trunk's feature cache), method and DataModule come from
  ``moram_bench.runner.build``;
* every task: reseed ``(seed, task)`` and ``meta_begin_task`` as the runner does, then a
  plain loop over the DataModule's own training batches (the batches ``fit`` draws for
  this seed) with the method's ``training_step`` and the optimiser and per-step schedule
  of its ``configure_optimizers``; then ``meta_end_task`` and an evaluation with the
  method's ``test_step``. The loop replaces the Lightning Trainer; a ``barebones``
  Trainer object is attached only so that ``configure_optimizers`` reads ``max_steps``
  (and ``self.log`` is a no-op).

The routing probe is a forward hook on every ``RankOneMemory`` (nothing in the package
changes): in training mode it recomputes the call's routing from the layer's input with
the memory's own routing function (``memory._route``) on the memory's keys (its frozen
keys as in its state dict, and its current ``keys``). The memory's routing statistics
(``record_routing``, switched on while training) are compared with the probe's: the
weight that the probe puts on the new atoms must equal the memory's own
``routing_mass_by_task()`` entry of the current task; the largest relative difference is
printed. Text tokens are counted as the layers read them: the class prompts of the
current task, padding included (the text tower pads each batch to its longest prompt).

One seed, a few hundred test images: differences of a few points are noise. Example
(the commands docs/EMBEDDED.md quotes)::

    python scripts/diagnose_routing.py --method moram --image-side tokens
    python scripts/diagnose_routing.py --method moram --image-side tokens --tau 0.1
    python scripts/diagnose_routing.py --method seq-lora --image-side tokens

Run it with one thread (``OMP_NUM_THREADS=1``; the script sets torch to 1 thread).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import time
import warnings
from collections import defaultdict
from functools import partial

import torch

METHODS = ("moram", "seq-lora", "moe-lora")
IMAGE_SIDES = ("tokens", "pooled")
DEFAULT_DOMAINS = "fashion_mnist,digits"

# layer groups of mini-clip's adapted linears (the first matching pattern names the group)
LAYER_GROUPS = (
    ("MiniLM linears", r"(^|\.)text\.transformer\."),
    ("text.proj", r"(^|\.)text\.proj$"),
    ("visual.head.conv_head", r"(^|\.)visual\.head\.conv_head$"),
    ("visual.head.proj", r"(^|\.)visual\.head\.proj$"),
)
OTHER_GROUP = "other layers"
TEXT_GROUP = LAYER_GROUPS[0][0]


def layer_group(name: str) -> str:
    for group, pattern in LAYER_GROUPS:
        if re.search(pattern, name):
            return group
    return OTHER_GROUP


# ---------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=METHODS, default="moram")
    p.add_argument("--image-side", choices=IMAGE_SIDES, default="tokens",
                   help="mini-clip's backbone.image_side (default tokens)")
    p.add_argument("--tau", type=float, default=None,
                   help="MoRAM's method.tau (default: the method's, 0.01)")
    p.add_argument("--iterations", type=int, default=None,
                   help="training steps per task, stream.iterations (default: the stream's, 150)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--test-items", type=int, default=300,
                   help="test images per domain, a seeded random subset (all if fewer)")
    p.add_argument("--domains", default=DEFAULT_DOMAINS,
                   help=f"comma-separated xtail-mini domains, in task order (default {DEFAULT_DOMAINS})")
    args = p.parse_args(argv)
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    if not args.domains:
        p.error("--domains is empty")
    if args.tau is not None and args.method != "moram":
        p.error("--tau is MoRAM's temperature; it applies to --method moram only")
    if args.test_items < 1:
        p.error("--test-items must be >= 1")
    if args.iterations is not None and args.iterations < 1:
        p.error("--iterations must be >= 1")
    return args


def overrides(args: argparse.Namespace) -> list[str]:
    """The ``fit`` overrides this diagnosis corresponds to."""
    out = [f"method={args.method}", "stream=xtail-mini", f"seed={args.seed}",
           f"stream.domains=[{','.join(args.domains)}]", f"backbone.image_side={args.image_side}",
           "trainer.num_threads=1", "trainer.enable_progress_bar=false"]
    if args.tau is not None:
        out.append(f"method.tau={args.tau}")
    if args.iterations is not None:
        out.append(f"stream.iterations={args.iterations}")
    return out


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this output."""
    parts = ["python scripts/diagnose_routing.py", f"--method {args.method}", f"--image-side {args.image_side}"]
    if args.tau is not None:
        parts.append(f"--tau {args.tau:g}")
    if args.iterations is not None:
        parts.append(f"--iterations {args.iterations}")
    if args.seed != 42:
        parts.append(f"--seed {args.seed}")
    if args.test_items != 300:
        parts.append(f"--test-items {args.test_items}")
    if ",".join(args.domains) != DEFAULT_DOMAINS:
        parts.append(f"--domains {','.join(args.domains)}")
    return " ".join(parts)


# ------------------------------------------------------------------------ routing probe
class RoutingProbe:
    """Forward hooks on every ``RankOneMemory`` of a method: per layer, while ``active``
    and the memory is in training mode, the routing of every token it reads.

    Per layer it sums: tokens; tokens whose winner (largest weight) is a new atom (index
    >= ``n_frozen``: added by the current task's ``grow``); the winner's weight; the
    weight on new atoms; top-k slots held by new atoms; the input norm.
    """

    COUNTERS = ("tokens", "new_wins", "winner_weight", "new_weight", "new_slots", "slots", "input_norm")

    def __init__(self, memories: dict):
        from moram_bench.memory import _route  # the routing function the memory's forward uses

        self._route = _route
        self.memories = memories
        self.active = False
        self.sums: dict[str, dict[str, float]] = {}
        # text layers: new-atom wins and tokens per position of the prompt (B, L, d inputs)
        self.positions: dict[str, list[torch.Tensor]] = {}
        self._group = {name: layer_group(name) for name in memories}
        self._frozen_keys: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(partial(self._hook, name)) for name, m in memories.items()]

    def begin_task(self) -> None:
        """Reset the sums; read each memory's frozen keys (they do not change in a task)."""
        self.sums = {name: dict.fromkeys(self.COUNTERS, 0.0) for name in self.memories}
        self.positions = {}
        self._frozen_keys = {name: m.state_dict()["frozen_keys"] for name, m in self.memories.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def all_keys(self, name: str) -> torch.Tensor:
        """The memory's keys in atom order: frozen atoms, then the current ones."""
        mem = self.memories[name]
        parts = [self._frozen_keys[name]]
        if mem.keys is not None:
            parts.append(mem.keys.detach())
        return torch.cat(parts)

    @torch.no_grad()
    def _hook(self, name, mem, inputs, output) -> None:
        x = inputs[0]
        if not self.active or not mem.training or mem.n_atoms == 0 or x.numel() == 0:
            return
        x2 = x.detach().reshape(-1, mem.d_in).float()
        keys = self.all_keys(name).float()
        p = x2 @ keys.t()
        k = min(max(mem.topk, 2), mem.n_atoms)  # the memory's k (module docstring of memory.py)
        idx, _, _, _, _, _, _, w = self._route(p, k, mem.tau, None, mem.eps)  # training: no gate
        best = w.argmax(dim=1, keepdim=True)
        winner = idx.gather(1, best).squeeze(1)
        is_new = idx >= mem.n_frozen
        s = self.sums[name]
        s["tokens"] += x2.shape[0]
        s["new_wins"] += float((winner >= mem.n_frozen).sum())
        s["winner_weight"] += float(w.gather(1, best).sum())
        s["new_weight"] += float((w * is_new).sum())
        s["new_slots"] += float(is_new.sum())
        s["slots"] += float(is_new.numel())
        s["input_norm"] += float(torch.linalg.vector_norm(x2, dim=1).sum())
        if x.dim() == 3 and self._group[name] == TEXT_GROUP:
            wins = (winner >= mem.n_frozen).view(x.shape[:2]).sum(0).double()
            acc = self.positions.setdefault(name, [torch.zeros_like(wins), torch.zeros_like(wins)])
            if acc[0].shape != wins.shape:  # prompts of another length: not comparable by position
                acc[0] = acc[1] = torch.full_like(wins, math.nan)
            acc[0] += wins
            acc[1] += x.shape[0]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per layer group: shares and means over the tokens of all its layers."""
        groups: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(self.COUNTERS, 0.0))
        layers: dict[str, int] = defaultdict(int)
        for name, s in self.sums.items():
            g = layer_group(name)
            layers[g] += 1
            for key, v in s.items():
                groups[g][key] += v
        out = {}
        for g, s in groups.items():
            n = s["tokens"]
            out[g] = {"layers": layers[g], "tokens": int(n),
                      "new_win_share": s["new_wins"] / n if n else math.nan,
                      "new_weight_share": s["new_weight"] / n if n else math.nan,
                      "new_slot_share": s["new_slots"] / s["slots"] if s["slots"] else math.nan,
                      "winner_weight": s["winner_weight"] / n if n else math.nan,
                      "input_norm": s["input_norm"] / n if n else math.nan}
        return out

    def position_shares(self) -> list[float] | None:
        """Text layers: share of new-atom wins per prompt position, over all their layers
        (None when the prompts' lengths varied between steps)."""
        if not self.positions:
            return None
        wins = sum(a[0] for a in self.positions.values())
        tokens = sum(a[1] for a in self.positions.values())
        if torch.isnan(wins).any():
            return None
        return (wins / tokens).tolist()


def key_value_norms(memories: dict) -> dict[str, dict[str, list[float]]]:
    """Per layer group, per task (grow call): mean key norm and mean value norm of its atoms,
    from the memories' state (frozen atoms as in the state dict, then the current ones)."""
    acc: dict[str, dict[str, list[list[float]]]] = {}
    for name, mem in memories.items():
        sd = mem.state_dict()
        keys, values = sd["frozen_keys"], sd["frozen_values"]
        if mem.keys is not None:
            keys = torch.cat([keys, mem.keys.detach()])
            values = torch.cat([values, mem.values.detach() * mem.scale], dim=1)
        ids = mem.atom_task_ids
        kn, vn = torch.linalg.vector_norm(keys, dim=1), torch.linalg.vector_norm(values, dim=0)
        g = acc.setdefault(layer_group(name), {"key_norm": [], "value_norm": []})
        for t in range(mem.n_grows):
            sel = ids == t
            while len(g["key_norm"]) <= t:
                g["key_norm"].append([])
                g["value_norm"].append([])
            g["key_norm"][t].extend(kn[sel].tolist())
            g["value_norm"][t].extend(vn[sel].tolist())
    return {grp: {k: [sum(v) / len(v) if v else math.nan for v in per_task] for k, per_task in d.items()}
            for grp, d in acc.items()}


def prompt_positions(backbone, prompts: list[str]) -> list[str]:
    """A label per position of the tokenised prompts: the token when every prompt has the
    same one there, else ``(varies)`` (the class name, or padding)."""
    ids = backbone.tokenize(prompts)
    hf = getattr(backbone.tokenizer, "tokenizer", None)
    labels = []
    for pos, column in enumerate(ids.t().tolist()):
        if len(set(column)) > 1:
            labels.append("(varies)")
        elif hf is not None and hasattr(hf, "convert_ids_to_tokens"):
            labels.append(str(hf.convert_ids_to_tokens([column[0]])[0]))
        else:
            labels.append(f"#{pos}")
    return labels


# --------------------------------------------------------------------------- evaluation
def test_loaders(data, num_tasks: int, items: int, seed: int, batch_size: int):
    """One loader per task: a seeded random subset of ``items`` test samples (all if fewer)."""
    from torch.utils.data import DataLoader, Subset

    loaders = []
    for t in range(num_tasks):
        ds = data.dataset("test", t)
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (t + 1))
        idx = sorted(torch.randperm(len(ds), generator=g)[:items].tolist())
        loaders.append(DataLoader(Subset(ds, idx), batch_size=batch_size, shuffle=False,
                                  collate_fn=data.collate_fn))
    return loaders


@torch.no_grad()
def evaluate(module, loaders, trainer=None, recorder=None) -> list[float]:
    """Accuracy (%) per task with the method's own test hooks; ``recorder`` (a
    ``RoutingRecorder``) is driven through its callback hooks as ``trainer.test`` would."""
    module.eval()
    module.on_test_epoch_start()
    if recorder is not None:
        recorder.on_test_epoch_start(trainer, module)
    row = []
    for t, loader in enumerate(loaders):
        scores = []
        for i, batch in enumerate(loader):
            if recorder is not None:
                recorder.on_test_batch_start(trainer, module, batch, i, t)
            out = module.test_step(batch, i, t)
            if recorder is not None:
                recorder.on_test_batch_end(trainer, module, out, batch, i, t)
            scores.append(out)
        row.append(float(torch.cat(scores).mean()))
    if recorder is not None:
        recorder.on_test_epoch_end(trainer, module)
    module.on_test_epoch_end()
    module.train()
    return row


# ----------------------------------------------------------------------------- training
def stand_in_trainer(max_steps: int):
    """A Lightning Trainer object that is never run: ``configure_optimizers`` reads its
    ``max_steps`` and ``self.log`` is a no-op under ``barebones``."""
    import lightning.pytorch as pl

    return pl.Trainer(barebones=True, max_steps=max_steps, accelerator="cpu", devices=1)


def train_task(module, data, task: int, steps: int, grad_clip) -> float:
    """The task's training steps with the method's optimiser, schedule and training_step
    (Lightning's automatic optimisation order: step, zero_grad, backward, clip, optimiser
    step, scheduler step). Returns the last loss."""
    data.set_task(task)
    module.trainer = stand_in_trainer(steps)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    params = module.trainable_parameters()
    module.train()
    loss = torch.tensor(math.nan)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*barebones=True.*")  # self.log is off by design
        for i, batch in enumerate(data.train_dataloader()):
            loss = module.training_step(batch, i)
            opt.zero_grad(set_to_none=True)
            module.on_before_backward(loss)  # the method's non-finite loss check
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, float(grad_clip))
            opt.step()
            sched.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------- driver
def diagnose(args: argparse.Namespace, log=None) -> dict:
    """Build, train task after task, evaluate; returns everything the report prints."""
    from lightning.fabric.utilities.seed import seed_everything

    from moram_bench import logs, runner
    from moram_bench.config import resolve_config
    from moram_bench.memory import RankOneMemory
    from moram_bench.routing import RoutingRecorder, supports_routing

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    torch.set_num_threads(1)
    logs.quiet_run()
    cpu0 = time.process_time()
    cfg = resolve_config(overrides(args))
    with contextlib.redirect_stdout(sys.stderr):  # the build's progress lines stay off the report
        built = runner.build(cfg)
    module, data, stream, steps = built.module, built.data, built.stream, built.steps
    names = stream.task_names
    T = len(stream)
    log(f"built in {time.process_time() - cpu0:.0f} CPU-s")

    memories = {n: a for n, a in module.adapters().items() if isinstance(a, RankOneMemory)}
    probe = RoutingProbe(memories) if memories else None
    loaders = test_loaders(data, T, args.test_items, args.seed, int(cfg.data.eval_batch_size))
    grad_clip = cfg.method.get("optim", {}).get("grad_clip")

    accuracy = [evaluate(module, loaders)]  # row 0: the untrained backbone
    training, fresh_keys, checks = [], [], []
    routing = None
    for t in range(T):
        seed_everything(int(cfg.seed) * 1000 + t, verbose=False)  # as the runner reseeds
        module.meta_begin_task(t, data)
        if probe is not None:
            probe.begin_task()
            fresh_keys.append({g: d["key_norm"][t] for g, d in key_value_norms(memories).items()})
            for m in memories.values():
                m.reset_routing()
                m.record_routing = True
            probe.active = True
        cpu = time.process_time()
        last_loss = train_task(module, data, t, steps[t], grad_clip)
        log(f"task {t + 1}/{T} ({names[t]}): {steps[t]} steps in {time.process_time() - cpu:.0f} CPU-s, "
            f"last loss {last_loss:.3f}")
        if probe is not None:
            probe.active = False
            worst = 0.0
            for name, m in memories.items():
                m.record_routing = False
                own = float(m.routing_mass_by_task()[m.n_grows - 1])
                mine = probe.sums[name]["new_weight"]
                worst = max(worst, abs(own - mine) / max(abs(own), 1e-12))
                m.reset_routing()
            checks.append(worst)
            shares = probe.position_shares()
            labels = prompt_positions(module.backbone, stream.tasks[t].prompts())
            training.append({"groups": probe.summary(),
                             "text_positions": None if shares is None or len(shares) != len(labels)
                             else list(zip(labels, shares))})
        module.meta_end_task(t, data)
        module.trainer = stand_in_trainer(-1)
        last = t == T - 1
        recorder = RoutingRecorder(T) if last and supports_routing(module) else None
        accuracy.append(evaluate(module, loaders, module.trainer, recorder))
        if recorder is not None:
            routing = recorder.result.matrix.tolist()
    module.trainer = None
    atoms = key_value_norms(memories) if memories else None
    if probe is not None:
        probe.remove()
        for g, d in atoms.items():
            d["fresh_key_norm"] = [fk.get(g, math.nan) for fk in fresh_keys]
    log(f"total {time.process_time() - cpu0:.0f} CPU-s")
    h = cfg.method
    return {
        "command": command(args), "method": args.method, "image_side": args.image_side, "seed": args.seed,
        "tau": float(h.tau) if "tau" in h else None, "steps": steps, "batch_size": int(cfg.stream.batch_size),
        "test_items": [len(lo.dataset) for lo in loaders], "tasks": names,
        "atoms_per_task": int(h.r) if args.method == "moram" else None,
        "topk": int(h.topk) if args.method == "moram" else None,
        "accuracy": accuracy, "training": training, "atoms": atoms, "routing": routing,
        "probe_check": max(checks) if checks else None,
    }


# ------------------------------------------------------------------------------- report
def _f(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _group_order(groups) -> list[str]:
    known = [g for g, _ in LAYER_GROUPS] + [OTHER_GROUP]
    return [g for g in known if g in groups]


def render(r: dict) -> str:
    names, T = r["tasks"], len(r["tasks"])
    tau = f", tau {r['tau']:g}" if r["tau"] is not None else ""
    title = f"{r['method']}, image side {r['image_side']}{tau}"
    lines = [f"## {title}: {' -> '.join(names)} (xtail-mini, seed {r['seed']})",
             "",
             f"`{r['command']}`: {', '.join(map(str, r['steps']))} steps per task, batch {r['batch_size']}, "
             f"test images per domain: {', '.join(map(str, r['test_items']))}; one seed.",
             "",
             "### Accuracy (%) per test domain",
             "",
             "| after | " + " | ".join(names) + " |",
             "|---|" + "---|" * T]
    for i, row in enumerate(r["accuracy"]):
        label = "untrained" if i == 0 else f"task {i} ({names[i - 1]})"
        lines.append(f"| {label} | " + " | ".join(_f(v, 1) for v in row) + " |")
    diag = [r["accuracy"][i + 1][i] for i in range(T)]
    lines += ["", "Right after training each task (diagonal): "
              + ", ".join(f"{n} {_f(v, 1)}" for n, v in zip(names, diag))]

    if r["training"]:
        s = r["training"][-1]["groups"]
        k = r["atoms_per_task"]
        lines += ["", f"### Routing while training {names[-1]} (task {T} of {T})", "",
                  f"Per layer: {k * (T - 1)} frozen + {k} new atoms, top-{min(max(r['topk'], 2), k * T)} of {k * T}. "
                  "Shares over the training tokens the layers read (text: the current task's class "
                  "prompts, padding included); the winner is the atom with the largest routing weight.",
                  "",
                  "| layer group | layers | tokens | new atom wins | new atoms' weight | new atoms' top-k slots "
                  "| winner's weight | input norm |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in _group_order(s):
            d = s[g]
            lines.append(f"| {g} | {d['layers']} | {d['tokens']:,} | {_f(d['new_win_share'])} | "
                         f"{_f(d['new_weight_share'])} | {_f(d['new_slot_share'])} | {_f(d['winner_weight'])} | "
                         f"{_f(d['input_norm'], 1)} |")
        pos = r["training"][-1]["text_positions"]
        if pos:
            lines += ["", f"Share of new-atom wins per prompt position, {TEXT_GROUP} together "
                          f"({names[-1]} prompts; `(varies)`: the class name or padding):", "",
                      "| position | " + " | ".join(f"`{lab}`" for lab, _ in pos) + " |",
                      "|---|" + "---|" * len(pos),
                      "| new atom wins | " + " | ".join(_f(v) for _, v in pos) + " |"]
        lines += ["", f"Probe check: its weight on new atoms differs from the memories' own routing "
                      f"statistics by at most {r['probe_check']:.1e} (relative)."]
    if r["atoms"]:
        a = r["atoms"]
        head = " | ".join(f"{n}: keys fresh / trained | {n}: values" for n in names)
        lines += ["", "### Atoms after the last task (mean norms over each group's atoms)", "",
                  "| layer group | " + head + " |", "|---|" + "---|---|" * T]
        for g in _group_order(a):
            d = a[g]
            cells = [f"{_f(d['fresh_key_norm'][t])} / {_f(d['key_norm'][t])} | {_f(d['value_norm'][t])}"
                     for t in range(T)]
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
    if r["routing"] is not None:
        unit = "atoms" if r["method"] == "moram" else "experts"
        lines += ["", "### Routing report after the last task (image-side layers; share of the routing weight)", "",
                  "| test domain | " + " | ".join(f"{n} {unit}" for n in names) + " |", "|---|" + "---|" * T]
        for n, row in zip(names, r["routing"]):
            lines.append(f"| {n} | " + " | ".join(_f(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = diagnose(args)
    print(render(result), end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
