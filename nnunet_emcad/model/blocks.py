"""The building blocks of EMCAD (Rahman et al., CVPR 2024), exact to the authors' official code.

Every block takes ``conv_op`` (``nn.Conv2d`` by default) so the same code serves 2D and 3D, and ``norm_op``
(a factory called with the channel count; BatchNorm by default, as in the official code). With the defaults
each block holds the same parameters, in the same order and under the same sub-module names,
as its official counterpart (``lib/decoders.py`` of the EMCAD repository), which keeps checkpoint import a
matter of renaming the decoder-level containers.
"""
from functools import reduce
from math import gcd
from typing import Callable, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.utils.checkpoint import checkpoint

from dynamic_network_architectures.building_blocks.helper import get_matching_batchnorm

ACTIVATIONS = ('relu', 'relu6', 'leakyrelu', 'prelu', 'gelu', 'hswish')
NormFactory = Optional[Callable[[int], nn.Module]]
KernelT = Union[int, Sequence[int]]


def same_padding(kernel_size: KernelT) -> KernelT:
    """Padding that keeps the size for an odd kernel, per axis for anisotropic kernels such as (1, 3, 3)."""
    return kernel_size // 2 if isinstance(kernel_size, int) else tuple(k // 2 for k in kernel_size)


def along_axes(kernel_size: int, axes: Optional[Sequence[bool]]) -> KernelT:
    """``kernel_size`` on the axes an nnU-Net stage convolves along and 1 on the others (anisotropic plans);
    the plain int when ``axes`` is None or all true, so isotropic networks keep the official layers."""
    if axes is None or all(axes):
        return kernel_size
    return tuple(kernel_size if a else 1 for a in axes)


def _norm(norm_op: NormFactory, conv_op: Type[_ConvNd]) -> Callable[[int], nn.Module]:
    """``norm_op`` (called with the channel count), or BatchNorm of ``conv_op``'s dimension as in the official code."""
    return norm_op if norm_op is not None else get_matching_batchnorm(conv_op)


class _InstanceNormThroughGroupNormOnCPU:
    """Instance norm that runs, on the CPU, through torch's group-norm kernel with one group per channel.

    One group per channel is instance norm's normalisation (per sample and channel over the spatial dims, the
    same ``eps``, weight and bias, the same parameters), and group norm's CPU kernel is several times faster
    than ``instance_norm``'s route through batch norm, in forward and backward. Elsewhere the norm's own
    forward: on CUDA autocast would run group norm in float32 (instance norm keeps float16), and with
    running statistics or unbatched input only instance norm applies.
    """

    unbatched_dim: int  # the dimension of an unbatched input (the norm's _get_no_batch_dim, which dynamo before
    # torch 2.5 cannot call on a subclass)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != 'cpu' or self.track_running_stats or x.dim() == self.unbatched_dim:
            return super().forward(x)
        return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)


