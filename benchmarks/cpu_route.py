"""The README's CPU route ("On a CPU: a first model in minutes") run as written on real data and timed command by
command: planning and preprocessing, training (with nnU-Net's final validation, which a user waits for too),
prediction and evaluation of held-out cases, and the Dice of nnU-Net's validation and of the held-out cases.

The route's bash block runs unchanged in a fresh shell whose home is a folder of the benchmark's own, whose
``~/nnUNet_raw/Dataset027_ACDC`` is ``--source``: by default ACDC from ../shared/data, whose copy has no test set
(nnU-Net's Dataset027_ACDC.py writes ACDC's own there), so the patients of its fold-0 validation split are held out
as imagesTs / labelsTs and the rest are the training cases; a source with imagesTs and labelsTs is used as it is.
Writes benchmarks/results/<name>.json and .md.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

from batchgenerators.utilities.file_and_folder_operations import load_json

if __package__ in (None, ''):  # run as python benchmarks/<name>.py: import benchmarks.* from the checkout's root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.harness import CACHE, machine, reproduce_command, write_results
from benchmarks.source_tree import code_block, readme_section
from nnunet_emcad.command.paths import shared_data_dir

SECTION = '### On a CPU: a first model in minutes'
DATASET = 'Dataset027_ACDC'
# bash's trace of each nnU-Net command, stamped with its start (run_route's PS4)
TRACE = re.compile(r'^\++ (\d+\.\d+) (nnUNetv2_\w+)', re.M)


def route_script() -> str:
    """The route's bash block, as the README writes it."""
    return code_block(readme_section(SECTION), 'bash')


def route_trainer(script: str) -> str:
    """The trainer the route trains (``-tr``)."""
    return re.search(r'nnUNetv2_train .*-tr (\S+)', script).group(1)


def has_test_set(source: str) -> bool:
    """Whether the raw data set ``source`` holds test images with their labels (imagesTs, labelsTs)."""
    return all(os.path.isdir(os.path.join(source, folder)) for folder in ('imagesTs', 'labelsTs'))


def link_dataset(source: str, target: str) -> List[str]:
    """``source`` (nnU-Net raw format) under ``target``, its files linked; without imagesTs / labelsTs, the cases of
    fold 0's validation split (``splits_final.json``) held out as them. Returns the held-out case names."""
    dataset_json = load_json(os.path.join(source, 'dataset.json'))
    ending = dataset_json['file_ending']
    if has_test_set(source):
        held_out = sorted(f[:-len(ending)] for f in os.listdir(os.path.join(source, 'labelsTs')) if f.endswith(ending))
        splits = {}
    else:
        held_out = sorted(load_json(os.path.join(source, 'splits_final.json'))[0]['val'])
        splits = {'imagesTr': 'imagesTs', 'labelsTr': 'labelsTs'}
    for folder in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
        if not os.path.isdir(os.path.join(source, folder)):
            continue
        for name in sorted(os.listdir(os.path.join(source, folder))):
            case = re.sub(r'_\d{4}$', '', name[:-len(ending)])
            into = splits.get(folder, folder) if case in held_out else folder
            os.makedirs(os.path.join(target, into), exist_ok=True)
            os.symlink(os.path.join(source, folder, name), os.path.join(target, into, name))
    if splits:
        dataset_json['numTraining'] = len(os.listdir(os.path.join(target, 'labelsTr')))
    with open(os.path.join(target, 'dataset.json'), 'w') as f:
        json.dump(dataset_json, f, indent=1)
    return held_out


def command_seconds(trace: str, end: float) -> Dict[str, float]:
    """Each nnU-Net command's seconds, from the start stamps of bash's trace to the next command's (the last
    one's to ``end``)."""
    starts = [(float(t), name) for t, name in TRACE.findall(trace)]
    return {name: later - t for (t, name), later in zip(starts, [s for s, _ in starts[1:]] + [end])}


def _foreground_dice(summary_file: str) -> Dict[str, float]:
    """Per-label and mean foreground Dice of an nnU-Net ``summary.json``."""
    summary = load_json(summary_file)
    dice = {label: round(v['Dice'], 3) for label, v in summary['mean'].items()}
    return dict(dice, mean=round(summary['foreground_mean']['Dice'], 3))


