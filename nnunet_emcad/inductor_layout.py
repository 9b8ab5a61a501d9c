"""Which memory layout inductor (``torch.compile``'s default backend) would choose for a network's training graph.

Inductor lays a whole graph out channels-last, or leaves it as it is, by a heuristic over the graph's
convolutions (``GraphLowering.decide_layout_opt``): on CUDA it keeps the default layout as soon as one grouped
conv has more than one input channel per group, or one conv with a kernel maps to at most half its input channels.
Depth-wise convolutions, most of EMCAD's work, run much faster channels-last on cuDNN, so that decision matters.
This module asks the heuristic itself on the traced forward graph, with fake tensors: no GPU and no memory needed.
Importing it loads inductor (tens of seconds on a cold start), which is why it is a module of its own.
"""
from typing import Sequence

import torch
from torch import nn
from torch._inductor.graph import GraphLowering
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx


def inductor_lays_out_channels_last(network: nn.Module, input_shape: Sequence[int], device: str = 'cuda') -> bool:
    """Whether inductor would lay the training forward graph of ``network`` on an ``input_shape`` batch out
    channels-last on ``device`` (default ``cuda``, which needs no GPU here: the tensors are fake). Run the
    network in the mode training uses (``train()``, deep supervision on)."""
    with FakeTensorMode() as mode:
        state = {name: mode.from_tensor(t).to(device)
                 for name, t in (*network.named_parameters(), *network.named_buffers())}
        x = torch.empty(tuple(input_shape), device=device)
        graph = make_fx(lambda s, inputs: functional_call(network, s, (inputs,)))(state, x)
    return GraphLowering.decide_layout_opt(graph, is_inference=False)
