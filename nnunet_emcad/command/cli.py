"""The ``nnunet-emcad`` console entry point."""
import argparse
import contextlib
import difflib
import io
import os
import platform
import sys
import warnings
from typing import List, Optional

DESCRIPTION = ("EMCAD (CVPR 2024), a light attention decoder, as an nnU-Net v2 plugin. Train, predict and evaluate "
               "with nnU-Net's own commands and -tr nnUNetTrainerEMCAD (nnUNetTrainerEMCAD_PVTb0 on a CPU); this "
               "command runs the demo, checks the set-up (info), converts official checkpoints, exports ONNX, renames "
               "a model's trainer and runs the benchmarks.")

def _demo(args: argparse.Namespace) -> int:
    """A short real EMCAD training through nnU-Net's commands: data, plan, train, predict, evaluate, overlays."""
    from nnunet_emcad.command.scripts import CommandFailed
    from nnunet_emcad.command.demo import run_demo
    from nnunet_emcad.nnunet.short_training import Schedule

    if args.device is None:
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    schedule = Schedule(2, 5, 4, 2) if args.fast else Schedule(args.epochs, args.iterations, args.batch_size, 5)
    try:
        run_demo(args.workdir, args.data, args.trainer, schedule, args.device)
    except CommandFailed as e:
        print(e, file=sys.stderr)
        return 1
    return 0


def _paper(args: argparse.Namespace) -> int:
    """Build the paper's EMCAD-B0/B2 and print their cost next to the paper's."""
    import torch

    from nnunet_emcad.model.counting import paper_fidelity, paper_table

    torch.set_num_threads(args.threads)
    print(f"EMCAD at {args.size}x{args.size}, 3 input channels, {args.classes} classes "
          f"(torch.utils.flop_counter; multiply-adds = FLOPs / 2)")
    print('\n'.join(paper_table(paper_fidelity(args.size, args.classes))))
    return 0


def _info(args: argparse.Namespace) -> int:
    """Versions, device, whether nnU-Net finds a trainer (the nearest EMCAD trainers' names where it does not),
    the state of the nnUNet_* folders and the trained models in nnUNet_results."""
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
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    print(f"nnUNet_extTrainer: {os.environ.get('nnUNet_extTrainer', '')}")
    try:
        # nnU-Net narrates its search, and the modules it imports (timm) warn of deprecations meant for developers
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            trainer = recursive_find_trainer_class_by_name(args.trainer)
        print(f"{args.trainer}: found by nnU-Net ({trainer.__module__})")
    except RuntimeError as e:
        from nnunet_emcad.nnunet.trainers import __all__ as emcad_trainers

        if args.trainer in emcad_trainers:
            print(f"{args.trainer}: NOT found by nnU-Net ({str(e).splitlines()[0]}); reinstall the package or add "
                  f"its nnunet_trainers folder to nnUNet_extTrainer")
        else:
            nearest = difflib.get_close_matches(args.trainer, emcad_trainers, n=3, cutoff=0.6)
            print(f"{args.trainer}: no trainer of that name; nearest EMCAD trainers: {', '.join(nearest) or 'none'}")
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        path = os.environ.get(var)
        state = 'unset' if not path else (
            'writable' if os.access(path, os.W_OK) else 'not writable' if os.path.isdir(path) else 'missing')
        print(f"{var}: {path or ''} ({state})")
    results = os.environ.get('nnUNet_results')
    if results and os.path.isdir(results):
        from nnunet_emcad.nnunet.model_folders import trained_models

        trained = trained_models(results)
        print("trained in nnUNet_results (-d, -tr, -p, -c for nnUNetv2_predict):" if trained else
              "trained in nnUNet_results: none")
        for model, folds in trained:
            print(f"  {model} (folds {', '.join(map(str, folds))})")
    return 0