class InstanceNorm2dCPU(_InstanceNormThroughGroupNormOnCPU, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (same parameters) whose CPU forward takes group norm's faster kernel."""

    unbatched_dim = 3


class InstanceNorm3dCPU(_InstanceNormThroughGroupNormOnCPU, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (same parameters) whose CPU forward takes group norm's faster kernel."""

    unbatched_dim = 4


CPU_INSTANCE_NORMS = {nn.InstanceNorm2d: InstanceNorm2dCPU, nn.InstanceNorm3d: InstanceNorm3dCPU}


def fast_cpu_norm(norm_op: Type[nn.Module]) -> Type[nn.Module]:
    """``InstanceNorm2dCPU``/``3dCPU`` for torch's instance norms, otherwise ``norm_op`` itself."""
    return CPU_INSTANCE_NORMS.get(norm_op, norm_op)


def make_activation(name: str, inplace: bool = True) -> nn.Module:
    """The activation layers the official code can choose by name (leaky slope and PReLU init 0.2)."""
    name = name.lower()
    if name == 'relu':
        return nn.ReLU(inplace)
    if name == 'relu6':
        return nn.ReLU6(inplace)
    if name == 'leakyrelu':
        return nn.LeakyReLU(0.2, inplace)
    if name == 'prelu':
        return nn.PReLU(num_parameters=1, init=0.2)
    if name == 'gelu':
        return nn.GELU()
    if name == 'hswish':
        return nn.Hardswish(inplace)
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


def run_stage(fn: Callable[..., torch.Tensor], *args, recompute: bool) -> torch.Tensor:
    """``fn(*args)``; with ``recompute``, keeping only the inputs for backward and running ``fn`` again there
    (``torch.utils.checkpoint``, non-reentrant: the random state is replayed, so outputs and gradients are the
    same)."""
    return checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args)


def require_no_running_stats(module: nn.Module, fix: str) -> None:
    """Refuse to run parts of ``module`` again in backward when one of its norms keeps running statistics
    (a second forward pass would update them twice); ``fix`` ends the message."""
    if any(getattr(m, 'track_running_stats', False) for m in module.modules()):
        raise ValueError(f"recompute_stages needs norms without running statistics (running the stages again "
                         f"would update BatchNorm's running statistics twice); {fix}")


CHANNELS_LAST_MIN_PIXELS = 1024
"""The smallest 2D feature map that ``channels_last_for_cpu_inference`` runs channels-last: below it torch's
channels-last group-norm kernel slows down by an order of magnitude."""


def channels_last_for_cpu_inference(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)``, run channels-last where that makes EMCAD's 2D blocks faster: in eager CPU inference (no
    gradient, not under ``torch.compile``), float32 or lower, on maps of at least ``CHANNELS_LAST_MIN_PIXELS``.

    oneDNN runs a depth-wise conv on default-layout input as a change to its blocked layout, the conv and a
    change back, several times the conv's own cost; channels-last input takes its kernel directly. With
    gradients the channels-last backward was slower, so training keeps the default layout; inductor chooses
    its own layout. The result is returned in the default layout, the same values.
    """
    if (x.device.type != 'cpu' or x.ndim != 4 or x.dtype == torch.float64 or torch.is_grad_enabled()
            or torch.compiler.is_compiling() or x.shape[2] * x.shape[3] < CHANNELS_LAST_MIN_PIXELS):
        return fn(x)
    return fn(x.contiguous(memory_format=torch.channels_last)).contiguous()


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: split the channels into ``groups`` groups and interleave them."""
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    return x.view(b, groups, c // groups, *spatial).transpose(1, 2).reshape(b, c, *spatial)


def init_emcad_weights(module: nn.Module) -> None:
    """The official decoder initialisation: convolutions N(0, 0.02) with zero bias, norms weight 1 and bias 0."""
    if isinstance(module, _ConvNd):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class GroupedConv3d(nn.Conv3d):
    """``nn.Conv3d`` for depth-wise and grouped convolutions (same parameters), run channels-last on the CPU.

    In the default layout PyTorch's CPU backward of grouped 3D convolutions takes a slow generic kernel;
    channels-last input sends it to oneDNN (the 3D cost report in docs/results.md measures the networks built
    with it). In 2D it did not pay (the layout change slowed the norms around it), so 2D keeps
    ``nn.Conv2d``. float64 (no oneDNN kernel) keeps the default layout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == 'cpu' and x.dtype != torch.float64:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return super().forward(x)


def grouped_conv_op(conv_op: Type[_ConvNd]) -> Type[_ConvNd]:
    """The conv type for grouped convolutions: ``GroupedConv3d`` for ``nn.Conv3d``, otherwise ``conv_op``."""
    return GroupedConv3d if conv_op is nn.Conv3d else conv_op


class _ChannelScale:
    """Runs a depth-wise convolution whose kernel is a single tap (1x1, 1x1x1) as what it is: every channel
    times its own weight, plus its bias.

    The parameters stay the conv's own, so checkpoints load unchanged. Why: on the CPU oneDNN runs such a conv
    like any depth-wise conv, with a change to its blocked layout and back around it, several times the cost
    of the product; on the GPU the product is an elementwise op that inductor fuses with the norm after it.
    It computes in the dtype the convolution would: autocast's (float16, bfloat16) where autocast is on.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not (self.groups == self.in_channels == self.out_channels and set(self.kernel_size) == {1}
                and set(self.stride) == {1} and not any(self.padding)):
            raise ValueError(f"{type(self).__name__} is a depth-wise conv with a single-tap kernel, stride 1 and no "
                             f"padding; got {self.in_channels}->{self.out_channels} channels in {self.groups} "
                             f"groups, kernel {self.kernel_size}, stride {self.stride}, padding {self.padding}; "
                             f"use a plain convolution for those")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        # dynamo (torch 2.4-2.6) cannot trace is_autocast_available: a graph break; the devices torch.compile
        # runs on all have autocast
        available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device)
        autocast = x.dtype != torch.float64 and available and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        per_channel = (-1,) + (1,) * len(self.kernel_size)
        out = x.to(dtype) * self.weight.to(dtype).view(per_channel)
        return out if self.bias is None else out + self.bias.to(dtype).view(per_channel)


class ChannelScaleConv2d(_ChannelScale, nn.Conv2d):
    """A depth-wise ``nn.Conv2d`` with a 1x1 kernel, computed as a per-channel product (same parameters)."""


