"""The ``nnunet-emcad`` console entry point."""
import argparse
import os
import platform
import sys
from typing import List, Optional

def _demo(args: argparse.Namespace) -> int:
    """Build the paper's EMCAD-B0/B2 and print their cost next to the paper's."""
    import torch

    from nnunet_emcad.profiling import paper_fidelity

    torch.set_num_threads(args.threads)
    print(f"EMCAD at {args.size}x{args.size}, 3 input channels, {args.classes} classes "
          f"(torch.utils.flop_counter; multiply-adds = FLOPs / 2)")
    print(f"{'network':<10}{'decoder params':>16}{'paper':>10}{'decoder MACs':>15}{'paper':>10}{'total params':>15}"
          f"{'total GFLOPs':>14}")
    for row in paper_fidelity(args.size, args.classes):
        print(f"{row['network']:<10}{row['decoder_params']:>16,}{row['paper_decoder_params'] / 1e6:>9.3f}M"
              f"{row['decoder_macs'] / 1e9:>14.3f}G{row['paper_decoder_macs'] / 1e9:>9.3f}G"
              f"{row['total_params']:>15,}{row['total_flops'] / 1e9:>14.2f}")
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
