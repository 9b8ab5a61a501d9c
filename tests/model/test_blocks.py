"""Behaviour of each EMCAD block against the official definitions."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_emcad.model import blocks
from nnunet_emcad.model.blocks import (CAB, EUCB, LGAG, MSCB, MSDC, SAB, ChannelScaleConv2d, ChannelScaleConv3d,
                                       DepthwiseSumConv2d, DepthwiseSumConv3d, GroupedConv3d, InstanceNorm2dCPU,
                                       InstanceNorm3dCPU, channel_shuffle, channels_last_for_cpu_inference,
                                       fast_cpu_norm, make_activation, max_along, spatial_max)
from nnunet_emcad.model.emcad import EMCADDecoder
from helpers import outputs_and_gradients


def _randomise_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)


def test_msdc_parallel_branches_read_the_same_input():
    torch.manual_seed(0)
    msdc = MSDC(8, (1, 3, 5), dw_parallel=True).eval()
    _randomise_bn(msdc)
    x = torch.randn(2, 8, 12, 12)
    outs = msdc(x)
    assert len(outs) == 3
    for branch, out in zip(msdc.dwconvs, outs, strict=True):
        torch.testing.assert_close(out, branch(x))
    assert [b[0].kernel_size for b in msdc.dwconvs] == [(1, 1), (3, 3), (5, 5)]
    assert all(b[0].groups == 8 and b[0].bias is None for b in msdc.dwconvs)
    assert isinstance(msdc.dwconvs[0][2], nn.ReLU6)


def test_msdc_sequential_adds_each_branch_to_the_next_input():
    torch.manual_seed(0)
    msdc = MSDC(8, (1, 3, 5), dw_parallel=False).eval()
    _randomise_bn(msdc)
    x = torch.randn(2, 8, 12, 12)
    outs = msdc(x)
    y0 = msdc.dwconvs[0](x)
    y1 = msdc.dwconvs[1](x + y0)
    y2 = msdc.dwconvs[2](x + y0 + y1)
    for got, want in zip(outs, (y0, y1, y2), strict=True):
        torch.testing.assert_close(got, want)


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(6.).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 6).flatten().tolist() == list(range(6))


@pytest.mark.parametrize('add', [True, False])
def test_mscb_matches_its_definition(add):
    torch.manual_seed(0)
    block = MSCB(16, 16, (1, 3, 5), expansion_factor=2, add=add).eval()
    _randomise_bn(block)
    x = torch.randn(2, 16, 10, 10)
    branches = block.msdc(block.pconv1(x))
    combined = sum(branches) if add else torch.cat(branches, 1)
    want = x + block.pconv2(channel_shuffle(combined, 16))  # gcd(32, 16) = gcd(96, 16) = 16
    torch.testing.assert_close(block(x), want)
    assert block.pconv2[0].in_channels == (32 if add else 96)
    assert block.pconv1[0].bias is None and block.pconv2[0].bias is None
    assert len(block.pconv2) == 2  # conv + BN, no activation


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('dims', [2, 3])
@pytest.mark.parametrize('add', [True, False])
def test_mscb_with_the_shuffle_in_its_weight_equals_shuffling_the_features_in_outputs_and_gradients(add, dims,
                                                                                                    dtype):
    torch.manual_seed(0)
    conv_op, norm_op = (nn.Conv2d, nn.InstanceNorm2d) if dims == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    block = MSCB(12, 12, (1, 3, 5), expansion_factor=2, add=add, conv_op=conv_op,
                 norm_op=lambda c: norm_op(c, affine=True)).to(dtype).train()
    for p in block.parameters():
        p.data.uniform_(-1, 1)
    x = torch.randn(2, 12, *((9, 7) if dims == 2 else (5, 6, 4)), dtype=dtype)

    def definition(x):  # the official order: shuffle the combined features, then project them
        branches = block.msdc(block.pconv1(x))
        combined = sum(branches) if add else torch.cat(branches, 1)
        return x + block.pconv2(channel_shuffle(combined, block.shuffle_groups))

    results = [outputs_and_gradients(forward, block, x) for forward in (block, definition)]
    assert block.shuffle_groups == 12 and block.combined_channels == (24 if add else 72)  # a real shuffle
    # float32: the weight gradient sums the same products in another order
    tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else {}
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **tolerance)


def test_mscb_is_a_residual_block():
    block = MSCB(8, 8).eval()
    nn.init.zeros_(block.pconv2[1].weight)
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(block(x), x)
    with pytest.raises(ValueError, match='keeps the width'):
        MSCB(8, 16)


def test_cab_shares_one_mlp_for_avg_and_max_pooling():
    torch.manual_seed(0)
    cab = CAB(64)
    assert cab.fc1.out_channels == 4 and cab.fc1.bias is None and cab.fc2.bias is None
    x = torch.randn(2, 64, 7, 9)
    mlp = lambda v: cab.fc2(torch.relu(cab.fc1(v)))
    want = torch.sigmoid(mlp(nn.AdaptiveAvgPool2d(1)(x)) + mlp(nn.AdaptiveMaxPool2d(1)(x)))
    got = cab(x)
    assert got.shape == (2, 64, 1, 1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape,pool', [((2, 6, 5, 7), F.adaptive_max_pool2d),
                                        ((2, 6, 3, 5, 4), F.adaptive_max_pool3d)])
def test_cab_max_pools_values_and_gradients_like_the_official_pooling(shape, pool, dtype):
    x = torch.randn(*shape, dtype=dtype)
    x[0, 0].fill_(1.5)  # a tie: the official pooling gives the whole gradient to one position, amax splits it
    ours, official = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn(shape[0], shape[1], dtype=dtype)
    (spatial_max(ours).flatten(1) * weights).sum().backward()
    (pool(official, 1).flatten(1) * weights).sum().backward()
    torch.testing.assert_close(spatial_max(x), pool(x, 1), rtol=0, atol=0)
    torch.testing.assert_close(ours.grad.flatten(2).sum(-1), official.grad.flatten(2).sum(-1))
    assert (ours.grad != 0).flatten(2).sum(-1).max() == 1


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('dims', [2, 3])
def test_cab_batching_its_two_paths_equals_the_official_two_calls_in_outputs_and_gradients(dims, dtype):
    torch.manual_seed(0)
    cab = CAB(32, conv_op=nn.Conv2d if dims == 2 else nn.Conv3d).to(dtype)
    x = torch.randn(3, 32, *((6, 5) if dims == 2 else (4, 3, 5)), dtype=dtype)

    def official(x):  # fc1 -> ReLU -> fc2 called on each pooled feature, as the official CAB does
        pools = (x.mean(dim=tuple(range(2, x.dim())), keepdim=True), spatial_max(x))
        return torch.sigmoid(sum(cab.fc2(cab.activation(cab.fc1(p))) for p in pools))

    results = [outputs_and_gradients(forward, cab, x) for forward in (cab, official)]
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('channels,hidden', [(8, 1), (15, 1), (16, 1), (32, 2), (320, 20)])
def test_cab_hidden_width(channels, hidden):
    assert CAB(channels).fc1.out_channels == hidden


def test_sab_pools_mean_then_max():
    sab = SAB()
    assert sab.conv.kernel_size == (7, 7) and sab.conv.padding == (3, 3) and sab.conv.bias is None
    x = torch.randn(1, 5, 9, 9)
    with torch.no_grad():
        sab.conv.weight.zero_()
        sab.conv.weight[0, 0, 3, 3] = 1.0  # centre tap of the first pooled channel
    torch.testing.assert_close(sab(x), torch.sigmoid(x.mean(1, keepdim=True)))
    with torch.no_grad():
        sab.conv.weight.zero_()
        sab.conv.weight[0, 1, 3, 3] = 1.0
    torch.testing.assert_close(sab(x), torch.sigmoid(x.amax(1, keepdim=True)))
    x.requires_grad_()
    sab(x).sum().backward()
    assert ((x.grad != 0).sum(1) == 1).all()  # the max's gradient goes to one channel per pixel, as torch.max


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', [(2, 6, 5, 7), (2, 6, 3, 5, 4)])
def test_max_without_gradients_takes_the_same_values_as_with_them(shape, dtype):
    x = torch.randn(*shape, dtype=dtype)
    x[0, 0].fill_(1.5)  # ties
    for dim in (1, 2):
        with torch.no_grad():
            values = max_along(x, dim)
        torch.testing.assert_close(values, torch.max(x, dim, keepdim=True).values, rtol=0, atol=0)
        torch.testing.assert_close(values, max_along(x.clone().requires_grad_(), dim).detach(), rtol=0, atol=0)
    sab = SAB(conv_op=nn.Conv2d if len(shape) == 4 else nn.Conv3d).to(dtype)
    with torch.no_grad():
        pooled, attention = spatial_max(x), sab(x)
    torch.testing.assert_close(pooled, spatial_max(x.clone().requires_grad_()).detach(), rtol=0, atol=0)
    torch.testing.assert_close(attention, sab(x.clone().requires_grad_()).detach(), rtol=0, atol=0)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('dims', [2, 3])
def test_instance_norm_through_the_group_norm_kernel_equals_instance_norm_in_outputs_and_gradients(dims, affine,
                                                                                                  dtype):
    torch.manual_seed(0)
    torch_norm, ours = (nn.InstanceNorm2d, InstanceNorm2dCPU) if dims == 2 else (nn.InstanceNorm3d, InstanceNorm3dCPU)
    assert fast_cpu_norm(torch_norm) is ours and fast_cpu_norm(nn.BatchNorm2d) is nn.BatchNorm2d
    want, got = torch_norm(6, affine=affine).to(dtype), ours(6, affine=affine).to(dtype)
    if affine:
        want.weight.data.uniform_(0.5, 1.5)
        want.bias.data.uniform_(-1, 1)
    got.load_state_dict(want.state_dict())
    assert list(got.state_dict()) == list(want.state_dict()) and isinstance(got, torch_norm)
    x = 3 * torch.randn(2, 6, *((9, 7) if dims == 2 else (5, 6, 4)), dtype=dtype) + 2
    results = [outputs_and_gradients(norm, norm, x) for norm in (want, got)]
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a)
    with torch.profiler.profile() as profile:
        got(x)
    assert {e.key for e in profile.key_averages()} >= {'aten::native_group_norm'}


def test_instance_norm_with_running_statistics_keeps_instance_norms_forward():
    torch.manual_seed(0)
    want, got = nn.InstanceNorm2d(4, track_running_stats=True), InstanceNorm2dCPU(4, track_running_stats=True)
    x = torch.randn(3, 4, 6, 6)
    torch.testing.assert_close(got(x), want(x), rtol=0, atol=0)  # training: updates the running statistics
    torch.testing.assert_close(got.running_mean, want.running_mean, rtol=0, atol=0)
    want.eval()
    got.eval()
    torch.testing.assert_close(got(x), want(x), rtol=0, atol=0)  # eval: normalises with them
    torch.testing.assert_close(InstanceNorm2dCPU(4)(x[0]), nn.InstanceNorm2d(4)(x[0]), rtol=0, atol=0)  # unbatched


def test_lgag_gates_the_skip():
    torch.manual_seed(0)
    gate = LGAG(32, kernel_size=3).eval()
    _randomise_bn(gate)
    assert gate.W_g[0].groups == 16 and gate.W_g[0].out_channels == 16 and gate.W_g[0].bias is not None
    assert gate.psi[0].out_channels == 1
    g, x = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
    psi = gate.psi(torch.relu(gate.W_g(g) + gate.W_x(x)))
    torch.testing.assert_close(gate(g=g, x=x), x * psi)
    assert LGAG(32, kernel_size=1).W_x[0].groups == 1


def test_an_lgag_gate_without_norm_is_not_centred_per_image_and_keeps_the_official_keys_but_the_norms():
    torch.manual_seed(0)
    plan_norm = functools.partial(fast_cpu_norm(nn.InstanceNorm2d), eps=1e-5, affine=True)  # nnU-Net's plans'
    normed, plain = (LGAG(32, 3, norm_op=plan_norm, gate_norm=flag) for flag in (True, False))
    plain.load_state_dict({k: v for k, v in normed.state_dict().items() if not k.startswith('psi.1.')})
    assert set(normed.state_dict()) - set(plain.state_dict()) == {'psi.1.weight', 'psi.1.bias'}
    assert isinstance(plain.psi[1], nn.Identity)
    g, x = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8) + 1.0
    gate_maps = [torch.logit(gate.psi(torch.relu(gate.W_g(g) + gate.W_x(x))), eps=1e-6) for gate in (normed, plain)]
    # instance norm centres each image's map before the sigmoid (its affine bias starts at 0); without it the
    # map keeps the bias and level the convolution gives it
    assert gate_maps[0].mean(dim=(1, 2, 3)).abs().max() < 1e-3
    assert gate_maps[1].mean(dim=(1, 2, 3)).abs().min() > 1e-2
    torch.testing.assert_close(plain(g=g, x=x), x * torch.sigmoid(gate_maps[1]), rtol=1e-4, atol=1e-4)


def _assert_rewrite_of_conv(conv: nn.Module, rewritten: nn.Module, x: torch.Tensor) -> None:
    """``rewritten`` has ``conv``'s parameters (names and shapes) and, given its weights, the same outputs and
    gradients (of the input and of every parameter) on ``x``."""
    assert [(n, p.shape) for n, p in rewritten.named_parameters()] == \
        [(n, p.shape) for n, p in conv.named_parameters()]
    rewritten.load_state_dict(conv.state_dict())
    for got, want in zip(outputs_and_gradients(rewritten, rewritten, x), outputs_and_gradients(conv, conv, x),
                         strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('dims', [2, 3])
@pytest.mark.parametrize('in_channels, out_channels, bias, kernel', [(16, 8, True, 3), (2, 1, False, 7)],
                         ids=['lgag-gate', 'sab-conv'])
def test_depthwise_sum_conv_equals_the_grouped_conv_in_outputs_and_gradients(dims, dtype, in_channels, out_channels,
                                                                             bias, kernel):
    torch.manual_seed(0)
    grouped_type, rewritten_type = (nn.Conv2d, DepthwiseSumConv2d) if dims == 2 else (nn.Conv3d, DepthwiseSumConv3d)
    args = (in_channels, out_channels, kernel, 1, kernel // 2)
    size = (11, 9) if dims == 2 else (5, 7, 6)
    _assert_rewrite_of_conv(grouped_type(*args, groups=out_channels, bias=bias).to(dtype),
                            rewritten_type(*args, groups=out_channels, bias=bias).to(dtype),
                            torch.randn(2, in_channels, *size, dtype=dtype))


def test_depthwise_sum_conv_refuses_more_than_one_output_channel_per_group():
    with pytest.raises(ValueError, match='one output channel per group'):
        DepthwiseSumConv2d(8, 8, 3, padding=1, groups=4)
    with pytest.raises(ValueError, match='zero padding'):
        DepthwiseSumConv2d(8, 4, 3, padding=1, groups=4, padding_mode='reflect')


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('dims', [2, 3])
@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('batched', [True, False])
def test_channel_scale_conv_equals_the_single_tap_depthwise_conv_in_outputs_and_gradients(dims, dtype, bias, batched):
    torch.manual_seed(0)
    conv_type, rewritten_type = (nn.Conv2d, ChannelScaleConv2d) if dims == 2 else (nn.Conv3d, ChannelScaleConv3d)
    size = (11, 9) if dims == 2 else (5, 7, 6)
    _assert_rewrite_of_conv(conv_type(6, 6, 1, groups=6, bias=bias).to(dtype),
                            rewritten_type(6, 6, 1, groups=6, bias=bias).to(dtype),
                            torch.randn(*(2,) * batched, 6, *size, dtype=dtype))


def test_channel_scale_conv_keeps_the_dtype_a_convolution_gives_under_autocast():
    conv, rewritten = nn.Conv2d(4, 4, 1, groups=4), ChannelScaleConv2d(4, 4, 1, groups=4)
    rewritten.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out_conv, out_rewritten = conv(x), rewritten(x)
    assert out_rewritten.dtype == out_conv.dtype == torch.bfloat16
    torch.testing.assert_close(out_rewritten, out_conv, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('kwargs, mistake', [(dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),
                                              'kernel'),
                                             (dict(in_channels=4, out_channels=8, kernel_size=1, groups=4),
                                              '4->8 channels'),
                                             (dict(in_channels=4, out_channels=4, kernel_size=1, groups=2),
                                              'in 2 groups'),
                                             (dict(in_channels=4, out_channels=4, kernel_size=1, stride=2, groups=4),
                                              'stride')])
def test_channel_scale_conv_refuses_anything_but_a_single_tap_depthwise_conv(kwargs, mistake):
    with pytest.raises(ValueError, match='single-tap kernel') as error:
        ChannelScaleConv2d(**kwargs)
    assert mistake in str(error.value)


@pytest.mark.parametrize('conv_op, scale_type, grouped_type', [(nn.Conv2d, ChannelScaleConv2d, nn.Conv2d),
                                                                (nn.Conv3d, ChannelScaleConv3d, GroupedConv3d)])
def test_msdc_runs_its_single_tap_branch_as_a_channel_scale(conv_op, scale_type, grouped_type):
    kernels = (1, 3, 5) if conv_op is nn.Conv2d else ((1, 1, 1), (1, 3, 3), 5)
    msdc = MSDC(8, kernels, conv_op=conv_op)
    assert [type(b[0]) for b in msdc.dwconvs] == [scale_type, grouped_type, grouped_type]


def test_lgag_and_sab_run_their_grouped_convs_as_depthwise_then_sum():
    assert isinstance(LGAG(32, kernel_size=3).W_g[0], DepthwiseSumConv2d)
    assert isinstance(LGAG(32, kernel_size=3, conv_op=nn.Conv3d).W_x[0], DepthwiseSumConv3d)
    assert type(LGAG(32, kernel_size=1).W_x[0]) is nn.Conv2d
    assert isinstance(SAB(conv_op=nn.Conv3d).conv, DepthwiseSumConv3d)


def _layout_seen(x: torch.Tensor, grad: bool = False) -> bool:
    """Whether ``channels_last_for_cpu_inference`` hands its function ``x`` channels-last (and returns the
    function's result in the default layout)."""
    seen = []

    def record(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous())
        return t * 2

    with torch.set_grad_enabled(grad):
        out = channels_last_for_cpu_inference(record, x)
    assert out.is_contiguous() and torch.equal(out, x * 2)
    return seen[0]


def test_blocks_run_channels_last_only_in_cpu_inference_on_large_2d_maps():
    assert _layout_seen(torch.randn(1, 4, 32, 32))
    assert not _layout_seen(torch.randn(1, 4, 32, 32), grad=True)
    assert not _layout_seen(torch.randn(1, 4, 32, 31)), 'below CHANNELS_LAST_MIN_PIXELS'
    assert not _layout_seen(torch.randn(1, 4, 32, 32, dtype=torch.float64))
    assert not _layout_seen(torch.randn(1, 4, 4, 16, 16))


@pytest.mark.parametrize('make', [lambda: MSCB(8, 8), lambda: EUCB(8, 4),
                                  lambda: MSCB(8, 8, norm_op=InstanceNorm2dCPU)],
                         ids=['mscb', 'eucb', 'mscb-instance-norm'])
def test_mscb_and_eucb_give_the_same_outputs_channels_last_in_cpu_inference(make, monkeypatch):
    torch.manual_seed(0)
    block = make().eval()
    _randomise_bn(block)
    depthwise = next(m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    layouts = []
    depthwise.register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 8, 40, 36)
    with torch.inference_mode():
        channels_last = block(x)
        monkeypatch.setattr(blocks, 'CHANNELS_LAST_MIN_PIXELS', 10 ** 9)
        default = block(x)
    assert layouts == [True, False]
    assert channels_last.is_contiguous() and default.is_contiguous()
    torch.testing.assert_close(channels_last, default)


def test_eucb_upsamples_by_the_stride():
    block = EUCB(16, 8)
    assert block(torch.randn(1, 16, 5, 7)).shape == (1, 8, 10, 14)
    assert EUCB(16, 8, scale_factor=(1, 2))(torch.randn(1, 16, 5, 7)).shape == (1, 8, 5, 14)
    assert block.up_dwc[1].groups == 16 and block.up_dwc[1].bias is None
    assert block.pwc.bias is not None


def test_activation_names():
    assert isinstance(make_activation('relu6'), nn.ReLU6)
    assert isinstance(make_activation('GELU'), nn.GELU)
    with pytest.raises(ValueError, match='unknown activation'):
        make_activation('swishy')


def test_decoder_init_is_the_official_one():
    torch.manual_seed(0)
    dec = EMCADDecoder([64, 128, 320, 512], [[4, 4], [2, 2], [2, 2], [2, 2]], num_classes=3)
    weights = torch.cat([m.weight.flatten() for n, m in dec.named_modules()
                         if isinstance(m, nn.Conv2d) and not n.startswith('seg_layers')])
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    assert all(m.bias.abs().sum() == 0 for n, m in dec.named_modules()
               if isinstance(m, nn.Conv2d) and m.bias is not None and not n.startswith('seg_layers'))
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in dec.modules()
               if isinstance(m, nn.BatchNorm2d))


def test_decoder_ablation_knobs_change_the_blocks():
    dec = EMCADDecoder([32, 64], [[1, 1], [2, 2]], 2, kernel_sizes=(3, 5, 7), expansion_factor=4,
                       add=False, lgag_ks=1, activation='relu')
    assert [b[0].kernel_size[0] for b in dec.mscb[0].msdc.dwconvs] == [3, 5, 7]
    assert dec.mscb[0].pconv1[0].out_channels == 128
    assert dec.mscb[0].pconv2[0].in_channels == 384
    assert dec.lgag[0].W_g[0].kernel_size == (1, 1)
    assert isinstance(dec.mscb[0].pconv1[2], nn.ReLU)
