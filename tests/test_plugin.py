"""'Add your own baseline': a new method file outside the package, registered the documented
way (the @register_method decorator + `plugins=[path]` or MORAM_BENCH_PLUGINS), fits a stream."""
import json
import textwrap

from moram_bench.__main__ import main

METHOD_FILE = '''
"""last-layer-lora: LoRA on the last text block's MLP only (a minimal example method)."""
from moram_bench.adapters.lora import LoRA
from moram_bench.method import ContinualModule
from moram_bench.registry import register_method


@register_method("last-layer-lora")
class LastLayerLoRA(ContinualModule):
    """LoRA on the last text-tower MLP, shared by all tasks (a tutorial example)."""

    def setup_adapters(self):
        self.inject(lambda name, lin: LoRA(lin.in_features, lin.out_features, int(self.hp.r)),
                    patterns=[r"^transformer\\.resblocks\\.1\\.mlp\\.c_fc$"])
'''

DEFAULTS = '''
r: 2
optim: {name: adamw, lr: 0.01, betas: [0.9, 0.999], weight_decay: 0.0, schedule: cosine}
'''


def test_a_method_file_in_a_temporary_place_fits_a_stream(tiny_overrides, tmp_path, capsys):
    plugin_dir = tmp_path / "my_methods"
    plugin_dir.mkdir()
    (plugin_dir / "last_layer_lora.py").write_text(textwrap.dedent(METHOD_FILE))
    (plugin_dir / "last-layer-lora.yaml").write_text(DEFAULTS)  # defaults beside the file

    assert main(["list", "--plugins", str(plugin_dir)]) == 0
    assert "last-layer-lora" in capsys.readouterr().out

    out = tmp_path / "run"
    code = main(["fit", *tiny_overrides(out, "method=last-layer-lora", f"plugins=[{plugin_dir}]", "method.r=3")])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "last-layer-lora"
    assert m["config"]["method"]["r"] == 3 and m["config"]["method"]["optim"]["lr"] == 0.01
    # one adapted Linear (64 -> 256) with rank 3: 3*64 + 256*3 trainable parameters
    assert m["trainable_params_per_task"] == [3 * 64 + 256 * 3] * 3
