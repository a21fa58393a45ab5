"""Small models the tests name by import path (``py:tests.own_models:TinyNet``), as a user's own
package would hold them."""

import torch
from torch import nn


class TinyNet(nn.Module):
    """Two 3x3 conv blocks and a linear head: a user's own classifier."""

    def __init__(self, width: int = 8, num_classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


#: The README's own model (``file:mynet.py:MyNet``): this file, copied as ``mynet.py``.
MyNet = TinyNet


def trained_tiny(width: int = 8) -> TinyNet:
    """A TinyNet whose weights are fixed (seeded inside): as a factory that loads trained weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return TinyNet(width)


class MobileTiny(nn.Module):
    """A stem conv and two depthwise-separable blocks (each pointwise narrows, so reordering shrinks
    the pair): ``dw -> BN -> ReLU -> pw`` (a reorder across a nonlinearity) and ``dw -> BN -> pw``
    (a linear pair)."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.dw1, self.bn1, self.act1 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU()
        self.pw1, self.bn1b = nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)
        self.dw2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.pw2 = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1b(self.pw1(self.act1(self.bn1(self.dw1(self.stem(x)))))))
        return self.head(self.pw2(self.bn2(self.dw2(x))).mean((2, 3)))


def trained_mobile() -> MobileTiny:
    """A MobileTiny whose weights are fixed (seeded inside): as a factory that loads trained weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return MobileTiny()


def raises(width: int = 8):
    raise ValueError(f"width {width} is not supported by this factory")


def not_a_module():
    return {"weights": 1}


NOT_CALLABLE = 42
