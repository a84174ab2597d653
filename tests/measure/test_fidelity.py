"""gradient_fidelity: exact against itself is the yardstick (cosine 1, no spread, no error); on a real
batch the compressed strategies stay close to it."""
import pytest
import torch
import torch.nn as nn

from actmem import data, models
from actmem.measure import activation_bytes
from actmem.measure.fidelity import gradient_fidelity


def test_exact_against_itself():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    r = gradient_fidelity(model, x, y, {"name": "exact"}, seeds=2)
    assert abs(r["cos"] - 1) < 1e-12 and abs(r["cos_min"] - 1) < 1e-12
    assert r["rel_var"] == 0 and r["mean_err"] == 0
    assert r["bytes"] == (4 * 8 + 4 * 16) * 4  # Linear's input, ReLU's output
    assert all(p.grad is None and torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("strategy, cos, rel_var, ratio", [("actnn", 0.96, 0.07, 12),  # measured 0.977, 0.048, 12.3x
                                                           ("division", 0.92, 0.18, 11)])  # 0.940, 0.132, 11.3x
def test_on_a_real_batch(cifar10_root, strategy, cos, rel_var, ratio):
    """resnet20, 32 CIFAR-10 images, fresh weights (the full table for resnet18 / preact_resnet56 is in
    results/gradient-fidelity.md)."""
    bundle = data.build({"name": "cifar10", "root": str(cifar10_root), "train_subset": 32, "augment": False},
                        batch_size=32, device="cpu", seed=0)
    x, y = next(iter(bundle.train))
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=10)
    r = gradient_fidelity(model, x, y, {"name": strategy}, seeds=2)
    assert r["cos"] > cos and r["rel_var"] < rel_var
    assert activation_bytes(model, x) / r["bytes"] > ratio
