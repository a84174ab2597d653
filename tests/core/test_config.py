"""The config tree: every group option composes, and the options are exactly the registries' names."""
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

from actmem import data, models, strategies
from actmem.core.config import CONFIG_DIR, validate
from actmem.core.errors import ConfigError
from actmem.runtime.loggers import LOGGERS
from actmem.runtime.optim import OPTIMIZERS
from actmem.runtime.setup import register_hydra

register_hydra()  # the schemas, as an entry point registers them
CONFIGS = Path(CONFIG_DIR)


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
    with pytest.raises(ConfigCompositionException, match="Could not override 'trainer.nosuch'"):
        compose_with("trainer.nosuch=1")


def test_validate_rejects_impossible_values():
    with pytest.raises(ConfigError, match="multistep needs optim.milestones"):
        validate(compose_with("optim.schedule=multistep"))
    with pytest.raises(ConfigError, match="trainer.epochs=0"):
        validate(compose_with("trainer.epochs=0"))


@pytest.mark.parametrize("group", ["dataset", "model", "strategy", "optim", "trainer", "logger", "experiment"])
def test_every_group_refuses_a_name_it_does_not_have_and_lists_its_options(group):
    with pytest.raises(MissingConfigException, match=f"Could not find '{group}/nosuch_{group}'") as refused:
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


def _numeric_keys():
    """(override prefix, key) of every int/float setting of the runner's own groups and every strategy."""
    import dataclasses

    from actmem.core.config import LoggerConfig, LookaheadConfig, OptimConfig, TrainerConfig

    keys = [("", f"{group}.{f.name}") for group, schema in
            (("trainer", TrainerConfig), ("optim", OptimConfig), ("logger", LoggerConfig),
             ("optim.lookahead", LookaheadConfig)) for f in dataclasses.fields(schema)
            if f.type in ("int", "float", "int | None", "float | None")]
    keys += [(f"strategy={e.name}", f"strategy.{f.name}") for e in strategies.STRATEGIES.entries()
             for f in dataclasses.fields(e.schema) if f.type in ("int", "float", "int | None", "float | None")]
    return keys


@pytest.mark.parametrize("group, key", _numeric_keys())
def test_every_numeric_key_refuses_a_non_finite_value_naming_the_key(group, key):
    """infinite epochs, a NaN lr or bit width...: refused up front, never trained on or written as null."""
    for bad in ("inf", "nan"):
        overrides = [o for o in (group, f"{key}={bad}") if o]
        try:
            cfg = compose_with(*overrides)
        except ConfigCompositionException as e:  # an int key: Hydra refuses the value at composition, naming it
            assert key.rsplit(".", 1)[1] in str(e)
            continue
        with pytest.raises(ConfigError, match=re.escape(f"{key}=")):
            validate(cfg)


@pytest.mark.parametrize("override, words", [
    ("optim.cycle_start=-0.5", "onecycle's lr factor at step 0 must be >= 0"),  # gradient ascent
    ("optim.cycle_end=-1", "must be >= 0"),
    ("optim.warmup_start=-1", "in [0, 1]"),
    ("optim.gamma=-0.1", "must be > 0"),
    ("optim.milestones=[30,10]", "increasing order"),
    ("optim.lookahead.decay_pow=-1", "it must be >= 0"),
    ("optim.lookahead.start_epochs=-1", "it must be >= 0"),
    ("logger.mode=bogus", "wandb's mode is one of"),
    ("logger.log_every=-1", "it must be >= 0"),
    ("optim.groups=[{params:[]}]", "params is empty"),
])
def test_settings_that_would_change_a_run_silently_are_refused(override, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as refused:
        validate(compose_with(override))
    assert override.split("=")[0].split("[")[0] in str(refused.value)


def test_every_lookahead_key_can_be_set_from_the_command_line():
    cfg = compose_with("optim.lookahead.enabled=true", "optim.lookahead.every_n_steps=7",
                       "optim.lookahead.decay_base=0.9")
    validate(cfg)
    assert cfg.optim.lookahead.enabled and cfg.optim.lookahead.every_n_steps == 7
    assert not compose_with().optim.lookahead.enabled and compose_with("experiment=airbench94").optim.lookahead.enabled


def test_a_milestone_at_epoch_zero_is_allowed_as_the_rule_says():
    validate(compose_with("optim.schedule=multistep", "optim.milestones=[0,10]"))
