"""The one definition of the language-model loss, below every stage that needs it.

The data loader labels positions that carry no loss with IGNORE_INDEX; the training step,
validation and `lmforge eval` all sum token cross-entropies with `summed_cross_entropy`, so a
perplexity printed by any of them means the same thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Label of a position that is not a target (padding in padded mode). PyTorch's own default.
IGNORE_INDEX = -100


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of fp32 token cross-entropies over targets that are not IGNORE_INDEX."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
