"""Where a network's time goes: the encoder, each decoder block and each EMCAD decoder stage timed on its own,
eager and under ``torch.compile``, with the operators it runs, the bytes they read and write, and its FLOPs.

The calls of one training forward pass are recorded (what was called, at which stride its output lies, and the
inputs it got); each is then run alone on copies of those inputs: forward, forward + backward (a training
step's share) and, in eval mode without autograd on the batch's first sample, prediction's forward. An EMCAD
stage (``EMCADDecoder._decode_stage``, and the deepest stage's ``_attend``) is timed as a whole too: it adds
what runs between its blocks (the attention products and the skip sum), and compiled, the fusion across blocks.
Stages that run again in backward (``EMCADDecoder.recompute_stages``) add their forward once more, in
backward. Traffic is a roofline-style estimate: each operator reads its tensor inputs and writes its outputs
in full (views move nothing), as eager execution does; compiled, fused operators move less.
"""
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from nnunet_emcad.model.emcad import EMCADNet, total_strides

STAGE = 'stage'
"""The kind of an EMCAD decoder stage's call as a whole (its blocks are recorded on their own too)."""


@dataclass
class Call:
    """One call in a training forward pass: its kind, the stride of its finest tensor, the function called, the
    module it belongs to (switched between train and eval), its inputs, and whether backward runs it again."""
    kind: str
    stride: int
    fn: Callable
    module: nn.Module
    args: tuple
    kwargs: dict
    recomputed: bool


OUTSIDE_STAGES = ('encoder', 'projection', 'refinement', 'head')
"""The kinds of ``blocks_of`` that run outside the EMCAD decoder's stages (never run again in backward)."""


def blocks_of(network: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The modules timed one by one, each with its kind: the encoder (whole), then the decoder's blocks (EMCAD:
    EUCB, LGAG, CAB, SAB, MSCB, the skips' projections to one width and the logits' refinement where built; stock
    nnU-Net: transposed convolutions and convolution stages) and heads."""
    blocks = [('encoder', network.encoder)]
    decoder = network.decoder
    if isinstance(network, EMCADNet):
        blocks += [(kind.upper(), m) for kind in ('eucb', 'lgag', 'cab', 'mscb') for m in getattr(decoder, kind)]
        blocks.append(('SAB', decoder.sab))
        blocks += [('projection', m) for m in decoder.project or ()]
        blocks += [('refinement', decoder.refine)] if decoder.refine is not None else []
    else:
        blocks += [('transposed conv', m) for m in decoder.transpconvs]
        blocks += [('conv stage', m) for m in decoder.stages]
    return blocks + [('head', m) for m in decoder.seg_layers]


def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _copy(value, grad: bool = False, first: bool = False):
    """A tensor detached and copied (its first sample only with ``first``; requiring grad with ``grad`` when
    floating); anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach()[:1] if first else value.detach()
    return value.clone().requires_grad_(grad and value.is_floating_point())


def _training_inputs(call: Call) -> Tuple[tuple, dict]:
    """Fresh copies of a call's inputs, requiring grad as in training."""
    return tuple(_copy(a, grad=True) for a in call.args), {k: _copy(v, grad=True) for k, v in call.kwargs.items()}


def _recomputed_strides(network: nn.Module) -> set:
    """The output strides of the EMCAD decoder stages that run again in backward."""
    stages = getattr(network.decoder, 'recompute_stages', 0) if isinstance(network, EMCADNet) else 0
    return {max(s) for s in total_strides(network.encoder.strides)[:stages]}


