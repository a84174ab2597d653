from itertools import product

import pytest
import torch
import torch.nn.functional as F

from actmem.core.errors import ConfigError
from actmem.data.loader import (
    Normalize,
    TensorLoader,
    balanced_subset,
    contiguous_share,
    epoch_seed,
    pad_crop_flip,
)

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


@pytest.mark.parametrize("pad", [1, 3, 5])  # 5: the largest a 6-row image can reflect
def test_reflect_crop_matches_f_pad_reflect_at_every_offset(pad):
    h, w = 6, 9  # not square, to catch rows and columns swapped
    x = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    dy, dx, flip = (torch.tensor(t) for t in zip(*product(range(2 * pad + 1), range(2 * pad + 1), [False, True])))
    out = pad_crop_flip(x.expand(len(dy), -1, -1, -1), pad, dy, dx, flip, "reflect")
    padded = F.pad(x.float(), (pad,) * 4, mode="reflect")[0]
    for i in range(len(dy)):
        ref = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        assert torch.equal(out[i].float(), ref.flip(-1) if flip[i] else ref), (int(dy[i]), int(dx[i]), bool(flip[i]))


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


def loader(n=50, bs=8, seed=0, augment=False, train=True, **options):
    ids = torch.arange(n)  # labels that name the image, to follow the order
    return TensorLoader(images(n), ids, bs, Normalize(MEAN, STD, torch.device("cpu")), train=train,
                        augment=augment, seed=seed, **options)


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


@pytest.mark.parametrize("seed", [0, 5])
def test_default_options_give_the_batches_of_the_original_loader(seed):
    """The loader before crop_padding/padding_mode/flip existed, inline: saved runs must not change."""
    n, e = 50, 3  # the loader() helper: 50 images, batches of 8, so 48 per epoch
    g = torch.Generator().manual_seed(epoch_seed(seed, e))
    order = torch.randperm(n, generator=g)
    dy, dx = torch.randint(0, 9, (2, n), generator=g)
    flip = torch.randint(0, 2, (n,), generator=g).bool()
    raw = images(n)
    crops = [F.pad(raw[j], (4,) * 4)[:, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i, j in enumerate(order[:48])]
    ref = torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flip)])
    x, y = epoch(loader(seed=seed, augment=True), e)
    assert torch.equal(y, order[:48])
    assert torch.equal(x, Normalize(MEAN, STD, torch.device("cpu"))(ref))


def flipped_per_image(n, seed, e):
    """Epoch e of an alternating-flip loader without translation: (images by id, whether each is mirrored)."""
    x, y = epoch(loader(n=n, bs=50, seed=seed, augment=True, crop_padding=0, flip="alternating"), e)
    x = x[torch.argsort(y)]
    raw = Normalize(MEAN, STD, torch.device("cpu"))(images(n))
    mirrored = (x == raw.flip(-1)).flatten(1).all(1)
    assert torch.equal(mirrored, ~(x == raw).flatten(1).all(1))  # each image is itself or its mirror
    return x, mirrored


def test_alternating_flip_mirrors_every_image_each_epoch_from_a_per_seed_base():
    n = 400
    x0, base = flipped_per_image(n, 0, 0)
    for e in range(1, 5):
        x, mirrored = flipped_per_image(n, 0, e)
        assert torch.equal(x, x0 if e % 2 == 0 else x0.flip(-1))  # epoch e and e+1: mirror images
        assert torch.equal(mirrored, base ^ (e % 2 == 1))
    assert 0.4 < base.float().mean() < 0.6  # about half start mirrored
    assert not torch.equal(base, flipped_per_image(n, 1, 0)[1])  # the base flips move with the seed
    assert torch.equal(base, flipped_per_image(n, 0, 2)[1])  # ... and not with the epoch (here, a resumed loader)


def test_flip_none_never_mirrors_and_crops_cover_every_offset():
    pad, n = 2, 400
    x, y = epoch(loader(n=n, bs=50, augment=True, crop_padding=pad, padding_mode="reflect", flip="none"), 1)
    padded = Normalize(MEAN, STD, torch.device("cpu"))(F.pad(images(n).float(), (pad,) * 4, mode="reflect").byte())
    offsets = [(sy, sx) for sy in range(-pad, pad + 1) for sx in range(-pad, pad + 1)]
    seen = set()
    for xi, yi in zip(x, y):
        crops = torch.stack([padded[yi, :, pad + sy : pad + sy + 8, pad + sx : pad + sx + 8] for sy, sx in offsets])
        hits = (crops == xi).flatten(1).all(1).nonzero().flatten()
        assert len(hits) == 1  # an unmirrored crop of its own image (a mirror would match none)
        seen.add(offsets[hits[0]])
    assert seen == set(offsets)