class ChannelScaleConv3d(_ChannelScale, nn.Conv3d):
    """A depth-wise ``nn.Conv3d`` with a 1x1x1 kernel, computed as a per-channel product (same parameters)."""


def depthwise_conv_op(conv_op: Type[_ConvNd], kernel_size: KernelT) -> Type[_ConvNd]:
    """The conv type for a depth-wise conv with ``kernel_size``: ``ChannelScaleConv2d``/``3d`` for a single-tap
    kernel, otherwise ``grouped_conv_op(conv_op)``."""
    if set(kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,)) == {1}:
        return ChannelScaleConv3d if issubclass(conv_op, nn.Conv3d) else ChannelScaleConv2d
    return grouped_conv_op(conv_op)


class _DepthwiseThenSum:
    """Runs a convolution with one output channel per group as a depth-wise conv and a sum over each group.

    Output channel ``g`` of such a conv is the sum over its group's input channels of each channel convolved
    with its own kernel: exactly a depth-wise conv (weight viewed as ``(in_channels, 1, *kernel)``) followed
    by a sum of consecutive channel runs. The parameters stay the conv's own, so checkpoints load unchanged.
    Why: inductor (``torch.compile`` on CUDA) lays the whole graph out channels-last only when no grouped conv
    has more than one input channel per group; LGAG's gates and SAB's 2->1 conv have two.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.out_channels != self.groups or self.padding_mode != 'zeros':
            raise ValueError(f"{type(self).__name__} needs one output channel per group and zero padding; got "
                             f"{self.in_channels}->{self.out_channels} channels in {self.groups} groups, "
                             f"padding_mode {self.padding_mode!r}; use a plain convolution for those")

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        out_channels, per_group = weight.shape[:2]
        depthwise = weight.reshape(out_channels * per_group, 1, *weight.shape[2:])
        conv = F.conv3d if weight.dim() == 5 else F.conv2d  # a function held by the module: dynamo before 2.5 fails
        out = conv(x, depthwise, None, self.stride, self.padding, self.dilation, out_channels * per_group)
        out = out.unflatten(1, (out_channels, per_group)).sum(2)
        return out if bias is None else out + bias.view(1, -1, *(1,) * (out.ndim - 2))


class DepthwiseSumConv2d(_DepthwiseThenSum, nn.Conv2d):
    """``nn.Conv2d`` with one output channel per group, computed as a depth-wise conv and a sum per group."""


class DepthwiseSumConv3d(_DepthwiseThenSum, GroupedConv3d):
    """``GroupedConv3d`` with one output channel per group, computed as a depth-wise conv and a sum per group."""


def depthwise_sum_conv_op(conv_op: Type[_ConvNd]) -> Type[_ConvNd]:
    """The depth-wise-then-sum conv type of ``conv_op``'s dimension."""
    return DepthwiseSumConv3d if issubclass(conv_op, nn.Conv3d) else DepthwiseSumConv2d


def _spatial_dims(x: torch.Tensor) -> Tuple[int, ...]:
    return tuple(range(2, x.ndim))


def max_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The maximum of ``x`` along ``dim``, kept as a size-1 dim.

    Where a gradient is needed, ``torch.max``'s: its backward routes the gradient through the argmax. ``amax``
    gives the same values, but its backward finds the maximum again by comparing the input with the stored
    result: under float16/bfloat16 autocast, inductor (``torch.compile``) can keep a fused input in higher
    precision than the stored result, the comparison then matches nothing, and every gradient becomes
    0/0 = NaN. Without a gradient, ``amax``: the same values without the indices, which on the CPU cost far
    more than the maximum itself.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.max(x, dim=dim, keepdim=True).values
    return x.amax(dim=dim, keepdim=True)


def spatial_max(x: torch.Tensor) -> torch.Tensor:
    """The maximum over the spatial dims, kept as size-1 dims, as the official ``AdaptiveMaxPool2d(1)`` takes it
    (``max_along``: its gradient through the argmax)."""
    return max_along(x.flatten(2), 2).reshape(x.shape[:2] + (1,) * (x.ndim - 2))


