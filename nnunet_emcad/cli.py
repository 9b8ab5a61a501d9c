"""The ``nnunet-emcad`` console entry point."""
import argparse
import os
import platform
import sys
from typing import List, Optional

PAPER_DECODER = {'pvt_v2_b0': (0.507e6, 0.110e9), 'pvt_v2_b2': (1.91e6, 0.381e9)}


def _demo(args: argparse.Namespace) -> int:
    """Build the paper's EMCAD-B0/B2 and an EMCAD over an nnU-Net plan; print their cost next to the paper's."""
    import torch

    from nnunet_emcad.emcad import create_emcad_pvt, create_emcad_unet
    from nnunet_emcad.profiling import count_flops, emcad_parameter_breakdown

    torch.set_num_threads(args.threads)
    size = args.size
    print(f"EMCAD decoders at {size}x{size}, 3 input channels, {args.classes} classes "
          f"(FLOPs from torch.utils.flop_counter; multiply-adds = FLOPs / 2)")
    print(f"{'network':<26}{'decoder params':>16}{'paper':>10}{'decoder MACs':>15}{'paper':>10}{'total params':>15}"
          f"{'total GFLOPs':>14}")
    for variant, (paper_params, paper_macs) in PAPER_DECODER.items():
        net = create_emcad_pvt(variant, args.classes, upsample_outputs='all').eval()
        x = torch.randn(1, 3, size, size)
        total = count_flops(net, x)
        encoder = count_flops(net.encoder, x)
        heads_and_decoder = total - encoder
        head_macs = sum(h.in_channels * h.out_channels * (size // s) ** 2
                        for h, s in zip(net.decoder.seg_layers, (4, 8, 16, 32)))
        decoder_macs = heads_and_decoder / 2 - head_macs
        counts = emcad_parameter_breakdown(net)
        print(f"{'EMCAD-' + variant[-2:].upper() + ' (PVTv2 ' + variant[-2:] + ')':<26}{counts['decoder']:>16,}"
              f"{paper_params / 1e6:>9.3f}M{decoder_macs / 1e9:>14.3f}G{paper_macs / 1e9:>9.3f}G"
              f"{counts['total']:>15,}{total / 1e9:>14.2f}")
    arch = {'n_stages': 6, 'features_per_stage': [32, 64, 128, 256, 512, 512], 'conv_op': 'torch.nn.Conv2d',
            'kernel_sizes': [[3, 3]] * 6, 'strides': [[1, 1]] + [[2, 2]] * 5, 'n_conv_per_stage': [2] * 6,
            'conv_bias': True, 'norm_op': 'torch.nn.InstanceNorm2d', 'norm_op_kwargs': {'eps': 1e-5, 'affine': True},
            'nonlin': 'torch.nn.LeakyReLU', 'nonlin_kwargs': {'inplace': True}}
    for kind in ('plain', 'residual'):
        net = create_emcad_unet(arch, 3, args.classes, encoder=kind).eval()
        counts = emcad_parameter_breakdown(net)
        total = count_flops(net, torch.randn(1, 3, size, size))
        print(f"{'EMCAD over nnU-Net ' + kind:<26}{counts['decoder']:>16,}{'-':>10}{'-':>15}{'-':>10}"
              f"{counts['total']:>15,}{total / 1e9:>14.2f}")
    print("Training through nnU-Net: nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerEMCAD (see README).")
    return 0


def _info(args: argparse.Namespace) -> int:
    """Versions, device and nnU-Net folders."""
    from importlib.metadata import PackageNotFoundError, version

    print(f"python {platform.python_version()} on {platform.platform()}")
    for package in ('nnunet-emcad', 'nnunetv2', 'torch', 'timm', 'dynamic-network-architectures'):
        try:
            print(f"{package} {version(package)}")
        except PackageNotFoundError:
            print(f"{package} not installed")
    import torch

    print(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if torch.cuda.is_available() else 'cpu'}, "
          f"{os.cpu_count()} CPU cores")
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        path = os.environ.get(var)
        state = 'unset' if not path else (
            'writable' if os.access(path, os.W_OK) else 'not writable' if os.path.isdir(path) else 'missing')
        print(f"{var}: {path or ''} ({state})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` and run the chosen subcommand."""
    parser = argparse.ArgumentParser(prog='nnunet-emcad', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    demo = sub.add_parser('demo', help=_demo.__doc__, description=_demo.__doc__)
    demo.add_argument('--size', type=int, default=224, help='input size (default 224, as in the paper)')
    demo.add_argument('--classes', type=int, default=9, help='output classes (default 9, Synapse)')
    demo.add_argument('--threads', type=int, default=min(4, os.cpu_count() or 1), help='torch CPU threads')
    demo.set_defaults(func=_demo)
    info = sub.add_parser('info', help=_info.__doc__, description=_info.__doc__)
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
