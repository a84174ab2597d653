import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from actmem.core.errors import ConfigError
from actmem.data import DATASETS, DataBundle, build
from actmem.data.synthetic import SyntheticConfig


def test_registry_names_and_schema_defaults():
    assert DATASETS.names() == ["cifar10", "cifar100", "imagenet", "synthetic"]
    defaults = {e.name: e.schema() for e in DATASETS.entries()}
    assert all(d.name == name for name, d in defaults.items())  # `name` first, matching the option
    assert all(dataclasses.fields(d)[0].name == "name" for d in defaults.values())
    assert defaults["cifar10"].root == "data/cifar10" and defaults["cifar100"].root == "data/cifar100"
    assert defaults["imagenet"].image_size == 224 and defaults["synthetic"].train_size == 512


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet", "synthetic"])
def test_schemas_are_typed_structured_configs(name):
    cfg = OmegaConf.structured(DATASETS.get(name).schema)
    with pytest.raises(ConfigAttributeError, match="Key 'nosuch' not in"):
        cfg.nosuch = 1  # a wrong key fails at composition
    if "train_subset" in cfg:
        cfg.train_subset = 10
        with pytest.raises(ValidationError, match="(?s)'ten' of type 'str' could not be converted.*train_subset"):
            cfg.train_subset = "ten"


@pytest.mark.parametrize("make", [
    lambda: {"name": "synthetic", "train_size": 64},
    lambda: OmegaConf.structured(SyntheticConfig(train_size=64)),
    lambda: SyntheticConfig(train_size=64),
])
def test_build_takes_dict_dictconfig_or_dataclass(make):
    b = build(make(), batch_size=32, device=torch.device("cpu"), seed=0)
    assert isinstance(b, DataBundle) and b.train_size == 64 and len(b.train) == 2


def test_build_errors_name_the_problem_and_the_fix():
    with pytest.raises(ConfigError, match="cifar10, cifar100, imagenet, synthetic"):
        build({"name": "mnist"}, batch_size=8, device="cpu", seed=0)
    with pytest.raises(ConfigError, match="no setting colour.*image_size"):
        build({"name": "synthetic", "colour": 1}, batch_size=8, device="cpu", seed=0)
    with pytest.raises(ConfigError, match="trainer.batch_size=0"):
        build({"name": "synthetic"}, batch_size=0, device="cpu", seed=0)
    with pytest.raises(ConfigError, match="fewer than trainer.batch_size=1024"):
        build({"name": "synthetic"}, batch_size=1024, device="cpu", seed=0)


def test_build_gives_each_rank_its_slice_of_the_global_batch():
    cfg = {"name": "synthetic", "train_size": 100, "test_size": 30, "augment": True}
    single = build(cfg, batch_size=16, device="cpu", seed=3)
    ranks = [build(cfg, batch_size=8, device="cpu", seed=3, rank=r, world_size=2) for r in range(2)]
    assert [(b.rank, b.world_size, b.train_size, b.test_size) for b in ranks] == [(0, 2, 100, 30), (1, 2, 100, 30)]
    for b in (single, *ranks):
        b.train.set_epoch(1)
    assert len(single.train) == len(ranks[0].train) == len(ranks[1].train) == 6
    for (x, y), (x0, y0), (x1, y1) in zip(single.train, ranks[0].train, ranks[1].train):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    test = [torch.cat([x for x, _ in b.test]) for b in (single, *ranks)]
    assert torch.equal(torch.cat(test[1:]), test[0]) and len(test[1]) == 15


def test_build_refuses_a_global_batch_beyond_the_training_set():
    with pytest.raises(ConfigError, match=r"trainer.batch_size=300 \(per rank\) x 2 ranks = 600.*number of ranks"):
        build({"name": "synthetic"}, batch_size=300, device="cpu", seed=0, rank=1, world_size=2)
    assert len(build({"name": "synthetic"}, batch_size=256, device="cpu", seed=0, world_size=2).train) == 1
    with pytest.raises(ValueError, match="rank=2 of world_size=2"):
        build({"name": "synthetic"}, batch_size=8, device="cpu", seed=0, rank=2, world_size=2)