class MSDC(nn.Module):
    """Multi-scale depth-wise convolution: one depth-wise conv + BN + activation branch per kernel size.

    In parallel mode every branch reads the block input; in sequential mode each branch's output is added to
    the input of the next. Returns the list of branch outputs. The 1x1 branch's conv is a per-channel product
    (``ChannelScaleConv2d``/``3d``, same parameters).
    """

    def __init__(self, channels: int, kernel_sizes: Sequence[KernelT] = (1, 3, 5), activation: str = 'relu6',
                 dw_parallel: bool = True, conv_op: Type[_ConvNd] = nn.Conv2d, norm_op: NormFactory = None):
        super().__init__()
        norm_op = _norm(norm_op, conv_op)
        self.dw_parallel = dw_parallel
        self.dwconvs = nn.ModuleList([
            nn.Sequential(
                depthwise_conv_op(conv_op, k)(channels, channels, k, 1, same_padding(k), groups=channels,
                                              bias=False),
                norm_op(channels),
                make_activation(activation),
            )
            for k in kernel_sizes
        ])

    def forward(self, x: torch.Tensor) -> list:
        outputs = []
        for dwconv in self.dwconvs:
            out = dwconv(x)
            outputs.append(out)
            if not self.dw_parallel:
                x = x + out
        return outputs


