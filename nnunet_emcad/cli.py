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


def _convert_official(args: argparse.Namespace) -> int:
    """Turn an official EMCAD checkpoint into a file for nnUNetv2_train's -pretrained_weights."""
    import json

    import torch
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_emcad.checkpoints import CheckpointError, official_weights_for

    nnUNet_preprocessed = os.environ.get('nnUNet_preprocessed')
    if not nnUNet_preprocessed:
        print("nnUNet_preprocessed is not set: export it to the folder nnUNetv2_plan_and_preprocess wrote",
              file=sys.stderr)
        return 2
    dataset = maybe_convert_to_dataset_name(args.dataset)
    folder = os.path.join(nnUNet_preprocessed, dataset)
    plans_file = os.path.join(folder, f'{args.plans}.json')
    if not os.path.isfile(plans_file):
        print(f"{plans_file} does not exist: run nnUNetv2_plan_and_preprocess -d {args.dataset} first",
              file=sys.stderr)
        return 2
    with open(os.path.join(folder, 'dataset.json')) as f:
        dataset_json = json.load(f)
    plans_manager = PlansManager(plans_file)
    configuration = plans_manager.get_configuration(args.configuration)
    trainer = recursive_find_trainer_class_by_name(args.trainer)
    network = trainer.build_network_architecture(
        plans_manager, configuration, determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, True)
    try:
        weights = official_weights_for(network, args.checkpoint, args.drop_heads)
    except CheckpointError as e:
        print(f"{args.checkpoint}: {e}", file=sys.stderr)
        return 1
    torch.save({'network_weights': weights, 'source': os.path.abspath(args.checkpoint)}, args.output)
    print(f"wrote {args.output} ({len(weights)} tensors{', heads dropped' if args.drop_heads else ''}). "
          f"Fine-tune with:\n  nnUNetv2_train {args.dataset} {args.configuration} FOLD -tr {args.trainer} "
          f"-p {args.plans} -pretrained_weights {args.output}")
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
    convert = sub.add_parser('convert-official', help=_convert_official.__doc__,
                             description=_convert_official.__doc__ + ' Checks encoder, channels and classes '
                             'against the dataset and trainer first; reads the file without running pickled code.')
    convert.add_argument('checkpoint', help='official EMCAD checkpoint (.pth state dict)')
    convert.add_argument('-d', '--dataset', required=True, help='dataset name or id (planned and preprocessed)')
    convert.add_argument('-c', '--configuration', default='2d', help='configuration (default 2d)')
    convert.add_argument('-p', '--plans', default='nnUNetPlans', help='plans identifier (default nnUNetPlans)')
    convert.add_argument('-tr', '--trainer', default='nnUNetTrainerEMCAD_PVTb2',
                         help='the PVT trainer to fine-tune with (default nnUNetTrainerEMCAD_PVTb2)')
    convert.add_argument('-o', '--output', required=True, help='file to write (for -pretrained_weights)')
    convert.add_argument('--drop-heads', action='store_true',
                         help='leave out the segmentation heads (needed when the class counts differ)')
    convert.set_defaults(func=_convert_official)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
