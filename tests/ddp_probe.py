"""Record what one training task does, step by step, through the runner's own pieces
(``runner.build`` and ``runner.make_trainer``: the same module, DataModule, Trainer and DDP
strategy as ``fit``), so that a 1-process and a 2-process run can be compared exactly.

    python tests/ddp_probe.py OUT_FILE STEPS [key=value ...]

trains the first task for STEPS steps and writes OUT_FILE (torch.save, rank 0 only) with,
per step: the global batch as the ranks saw it (labels and an exact per-sample fingerprint
of the inputs, interleaved back into global order), the global loss (mean of the ranks'
losses: each rank returns ``world x`` its share, see ``ClipProtocol.loss``), the gradients
after DDP's all-reduce, and the trainable parameters after the optimiser step.
Lightning's DDP launcher re-runs this script for rank 1 (as it re-runs the CLI).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of ``t`` (same shape on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rank r holds global rows r, r+world, ... (``StepBatchSampler``): undo that."""
    world = len(parts)
    n = sum(len(p) for p in parts)
    out = parts[0].new_empty((n, *parts[0].shape[1:]))
    for r, p in enumerate(parts):
        out[r::world] = p
    return out


class Recorder(pl.Callback):
    def __init__(self):
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        x = batch["x"].detach().double().flatten(1)
        fp = torch.stack([x.sum(1), (x * x).sum(1), batch["label"].double()], 1)
        self.steps.append({"batch": _interleave(_gather(fp))})

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
                           for p in module.trainable_parameters()])
        self.steps[-1]["grad"] = grads.clone()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        losses = _gather(loss.detach().reshape(1).double())
        self.steps[-1]["loss"] = torch.cat(losses).mean()
        self.steps[-1]["rank_losses"] = torch.cat(losses)
        self.steps[-1]["params"] = torch.cat([p.detach().flatten() for p in module.trainable_parameters()]).clone()


def main(argv: list[str]) -> None:
    out_file, steps, overrides = argv[0], int(argv[1]), argv[2:]
    from lightning.fabric.utilities.seed import seed_everything

    from moram_bench import logs, runner
    from moram_bench.config import resolve_config
    from moram_bench.tblog import RunLogger

    cfg = resolve_config([*overrides, f"stream.iterations={steps}", "trainer.enable_progress_bar=false"])
    runner.set_threads(cfg)
    logs.quiet_run()
    built = runner.build(cfg)
    seed_everything(int(cfg.seed) * 1000, verbose=False)
    built.module.meta_begin_task(0, built.data)
    built.data.set_task(0)
    rec = Recorder()
    log_dir = os.path.join(os.path.dirname(os.path.abspath(out_file)), "probe_logs")
    trainer = runner.make_trainer(cfg, RunLogger(log_dir), [rec], max_steps=steps, label="probe")
    trainer.fit(built.module, datamodule=built.data)
    if trainer.global_rank == 0:
        names = [(n, p.numel()) for n, p in built.module.named_parameters() if p.requires_grad]
        torch.save({"steps": rec.steps, "threads": torch.get_num_threads(), "world": trainer.world_size,
                    "overrides": overrides, "names": names}, out_file)


if __name__ == "__main__":
    main(sys.argv[1:])