class MSCB(nn.Module):
    """Multi-scale convolution block: expand (1x1), MSDC, combine, channel shuffle, project (1x1), residual add.

    ``add=True`` sums the MSDC branches, ``add=False`` concatenates them. The residual add is the official
    stride-1 path; the decoder always uses ``in_channels == out_channels``. The shuffle is folded into the
    projection's weight: the same outputs and gradients, without a shuffled copy of the features. Eager CPU
    inference runs the block channels-last (``channels_last_for_cpu_inference``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: Sequence[KernelT] = (1, 3, 5),
                 expansion_factor: int = 2, dw_parallel: bool = True, add: bool = True, activation: str = 'relu6',
                 conv_op: Type[_ConvNd] = nn.Conv2d, norm_op: NormFactory = None):
        super().__init__()
        if in_channels != out_channels:
            raise ValueError(f"MSCB keeps the width: got {in_channels} -> {out_channels} channels")
        norm_op = _norm(norm_op, conv_op)
        ex_channels = int(in_channels * expansion_factor)
        self.add = add
        self.combined_channels = ex_channels if add else ex_channels * len(kernel_sizes)
        self.shuffle_groups = gcd(self.combined_channels, out_channels)
        self.pconv1 = nn.Sequential(
            conv_op(in_channels, ex_channels, 1, 1, 0, bias=False),
            norm_op(ex_channels),
            make_activation(activation),
        )
        self.msdc = MSDC(ex_channels, kernel_sizes, activation, dw_parallel, conv_op, norm_op)
        self.pconv2 = nn.Sequential(
            conv_op(self.combined_channels, out_channels, 1, 1, 0, bias=False),
            norm_op(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last_for_cpu_inference(self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = self.msdc(self.pconv1(x))
        combined = reduce(torch.add, branches) if self.add else torch.cat(branches, dim=1)
        # pconv2 of the shuffled channels, read through pconv2's weight: shuffling a 1x1 convolution's input
        # channels in g groups is shuffling its weight's in c / g groups, so no shuffled copy of the features
        conv, norm = self.pconv2
        weight = channel_shuffle(conv.weight, self.combined_channels // self.shuffle_groups)
        return x + norm(conv._conv_forward(combined, weight, conv.bias))


class CAB(nn.Module):
    """Channel attention: a shared two-layer 1x1 MLP over average- and max-pooled features, sigmoid.

    Returns the per-channel weights; the caller multiplies them in. Below ``ratio`` channels the hidden width is 1.
    The two pooled features go through the MLP as one batch (the same outputs, half the MLP's calls).
    """

    def __init__(self, channels: int, ratio: int = 16, conv_op: Type[_ConvNd] = nn.Conv2d):
        super().__init__()
        hidden = channels // min(ratio, channels)
        self.fc1 = conv_op(channels, hidden, 1, bias=False)
        self.fc2 = conv_op(hidden, channels, 1, bias=False)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=_spatial_dims(x), keepdim=True), spatial_max(x)])
        # back to (average, max) x batch, then their sum (unflatten, not chunk: ONNX keeps the batch dynamic)
        return torch.sigmoid(self.fc2(self.activation(self.fc1(pooled))).unflatten(0, (2, -1)).sum(0))


class SAB(nn.Module):
    """Spatial attention: conv over [channel mean, channel max], sigmoid. Returns the per-pixel weights.

    The 2->1 conv runs as a depth-wise conv and a sum (``DepthwiseSumConv2d``/``3d``), same parameters.
    """

    def __init__(self, kernel_size: KernelT = 7, conv_op: Type[_ConvNd] = nn.Conv2d):
        super().__init__()
        self.conv = depthwise_sum_conv_op(conv_op)(2, 1, kernel_size, padding=same_padding(kernel_size), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), max_along(x, 1)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class LGAG(nn.Module):
    """Large-kernel grouped attention gate: gates the encoder skip ``x`` with the upsampled decoder feature ``g``.

    ``W_g`` and ``W_x`` are grouped ``kernel_size`` convs to ``channels // 2`` (groups ``channels // 2``; a 1x1
    kernel uses groups 1), each with BN; ``psi`` maps their ReLU'd sum to one sigmoid gate. The grouped gates
    run as a depth-wise conv and a sum over channel pairs (``DepthwiseSumConv2d``/``3d``), same parameters.
    ``gate_norm=False`` (not in EMCAD) leaves the one-channel gate map unnormalised before its sigmoid (an
    identity at ``psi.1``, so the other keys stay the official ones): instance norm would centre every image's map.
    """

    def __init__(self, channels: int, kernel_size: KernelT = 3, conv_op: Type[_ConvNd] = nn.Conv2d,
                 norm_op: NormFactory = None, gate_norm: bool = True):
        super().__init__()
        norm_op = _norm(norm_op, conv_op)
        inter = channels // 2
        largest = kernel_size if isinstance(kernel_size, int) else max(kernel_size)
        groups = 1 if largest == 1 else inter
        gate_conv = conv_op if groups == 1 else depthwise_sum_conv_op(conv_op)
        self.W_g = nn.Sequential(
            gate_conv(channels, inter, kernel_size, 1, same_padding(kernel_size), groups=groups, bias=True),
            norm_op(inter),
        )
        self.W_x = nn.Sequential(
            gate_conv(channels, inter, kernel_size, 1, same_padding(kernel_size), groups=groups, bias=True),
            norm_op(inter),
        )
        self.psi = nn.Sequential(
            conv_op(inter, 1, 1, 1, 0, bias=True),
            norm_op(1) if gate_norm else nn.Identity(),
            nn.Sigmoid(),
        )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.psi(self.activation(self.W_g(g) + self.W_x(x)))


class EUCB(nn.Module):
    """Efficient up-convolution block: nearest upsampling, depth-wise 3x3 + BN + ReLU, 1x1 conv to ``out_channels``.

    ``scale_factor`` is 2 in the paper; nnU-Net encoders pass their per-axis stride. (The official block also
    shuffles channels with ``groups = in_channels``, which is the identity and is left out.) Eager CPU inference
    runs the block channels-last (``channels_last_for_cpu_inference``).
    """

    def __init__(self, in_channels: int, out_channels: int, scale_factor: Union[int, Sequence[int]] = 2,
                 kernel_size: KernelT = 3, conv_op: Type[_ConvNd] = nn.Conv2d, norm_op: NormFactory = None):
        super().__init__()
        norm_op = _norm(norm_op, conv_op)
        if not isinstance(scale_factor, int):
            scale_factor = tuple(float(s) for s in scale_factor)
        self.up_dwc = nn.Sequential(
            nn.Upsample(scale_factor=scale_factor, mode='nearest'),
            grouped_conv_op(conv_op)(in_channels, in_channels, kernel_size, 1, same_padding(kernel_size),
                                     groups=in_channels, bias=False),
            norm_op(in_channels),
            nn.ReLU(inplace=True),
        )
        self.pwc = conv_op(in_channels, out_channels, 1, 1, 0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last_for_cpu_inference(self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pwc(self.up_dwc(x))


class LogitRefinement(nn.Module):
    """A cheap full-resolution stage (not in EMCAD): coarse logits, interpolated to a finer skip's size, plus a
    correction read from both: ``kernel_size`` conv of [logits, skip] to ``channels`` + norm + ReLU, then a 1x1
    conv back to the classes. It lets the skip sharpen the boundaries that interpolation blurs, for a few
    channels at full resolution instead of a decoder stage's width.
    """

    def __init__(self, skip_channels: int, num_classes: int, channels: int = 8, kernel_size: KernelT = 3,
                 conv_op: Type[_ConvNd] = nn.Conv2d, norm_op: NormFactory = None):
        super().__init__()
        norm_op = _norm(norm_op, conv_op)
        self.conv = nn.Sequential(
            conv_op(skip_channels + num_classes, channels, kernel_size, 1, same_padding(kernel_size), bias=False),
            norm_op(channels),
            nn.ReLU(inplace=True),
        )
        self.out = conv_op(channels, num_classes, 1)

    def forward(self, logits: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        mode = 'bilinear' if skip.dim() == 4 else 'trilinear'
        up = F.interpolate(logits, size=skip.shape[2:], mode=mode, align_corners=False)
        return up + self.out(self.conv(torch.cat([up, skip], dim=1)))
