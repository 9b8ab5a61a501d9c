"""Counting a network's cost: parameters per part and FLOPs through ``torch.utils.flop_counter``."""
from typing import Dict

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of a module."""
    return sum(p.numel() for p in module.parameters())


def emcad_parameter_breakdown(network: nn.Module) -> Dict[str, int]:
    """Parameters of an EMCAD network's encoder, decoder blocks (without heads) and heads."""
    decoder = network.decoder
    heads = count_parameters(decoder.seg_layers)
    return {'encoder': count_parameters(network.encoder), 'decoder': count_parameters(decoder) - heads,
            'heads': heads, 'total': count_parameters(network)}


@torch.no_grad()
def count_flops(network: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass as ``torch.utils.flop_counter`` counts them (2 per multiply-add).

    Attention runs through the math kernel while counting: the counter has no formula for the fused CPU
    kernel and would silently count its matrix products as zero.
    """
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        network(x)
    return counter.get_total_flops()
