"""Where a model's weights are when accelerate placed them: its input device, and offloaded weights brought back
for code that reads weights rather than calling the module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """Where to put the model's inputs: its device, or the CPU when accelerate offloaded it (the weights then sit
    on ``meta`` between forwards, and accelerate's hooks move inputs to each layer's execution device)."""
    return model.device if model.device.type != "meta" else torch.device("cpu")


def offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloaded some of the module's weights (they sit on ``meta`` outside its forward)."""
    from accelerate.utils import has_offloaded_params

    return any(has_offloaded_params(part) for part in module.modules())


@contextmanager
def resident(module: nn.Module) -> Iterator[None]:
    """The module's weights on its execution device inside the block, those accelerate offloaded to the CPU or disk
    included (on ``meta`` outside their forward)."""
    from accelerate.utils import align_module_device, has_offloaded_params

    with ExitStack() as stack:
        for part in module.modules():
            if has_offloaded_params(part):
                stack.enter_context(align_module_device(part))
        yield
