"""parse_spec / expand: strategies named on the command lines of the scripts."""
from actmem.strategies import STRATEGIES
from actmem.strategies.spec import expand, parse_spec


def test_values_are_read_as_yaml():
    assert parse_spec("exact") == ("exact", {})
    assert parse_spec("actnn:level=L3,bits=2") == ("actnn", {"level": "L3", "bits": 2})
    assert parse_spec("division:compress_linear=false,lr=0.5") == ("division", {"compress_linear": False, "lr": 0.5})
    assert parse_spec("combo:parts=[fewbit,actnn],bits=4") == ("combo", {"parts": ["fewbit", "actnn"], "bits": 4})


def test_star_is_every_strategy_not_named():
    got = expand(["exact", "blpa:bits=4", "*"])
    assert got[:2] == ["exact", "blpa:bits=4"]
    assert got[2:] == [n for n in STRATEGIES.names() if n not in ("exact", "blpa")]
