import pytest
import torch
import torch.nn.functional as F

from actmem.data.loader import Normalize, TensorLoader, balanced_subset, pad_crop_flip
from actmem.errors import ConfigError

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def images(n, size=8, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def candidates(img, pad):
    """Every pad-crop-flip of one image, by plain slicing: the reference for pad_crop_flip."""
    h, w = img.shape[-2:]
    padded = F.pad(img, (pad,) * 4)
    crops = [padded[:, y : y + h, x : x + w] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]
    return torch.stack(crops + [c.flip(-1) for c in crops])


def test_pad_crop_flip_matches_slicing():
    x = images(6)
    dy, dx = torch.tensor([0, 4, 8, 1, 4, 7]), torch.tensor([8, 4, 0, 3, 4, 2])
    flip = torch.tensor([False, False, True, True, False, True])
    out = pad_crop_flip(x, 4, dy, dx, flip)
    for i in range(6):
        ref = F.pad(x[i], (4,) * 4)[:, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)
    assert torch.equal(out[4], x[4])  # centred and unflipped: the image itself
    assert out.dtype == torch.uint8


def test_normalize_is_the_usual_formula():
    x = images(4)
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(Normalize(MEAN, STD, torch.device("cpu"))(x), ref)


def test_balanced_subset_is_balanced_fixed_and_sorted():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([50, 7, 30, 100])])[torch.randperm(187)]
    idx = balanced_subset(labels, 20, "k")
    assert torch.equal(idx, balanced_subset(labels, 20, "k"))  # same for every call (and run seed)
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == 20
    assert torch.bincount(labels[idx], minlength=4).tolist() == [5, 5, 5, 5]
    counts = torch.bincount(labels[balanced_subset(labels, 40, "k")], minlength=4).tolist()
    assert counts == [11, 7, 11, 11]  # the small class runs out; the others share the rest
    assert len(balanced_subset(labels, 187, "k")) == 187


@pytest.mark.parametrize("k", [0, 188])
def test_balanced_subset_rejects_impossible_sizes(k):
    with pytest.raises(ConfigError, match="dataset.train_subset"):
        balanced_subset(torch.zeros(187, dtype=torch.long), k, "dataset.train_subset")


def loader(n=50, bs=8, seed=0, augment=False, train=True):
    ids = torch.arange(n)  # labels that name the image, to follow the order
    return TensorLoader(images(n), ids, bs, Normalize(MEAN, STD, torch.device("cpu")), train=train,
                        augment=augment, seed=seed)


def epoch(ld, e):
    ld.set_epoch(e)
    xs, ys = zip(*ld)
    return torch.cat(xs), torch.cat(ys)


def test_train_order_is_a_fresh_permutation_per_epoch_fixed_by_seed_and_epoch():
    ld = loader()
    assert len(ld) == 6 and all(len(y) == 8 for _, y in ld)  # drop_last: 48 of 50
    _, y0 = epoch(ld, 0)
    assert len(y0.unique()) == 48
    assert torch.equal(y0, epoch(ld, 0)[1])  # iterating again, same epoch: same order
    assert torch.equal(y0, epoch(loader(), 0)[1])  # a new loader, same (seed, epoch): same order
    assert not torch.equal(y0, epoch(ld, 1)[1])
    assert not torch.equal(y0, epoch(loader(seed=1), 0)[1])
    assert not torch.equal(y0, torch.arange(48))


def test_augmentation_is_a_real_pad_crop_flip():
    plain, aug = loader(augment=False), loader(augment=True)
    x, y = epoch(plain, 3)
    xa, ya = epoch(aug, 3)
    assert torch.equal(y, ya)  # augmentation draws after the permutation: same order
    assert not torch.equal(x, xa)
    raw = images(50)
    norm = Normalize(MEAN, STD, torch.device("cpu"))
    which = []
    for i in range(16):  # each augmented image is one of the 162 pad-crop-flips of its source
        cands = norm(candidates(raw[y[i]], 4))
        hits = ((cands - xa[i]).abs().amax(dim=(1, 2, 3)) < 1e-5).nonzero().flatten()
        assert len(hits) >= 1
        which.append(int(hits[0]))
    assert any(w >= 81 for w in which) and any(w < 81 and w != 40 for w in which)  # flips and shifts occur


def test_test_loader_keeps_every_image_in_order_unaugmented():
    ld = loader(n=50, bs=8, train=False, augment=True)
    assert len(ld) == 7
    sizes = [len(y) for _, y in ld]
    assert sizes == [8] * 6 + [2]
    x, y = epoch(ld, 5)
    assert torch.equal(y, torch.arange(50))
    torch.testing.assert_close(x, Normalize(MEAN, STD, torch.device("cpu"))(images(50)))
