"""Output contracts of the EMCAD networks: PVTv2 encoders and nnU-Net encoders built from plans."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from nnunet_emcad.model.counting import saved_activation_bytes
from nnunet_emcad.model.emcad import EMCADDecoder, create_emcad_pvt, stages_up_to_stride
from nnunet_emcad.nnunet.plans import create_emcad_unet, decoded_first_stage, first_stage_at_stride
from helpers import assert_same_outputs_and_gradients
from tiny_plans import ACDC_2D_ARCH

SMALL_2D_ARCH = dict(ACDC_2D_ARCH, n_stages=4, strides=ACDC_2D_ARCH['strides'][:4], kernel_sizes=[[3, 3]] * 4,
                     features_per_stage=[8, 16, 32, 64], n_conv_per_stage=[2] * 4, n_conv_per_stage_decoder=[2] * 3)


def _check_outputs(net, in_channels, num_classes, patch, batch=1):
    x = torch.randn(batch, in_channels, *patch)
    strides = net.output_strides()
    net.decoder.deep_supervision = True
    with torch.no_grad():
        outs = net(x)
    assert len(outs) == len(strides)
    for out, stride in zip(outs, strides):
        assert out.shape == (batch, num_classes, *[p // s for p, s in zip(patch, stride)])
    net.decoder.deep_supervision = False
    with torch.no_grad():
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (batch, num_classes, *patch)
    torch.testing.assert_close(single, outs[0])


@pytest.mark.parametrize('encoder', ['plain', 'residual'])
def test_acdc_plan(encoder):
    net = create_emcad_unet(ACDC_2D_ARCH, input_channels=1, num_classes=4, encoder=encoder).eval()
    assert net.output_strides() == [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32)]
    assert net.decoder.mscb[0].pconv1[0].in_channels == 32 and net.decoder.mscb[5].pconv1[0].in_channels == 512
    _check_outputs(net, 1, 4, (256, 224))


def test_residual_encoder_takes_resenc_plans():
    arch = {k: v for k, v in ACDC_2D_ARCH.items() if k != 'n_conv_per_stage'}
    arch.update(n_blocks_per_stage=[1, 3, 4, 6, 6, 6], n_conv_per_stage_decoder=[1] * 5)
    net = create_emcad_unet(arch, 1, 4, encoder='residual')
    assert [len(stage.blocks) for stage in net.encoder.stages] == [1, 3, 4, 6, 6, 6]


@pytest.mark.parametrize('variant,channels', [('pvt_v2_b0', [32, 64, 160, 256]), ('pvt_v2_b1', [64, 128, 320, 512])])
@pytest.mark.parametrize('upsample', ['first', 'all'])
def test_pvt_outputs(variant, channels, upsample):
    net = create_emcad_pvt(variant, num_classes=3, in_channels=1, upsample_outputs=upsample).eval()
    assert net.encoder.output_channels == channels
    expected = [(1, 1), (8, 8), (16, 16), (32, 32)] if upsample == 'first' else [(1, 1)] * 4
    assert net.output_strides() == expected
    _check_outputs(net, 1, 3, (64, 96), batch=2)


def test_pvt_rejects_sizes_it_cannot_take():
    net = create_emcad_pvt('pvt_v2_b0', num_classes=2, in_channels=1)
    with pytest.raises(ValueError, match='divisible by 32'):
        net(torch.randn(1, 1, 64, 80))
    with pytest.raises(ValueError, match='unknown PVTv2 encoder'):
        create_emcad_pvt('pvt_v2_b9')


@st.composite
def nnunet_2d_plans(draw):
    """Random valid 2D nnU-Net configurations: stages, per-axis strides, a patch that fits them with a
    bottleneck of at least 4 pixels per axis (nnU-Net's planner stops pooling there)."""
    n_stages = draw(st.integers(4, 8))
    strides = [[1, 1]] + [draw(st.sampled_from([[2, 2], [2, 2], [1, 2], [2, 1]])) for _ in range(n_stages - 1)]
    total = [math.prod(s[a] for s in strides) for a in range(2)]
    patch = [t * draw(st.integers(4, max(4, 256 // t))) for t in total]
    base = draw(st.sampled_from([4, 8, 16]))
    arch = dict(ACDC_2D_ARCH, n_stages=n_stages, strides=strides, kernel_sizes=[[3, 3]] * n_stages,
                features_per_stage=[min(base * 2 ** i, 64) for i in range(n_stages)],
                n_conv_per_stage=[1] * n_stages, n_conv_per_stage_decoder=[1] * (n_stages - 1))
    return arch, patch, draw(st.integers(1, 4)), draw(st.integers(2, 10)), draw(st.sampled_from(['plain', 'residual']))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nnunet_2d_plans(), st.sampled_from([1, 2, 4, 8]), st.booleans(), st.sampled_from([None, 8]), st.booleans())
def test_random_plans_give_one_output_per_decoded_stage(case, decoder_stride, light_stages, width, refine):
    arch, patch, in_channels, num_classes, encoder = case
    first = decoded_first_stage(arch['strides'], decoder_stride)
    refine = refine and first > 0 and not light_stages
    net = create_emcad_unet(arch, in_channels, num_classes, encoder=encoder, decoder_stride=decoder_stride,
                            light_stages=light_stages, width=width, refine_channels=4 if refine else 0).eval()
    assert len(net.decoder.mscb) == arch['n_stages'] - first
    assert len(net.output_strides()) == arch['n_stages'] - (0 if light_stages else first) + refine
    _check_outputs(net, in_channels, num_classes, patch)


def test_decoder_from_stride_4_leaves_the_fine_stages_out():
    net = create_emcad_unet(ACDC_2D_ARCH, 1, 4, decoder_stride=4).eval()
    assert net.output_strides() == [(1, 1), (8, 8), (16, 16), (32, 32)]
    assert net.decoder.mscb[0].pconv1[0].in_channels == 128 and len(net.decoder.eucb) == 3
    _check_outputs(net, 1, 4, (256, 224))
    skips = net.encoder(torch.randn(1, 1, 64, 64))
    changed = [s.clone() for s in skips]
    changed[0].normal_()
    changed[1].normal_()
    with torch.no_grad():
        torch.testing.assert_close(net.decode(changed, (64, 64)), net.decode(skips, (64, 64)))


def test_light_stages_decode_the_fine_stages_with_eucb_and_lgag_only():
    net = create_emcad_unet(ACDC_2D_ARCH, 1, 4, decoder_stride=4, light_stages=True).eval()
    assert net.output_strides() == [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32)]
    assert len(net.decoder.mscb) == len(net.decoder.cab) == 4 and len(net.decoder.eucb) == 5
    assert net.decoder.eucb[0].pwc.out_channels == 32 and net.decoder.lgag[0].W_x[0].in_channels == 32
    _check_outputs(net, 1, 4, (64, 64))


def test_one_decoder_width_projects_every_decoded_skip_and_decodes_at_that_width():
    net = create_emcad_unet(ACDC_2D_ARCH, 1, 4, decoder_stride=2, width=16).eval()
    features = ACDC_2D_ARCH['features_per_stage']
    assert [(p.in_channels, p.out_channels) for p in net.decoder.project] == [(c, 16) for c in features[1:]]
    assert {m.pconv1[0].in_channels for m in net.decoder.mscb} == {16}
    assert {m.pwc.in_channels for m in net.decoder.eucb} == {m.pwc.out_channels for m in net.decoder.eucb} == {16}
    assert {h.in_channels for h in net.decoder.seg_layers} == {16}
    assert net.output_strides() == [(1, 1), (4, 4), (8, 8), (16, 16), (32, 32)]
    _check_outputs(net, 1, 4, (64, 64))
    encoder_widths = create_emcad_unet(ACDC_2D_ARCH, 1, 4, decoder_stride=2)
    assert (sum(p.numel() for p in net.decoder.parameters())
            < sum(p.numel() for p in encoder_widths.decoder.parameters()) / 10)


def test_the_refinement_corrects_the_interpolated_logits_from_the_full_resolution_skip():
    torch.manual_seed(0)
    net = create_emcad_unet(SMALL_2D_ARCH, 1, 4, decoder_stride=2, refine_channels=8).eval()
    assert net.output_strides() == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert net.decoder.refine.conv[0].in_channels == 8 + 4 and net.decoder.refine.conv[0].out_channels == 8
    _check_outputs(net, 1, 4, (32, 32))
    net.decoder.deep_supervision = True
    skips = net.encoder(torch.randn(1, 1, 32, 32))
    changed = [s.clone() for s in skips]
    changed[0].normal_()
    with torch.no_grad():
        refined, coarse = net.decode(skips, (32, 32))[:2]
        refined_changed, coarse_changed = net.decode(changed, (32, 32))[:2]
        assert not torch.allclose(refined, refined_changed)  # the full-resolution skip reaches the first output
        torch.testing.assert_close(coarse, coarse_changed)  # and only that one
        net.decoder.refine.out.weight.zero_()
        net.decoder.refine.out.bias.zero_()
        # without a correction, the first output is the stride-2 logits interpolated
        torch.testing.assert_close(net.decode(skips, (32, 32))[0],
                                   F.interpolate(coarse, size=(32, 32), mode='bilinear', align_corners=False))
    with pytest.raises(ValueError, match='nothing to refine'):
        create_emcad_unet(SMALL_2D_ARCH, 1, 4, decoder_stride=1, refine_channels=8)


def test_width_and_refinement_follow_an_anisotropic_3d_plan():
    arch = dict(SMALL_2D_ARCH, conv_op='torch.nn.modules.conv.Conv3d', kernel_sizes=[[1, 3, 3]] * 2 + [[3, 3, 3]] * 2,
                strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                norm_op='torch.nn.modules.instancenorm.InstanceNorm3d')
    net = create_emcad_unet(arch, 1, 3, decoder_stride=2, width=8, refine_channels=4, decoder_norm='plan').eval()
    assert net.decoder.refine.conv[0].kernel_size == (1, 3, 3)
    assert net.output_strides() == [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8)]
    _check_outputs(net, 1, 3, (8, 32, 32))


def test_the_decoder_stride_is_read_along_the_most_strided_axis():
    anisotropic = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert [first_stage_at_stride(anisotropic, s) for s in (1, 2, 4, 8, 64)] == [0, 1, 2, 3, 4]
    assert first_stage_at_stride([[1, 1], [2, 1], [1, 2], [2, 2]], 4) == 3
    shallow = dict(ACDC_2D_ARCH, n_stages=3, strides=ACDC_2D_ARCH['strides'][:3], kernel_sizes=[[3, 3]] * 3,
                   features_per_stage=[8, 16, 32], n_conv_per_stage=[2] * 3, n_conv_per_stage_decoder=[2] * 2)
    # stride 4 is the bottleneck here; two stages are decoded, so deep supervision has a head it weights
    assert create_emcad_unet(shallow, 1, 2, decoder_stride=4).output_strides() == [(1, 1), (4, 4)]


def test_coarser_decoders_save_fewer_activation_bytes_for_backward():
    x = torch.randn(1, 1, 64, 64)
    saved = {(stride, light): saved_activation_bytes(
        create_emcad_unet(ACDC_2D_ARCH, 1, 4, decoder_stride=stride, light_stages=light).train(), x)
        for stride, light in ((1, False), (4, True), (4, False))}
    assert saved[1, False] > saved[4, True] > saved[4, False] > 0


def test_recomputed_decoder_stages_give_the_same_outputs_and_gradients_and_keep_less():
    torch.manual_seed(0)
    arch = SMALL_2D_ARCH
    kept = create_emcad_unet(arch, 1, 4, decoder_norm='plan').train()
    for p in kept.parameters():
        p.data.uniform_(-0.5, 0.5)
    recomputed = create_emcad_unet(arch, 1, 4, decoder_norm='plan', recompute_stride=2).train()
    recomputed.load_state_dict(kept.state_dict())
    assert recomputed.decoder.recompute_stages == 2 and kept.decoder.recompute_stages == 0
    x = torch.randn(2, 1, 32, 32)
    assert_same_outputs_and_gradients(kept, recomputed, x)
    # the stride-1 stage alone keeps, among others, MSCB's three branches at twice its width (2 x 8 channels)
    branches = x.shape[0] * 3 * 2 * 8 * 32 * 32 * x.element_size()
    assert saved_activation_bytes(kept, x) - saved_activation_bytes(recomputed, x) > branches
    with torch.no_grad():
        torch.testing.assert_close(recomputed.eval()(x)[0], kept.eval()(x)[0], rtol=0, atol=0)


def test_recomputed_pvt_stages_give_the_same_outputs_and_gradients_and_keep_less():
    torch.manual_seed(0)
    # drop path on: the recomputed blocks must draw the same random numbers again
    kept = create_emcad_pvt('pvt_v2_b0', 3, 1, norm_op=torch.nn.InstanceNorm2d, drop_path_rate=0.3).train()
    recomputed = create_emcad_pvt('pvt_v2_b0', 3, 1, norm_op=torch.nn.InstanceNorm2d, drop_path_rate=0.3,
                                  recompute_stride=8, recompute_encoder=True).train()
    recomputed.load_state_dict(kept.state_dict())
    assert recomputed.encoder.recompute_stages == recomputed.decoder.recompute_stages == 2  # strides 4 and 8
    x = torch.randn(2, 1, 64, 64)
    assert_same_outputs_and_gradients(kept, recomputed, x)
    # the encoder's first stage alone keeps, among others, its two blocks' MLP hidden features (8 x 32 channels
    # at 16x16); the decoder's, MSCB's three branches at twice its width (2 x 32 channels)
    hidden = 2 * x.shape[0] * 8 * 32 * 16 * 16 * x.element_size()
    assert saved_activation_bytes(kept.encoder, x) - saved_activation_bytes(recomputed.encoder, x) > hidden
    branches = x.shape[0] * 3 * 2 * 32 * 16 * 16 * x.element_size()
    assert saved_activation_bytes(kept, x) - saved_activation_bytes(recomputed, x) > hidden + branches


@pytest.mark.parametrize('encoder', ['plain', 'residual'])
def test_recomputed_nnunet_encoder_stages_give_the_same_outputs_and_gradients_and_keep_less(encoder):
    torch.manual_seed(0)
    # dropout on: the recomputed stages must draw the same random numbers again
    arch = dict(SMALL_2D_ARCH, dropout_op='torch.nn.Dropout2d', dropout_op_kwargs={'p': 0.3})
    kept = create_emcad_unet(arch, 1, 4, encoder, decoder_norm='plan', recompute_stride=2).train()
    for p in kept.parameters():
        p.data.uniform_(-0.5, 0.5)
    recomputed = create_emcad_unet(arch, 1, 4, encoder, decoder_norm='plan', recompute_stride=2,
                                   recompute_encoder=True).train()
    recomputed.load_state_dict(kept.state_dict())
    assert recomputed.encoder.recompute_stages == recomputed.decoder.recompute_stages == 2
    # nnU-Net's own class when nothing is recomputed, a subclass of it otherwise
    assert isinstance(recomputed.encoder, type(kept.encoder)) and type(recomputed.encoder) is not type(kept.encoder)
    x = torch.randn(2, 1, 32, 32)
    assert_same_outputs_and_gradients(kept, recomputed, x)
    # the stride-1 stage alone keeps, among others, its two convolutions' outputs (8 channels at 32x32)
    convs = x.shape[0] * 2 * 8 * 32 * 32 * x.element_size()
    assert saved_activation_bytes(kept.encoder, x) - saved_activation_bytes(recomputed.encoder, x) > convs
    with torch.no_grad():
        torch.testing.assert_close(recomputed.eval()(x)[0], kept.eval()(x)[0], rtol=0, atol=0)


def test_recompute_stride_counts_the_stages_along_the_most_strided_axis():
    assert [stages_up_to_stride(ACDC_2D_ARCH['strides'], s) for s in (0, 1, 2, 3, 4, 64)] == [0, 1, 2, 2, 3, 6]
    anisotropic = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert [stages_up_to_stride(anisotropic, s) for s in (1, 2, 4, 8)] == [1, 2, 3, 4]


def test_recomputing_decoder_stages_refuses_batchnorm_running_statistics():
    with pytest.raises(ValueError, match='recompute_stages needs norms without running statistics'):
        create_emcad_unet(ACDC_2D_ARCH, 1, 4, recompute_stride=1)


def test_recomputing_encoder_stages_refuses_a_plan_with_batchnorm_running_statistics():
    arch = dict(ACDC_2D_ARCH, norm_op='torch.nn.BatchNorm2d')
    with pytest.raises(ValueError, match='recompute_stages needs norms without .* a plan whose norm_op keeps none'):
        create_emcad_unet(arch, 1, 4, recompute_stride=1, recompute_encoder=True)


def test_decoder_norm_choice():
    official = create_emcad_unet(ACDC_2D_ARCH, 1, 4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in official.decoder.modules())
    planned = create_emcad_unet(ACDC_2D_ARCH, 1, 4, decoder_norm='plan')
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in planned.decoder.modules())
    assert sum(p.numel() for p in planned.parameters()) == sum(p.numel() for p in official.parameters())
    with pytest.raises(ValueError, match="decoder_norm must be 'batch' or 'plan'"):
        create_emcad_unet(ACDC_2D_ARCH, 1, 4, decoder_norm='group')


def test_a_decoder_whose_every_stage_would_skip_attention_stops_with_the_reason():
    with pytest.raises(ValueError, match='mscb_only_stages must leave the deepest of the 3 stages its attention'):
        EMCADDecoder([8, 16, 32], [1, 2, 2], 3, mscb_only_stages=3)
