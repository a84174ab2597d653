"""optim.lookahead: airbench94's weight lookahead, step by step against its definition."""
import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from actmem.core.config import LookaheadConfig
from actmem.runtime.lookahead import Lookahead


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def perturb(net, by):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(by)
        net[1].running_mean.add_(by)


def floats(net):
    return [t.clone() for t in net.state_dict().values() if t.is_floating_point()]


def test_the_average_moves_by_one_minus_rho_and_is_copied_back():
    cfg = OmegaConf.structured(LookaheadConfig(start_epochs=1, every_n_steps=5, decay_base=0.9, decay_pow=2))
    net, la = model(), Lookahead(cfg, total_steps=20)
    la.after_step(net, 5, epoch=0)  # before start_epochs: nothing
    assert la.average is None
    la.after_step(net, 6, epoch=1)  # not a multiple of every_n_steps
    assert la.average is None
    la.after_step(net, 10, epoch=1)  # the first time: a copy of the state
    snapshot = floats(net)
    assert all(torch.equal(a, s) for a, s in zip(la.average, snapshot))
    perturb(net, 1.0)
    moved = floats(net)
    la.after_step(net, 15, epoch=1)
    rho = 0.9**5 * (15 / 20) ** 2
    expected = [s + (1 - rho) * (m - s) for s, m in zip(snapshot, moved)]
    for got, want in zip(floats(net), expected):  # the model is set to the average, BN statistics included
        torch.testing.assert_close(got, want)
    perturb(net, 1.0)
    la.end_epoch(net)  # at the epoch end the model goes back to the average
    for got, want in zip(floats(net), expected):
        torch.testing.assert_close(got, want)
    assert net[1].num_batches_tracked.dtype == torch.long  # integer state is left alone


def test_its_state_survives_a_checkpoint_round_trip():
    cfg = OmegaConf.structured(LookaheadConfig(start_epochs=0))
    net, la = model(), Lookahead(cfg, total_steps=10)
    la.after_step(net, 5, epoch=0)
    restored = Lookahead(cfg, total_steps=10)
    restored.load_state_dict(la.state_dict())
    perturb(net, 2.0)
    restored.end_epoch(net)
    assert all(torch.equal(a, b) for a, b in zip(floats(net), la.average))


@pytest.mark.parametrize("bad", ["optim.lookahead.every_n_steps=0", "optim.lookahead.decay_base=1.5"])
def test_bad_lookahead_settings_are_refused_naming_the_key(bad):
    from hydra import compose, initialize_config_dir

    from actmem.core.config import CONFIG_DIR, validate
    from actmem.core.errors import ConfigError

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=airbench94", bad])
    with pytest.raises(ConfigError, match="optim.lookahead"):
        validate(cfg)