def _convert_official(args: argparse.Namespace) -> int:
    """Turn an official EMCAD checkpoint into a file for nnUNetv2_train's -pretrained_weights."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_emcad.model.checkpoints import CheckpointError
    from nnunet_emcad.nnunet.model_folders import trainer_network
    from nnunet_emcad.model.official import official_weights_for

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
    network = trainer_network(recursive_find_trainer_class_by_name(args.trainer), PlansManager(plans_file),
                              args.configuration, load_json(os.path.join(folder, 'dataset.json')))
    try:
        weights = official_weights_for(network, args.checkpoint)
    except CheckpointError as e:
        print(f"{args.checkpoint}: {e}", file=sys.stderr)
        return 1
    torch.save({'network_weights': weights, 'source': os.path.abspath(args.checkpoint)}, args.output)
    print(f"wrote {args.output} ({len(weights)} tensors: encoder, stem and decoder; nnU-Net trains new "
          f"segmentation heads). Fine-tune with:\n  nnUNetv2_train {args.dataset} {args.configuration} FOLD "
          f"-tr {args.trainer} -p {args.plans} -pretrained_weights {args.output}")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    """Export a trained fold's network to ONNX, check it against PyTorch with onnxruntime, write the plan facts."""
    from nnunet_emcad.nnunet.export import export_onnx, model_folder_for

    try:
        folder = model_folder_for(args.dataset, args.trainer, args.plans, args.configuration)
        facts = export_onnx(folder, args.fold, args.output, args.checkpoint)
    except (FileNotFoundError, RuntimeError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"wrote {args.output} (input image: batch x {len(facts['channel_names'])} x "
          f"{' x '.join(map(str, facts['patch_size']))}, output logits, {len(facts['labels'])} classes) and "
          f"{facts['json']}; onnxruntime vs PyTorch on random inputs (batch 1-"
          f"{facts['checked_batches']}): max abs difference {facts['max_abs_difference']:.2e}")
    return 0


