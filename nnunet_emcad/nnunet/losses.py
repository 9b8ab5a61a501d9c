"""The EMCAD paper's MUTATION loss (a loss over the summed logits of every non-empty subset of the heads), its
per-output CE + Dice, and the adapter that hands it nnU-Net's deep-supervision targets."""
from itertools import combinations
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PaperDiceCELoss(nn.Module):
    """The official per-output loss: ``0.3 * CE + 0.7 * Dice``.

    Dice is the TransUNet/EMCAD form: softmax probabilities, per class ``1 - (2 I + s) / (sum p^2 + sum t^2 + s)``
    over the whole batch (s = 1e-5), averaged over all classes including background. ``target`` holds class
    indices, shaped ``(B, *spatial)`` or nnU-Net's ``(B, 1, *spatial)``.
    """

    def __init__(self, num_classes: int, weight_ce: float = 0.3, weight_dice: float = 0.7, smooth: float = 1e-5):
        super().__init__()
        self.num_classes = num_classes
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim:
            target = target[:, 0]
        target = target.long()
        ce = F.cross_entropy(logits, target)
        probs = torch.softmax(logits.float(), dim=1)
        onehot = F.one_hot(target, self.num_classes).movedim(-1, 1).float()
        dims = (0,) + tuple(range(2, logits.ndim))
        intersect = (probs * onehot).sum(dims)
        denominator = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
        dice = 1 - (2 * intersect + self.smooth) / (denominator + self.smooth)
        return self.weight_ce * ce + self.weight_dice * dice.mean()


class MutationLoss(nn.Module):
    """MUTATION (multi-scale mutation of outputs): sum ``base_loss(sum of logits in S, target)`` over every
    non-empty subset S of the head outputs (15 subsets for 4 heads). All outputs must share one size."""

    def __init__(self, base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.base_loss = base_loss

    def forward(self, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        total = 0
        for r in range(1, len(outputs) + 1):
            for subset in combinations(outputs, r):
                total = total + self.base_loss(sum(subset), target)
        return total


class FirstTargetLoss(nn.Module):
    """Hands a loss over all outputs nnU-Net's first (full-resolution) target of its per-output target list."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.loss(outputs, targets[0])