def run_route(source: str, home: str, trainer: Optional[str] = None, ext_trainers: Optional[str] = None,
              timeout: float = 7200) -> dict:
    """The route in a fresh shell whose home is ``home`` (emptied first), on ``source``; its times and Dice."""
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    held_out = link_dataset(source, os.path.join(home, 'nnUNet_raw', DATASET))
    script = route_script()
    written = route_trainer(script)
    trainer = trainer or written
    env = {k: v for k, v in os.environ.items() if not k.startswith(('nnUNet', 'MALLOC_'))}
    # a user's shell with this environment active: its nnU-Net commands first on PATH
    env.update(HOME=home, MPLBACKEND='Agg', PATH=os.path.dirname(sys.executable) + os.pathsep + env['PATH'])
    if ext_trainers:
        env['nnUNet_extTrainer'] = ext_trainers
    start = time.time()
    # bash -x traces each command stamped with its start (PS4, which bash run as root takes from no environment)
    traced = "PS4='+ ${EPOCHREALTIME} '\n" + script.replace(written, trainer)
    proc = subprocess.run(['bash', '-e', '-x', '-c', traced], env=env, cwd=home,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"the route failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    fold = os.path.join(home, 'nnUNet_results', DATASET, f'{trainer}__nnUNetPlans__2d', 'fold_0')
    log = next(os.path.join(fold, f) for f in os.listdir(fold) if f.startswith('training_log_'))
    with open(log) as f:
        epochs = [float(s) for s in re.findall(r'Epoch time: ([\d.]+) s', f.read())]
    return {'trainer': trainer, 'held_out_cases': held_out, 'seconds': command_seconds(proc.stderr, end),
            'total_seconds': end - start, 'epochs': len(epochs), 'epoch_seconds': sum(epochs),
            'validation_dice': _foreground_dice(os.path.join(fold, 'validation', 'summary.json')),
            'held_out_dice': _foreground_dice(os.path.join(home, 'acdc_predictions', 'summary.json'))}


def report(result: dict, args: argparse.Namespace, info: Dict[str, str], command: str) -> str:
    seconds, labels = result['seconds'], [k for k in result['held_out_dice'] if k != 'mean']
    train = seconds['nnUNetv2_train']
    lines = [
        f"# The README's CPU route on {os.path.basename(os.path.normpath(args.source))}", '',
        f"Machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}; torch {info['torch']}. The README's "
        f"bash block ({SECTION[4:]}) run as written in a fresh shell (trainer {result['trainer']}), nothing else "
        f"running; held out: {len(result['held_out_cases'])} cases (" + (
            "the source's imagesTs" if has_test_set(args.source) else
            "fold 0's validation patients of splits_final.json") + "), never trained on.", '',
        f"Reproduce: `{command}`", '',
        '| command | seconds | minutes |', '|---|---:|---:|',
        *[f"| {name} | {s:.0f} | {s / 60:.1f} |" for name, s in seconds.items()],
        f"| the whole route | {result['total_seconds']:.0f} | {result['total_seconds'] / 60:.1f} |", '',
        f"Training: {result['epochs']} epochs in {result['epoch_seconds'] / 60:.1f} minutes (nnU-Net's epoch times); "
        f"the rest of nnUNetv2_train's {train / 60:.1f} minutes is its start and its final validation "
        f"({(train - result['epoch_seconds']) / 60:.1f} minutes).", '',
        '| Dice | ' + ' | '.join(f'label {k}' for k in labels) + ' | mean |',
        '|---|' + '---:|' * (len(labels) + 1),
        *[f"| {title} | " + ' | '.join(f"{result[key][k]:.3f}" for k in labels + ['mean']) + ' |'
          for title, key in (("nnU-Net's validation (fold 0 of its own split of the training cases)",
                              'validation_dice'), ('held-out cases (nnUNetv2_evaluate_folder)', 'held_out_dice'))],
        '']
    return '\n'.join(lines)


def default_source() -> str:
    return os.path.join(shared_data_dir(), DATASET)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--source', default=default_source(), help='the raw data set (default: ACDC from ../shared)')
    parser.add_argument('--trainer', help="train this trainer instead of the route's (a test's shorter stand-in)")
    parser.add_argument('--ext-trainers', help='a folder of trainers for nnUNet_extTrainer (with --trainer)')
    parser.add_argument('--home', default=os.path.join(CACHE, 'cpu_route'), help="the route's home (emptied)")
    parser.add_argument('--name', default='cpu_route_acdc', help='result file name')
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.source, 'dataset.json')):
        parser.error(f"no data set at {args.source}: point --source to one in nnU-Net's raw format")
    result = run_route(os.path.abspath(args.source), os.path.abspath(args.home), args.trainer, args.ext_trainers)
    command = reproduce_command('benchmarks/cpu_route.py', parser, args, leave_out=('home', 'out'))
    info = machine()
    write_results(args.name, {'machine': info, 'command': command, **result},
                  report(result, args, info, command), args.out)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
