"""The classifier's output layer, always computed in fp32.

CUBA trains the backdoor logits to be near-ties over the target set, and the argmax among
near-ties decides where a backdoor image lands. Under bf16 autocast the logits would carry
only 8 mantissa bits, so the loss could not see (nor remove) a class-level bias smaller than
bf16's resolution that an fp32 evaluation then reads as a systematic preference. The head is
one small matrix product, so keeping it in fp32 costs nothing measurable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FP32Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
