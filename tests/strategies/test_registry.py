"""The strategy registry: names, configs by name/dict/DictConfig, clear errors."""
import pytest
import torch
from omegaconf import OmegaConf

from actmem import models, strategies
from actmem.core.errors import ConfigError


def test_apply_by_name_dict_and_dictconfig_agree():
    cfgs = [strategies.resolve("checkpoint", granularity="stage"),
            strategies.resolve({"name": "checkpoint", "granularity": "stage"}),
            strategies.resolve(OmegaConf.create({"name": "checkpoint", "granularity": "stage"}))]
    assert all(c == cfgs[0] for c in cfgs) and cfgs[0].granularity == "stage"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError, match="exact"):
        strategies.apply(models.build("resnet20", num_classes=10), "nosuch")


def test_unknown_key_and_bad_type_fail_with_the_keys():
    with pytest.raises(ConfigError, match="granularity"):
        strategies.resolve("checkpoint", nosuch=1)
    with pytest.raises(ConfigError, match="name"):
        strategies.resolve({"granularity": "block"})


def test_exact_is_identity():
    model = models.build("resnet20", num_classes=10)
    assert strategies.apply(model, "exact") is model
    assert "exact" in strategies.STRATEGIES.names()
    assert torch.is_tensor(model(torch.randn(2, 3, 32, 32)))


def test_a_converted_model_says_which_strategy_converted_it():
    from actmem.core.errors import StrategyError

    model = strategies.apply(models.build("resnet20", num_classes=10), "actnn")
    with pytest.raises(StrategyError, match=r"already converted by strategy 'actnn'.*cannot be combined"):
        strategies.apply(model, "division")  # combo refuses the pair, so it is not suggested
    with pytest.raises(StrategyError, match=r"already converted by strategy 'actnn'.*parts=\[actnn,fewbit\]"):
        strategies.apply(model, "fewbit")
    strategies.apply(strategies.apply(models.build("resnet20", num_classes=10), "exact"), "actnn")  # exact: no-op
