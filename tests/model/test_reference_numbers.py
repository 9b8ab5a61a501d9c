"""The official code's parameter counts, FLOPs and decoder fingerprint, reproduced exactly."""

import pytest
import torch

from helpers import fingerprint_features, fingerprint_fill, official_state_dict
from nnunet_emcad.model.counting import count_flops, count_parameters, parameter_breakdown, saved_activation_bytes
from nnunet_emcad.model.emcad import create_emcad_pvt
from nnunet_emcad.model.official import load_official_checkpoint


@pytest.mark.parametrize('variant,decoder,total', [('pvt_v2_b0', 506_507, 3_920_923),
                                                   ('pvt_v2_b2', 1_913_515, 26_772_635)])
def test_parameter_counts(variant, decoder, total):
    net = create_emcad_pvt(variant, num_classes=9, in_channels=1)
    counts = parameter_breakdown(net)
    assert counts['decoder'] == decoder
    assert counts['total'] == total


def test_b2_parameters_per_module():
    dec = create_emcad_pvt('pvt_v2_b2', num_classes=9).decoder
    per = lambda part: [count_parameters(m) for m in getattr(dec, part)][::-1]  # deepest first, like mscb4..1
    assert per('mscb') == [1_093_632, 437_760, 76_800, 22_016]
    assert per('eucb') == [169_792, 44_608, 9_664]
    assert per('lgag') == [6_883, 2_755, 1_379]
    assert per('cab') == [32_768, 12_800, 2_048, 512]
    assert count_parameters(dec.sab) == 98


@pytest.mark.parametrize('variant,flops', [('pvt_v2_b0', 1_338_876_500), ('pvt_v2_b2', 8_790_577_108)])
def test_flops_at_224_are_the_official_ones_less_the_single_tap_convs_run_as_products(variant, flops):
    # flops: the official network's count; its MSDC 1x1 depth-wise convs (2 FLOPs per output element) run here
    # as per-channel products, which the counter, like for every elementwise op, does not count
    net = create_emcad_pvt(variant, num_classes=9, in_channels=3, upsample_outputs='all').eval()
    single_tap = [mscb.msdc.dwconvs[0][0] for mscb in net.decoder.mscb]
    assert all(conv.kernel_size == (1, 1) for conv in single_tap)
    products = sum(2 * conv.in_channels * (224 // stride) ** 2 for conv, stride in zip(single_tap, (4, 8, 16, 32)))
    assert count_flops(net, torch.randn(1, 3, 224, 224)) == flops - products


def test_decoder_fingerprint_through_checkpoint_import():
    official = fingerprint_fill(official_state_dict(create_emcad_pvt('pvt_v2_b2', num_classes=9, in_channels=1)))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        net = load_official_checkpoint(official)
    finally:
        torch.set_default_dtype(default)
    assert not net.training and not net.decoder.deep_supervision
    with torch.no_grad():
        pred = net.decode(fingerprint_features(), (224, 224))
    assert pred.dtype == torch.float64 and pred.shape == (1, 9, 224, 224)
    assert pred.sum().item() == pytest.approx(53439099.9098, rel=1e-9)
    assert pred.flatten()[0].item() == pytest.approx(-15.79948742, rel=1e-9)
    assert pred[0, 1, 3, 5].item() == pytest.approx(20.57772953, rel=1e-9)


def test_official_key_names_and_shapes(shared_file):
    rows = [line.split('\t') for line in open(shared_file('reference/official_emcad_keys_b2.tsv')).read().splitlines()]
    reference = {name: shape for name, shape, _ in rows}
    ours = {k: str(tuple(v.shape)) for k, v in
            official_state_dict(create_emcad_pvt('pvt_v2_b2', num_classes=9, in_channels=1)).items()
            if not k.startswith('backbone.')}
    assert ours == reference


class _SquareOfExp(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.exp()  # exp saves its output y; y * y saves y twice more: one storage
        return y * y


def test_saved_activation_bytes_count_each_saved_storage_once_and_no_parameters():
    x = torch.randn(2, 3, 8, 8)
    conv_relu = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.ReLU())
    # the conv saves its input (and its weight, a parameter); ReLU saves its output
    assert saved_activation_bytes(conv_relu, x) == (2 * 3 * 64 + 2 * 5 * 64) * 4
    assert saved_activation_bytes(_SquareOfExp(), x.requires_grad_()) == 2 * 3 * 64 * 4
    with torch.no_grad():
        assert saved_activation_bytes(conv_relu, x) == 0
