import pytest
import torch

from actmem.core.errors import ConfigError
from actmem.data import build


def synthetic(seed=0, bs=16, **kw):
    return build({"name": "synthetic", **kw}, batch_size=bs, device="cpu", seed=seed)


def test_shapes_sizes_and_label_range():
    b = synthetic(num_classes=7, image_size=12, channels=1, train_size=100, test_size=40)
    assert (b.num_classes, b.image_shape, b.train_size, b.test_size) == (7, (1, 12, 12), 100, 40)
    assert (len(b.train), len(b.test)) == (6, 3)
    x, y = next(iter(b.train))
    assert x.shape == (16, 1, 12, 12) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.dtype == torch.int64
    ys = torch.cat([y for _, y in b.test])
    assert len(ys) == 40 and 0 <= ys.min() and ys.max() < 7
    assert abs(x.mean().item()) < 0.2 and abs(x.std().item() - 1) < 0.1  # normalised


def test_deterministic_by_seed():
    a, b, c = synthetic(seed=3), synthetic(seed=3), synthetic(seed=4)
    xa, ya = next(iter(a.test))
    xb, yb = next(iter(b.test))
    xc, _ = next(iter(c.test))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)


@pytest.mark.parametrize("key", ["num_classes", "train_size", "test_size", "image_size"])
def test_rejects_empty_settings(key):
    with pytest.raises(ConfigError, match=f"dataset.{key}=0"):
        synthetic(**{key: 0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_live_on_the_gpu():
    b = synthetic(bs=16)
    b2 = build({"name": "synthetic"}, batch_size=16, device="cuda", seed=0)
    assert b2.train.images.device.type == "cuda"  # the whole set sits on the GPU
    (x, y), (xc, yc) = next(iter(b.test)), next(iter(b2.test))
    assert xc.device.type == "cuda" and yc.device.type == "cuda"
    torch.testing.assert_close(xc.cpu(), x)
    assert torch.equal(yc.cpu(), y)
    assert torch.equal(next(iter(b.train))[1], next(iter(b2.train))[1].cpu())  # same order on any device
