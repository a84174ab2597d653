"""A strategy named on a command line: `name` or `name:key=value,key=value`, values read as YAML
(`division:compress_linear=false`, `blpa:bits=4`, `combo:parts=[fewbit,actnn]`)."""
from __future__ import annotations

import re

import yaml

from actmem.strategies.base import STRATEGIES


def parse_spec(spec: str) -> tuple[str, dict]:
    """"actnn:level=L3,bits=2" -> ("actnn", {"level": "L3", "bits": 2}); a comma inside [...] stays in
    its value."""
    name, _, rest = spec.partition(":")
    kw = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):
        key, _, value = item.partition("=")
        kw[key] = yaml.safe_load(value)
    return name, kw


def expand(specs: list[str]) -> list[str]:
    """The specs with "*" replaced by every registered strategy that no other spec names."""
    named = {parse_spec(s)[0] for s in specs}
    rest = [n for n in STRATEGIES.names() if n not in named]
    return [t for s in specs for t in (rest if s == "*" else [s])]
