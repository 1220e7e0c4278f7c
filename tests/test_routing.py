"""The routing report: hand-computed shares from a fake router, a real tiny RankOneMemory
(exact softmax shares, the gate, the zero-shot fallback), the files, and a real MoRAM
module on the synthetic stream."""
import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from moram_bench import routing as RT
from moram_bench.adapters.inject import AdaptedLinear


class FakeRouter(nn.Module):
    """Routing whose mass we control: every token is a "type" id and adds the row
    ``table[type]`` (mass per task) while recording."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float64)
        self.record_routing = False
        self.mass = torch.zeros(self.table.shape[1], dtype=torch.float64)
        self.routing_tokens = torch.zeros((), dtype=torch.int64)

    def reset_routing(self):
        self.mass.zero_()
        self.routing_tokens.zero_()

    def routing_mass_by_task(self):
        return self.mass.clone()

    def forward(self, x):
        if self.record_routing:
            for t in x.flatten().tolist():
                self.mass += self.table[int(t)]
            self.routing_tokens += x.numel()
        return x


class TinyMethod(pl.LightningModule):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.prompt_calls = 0

    def on_test_epoch_start(self):
        # like the CLIP protocol's class-prompt encoding: routed, but not test inputs
        self.prompt_calls += 1
        for layer in self.layers:
            layer.record_routing = True  # even if it were on, the recorder must not count it
            layer(torch.zeros(5, dtype=torch.long))

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x = batch
        for layer in self.layers:
            x = layer(x)
        return torch.zeros(len(batch))


class ListData(pl.LightningDataModule):
    def __init__(self, loaders):
        super().__init__()
        self.loaders = loaders

    def test_dataloader(self):
        return [DataLoader(batches, batch_size=None) for batches in self.loaders]


def test_fake_router_shares_are_hand_computed():
    # token types: 0 (domain 1), 1 and 2 (domain 2); mass per token on (task 1, task 2)
    layer_a = FakeRouter([[3, 1], [1, 1], [0, 4]])
    layer_b = FakeRouter([[1, 0], [0, 2], [2, 0]])
    module = TinyMethod([layer_a, layer_b])
    data = ListData([
        [torch.zeros(2, 2, dtype=torch.long)],                                  # 4 tokens of type 0
        [torch.ones(2, 2, dtype=torch.long), torch.full((1, 2), 2, dtype=torch.long)],  # 4 x type 1, 2 x type 2
    ])
    res = RT.routing_report(module, data, num_tasks=2)
    # domain 1: A (12, 4) -> (.75, .25); B (4, 0) -> (1, 0); mean over layers (.875, .125)
    # domain 2: A (4, 4) + (0, 8) = (4, 12) -> (.25, .75); B (0, 8) + (4, 0) -> (1/3, 2/3)
    expected = np.array([[0.875, 0.125], [(0.25 + 1 / 3) / 2, (0.75 + 2 / 3) / 2]])
    np.testing.assert_allclose(res.matrix, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.beyond_last_task, [0, 0])
    np.testing.assert_array_equal(res.tokens, [8, 12])  # tokens x 2 layers
    assert res.fallback_rate is None and res.layers == 2
    assert module.prompt_calls == 1
    # statistics reset, the recording switch restored to what it was before the pass
    assert layer_a.mass.sum() == 0 and layer_a.record_routing is False


def test_shares_skip_silent_layers_and_separate_atoms_after_the_last_task():
    mass = np.array([
        [[1, 1, 2], [0, 0, 0]],   # test task 1: layer 2 routed nothing -> left out
        [[0, 3, 1], [2, 2, 0]],   # test task 2
    ], dtype=float)
    m, beyond = RT.shares_from_mass(mass)
    np.testing.assert_allclose(m, [[0.25, 0.25], [0.25, 0.625]])
    np.testing.assert_allclose(beyond, [0.5, 0.125])
    m, beyond = RT.shares_from_mass(np.zeros((2, 1, 2)))
    assert np.isnan(m).all() and np.isnan(beyond).all()


def _memory_method(delta):
    from moram_bench.memory import RankOneMemory

    mem = RankOneMemory(2, 2, topk=2, tau=0.5, delta=delta)
    for key in ([1.0, 0.0], [0.0, 1.0]):  # task 1's atom reads x1, task 2's reads x2
        mem.grow(1)
        with torch.no_grad():
            mem.keys.copy_(torch.tensor([key]))
            mem.values.fill_(1.0)
    mem.freeze()
    layer = AdaptedLinear(nn.Linear(2, 2), mem)

    class Method(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def test_step(self, batch, batch_idx, dataloader_idx=0):
            self.layer(batch)
            return torch.zeros(len(batch))

    return Method(), mem


def test_real_rank_one_memory_softmax_shares():
    module, mem = _memory_method(delta=0.0)  # no gate: both atoms always weigh in
    data = ListData([[torch.tensor([[[2.0, 0.0]] * 3])], [torch.tensor([[[0.0, 0.5]]] * 2)]])
    res = RT.routing_report(module, data, num_tasks=2)
    # z = (1, 0) -> softmax((1, 0) / 0.5) = (e^2, 1) / (e^2 + 1)
    big = math.exp(2) / (math.exp(2) + 1)
    np.testing.assert_allclose(res.matrix, [[big, 1 - big], [1 - big, big]], rtol=0, atol=1e-6)  # float32 memory
    np.testing.assert_array_equal(res.tokens, [3, 2])
    np.testing.assert_array_equal(res.fallback_rate, [0, 0])
    assert not mem.record_routing and mem.routing_tokens == 0


def test_real_rank_one_memory_gate_and_fallback():
    module, _ = _memory_method(delta=0.2)
    # domain 2: two tokens reading atom 2, two with no atom passing the gate (z < 0.2)
    data = ListData([[torch.tensor([[[1.0, 0.0]]])],
                     [torch.tensor([[[0.0, 1.0], [-1.0, -1.0]], [[0.0, 3.0], [-2.0, -1.0]]])]])
    res = RT.routing_report(module, data, num_tasks=2)
    np.testing.assert_allclose(res.matrix, [[1.0, 0.0], [0.0, 1.0]], atol=1e-12)
    np.testing.assert_allclose(res.fallback_rate, [0.0, 0.5])
    np.testing.assert_array_equal(res.tokens, [1, 4])


def test_module_without_routing_adapters():
    assert not RT.supports_routing(nn.Linear(2, 2))
    module, _ = _memory_method(delta=0.0)
    assert RT.supports_routing(module) and list(RT.routing_adapters(module)) == ["layer.adapter"]


def test_write_routing_report_files(tmp_path):
    m = np.array([[0.875, 0.125, 0.0], [0.25, 0.5, 0.25], [np.nan, np.nan, np.nan]])
    res = RT.RoutingResult(matrix=m, beyond_last_task=np.zeros(3), tokens=np.array([8.0, 12.0, 0.0]),
                           fallback_rate=np.array([0.0, 0.5, np.nan]), layers=2)
    paths = RT.write_routing_report(tmp_path, m, ["a", "b,c", "d"], res)
    assert [p.name for p in paths] == ["routing.csv", "routing.png", "routing.json"]
    assert (tmp_path / "routing.csv").read_text() == (
        'test_task,a,"b,c",d\na,0.8750,0.1250,0.0000\n"b,c",0.2500,0.5000,0.2500\nd,,,\n')
    back, names = RT.read_routing_csv(tmp_path / "routing.csv")
    assert names == ["a", "b,c", "d"]
    np.testing.assert_array_equal(back, m)
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(tmp_path / "routing.png") as im:
        im.verify()
    info = json.loads((tmp_path / "routing.json").read_text())
    assert info["diagonal_mean"] == pytest.approx((0.875 + 0.5) / 2)
    assert info["fallback_rate"] == [0.0, 0.5, None] and info["layers"] == 2
    assert info["matrix"][2] == [None, None, None] and info["orientation"].startswith("rows: test task")
    with pytest.raises(ValueError, match="T x T"):
        RT.write_routing_report(tmp_path, m[:2], ["a", "b", "c"])


def test_moram_module_on_the_synthetic_stream(tmp_path):
    """The call the runner makes at the end of a run, on a real MoRAM module."""
    from moram_bench import registry
    from moram_bench.config import resolve_config

    registry.discover()
    if "synthetic-tiny" not in registry.STREAMS:
        pytest.skip("the synthetic-tiny stream is not available")
    from moram_bench.data import TaskStreamDataModule

    cfg = resolve_config(["stream=synthetic-tiny", "method=moram", "method.r=2", "stream.num_tasks=2",
                          "stream.test_per_class=2", f"cache_dir={tmp_path}/cache"])
    stream = registry.STREAMS[cfg.stream.name](cfg)
    backbone = registry.BACKBONES[cfg.backbone.name](cfg)
    module = registry.METHODS["moram"](cfg, stream, backbone)
    for t in range(len(stream)):
        module.meta_begin_task(t, None)
        module.meta_end_task(t, None)
    dm = TaskStreamDataModule(stream, batch_size=4, steps_per_task=[1, 1], seed=0, eval_batch_size=8,
                              transform=getattr(backbone, "preprocess", None))
    res = RT.routing_report(module, dm)
    assert res.matrix.shape == (2, 2) and res.layers == len(module.adapters())
    finite = np.isfinite(res.matrix).all(axis=1)
    assert finite.any()
    np.testing.assert_allclose(res.matrix[finite].sum(axis=1) + res.beyond_last_task[finite], 1.0, atol=1e-9)
    # test inputs only: each test image's tokens are counted once per adapted layer
    assert (res.tokens > 0).all()
    paths = RT.write_routing_report(tmp_path, res.matrix, stream.task_names, res)
    assert all(p.exists() for p in paths)
