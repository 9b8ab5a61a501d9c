"""Counting a network's cost: parameters and FLOPs per part through ``torch.utils.flop_counter``, and the
activation bytes a training forward pass keeps for backward.

Works for EMCAD networks and nnU-Net's own U-Nets alike: both have ``encoder`` and ``decoder`` modules and
their segmentation heads in ``decoder.seg_layers``. FLOPs count 2 per multiply-add, as the counter does.
"""
from typing import Dict, List

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nnunet_emcad.model.emcad import create_emcad_pvt

PAPER_DECODER = {'pvt_v2_b0': (0.507e6, 0.110e9), 'pvt_v2_b2': (1.91e6, 0.381e9)}  # parameters, multiply-adds


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of a module."""
    return sum(p.numel() for p in module.parameters())


def parameter_breakdown(network: nn.Module) -> Dict[str, int]:
    """Parameters of the encoder, the decoder without its heads, and the heads.

    nnU-Net's ``UNetDecoder`` keeps a reference to its encoder; those parameters count once, as encoder.
    """
    encoder = {id(p) for p in network.encoder.parameters()}
    heads = {id(p) for p in network.decoder.seg_layers.parameters()}
    decoder = sum(p.numel() for p in network.decoder.parameters() if id(p) not in encoder | heads)
    return {'encoder': count_parameters(network.encoder), 'decoder': decoder,
            'heads': count_parameters(network.decoder.seg_layers), 'total': count_parameters(network)}


def _counted(fn) -> FlopCounterMode:
    with FlopCounterMode(display=False, depth=None) as counter, sdpa_kernel([SDPBackend.MATH]):
        fn()
    return counter


@torch.no_grad()
def flop_breakdown(network: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """FLOPs of one forward pass of ``network(x)``: total, encoder, decoder without heads, heads.

    The encoder is counted on its own (nnU-Net's decoder also holds the encoder, which blurs the counter's
    module names); the decoder is the rest. Attention runs through the math kernel while counting: the counter
    has no formula for the fused CPU kernel and would count its matrix products as zero.
    """
    counter = _counted(lambda: network(x))
    total = counter.get_total_flops()
    encoder = _counted(lambda: network.encoder(x)).get_total_flops()
    root = type(network).__name__
    heads = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                if name.startswith(f'{root}.decoder.seg_layers.') and name.count('.') == 3)
    return {'total': total, 'encoder': encoder, 'decoder': total - encoder - heads, 'heads': heads}


def count_flops(network: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (2 per multiply-add)."""
    return flop_breakdown(network, x)['total']


def saved_activation_bytes(network: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors that ``network(x)`` saves for its backward pass, each storage counted once,
    parameters and buffers left out: what training holds in memory between forward and backward, measurable
    on the CPU (``torch.autograd.graph.saved_tensors_hooks``). Run it in the mode training uses (``train()``,
    deep supervision on)."""
    own = {t.untyped_storage().data_ptr() for t in (*network.parameters(), *network.buffers())}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        network(x)
    return sum(saved.values())


def paper_fidelity(size: int = 224, num_classes: int = 9) -> List[dict]:
    """Our EMCAD-B0/B2 decoders' parameters and multiply-adds next to the paper's (3-channel input)."""
    rows = []
    for variant, (paper_params, paper_macs) in PAPER_DECODER.items():
        net = create_emcad_pvt(variant, num_classes, upsample_outputs='all').eval()
        flops = flop_breakdown(net, torch.randn(1, 3, size, size))
        rows.append({'network': f'EMCAD-{variant[-2:].upper()}', 'decoder_params': parameter_breakdown(net)['decoder'],
                     'paper_decoder_params': paper_params, 'decoder_macs': flops['decoder'] // 2,
                     'paper_decoder_macs': paper_macs, 'total_params': count_parameters(net),
                     'total_flops': flops['total']})
    return rows


def paper_table(rows: List[dict]) -> List[str]:
    """``paper_fidelity``'s rows as a Markdown table (the cost report's and ``nnunet-emcad paper``'s)."""
    lines = ['| network | decoder params | paper | decoder MACs | paper | total params | total GFLOPs |',
             '|---|---:|---:|---:|---:|---:|---:|']
    return lines + [f"| {r['network']} | {r['decoder_params']:,} | {r['paper_decoder_params'] / 1e6:.3f}M | "
                    f"{r['decoder_macs'] / 1e9:.3f}G | {r['paper_decoder_macs'] / 1e9:.3f}G | {r['total_params']:,} | "
                    f"{r['total_flops'] / 1e9:.2f} |" for r in rows]
