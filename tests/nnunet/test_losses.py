"""The paper's MUTATION loss and its per-output CE + Dice."""
from itertools import combinations

import torch
import torch.nn.functional as F

from nnunet_emcad.nnunet.losses import MutationLoss, PaperDiceCELoss


def _official_dice(logits, target, n_classes, smooth=1e-5):
    """The TransUNet/EMCAD DiceLoss written as the official loop."""
    probs = torch.softmax(logits, dim=1)
    loss = 0.0
    for i in range(n_classes):
        score, t = probs[:, i], (target == i).float()
        loss += 1 - (2 * (score * t).sum() + smooth) / ((score * score).sum() + (t * t).sum() + smooth)
    return loss / n_classes


def test_paper_loss_is_03_ce_plus_07_dice():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    want = 0.3 * F.cross_entropy(logits, target) + 0.7 * _official_dice(logits, target, 4)
    loss = PaperDiceCELoss(4)
    torch.testing.assert_close(loss(logits, target), want)
    torch.testing.assert_close(loss(logits, target[:, None].float()), want)  # nnU-Net's (B, 1, H, W) targets


def test_paper_loss_is_near_zero_for_a_confident_correct_prediction():
    target = torch.randint(0, 3, (1, 6, 6))
    logits = 50 * F.one_hot(target, 3).movedim(-1, 1).float()
    assert PaperDiceCELoss(3)(logits, target).item() < 1e-4


def test_mutation_sums_the_loss_over_all_15_subsets():
    torch.manual_seed(0)
    outputs = [torch.randn(2, 3, 8, 8, requires_grad=True) for _ in range(4)]
    target = torch.randint(0, 3, (2, 8, 8))
    calls = []
    base = PaperDiceCELoss(3)

    def counting(logits, t):
        calls.append(logits)
        return base(logits, t)

    total = MutationLoss(counting)(outputs, target)
    assert len(calls) == 15
    want = sum(base(sum(s), target) for r in range(1, 5) for s in combinations(outputs, r))
    torch.testing.assert_close(total, want)
    total.backward()
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outputs)
