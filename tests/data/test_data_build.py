import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from actmem.data import DATASETS, DataBundle, build
from actmem.data.synthetic import SyntheticConfig
from actmem.errors import ConfigError


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
    with pytest.raises(Exception, match="nosuch"):
        cfg.nosuch = 1  # a wrong key fails at composition
    if "train_subset" in cfg:
        cfg.train_subset = 10
        with pytest.raises(Exception, match="train_subset"):
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
