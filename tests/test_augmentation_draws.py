"""Training augmentation draws its randomness from the draw (seed, step, position in the
global batch), so 1 and 2 processes, and any number of DataLoader workers, see the same
pixels for the same step (docs/DDP.md)."""
import torch
from torch.utils.data import DataLoader, Dataset

from moram_bench.data import KeyedStepBatchSampler, StepBatchSampler, _ImageTaskDataset, collate, draw_key


class Images(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"image": torch.full((3,), float(i)), "label": i % 3}


def jitter(x):  # a random transform on torch's generator, like a random crop
    return x + torch.rand(3)


def batches(world: int, rank: int, workers: int = 0, steps: int = 4, batch: int = 6):
    ds = _ImageTaskDataset(Images(), task=1, offset=100, transform=jitter)
    sampler = KeyedStepBatchSampler(len(ds), batch, steps, seed=7, rank=rank, world=world)
    return list(DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate))


def test_two_processes_see_the_pixels_of_one():
    one = batches(1, 0)
    r0, r1 = batches(2, 0), batches(2, 1)
    for b, b0, b1 in zip(one, r0, r1):
        assert torch.equal(b["x"][0::2], b0["x"]) and torch.equal(b["x"][1::2], b1["x"])  # bit for bit
        assert torch.equal(b["label"][0::2], b0["label"]) and (b["label"] >= 100).all()


def test_workers_and_the_global_generator_do_not_change_the_draws():
    torch.manual_seed(0)
    a = batches(1, 0)
    ds = _ImageTaskDataset(Images(), task=0, offset=0, transform=jitter)
    state = torch.get_rng_state()
    ds[(3, draw_key(7, 0, 0))]
    assert torch.equal(torch.get_rng_state(), state)  # the process's generator is left as it was
    torch.manual_seed(123)
    b = batches(1, 0, workers=2)
    assert all(torch.equal(x["x"], y["x"]) for x, y in zip(a, b))


def test_each_draw_is_its_own_augmentation():
    one = batches(1, 0, steps=6)
    noise = torch.cat([b["x"] - b["x"].floor() for b in one])  # the jitter of every draw
    assert len({tuple(v.tolist()) for v in noise}) == len(noise)  # no two draws share a crop
    # the same indices as the plain sampler, in the same order
    plain = list(StepBatchSampler(10, 6, 6, seed=7))
    assert [b["label"].tolist() for b in one] == [[i % 3 + 100 for i in idx] for idx in plain]
    assert draw_key(7, 0, 0) == draw_key(7, 0, 0) != draw_key(7, 0, 1) and 0 <= draw_key(7, 5, 3) < 2 ** 63


def test_open_clips_training_transform_is_reproduced_per_draw():
    import open_clip
    from PIL import Image

    tf = open_clip.image_transform(32, is_train=True)  # random resized crop, as the real streams train
    img = Image.fromarray((torch.arange(64 * 64 * 3) % 251).reshape(64, 64, 3).to(torch.uint8).numpy())

    class One(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": img, "label": 0}

    ds = _ImageTaskDataset(One(), task=0, offset=0, transform=tf)
    a, b, c = ds[(0, draw_key(1, 0, 0))]["x"], ds[(0, draw_key(1, 0, 0))]["x"], ds[(0, draw_key(1, 1, 0))]["x"]
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
