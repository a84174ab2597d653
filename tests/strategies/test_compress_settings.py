"""compress refuses bad arguments with its own CompressError (it knows nothing of training); a bad strategy
setting must still reach the user as the strategy's one-paragraph ConfigError naming `strategy.KEY`. That
holds because each strategy's `check` refuses, when its config is resolved (before any model is built or
anything compressed), every value of a setting that the compress call it feeds would refuse."""
from __future__ import annotations

import pytest
import torch
from helpers import run_train

from actmem import compress, strategies
from actmem.compress.errors import CompressError
from actmem.compress.grid import grid_quantize
from actmem.compress.index import bucketize_pack
from actmem.compress.split import split_quantize
from actmem.core.errors import ConfigError

x = torch.randn(2, 3, 8, 8)


def _fewbit_codes(bits):
    borders = torch.linspace(-1, 1, (1 << bits) - 1) if 1 <= bits <= 16 else torch.zeros(1)
    return bucketize_pack(x, borders, bits)


# (strategy, other settings, key) -> the compress call the strategy makes with the key's value
FEEDS = {
    ("actnn", "L2", "bits"): lambda v: compress.quantize(x, v),  # L1/L2: one uniform width
    ("actnn", "L3", "bits"): lambda v: compress.quantize(x, torch.full((2,), v)),  # L3: per-sample widths
    ("actnn", "L2", "group_size"): lambda v: compress.quantize(x, 4, group_size=v),
    ("division", None, "bits"): lambda v: split_quantize(x, 8, v),
    ("division", None, "block"): lambda v: split_quantize(x, v, 2),
    ("blpa", None, "bits"): lambda v: grid_quantize(x, torch.ones(3), torch.zeros(3), v),
    ("fewbit", None, "bits"): _fewbit_codes,
}
VALUES = [-8, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 24, 256]


@pytest.mark.parametrize("strategy, level, key", FEEDS, ids=[f"{s}-{lv or ''}-{k}" for s, lv, k in FEEDS])
def test_check_refuses_every_value_compress_would_refuse(strategy, level, key):
    feed = FEEDS[strategy, level, key]
    refused_by_compress, refused_by_check = set(), set()
    for value in VALUES:
        try:
            feed(value)
        except CompressError:
            refused_by_compress.add(value)
        try:
            strategies.resolve(strategy, **({"level": level} if level else {}), **{key: value})
        except ConfigError as e:
            refused_by_check.add(value)
            assert f"strategy.{key}={value}" in str(e) and "\n" not in str(e), str(e)  # names the key, one line
    assert refused_by_compress, f"no value of {key} tried here is refused by compress: the check is untested"
    assert refused_by_compress <= refused_by_check, (
        f"strategy.{key}={sorted(refused_by_compress - refused_by_check)} passes {strategy}'s check but "
        "compress refuses it: the user would get a CompressError from a forward pass, not a ConfigError")


def test_a_bad_strategy_setting_is_a_one_paragraph_config_error(tmp_path):
    res = run_train("dataset=synthetic", "model=resnet20", "strategy=division", "strategy.bits=9", "logger=none",
                    run_dir=tmp_path / "run")
    message = res.stderr.strip()
    assert res.returncode == 2 and "Traceback" not in message and "CompressError" not in message, res.stderr
    assert message.startswith("Error: strategy.bits=9: DIVISION") and "\n\n" not in message, res.stderr
