"""engine: test-time augmentation against its definition (airbench94's tta_level 1 and 2)."""
import pytest
import torch
import torch.nn.functional as F

from actmem.runtime.engine import tta_logits


class Probe(torch.nn.Module):
    """Logits that tell views apart: a fixed linear map of the whole image (not mirror-invariant)."""

    def __init__(self):
        super().__init__()
        self.w = torch.randn(3 * 6 * 6, 4, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return x.flatten(1) @ self.w


@pytest.mark.parametrize("level", [0, 1, 2])
def test_tta_averages_the_published_views(level):
    model, x = Probe(), torch.randn(2, 3, 6, 6)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., :6, :6], padded[..., 2:, 2:]
    views = {0: [(1.0, x)],
             1: [(0.5, x), (0.5, x.flip(-1))],
             2: [(0.25, x), (0.25, x.flip(-1)), (0.125, up_left), (0.125, up_left.flip(-1)),
                 (0.125, down_right), (0.125, down_right.flip(-1))]}[level]
    expected = sum(w * model(v) for w, v in views)
    torch.testing.assert_close(tta_logits(model, x, level), expected)
    assert level == 0 or not torch.allclose(tta_logits(model, x, level), model(x))
