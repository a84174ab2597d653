"""Each option's yaml in configs/<group>/ shows its knobs: every setting of its schema, at the schema's
default, with a one-line comment, so the yaml and the schema cannot drift apart; and listing them changes
nothing: composing an option gives exactly the schema's defaults plus what the option sets on purpose."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import MISSING, OmegaConf

from actmem import models
from actmem.core.config import CONFIG_DIR, LoggerConfig, ModelConfig, OptimConfig, TrainerConfig
from actmem.data import DATASETS
from actmem.runtime.setup import register_hydra
from actmem.strategies import STRATEGIES

register_hydra()  # the schemas, as an entry point registers them
CONFIGS = Path(CONFIG_DIR)
GROUPS = ("dataset", "strategy", "trainer", "optim", "logger", "model")
PER_OPTION = {"dataset": DATASETS, "strategy": STRATEGIES}  # a schema per option, whose default names it
SHARED = {"trainer": TrainerConfig, "optim": OptimConfig, "logger": LoggerConfig, "model": ModelConfig}
# What an option sets that is not its schema's default. The groups with one schema for all options name
# the option in the yaml (`name:`); adamw keeps its own recipe (OptimConfig's defaults are SGD's).
OWN = {"optim/adamw": {"lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 5}}


def option_files():
    return [p for group in GROUPS for p in sorted((CONFIGS / group).glob("*.yaml"))]


def option_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def schema_of(path: Path) -> tuple[type, str]:
    """The option's schema and the name it is stored under (configs' `/schema/<group>/<name>`)."""
    group, option = path.parent.name, path.stem
    if group in PER_OPTION:
        return PER_OPTION[group].get(option).schema, option
    return SHARED[group], "base"


def defaults_of(schema: type) -> dict:
    """{field: default}, nested dataclasses (optim.lookahead) as dicts of their own defaults."""
    out = {}
    for f in dataclasses.fields(schema):
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[f.name] = defaults_of(type(value)) if dataclasses.is_dataclass(value) else value
    return out


def own_values(path: Path) -> dict:
    group, option = path.parent.name, path.stem
    return {**({"name": option} if group in SHARED and "name" in defaults_of(SHARED[group]) else {}),
            **OWN.get(option_id(path), {})}


def expected(path: Path) -> dict:
    """What the yaml must list: the schema's settings at their defaults and the option's own values. The
    groups with a schema per option leave `name` to that schema (as the yamls always have)."""
    schema, _ = schema_of(path)
    want = {**defaults_of(schema), **own_values(path)}
    if path.parent.name in PER_OPTION:
        del want["name"]
    return want


def same(a, b) -> bool:
    """Equal values of the same kind: 1 == 1.0 for a float setting, but true is not 1."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def listed(path: Path) -> dict:
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults")
    return raw


@pytest.mark.parametrize("path", option_files(), ids=option_id)
def test_yaml_lists_every_setting_at_its_schema_default(path):
    _, stored = schema_of(path)
    assert OmegaConf.load(path).defaults == [f"/schema/{path.parent.name}/{stored}@_here_", "_self_"]
    got, want = listed(path), expected(path)
    assert sorted(got) == sorted(want), f"{option_id(path)}: keys differ from its schema's fields"
    for key in want:
        if isinstance(want[key], dict):
            assert isinstance(got[key], dict) and sorted(got[key]) == sorted(want[key]), f"{key}'s keys differ"
    differing = {k: (got[k], want[k]) for k in want if not same(got[k], want[k])}
    assert not differing, f"{option_id(path)}: (yaml, schema default) {differing}"


@pytest.mark.parametrize("path", option_files(), ids=option_id)
def test_every_setting_has_a_one_line_comment(path):
    lines = path.read_text().splitlines()
    body = lines[lines.index("  - _self_") + 1:]
    settings = [line for line in body if re.match(r"^\s*\w+:", line)]
    assert len(settings) == len(body) - body.count(""), "one setting a line, nothing else after `defaults:`"
    bare = [line for line in settings if "#" not in line and not line.startswith("name:")]
    assert not bare, f"{option_id(path)}: settings without a comment: {bare}"


@pytest.mark.parametrize("path", option_files(), ids=option_id)
def test_composing_the_option_adds_nothing_to_its_schema(path):
    """The composed group is the schema with only the option's own values set: the listed defaults are
    the schema's, so the yaml composes to what it did before it listed them."""
    group, option = path.parent.name, path.stem
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[f"{group}={option}"])
    schema, _ = schema_of(path)
    want = OmegaConf.merge(OmegaConf.structured(schema), own_values(path))
    assert OmegaConf.to_container(cfg[group]) == OmegaConf.to_container(want)


@pytest.mark.parametrize("name", models.names())
def test_model_yaml_names_its_builders_options(name):
    """kwargs stays empty (the builder's defaults apply); its comment lists what can be set there."""
    line = next(x for x in (CONFIGS / "model" / f"{name}.yaml").read_text().splitlines() if x.startswith("kwargs:"))
    assert all(f"{key}=" in line for key in models.MODELS.get(name).settings()), line


def test_every_group_option_is_covered():
    assert ModelConfig.__dataclass_fields__["name"].default == MISSING  # the model yaml's name is its own
    assert {p.parent.name for p in option_files()} == set(GROUPS)
