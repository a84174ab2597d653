"""Loggers: what each records besides the epoch records, and the wandb mirror (with a stand-in wandb)."""
from __future__ import annotations

import sys
import types

from omegaconf import OmegaConf

from actmem.runtime.loggers import LOGGERS


def cfg(name):
    return OmegaConf.create({"name": name, "log_every": 5, "project": "p", "mode": "offline"})


def test_none_logs_epoch_records_only_and_jsonl_every_log_every_steps(tmp_path):
    assert LOGGERS.get("none").fn(tmp_path, cfg("none"), {}).log_every == 0
    assert LOGGERS.get("jsonl").fn(tmp_path, cfg("jsonl"), {}).log_every == 5


def test_wandb_mirrors_each_record_under_its_split_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    logger = LOGGERS.get("wandb").fn(tmp_path, cfg("wandb"), {"seed": 0})
    again = LOGGERS.get("wandb").fn(tmp_path, cfg("wandb"), {"seed": 0})
    logger.mirror({"split": "test", "step": 7, "acc": 50.0})
    logger.finish()
    (_, first), (_, second) = calls[0], calls[1]
    assert first["id"] == second["id"] and first["resume"] == "allow" and first["mode"] == "offline"
    assert calls[2:] == [("log", {"test/step": 7, "test/acc": 50.0}, 7), ("finish",)]
    assert logger.log_every == again.log_every == 5