def _rename_trainer(args: argparse.Namespace) -> int:
    """Copy a trained model folder under another trainer's name (folder and checkpoints), for a model whose
    trainer was renamed; checks first that its weights load into that trainer's network."""
    from nnunet_emcad.model.checkpoints import CheckpointError
    from nnunet_emcad.nnunet.model_folders import rename_trainer

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search for the trainer
            target = rename_trainer(args.model_folder, args.trainer)
    except (CheckpointError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"copied to {target}: predict with -tr {args.trainer} (the original folder is unchanged)")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    """Run a benchmark of the source checkout's benchmarks/ (cost, accuracy, update_docs); arguments pass on."""
    from nnunet_emcad.command.paths import checkout_benchmark

    script = checkout_benchmark(args.name)
    if not os.path.isfile(script):
        print(f"{script} is absent: the benchmarks live in the source checkout, not in the installed package "
              f"(clone the repository and install it with pip install -e .)", file=sys.stderr)
        return 2
    import subprocess

    return subprocess.call([sys.executable, script, *args.args])


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` and run the chosen subcommand."""
    from nnunet_emcad.command.demo import DATA_CHOICES

    parser = argparse.ArgumentParser(prog='nnunet-emcad', description=DESCRIPTION)
    sub = parser.add_subparsers(dest='command', required=True)
    demo = sub.add_parser('demo', help=_demo.__doc__, description=_demo.__doc__ + ' Data: ACDC cardiac MRI '
                          'where $NNUNET_EMCAD_SHARED_DATA (default: ../shared/data beside the clone) holds '
                          'Dataset027_ACDC, else real lung CT from the pycerr wheel on PyPI, else generated images. '
                          'About ten minutes on 2 otherwise idle CPU cores, prediction and evaluation included.')
    demo.add_argument('--data', choices=DATA_CHOICES, default='auto', help='data set (default auto: the first '
                      'available of acdc, lungct, synthetic)')
    demo.add_argument('--workdir', default='nnunet_emcad_demo', help='folder for data, models, logs and results '
                      '(default ./nnunet_emcad_demo; planning is reused on a second run)')
    demo.add_argument('--trainer', default='nnUNetTrainerEMCAD_PVTb0',
                      help='EMCAD trainer to train (default nnUNetTrainerEMCAD_PVTb0, the fastest on a CPU)')
    demo.add_argument('--epochs', type=int, default=14, help='epochs (default 14)')
    demo.add_argument('--iterations', type=int, default=30, help='training iterations per epoch (default 30)')
    demo.add_argument('--batch-size', type=int, default=8, help='batch size (default 8)')
    demo.add_argument('--device', choices=('cpu', 'cuda', 'mps'), help='default: cuda when present, else cpu')
    demo.add_argument('--fast', action='store_true', help='2 epochs of 5 iterations at batch 4: checks the '
                      'pipeline in about three minutes on 2 CPU cores (use with --data synthetic)')
    demo.set_defaults(func=_demo)
    paper = sub.add_parser('paper', help=_paper.__doc__, description=_paper.__doc__)
    paper.add_argument('--size', type=int, default=224, help='input size (default 224, as in the paper)')
    paper.add_argument('--classes', type=int, default=9, help='output classes (default 9, Synapse)')
    paper.add_argument('--threads', type=int, default=min(4, os.cpu_count() or 1), help='torch CPU threads')
    paper.set_defaults(func=_paper)
    info = sub.add_parser('info', help=_info.__doc__, description=_info.__doc__)
    info.add_argument('--trainer', default='nnUNetTrainerEMCAD',
                      help='the trainer to look for as nnU-Net does (default nnUNetTrainerEMCAD)')
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
    convert.set_defaults(func=_convert_official)
    export = sub.add_parser('export-onnx', help=_export_onnx.__doc__, description=_export_onnx.__doc__ + ' The '
                            'graph is the network (deep supervision off, dynamic batch, the plan\'s patch size); '
                            'nnU-Net\'s preprocessing, sliding window and resampling are listed in the JSON file.')
    export.add_argument('-d', '--dataset', required=True, help='dataset name or id')
    export.add_argument('-c', '--configuration', default='2d', help='configuration (default 2d)')
    export.add_argument('-f', '--fold', default='0', help='fold (0-4 or all; default 0)')
    export.add_argument('-tr', '--trainer', default='nnUNetTrainerEMCAD', help='trainer (default nnUNetTrainerEMCAD)')
    export.add_argument('-p', '--plans', default='nnUNetPlans', help='plans identifier (default nnUNetPlans)')
    export.add_argument('-chk', '--checkpoint', default='checkpoint_final.pth',
                        help='checkpoint file name in the fold folder (default checkpoint_final.pth)')
    export.add_argument('-o', '--output', required=True, help='ONNX file to write')
    export.set_defaults(func=_export_onnx)
    rename = sub.add_parser('rename-trainer', help=_rename_trainer.__doc__, description=_rename_trainer.__doc__ +
                            ' Example, for a model trained with nnUNetTrainerEMCAD of nnunet-emcad 0.1: nnunet-emcad '
                            'rename-trainer $nnUNet_results/Dataset027_ACDC/nnUNetTrainerEMCAD__nnUNetPlans__2d '
                            'nnUNetTrainerEMCAD_Stride1')
    rename.add_argument('model_folder', help='$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION')
    rename.add_argument('trainer', help='the trainer the copy belongs to, e.g. nnUNetTrainerEMCAD_Stride1')
    rename.set_defaults(func=_rename_trainer)
    bench = sub.add_parser('benchmark', help=_benchmark.__doc__, description=_benchmark.__doc__ + ' Example: '
                           'nnunet-emcad benchmark cost --help')
    bench.add_argument('name', choices=('cost', 'accuracy', 'update_docs'), help='which benchmark')
    bench.add_argument('args', nargs=argparse.REMAINDER, help='its arguments (see nnunet-emcad benchmark NAME --help)')
    bench.set_defaults(func=_benchmark)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
