"""Uncertainty by Monte-Carlo dropout.

The dropout layers of the network's head stay stochastic while batch norm stays frozen;
the head runs ``samples`` times on the same feature map (one batched pass), and the
spread of the calibrated probabilities is the uncertainty reported next to each
probability (standard deviation).
"""

from __future__ import annotations

import torch
from torch import nn

from models.nets import set_mc_dropout


def mc_dropout_probabilities(
    net: nn.Module, features: torch.Tensor, *, samples: int = 24, temperature: float = 1.0, seed: int = 0
) -> list[torch.Tensor]:
    """Per head: (samples, n_classes) softmax probabilities of ``samples`` stochastic head passes on ``features`` (1, ...)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # reproducible uncertainty for the same input
    try:
        set_mc_dropout(net, True)
        with torch.inference_mode():
            feats = features.expand(samples, *features.shape[1:])
            logits, _ = net.forward_head(feats)
            return [torch.softmax(lg / temperature, dim=1) for lg in logits]
    finally:
        set_mc_dropout(net, False)
        torch.random.set_rng_state(gen_state)
