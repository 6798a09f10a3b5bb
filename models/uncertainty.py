"""Uncertainty by Monte-Carlo dropout.

The dropout layers of the network's head stay stochastic while batch norm stays frozen;
the head runs ``samples`` times on the same feature map (one batched pass), and the
spread of the calibrated probabilities is the uncertainty reported next to each
probability (standard deviation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.nets import LesionNet, set_mc_dropout


def mc_dropout_probabilities(
    net: LesionNet,
    features: torch.Tensor | Sequence[torch.Tensor],
    *,
    samples: int = 24,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Per head: (samples, n_classes) softmax probabilities of ``samples`` stochastic head passes on ``features``
    (1, ...). Several feature maps (test-time views of one series) share each sample's dropout masks and
    their logits are averaged, as in the deterministic pass."""
    views = [features] if isinstance(features, torch.Tensor) else list(features)
    gen_state = torch.random.get_rng_state()
    try:
        set_mc_dropout(net, True)
        with torch.inference_mode():
            per_view = []
            for f in views:
                torch.manual_seed(seed)  # reproducible uncertainty for the same input, the same masks per view
                per_view.append(net.forward_head(f.expand(samples, *f.shape[1:]))[0])
            n_heads = len(per_view[0])
            logits = [torch.stack([v[h] for v in per_view]).mean(dim=0) for h in range(n_heads)]
            return [torch.softmax(lg / temperature, dim=1) for lg in logits]
    finally:
        set_mc_dropout(net, False)
        torch.random.set_rng_state(gen_state)
