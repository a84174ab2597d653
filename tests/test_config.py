"""The config tree: every group option composes, and the options are exactly the registries' names."""
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import actmem.train  # noqa: F401  (registers the schemas)
from actmem import data, models, strategies
from actmem.config import validate
from actmem.errors import ConfigError
from actmem.loggers import LOGGERS
from actmem.optim import OPTIMIZERS

CONFIGS = Path(actmem.train.CONFIG_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group, registry", [
    ("dataset", data.DATASETS), ("model", models.MODELS), ("strategy", strategies.STRATEGIES),
    ("optim", OPTIMIZERS), ("logger", LOGGERS),
])
def test_group_options_match_registry(group, registry):
    assert options(group) == registry.names()


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("group", ["dataset", "model", "strategy", "optim", "trainer", "logger", "experiment"])
def test_every_option_composes_and_validates(group):
    for name in options(group):
        cfg = compose_with(f"{group}={name}")
        validate(cfg)
        if group in ("dataset", "model", "strategy", "optim", "logger"):
            assert cfg[group].name == name


def test_wrong_key_fails_at_composition():
    with pytest.raises(Exception, match="nosuch"):
        compose_with("trainer.nosuch=1")


def test_validate_rejects_impossible_values():
    with pytest.raises(ConfigError, match="multistep needs optim.milestones"):
        validate(compose_with("optim.schedule=multistep"))
    with pytest.raises(ConfigError, match="trainer.epochs=0"):
        validate(compose_with("trainer.epochs=0"))


@pytest.mark.parametrize("group", ["dataset", "model", "strategy", "optim", "trainer", "logger", "experiment"])
def test_every_group_refuses_a_name_it_does_not_have_and_lists_its_options(group):
    with pytest.raises(Exception) as refused:
        compose_with(f"{group}=nosuch_{group}")
    message = str(refused.value)
    assert f"nosuch_{group}" in message and all(name in message for name in options(group)), message


@pytest.mark.parametrize("override, key", [("seed=-1", "seed=-1"), ("optim.momentum=-0.5", "optim.momentum"),
                                           ("optim.betas=[0.9,1.0]", "optim.betas"),
                                           ("optim.weight_decay=-1", "optim.weight_decay"),
                                           ("trainer.threads=-2", "trainer.threads")])
def test_settings_torch_would_reject_later_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(compose_with(override))
