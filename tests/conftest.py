import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def tiny_overrides(tmp_path, *extra):
    """Overrides for a fast end-to-end fit: the synthetic stream on the random tiny CLIP."""
    return ["stream=synthetic-tiny", f"output_dir={tmp_path}", "trainer.enable_progress_bar=false",
            f"cache_dir={tmp_path}/cache", *extra]