def record_calls(network: nn.Module, x: torch.Tensor, only: Optional[int] = None) -> List[Call]:
    """The calls of ``blocks_of(network)``, and of each EMCAD decoder stage, in one training forward pass of
    ``x`` (train mode, no autograd), with copies of their inputs; with ``only``, of call number ``only``'s alone
    (-1: none), the others get none."""
    calls: List[Call] = []
    size = max(x.shape[2:])
    recomputed = _recomputed_strides(network)

    def record(kind: str, fn: Callable, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        finest = max(max(t.shape[2:]) for t in _tensors((args, kwargs, output)) if t.dim() > 2)
        stride = max(1, round(size / finest))
        if only is not None and only != len(calls):
            args, kwargs = (), {}
        calls.append(Call(kind, stride, fn, module, tuple(_copy(a) for a in args),
                          {k: _copy(v) for k, v in kwargs.items()},
                          kind not in OUTSIDE_STAGES and stride in recomputed))

    handles = [m.register_forward_hook(lambda m, a, kw, out, kind=kind: record(kind, m, m, a, kw, out),
                                       with_kwargs=True) for kind, m in blocks_of(network)]
    decoder = network.decoder
    if isinstance(network, EMCADNet):
        decode_stage, attend = decoder._decode_stage, decoder._attend
        deepest = decoder.first_stage + len(decoder.mscb) - 1

        def recording_decode_stage(d, skip, stage):
            out = decode_stage(d, skip, stage)
            record(STAGE, lambda d, skip: decode_stage(d, skip, stage), decoder, (d, skip), {}, out)
            return out

        def recording_attend(d, stage):
            out = attend(d, stage)
            if stage == deepest:  # called by forward; the other stages' calls lie inside _decode_stage
                record(STAGE, lambda d: attend(d, stage), decoder, (d,), {}, out)
            return out

        decoder._decode_stage, decoder._attend = recording_decode_stage, recording_attend
    try:
        network.train()
        with torch.no_grad():
            network(x)
    finally:
        for h in handles:
            h.remove()
        for name in ('_decode_stage', '_attend'):
            decoder.__dict__.pop(name, None)
    return calls


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` (CPU) over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def first_call_s(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes (its first call: compiling, where it compiles)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_call(call: Call, repeats: int, compiled: bool = False) -> Dict[str, float]:
    """A call's forward and backward milliseconds in training (inputs and parameters get gradients), its
    forward milliseconds in prediction, and with ``compiled`` (``torch.compile``, compiled afresh) the seconds
    its first training and first prediction call took beyond a later one's (mostly compiling)."""
    fn = call.fn
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn)

    def forward():
        args, kwargs = _training_inputs(call)
        return fn(*args, **kwargs)

    def forward_backward():
        outputs = _tensors(forward())
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
        call.module.zero_grad(set_to_none=True)

    call.module.train()
    first_train = first_call_s(forward_backward)
    fwd = median_ms(forward, repeats)
    both = median_ms(forward_backward, repeats, warmup=0)
    args = tuple(_copy(a, first=True) for a in call.args)
    kwargs = {k: _copy(v, first=True) for k, v in call.kwargs.items()}
    call.module.eval()
    with torch.no_grad():
        first_predict = first_call_s(lambda: fn(*args, **kwargs))
        predict = median_ms(lambda: fn(*args, **kwargs), repeats, warmup=0)
    call.module.train()
    timed = {'forward_ms': fwd, 'backward_ms': max(0.0, both - fwd), 'predict_ms': predict}
    if compiled:
        timed['compile_s'] = max(0.0, first_train - both / 1000) + max(0.0, first_predict - predict / 1000)
    return timed


class _Traffic(TorchDispatchMode):
    """Counts the operators that run (views left out) and the bytes of their tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.ops += 1
            self.bytes += sum(t.nbytes for t in _tensors((args, kwargs, out)))
        return out


def traffic(call: Call) -> Dict[str, int]:
    """Operators and bytes read and written (``_Traffic``) of a call's training forward and of its backward,
    and the forward's FLOPs (torch's counter counts a grouped convolution's weight gradient as an ungrouped
    one's, so backward FLOPs are left to the usual estimate: twice the forward's)."""
    counted = {}
    call.module.train()
    args, kwargs = _training_inputs(call)
    with _Traffic() as moved, FlopCounterMode(display=False) as flops:
        outputs = _tensors(call.fn(*args, **kwargs))
    counted.update(ops_forward=moved.ops, bytes_forward=moved.bytes, flops_forward=flops.get_total_flops())
    grads = [torch.ones_like(o) for o in outputs]
    with _Traffic() as moved:
        torch.autograd.backward(outputs, grads)
    call.module.zero_grad(set_to_none=True)
    counted.update(ops_backward=moved.ops, bytes_backward=moved.bytes)
    return counted


def breakdown(network: nn.Module, x: torch.Tensor, repeats: int = 3, compiled: bool = False) -> List[dict]:
    """Rows (kind, stride, calls, the times of ``time_call`` eager and, with ``compiled``, compiled under
    'compiled_' names, and ``traffic``) summed over the calls of each kind at each stride, for a training batch
    ``x``; prediction runs only the finest head, as without deep supervision. Recomputed EMCAD stages add a
    'recompute' row per stride: their stage's forward, again in backward."""
    rows: Dict[Tuple[str, int], Dict[str, float]] = {}

    def add(kind: str, stride: int, values: Dict[str, float]) -> None:
        row = rows.setdefault((kind, stride), {'calls': 0})
        row['calls'] += 1
        for k, v in values.items():
            row[k] = row.get(k, 0) + v

    calls = record_calls(network, x, only=-1)
    finest_head = min(c.stride for c in calls if c.kind == 'head')
    for i in range(len(calls)):
        # recorded again for each call, holding its inputs alone: every call's inputs held at once (gigabytes at
        # nnU-Net's 2D patches) slowed the largest parts' own allocations
        call = record_calls(network, x, only=i)[i]
        values = dict(time_call(call, repeats), **traffic(call))
        if compiled:
            values.update({f'compiled_{k}': v for k, v in time_call(call, repeats, compiled=True).items()})
        if call.kind == 'head' and call.stride != finest_head:  # prediction runs the finest head alone
            values.update(predict_ms=0.0, **({'compiled_predict_ms': 0.0} if compiled else {}))
        add(call.kind, call.stride, values)
        if call.kind == STAGE and call.recomputed:
            again = {k.replace('forward', 'backward'): v for k, v in values.items()
                     if k.endswith(('forward_ms', 'ops_forward', 'bytes_forward'))}
            add('recompute', call.stride, again)
    return [dict(kind=kind, stride=stride, **values) for (kind, stride), values in rows.items()]


def build_trainer(plans_file: str, trainer: str, configuration: str, device: str = 'cpu'):
    """``trainer`` (a class name nnU-Net finds) constructed on a plans file with its dataset.json beside it;
    nothing is trained."""
    with open(plans_file) as f:
        plans = json.load(f)
    with open(os.path.join(os.path.dirname(plans_file), 'dataset.json')) as f:
        dataset_json = json.load(f)
    plans['continue_training'] = False
    cls = recursive_find_trainer_class_by_name(trainer)
    return cls(plans, configuration, 0, dataset_json, device=torch.device(device))


def training_step(trainer, network: nn.Module, batch: int, channels: int, classes: int,
                  compiled: bool = False) -> Callable[[], None]:
    """One step of ``trainer``'s own loss (deep supervision as ``network`` is built) and optimiser over
    ``network`` (made the trainer's), on random data of the trainer's patch at ``batch`` with ``channels`` and
    labels of ``classes``; with ``compiled`` the network runs under ``torch.compile``. AMP on CUDA."""
    device = trainer.device
    trainer.network = network.to(device).train()
    trainer.loss = trainer._build_loss()
    optimizer, _ = trainer.configure_optimizers()
    run = torch.compile(trainer.network) if compiled else trainer.network
    patch = list(trainer.configuration_manager.patch_size)
    data = torch.randn(batch, channels, *patch, device=device)
    target = torch.randint(0, classes, (batch, 1, *patch), device=device).float()
    targets = [F.interpolate(target, size=[round(p * s) for p, s in zip(patch, scale)], mode='nearest')
               for scale in trainer._get_deep_supervision_scales()]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=device.type == 'cuda'):
            loss = trainer.loss(run(data), targets)
        loss.backward()
        optimizer.step()

    return step
