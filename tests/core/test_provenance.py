"""The provenance header of results files."""
import datetime as dt

from actmem.core.provenance import command_line, device_name, git_commit, header


def test_header_lines():
    started = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    text = header("python scripts/sweep_table.py --y 'a b'", "CPU, 2 cores", started, {"batch": 64})
    lines = text.splitlines()
    assert text.endswith("\n") and all(line.startswith("- ") for line in lines)
    assert lines[0] == "- command: `python scripts/sweep_table.py --y 'a b'`"
    assert lines[1] == f"- commit: {git_commit() or 'unknown'}"
    assert dt.datetime.fromisoformat(lines[2].removeprefix("- date: ")) == started
    assert lines[3] == "- device: CPU, 2 cores"
    assert lines[4].startswith("- versions: python ") and "torch " in lines[4]
    assert lines[5] == "- batch: 64"


def test_command_and_cpu_device():
    assert command_line().startswith("python ")
    assert device_name("cpu").startswith("CPU, ") and "torch threads" in device_name("cpu")
