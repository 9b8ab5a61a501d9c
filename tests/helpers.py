"""Test helpers: official-format state dicts made from our networks (the inverse of the checkpoint import),
outputs with gradients for comparing two ways of computing the same thing, and the docs' text (the README's
sections: ``benchmarks.source_tree``)."""
import math
import os
import re
from typing import Callable, Dict, List

import torch
from torch import nn

from benchmarks.source_tree import README

TESTS = os.path.dirname(os.path.abspath(__file__))
"""The tests' root: their shared modules, ``ext_trainers/`` and ``ddp_steps.py``."""

_TO_OFFICIAL = (
    (re.compile(r'^encoder\.stem\.'), 'conv.'),
    (re.compile(r'^decoder\.seg_layers\.(\d+)\.'), lambda m: f'out_head{int(m.group(1)) + 1}.'),
    (re.compile(r'^decoder\.mscb\.(\d+)\.'), lambda m: f'decoder.mscb{int(m.group(1)) + 1}.0.'),
    (re.compile(r'^decoder\.eucb\.(\d+)\.pwc\.'), lambda m: f'decoder.eucb{int(m.group(1)) + 1}.pwc.0.'),
    (re.compile(r'^decoder\.(eucb|lgag|cab)\.(\d+)\.'), lambda m: f'decoder.{m.group(1)}{int(m.group(2)) + 1}.'),
)


def timm_to_original_pvt(key: str) -> str:
    """timm PVTv2 key (plain or feature-wrapped) -> the original PVT repository's name."""
    key = re.sub(r'^stages[._](\d+)\.downsample\.', lambda m: f'patch_embed{int(m.group(1)) + 1}.', key)
    key = re.sub(r'^patch_embed\.', 'patch_embed1.', key)
    key = re.sub(r'^stages[._](\d+)\.blocks\.(\d+)\.', lambda m: f'block{int(m.group(1)) + 1}.{m.group(2)}.', key)
    key = re.sub(r'^stages[._](\d+)\.norm\.', lambda m: f'norm{int(m.group(1)) + 1}.', key)
    return key.replace('mlp.dwconv.', 'mlp.dwconv.dwconv.')


def to_official_key(key: str) -> str:
    """Our EMCADNet key -> the official EMCADNet key."""
    if key.startswith('encoder.body.'):
        return 'backbone.' + timm_to_original_pvt(key[len('encoder.body.'):])
    for pattern, replacement in _TO_OFFICIAL:
        key, n = pattern.subn(replacement, key, count=1)
        if n:
            break
    return key


def official_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict the official code would hold for the same weights."""
    return {to_official_key(k): v.clone() for k, v in model.state_dict().items()}


def fingerprint_fill(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The reference fingerprint's deterministic values for every non-backbone float tensor (float64)."""
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key.startswith('backbone.') or key.endswith('num_batches_tracked'):
            continue
        s = sum(ord(c) for c in key) % 97
        j = torch.arange(value.numel(), dtype=torch.float64).reshape(value.shape)
        filled = torch.sin(0.1 * j + s)
        out[key] = 1 + 0.5 * filled ** 2 if key.endswith('running_var') else filled
    return out


def fingerprint_features() -> list:
    """Stage inputs x_k = 10 sin(0.013 j + 0.5 k), k = 1..4 from the shallowest (B2 widths, 224x224 input)."""
    shapes = [(1, 64, 56, 56), (1, 128, 28, 28), (1, 320, 14, 14), (1, 512, 7, 7)]
    return [10 * torch.sin(0.013 * torch.arange(math.prod(s), dtype=torch.float64).reshape(s) + 0.5 * k)
            for k, s in enumerate(shapes, start=1)]


def outputs_and_gradients(forward: Callable, module: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """``forward(x)``'s output(s), and the gradients of ``x`` and of ``module``'s parameters, for a fixed upstream
    gradient on every output."""
    module.zero_grad()
    xi = x.clone().requires_grad_()
    out = forward(xi)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    torch.autograd.backward(outs, [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o) for o in outs])
    return [o.detach() for o in outs] + [xi.grad] + [p.grad.clone() for p in module.parameters()]


def assert_same_outputs_and_gradients(expected: nn.Module, got: nn.Module, x: torch.Tensor) -> None:
    """``got`` gives exactly ``expected``'s outputs and gradients on ``x``, each run from the same random state
    (dropout and drop path draw the same numbers)."""
    torch.manual_seed(1)
    want = outputs_and_gradients(expected, expected, x)
    torch.manual_seed(1)
    for a, b in zip(want, outputs_and_gradients(got, got, x), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def doc_text(name: str) -> str:
    """docs/``name``.md, whole."""
    with open(os.path.join(os.path.dirname(README), 'docs', f'{name}.md')) as f:
        return f.read()
