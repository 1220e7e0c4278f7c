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


def _tiny_overrides(out, *extra):
    return ["stream=synthetic-tiny", f"output_dir={out}", "trainer.enable_progress_bar=false",
            f"cache_dir={out}/cache", *extra]


@pytest.fixture(scope="session")
def tiny_overrides():
    """``tiny_overrides(out, *extra)``: overrides for a fast end-to-end fit into ``out``: the
    synthetic stream on the random tiny CLIP, no progress bar, a cache inside ``out``."""
    return _tiny_overrides