@pytest.mark.parametrize("options, message", [
    ({"padding_mode": "edge"}, "dataset.padding_mode='edge': use zeros or reflect"),
    ({"flip": "horizontal"}, "dataset.flip='horizontal': use random, alternating or none"),
    ({"crop_padding": -1}, "dataset.crop_padding=-1"),
    ({"crop_padding": 8, "padding_mode": "reflect"}, "dataset.crop_padding=8 .*below the image side, 8"),
])
def test_bad_augmentation_options_name_the_key(options, message):
    with pytest.raises(ConfigError, match=message):
        loader(augment=True, **options)


def test_zero_padding_may_exceed_the_image_side():
    x, _ = epoch(loader(augment=True, crop_padding=8, flip="none"), 0)  # zeros mode has no such bound
    assert x.shape == (48, 3, 8, 8)


@pytest.mark.parametrize("n, world_size", [(50, 3), (48, 4), (5, 2), (2, 3)])
def test_contiguous_share_is_tensor_splits_cut(n, world_size):
    for r, part in enumerate(torch.tensor_split(torch.arange(n), world_size)):
        start, stop = contiguous_share(n, r, world_size)
        assert torch.equal(torch.arange(start, stop), part)


def rank_batches(world_size, global_batch, e, **options):
    """Epoch e of each rank's training loader: a list per rank of its (images, labels) batches."""
    loaders = [loader(bs=global_batch // world_size, rank=r, world_size=world_size, **options)
               for r in range(world_size)]
    for ld in loaders:
        ld.set_epoch(e)
    return [list(ld) for ld in loaders]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("options", [
    {},
    {"augment": True},
    {"augment": True, "crop_padding": 2, "padding_mode": "reflect", "flip": "alternating"},
])
def test_ranks_cut_the_global_batch_of_one_process_into_slices(world_size, options):
    for e in (0, 3):
        (single,) = rank_batches(1, 8, e, **options)
        ranks = rank_batches(world_size, 8, e, **options)
        assert len(single) == 6 and all(len(batches) == 6 for batches in ranks)  # 48 of 50 in global batches of 8
        for i, (x, y) in enumerate(single):  # same images, same crops, same flips
            assert torch.equal(torch.cat([batches[i][1] for batches in ranks]), y)
            assert torch.equal(torch.cat([batches[i][0] for batches in ranks]), x)


def test_global_batch_drops_the_last_partial_one():
    ranks = rank_batches(2, 16, 0)  # 50 images: three global batches of 16, the last 2 images dropped
    assert [len(batches) for batches in ranks] == [3, 3] and all(len(y) == 8 for b in ranks for _, y in b)
    assert len(torch.cat([y for b in ranks for _, y in b]).unique()) == 48


def test_test_set_shares_are_contiguous_disjoint_and_cover_it():
    shares = [loader(n=50, bs=8, train=False, rank=r, world_size=3) for r in range(3)]
    assert [len(ld) for ld in shares] == [3, 3, 2]  # 17, 17 and 16 images
    ys = [epoch(ld, 0)[1] for ld in shares]
    assert [len(y) for y in ys] == [17, 17, 16]
    assert torch.equal(torch.cat(ys), torch.arange(50))


@pytest.mark.parametrize("train", [True, False])
def test_start_batch_yields_the_rest_of_the_uninterrupted_epoch(train):
    ld = loader(n=50, bs=4, train=train, augment=True, rank=1, world_size=2)
    steps = len(ld)
    ld.set_epoch(3)
    full = list(ld)
    for k in (1, 4, steps):
        ld.set_epoch(3, start_batch=k)
        assert len(ld) == steps  # the whole epoch's: the trainer counts steps itself
        rest = list(ld)
        assert len(rest) == steps - k
        assert all(torch.equal(x, xf) and torch.equal(y, yf) for (x, y), (xf, yf) in zip(rest, full[k:]))
    ld.set_epoch(4)  # the next epoch starts at its beginning
    assert len(list(ld)) == steps
    with pytest.raises(ValueError, match=f"start_batch={steps + 1}"):
        ld.set_epoch(3, start_batch=steps + 1)


def test_epoch_seeds_of_ranks_and_epochs_give_distinct_streams():
    """A CPU generator keeps a seed's low 32 bits: ranks must differ there, not only above them."""
    draws = {torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(epoch_seed(7, e, r))).item()
             for e in range(-1, 50) for r in range(8)}
    assert len(draws) == 51 * 8
    assert epoch_seed(7, 3, rank=0) == epoch_seed(7, 3)  # rank 0: the single-process seed
