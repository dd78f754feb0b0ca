"""Attack your own classifier with CUBA FRA on the bundled digits data, then audit it with STRIP.

    python examples/own_model.py [OUT]

The model is any torch.nn.Module mapping [0, 1] images (B, C, H, W) to logits; cuba builds the
trigger generator to fit the input and trains both jointly (cuba.api.attack).
"""

import sys

from torch import nn

from cuba import api


class TinyNet(nn.Module):  # the whole model: ten lines
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.LazyLinear(128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.net(x)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/own-model"
    run = api.attack(classifier=TinyNet, dataset="digits", attack="cuba", variant="fra", out=out, progress=False)
    m = run.metrics
    print(f"CA {100 * m['ca']:.2f}%  ASR {100 * m['asr']:.2f}%  ASR-C {100 * m['asr_c']:.2f}%  DS {100 * m['ds']:.2f}%")
    strip = api.defend(run, "strip", n_eval=300, n_calib=140)
    print(f"STRIP: FAR at FRR 1% {strip['far_at_frr_1pct']:.3f}, two-sided {strip['far_at_frr_1pct_two_sided']:.3f}")
