"""Which memory layout inductor (``torch.compile``'s default backend) would choose for a network's training graph.

Inductor lays a whole graph out channels-last, or leaves it as it is, by a heuristic over the graph's
convolutions (``GraphLowering.decide_layout_opt``): on CUDA it keeps the default layout as soon as one grouped
conv has more than one input channel per group, or one conv with a kernel maps to at most half its input channels.
Depth-wise convolutions, most of EMCAD's work, run much faster channels-last on cuDNN, so that decision matters.
This module asks the heuristic itself on the traced forward graph.
Importing it loads inductor (tens of seconds on a cold start), which is why it is a module of its own.
"""
import copy
from typing import Sequence

import torch
from torch import nn
from torch._inductor.graph import GraphLowering
from torch.fx.experimental.proxy_tensor import make_fx


def inductor_lays_out_channels_last(network: nn.Module, input_shape: Sequence[int]) -> bool:
    """Whether inductor would lay the training forward graph of ``network`` on an ``input_shape`` batch out
    channels-last on CUDA. Run the network in the mode training uses (``train()``, deep supervision on).

    The graph is traced from a copy of the network on the meta device (shapes only, no GPU needed), to which
    inductor applies the same heuristic as to CUDA (on the CPU, with oneDNN, it always chooses channels-last).
    The copy leaves the network untouched: tracing its own parameters through ``torch.func.functional_call``
    broke CPU float16 autocast for them afterwards."""
    copied = copy.deepcopy(network).to('meta')
    state = {**dict(copied.named_parameters()), **dict(copied.named_buffers())}
    # traced with fake tensors, so that every node carries the shape the heuristic reads (node.meta['val'])
    graph = make_fx(lambda state, x: torch.func.functional_call(copied, state, (x,)), tracing_mode='fake')(
        state, torch.empty(tuple(input_shape), device='meta'))
    return GraphLowering.decide_layout_opt(graph, is_inference=False)
