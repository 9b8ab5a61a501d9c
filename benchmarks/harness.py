"""What the benchmarks of a source checkout (``benchmarks/``) share: the trainers they compare, the machine
they ran on, their result files, goal verdicts, the command that reproduces a run, and nnU-Net's plans of the
shared ACDC data.

Torch-free, like the package's import.
"""
import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

from benchmarks.source_tree import BENCHMARKS
from nnunet_emcad.command.paths import shared_data_dir
from nnunet_emcad.command.scripts import MALLOC_SETTINGS, nnunet_env, run_logged, with_malloc_settings

RESULTS = os.path.join(BENCHMARKS, 'results')
CACHE = os.path.join(BENCHMARKS, '.cache')

STOCK = 'nnUNetTrainer'
# nnUNetTrainerEMCAD_Stride2Narrow is left out: its network is nnUNetTrainerEMCAD's
EMCAD_TRAINERS = ['nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_Stride1', 'nnUNetTrainerEMCAD_Stride4',
                  'nnUNetTrainerEMCAD_Stride4Light', 'nnUNetTrainerEMCAD_Stride2', 'nnUNetTrainerEMCAD_Stride2Refine',
                  'nnUNetTrainerEMCAD_Stride2NarrowRefine', 'nnUNetTrainerEMCAD_ResEnc', 'nnUNetTrainerEMCAD_PVTb0',
                  'nnUNetTrainerEMCAD_PVTb2']
# Trainers that differ from one above in cost only (the same network, outputs and gradients): the cost benchmark
# measures them, the accuracy benchmark leaves them out.
COST_ONLY_TRAINERS = ['nnUNetTrainerEMCAD_NoRecompute']
EMCAD_3D_TRAINERS = ['nnUNetTrainerEMCAD3D', 'nnUNetTrainerEMCAD3D_ResEnc', 'nnUNetTrainerEMCAD3D_Stride2Narrow']
MODES = ('eager', 'compiled')
"""How the cost benchmarks run a network: as it is, and under ``torch.compile``."""
BENCH_PLANS = 'nnUNetBenchPlans'
"""The plans name of the benchmarks' own plans copies (``bench_plans``)."""


def machine() -> Dict[str, str]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return {'cpu': cpu, 'cores': str(os.cpu_count()), 'python': platform.python_version(),
            'torch': torch.__version__, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}


def malloc_note(env: Mapping[str, str]) -> str:
    """How glibc's malloc was set in the processes measured with ``env`` (``scripts.MALLOC_SETTINGS``)."""
    settings = ', '.join(f'{k}={env[k]}' for k in MALLOC_SETTINGS if k in env)
    return f'glibc malloc keeps freed memory ({settings})' if settings else "glibc malloc at its defaults"


def write_results(name: str, payload: dict, markdown: str, out_dir: str = RESULTS) -> None:
    """``<out_dir>/<name>.json`` and ``.md``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(out_dir, f'{name}.md'), 'w') as f:
        f.write(markdown)
    print(f"wrote {os.path.join(out_dir, name)}.json and .md")


class WorkerFailed(RuntimeError):
    """A benchmark's worker process failed; the message is the end of its error output."""


def add_output_options(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every benchmark has: its result file name and folder, and the hidden worker entry."""
    parser.add_argument('--name', default=name, help=f'result file name (default {name})')
    parser.add_argument('--out', default=RESULTS)
    parser.add_argument('--worker', help=argparse.SUPPRESS)


def add_plans_options(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark that measures networks built from a plans file, at its patch or another."""
    parser.add_argument('--plans', help='nnUNetPlans.json (dataset.json beside it); default: ACDC from ../shared')
    parser.add_argument('--configuration', default='2d')
    parser.add_argument('--patch-size', nargs='+', type=int,
                        help="measure at this patch, through a plans copy with the topology nnU-Net's planner "
                             "gives it (default: the plan's own patch)")


def add_republish_option(parser: argparse.ArgumentParser) -> None:
    """``--republish``: rewrite a report from its measurements (``republish``)."""
    parser.add_argument('--republish', action='store_true',
                        help='rewrite the report from the measurements of the same name (nothing measured again)')


def republish(args: argparse.Namespace, report: Callable[[list, argparse.Namespace, dict], str], key: str) -> None:
    """Rewrite the report ``args.name`` in ``args.out`` from its JSON: ``report(payload[key], settings, machine)``."""
    with open(os.path.join(args.out, f'{args.name}.json')) as f:
        payload = json.load(f)
    write_results(args.name, payload, report(payload[key], argparse.Namespace(**payload['settings']),
                                             payload['machine']), args.out)


def worker_env(configuration: str, glibc_malloc_defaults: bool = False) -> Dict[str, str]:
    """The environment a benchmark's worker processes measure in: this one, with ``MALLOC_SETTINGS`` for a 2D
    configuration (as this project's scripts run nnU-Net's commands) unless ``glibc_malloc_defaults``, and
    nnU-Net's folders set (nothing is written there)."""
    env = dict(os.environ)
    if glibc_malloc_defaults:
        env = {k: v for k, v in env.items() if k not in MALLOC_SETTINGS}
    else:
        env = with_malloc_settings(env, configuration)
    env.setdefault('nnUNet_preprocessed', os.path.join(CACHE, 'unused'))
    env.setdefault('nnUNet_results', os.path.join(CACHE, 'unused'))
    return env


def start_plans_benchmark(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> Dict[str, str]:
    """For a benchmark with ``add_plans_options``: sets its reproduce command (``args.command``), its plans file,
    absolute (ACDC's where none is named; ``args.plans``) and glibc malloc's note (``args.malloc``); returns the
    environment its workers run in."""
    args.command = reproduce_command(script, parser, args, leave_out=('out', 'worker'))
    args.plans = os.path.abspath(args.plans or acdc_plans()['default'])
    env = worker_env(args.configuration)
    args.malloc = malloc_note(env)
    return env


def answer_worker(args: argparse.Namespace, measure: Callable[[dict], dict]) -> bool:
    """In a worker process (``--worker SPEC``): print ``measure(SPEC)`` as JSON for ``run_worker`` and say so."""
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
    return bool(args.worker)


def run_worker(script: str, spec: dict, env: Optional[Mapping[str, str]] = None) -> dict:
    """Run ``script --worker SPEC`` (a benchmark measuring one thing in a fresh process) and return the JSON it
    prints last; ``WorkerFailed`` with the end of its error output when it fails."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), '--worker', json.dumps(spec)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise WorkerFailed(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_trainers(script: str, trainers: Sequence[str], spec: dict, env: Mapping[str, str], folder: str,
                     measured: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Each trainer measured by ``script``'s worker (``run_worker``; ``spec`` with the trainer's name) in a process
    of its own with an empty inductor cache in ``folder``; ``measured(results so far)`` after each."""
    results = []
    for trainer in trainers:
        print(f"measuring {trainer} ...", flush=True)
        cache = os.path.join(folder, f'inductor-{trainer}')
        try:
            results.append(run_worker(script, dict(spec, trainer=trainer), dict(env, TORCHINDUCTOR_CACHE_DIR=cache)))
        except WorkerFailed as e:
            raise RuntimeError(f"measuring {trainer} failed:\n{e}") from e
        if measured is not None:
            measured(results)
    return results


def ratios(result: dict) -> Dict[str, float]:
    """A trainer's step time and training memory as fractions of stock's, and its prediction speed as a multiple
    of stock's, per mode (keys 'step eager', 'predict compiled', ..., 'saved')."""
    out = {}
    for mode in (m for m in MODES if m in result):
        timed = result[mode]
        out[f'step {mode}'] = timed['step_ms']['trainer'] / timed['step_ms']['stock']
        out[f'predict {mode}'] = timed['predict_ms']['stock'] / timed['predict_ms']['trainer']
    out['saved'] = result['saved_mib']['trainer'] / result['saved_mib']['stock']
    return out


def runs_summary(results: List[dict], trainer: str, budget: str) -> Optional[dict]:
    """A trainer's runs under a budget: their mean Dice each, its mean and spread (max - min), and the mean
    iterations, training and prediction seconds of those every run measured (a point of --eval-at has no timed
    prediction); None when it has no run there."""
    runs = sorted((r for r in results if r['trainer'] == trainer and r['budget'] == budget),
                  key=lambda r: r.get('run', 1))
    if not runs:
        return None
    dice = [r['dice_mean'] for r in runs]
    return {'runs': len(runs), 'dice_per_run': dice, 'dice': float(np.mean(dice)),
            'spread': float(max(dice) - min(dice)),
            **{key: float(np.mean([r[key] for r in runs]))
               for key in ('iterations', 'train_seconds', 'predict_seconds') if all(key in r for r in runs)}}


def point_records(runs: Sequence[dict]) -> List[dict]:
    """Every --eval-at point of the accuracy benchmark's equal-iteration ``runs`` (finished or stopped) as a record
    of its own, with its run's trainer and number, as ``runs_summary`` reads them."""
    return [dict(p, trainer=r['trainer'], run=r.get('run', 1), budget='equal_iterations')
            for r in runs if r['budget'] == 'equal_iterations' for p in r.get('points', [])]


def point_summaries(records: Sequence[dict], eval_at: Sequence[int]) -> List[Tuple[int, str, dict, Optional[dict]]]:
    """Per point of ``eval_at`` and trainer (in the order ``records`` first name them, stock included) with runs
    there: (iterations, trainer, its ``runs_summary`` of the ``point_records`` at that point, stock's or None)."""
    trainers = list(dict.fromkeys(r['trainer'] for r in records))
    summaries = []
    for n in eval_at:
        at_n = [r for r in records if r['iterations'] == n]
        stock = runs_summary(at_n, STOCK, 'equal_iterations')
        summaries += [(n, trainer, mine, stock) for trainer in trainers
                      if (mine := runs_summary(at_n, trainer, 'equal_iterations')) is not None]
    return summaries


def versus_stock(mine: dict, stock: dict) -> Tuple[str, str]:
    """How ``mine`` compares with stock's ``runs_summary``: 'ahead', 'behind', 'tie' (the difference of the means
    is not larger than the larger of the two spreads) or 'spread unknown' (one run), and the same in words."""
    difference = 100 * (mine['dice'] - stock['dice'])
    spread = 100 * max(mine['spread'], stock['spread'])
    if min(mine['runs'], stock['runs']) < 2:
        return 'spread unknown', f"{difference:+.1f} points; one run, so its spread is unknown"
    if abs(difference) <= spread:
        return 'tie', f"{difference:+.1f} points, inside the {spread:.1f}-point spread: a tie"
    side = 'ahead' if difference > 0 else 'behind'
    return side, f"{difference:+.1f} points, beyond the {spread:.1f}-point spread: {side}"


def verdict(ok: bool) -> str:
    """A goal's verdict in a report."""
    return 'met' if ok else 'missed'


def reproduce_command(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace,
                      defaults: Optional[Mapping] = None, leave_out: Sequence[str] = ()) -> str:
    """``python <script>`` with the options whose values in ``args`` differ from their defaults: the parser's,
    or ``defaults``' where a default depends on other options. ``leave_out`` names settings left at their
    defaults on purpose (output folders)."""
    defaults = dict(defaults or {})
    words = ['python', script]
    for dest, value in vars(args).items():
        if dest in leave_out or value == defaults.get(dest, parser.get_default(dest)):
            continue
        option = f"--{dest.replace('_', '-')}"
        if isinstance(value, bool):
            words.append(option)
        else:
            words += [option, *map(str, value if isinstance(value, list) else [value])]
    return ' '.join(words)


def acdc_plans(cache: str = CACHE) -> Dict[str, str]:
    """nnU-Net's default and ResEnc M plans for the shared ``Dataset027_ACDC`` (planned once, cached)."""
    raw = shared_data_dir()
    if not os.path.isdir(os.path.join(raw, 'Dataset027_ACDC')):
        raise SystemExit(f"{os.path.join(raw, 'Dataset027_ACDC')} is absent: pass --plans (a nnUNetPlans.json) "
                         f"instead")
    root = os.path.join(cache, 'acdc')
    env = nnunet_env(root, raw=raw)
    folder = os.path.join(env['nnUNet_preprocessed'], 'Dataset027_ACDC')
    plans = {'default': os.path.join(folder, 'nnUNetPlans.json'),
             'resenc_m': os.path.join(folder, 'nnUNetResEncUNetMPlans.json')}
    log = os.path.join(root, 'planning.log')
    if not os.path.isfile(os.path.join(folder, 'dataset_fingerprint.json')):
        print(f"planning ACDC with nnU-Net (once; log: {log})", flush=True)
        run_logged(['nnUNetv2_extract_fingerprint', '-d', '27', '-np', env['nnUNet_def_n_proc']], env, log)
    if not os.path.isfile(plans['default']):
        run_logged(['nnUNetv2_plan_experiment', '-d', '27'], env, log)
    if not os.path.isfile(plans['resenc_m']):
        run_logged(['nnUNetv2_plan_experiment', '-d', '27', '-pl', 'nnUNetPlannerResEncM'], env, log)
    return plans


def bench_plans(plans: dict, configuration: str, batch_size: int, patch_size: Optional[List[int]] = None) -> dict:
    """``plans`` as the benchmark's (``BENCH_PLANS``), with ``batch_size`` and, if given, a patch of ``patch_size``.

    A patch of its own gets the topology nnU-Net's planner gives a patch (its ``get_pool_and_conv_props``, feature
    maps at least 4 wide): stages, strides and kernels; features per stage double from the plan's first up to its
    widest, and convolutions per stage follow the plan's, as the planner sets them. The patch must be one the
    poolings divide (the planner would round it up; the message names that patch). The preprocessed data stay the
    plan's.
    """
    plans = copy.deepcopy(plans)
    plans['plans_name'] = BENCH_PLANS
    config = plans['configurations'][configuration]
    config['batch_size'] = batch_size
    if patch_size:
        if len(patch_size) != len(config['patch_size']):
            raise SystemExit(f"--patch-size needs {len(config['patch_size'])} sizes for {configuration}, got "
                             f"{len(patch_size)}")
        _, strides, kernels, fitted, _ = get_pool_and_conv_props(config['spacing'], patch_size, 4, 999999)
        if [int(p) for p in fitted] != list(patch_size):
            raise SystemExit(f"--patch-size {' '.join(map(str, patch_size))}: nnU-Net's planner rounds it up to "
                             f"{' '.join(str(int(p)) for p in fitted)} for its poolings; give that")
        kw = config['architecture']['arch_kwargs']
        n = len(strides)
        features = kw['features_per_stage']
        kw.update(n_stages=n, strides=[list(s) for s in strides], kernel_sizes=[list(k) for k in kernels],
                  features_per_stage=[min(max(features), features[0] * 2 ** i) for i in range(n)])
        for key, stages in (('n_conv_per_stage', n), ('n_blocks_per_stage', n), ('n_conv_per_stage_decoder', n - 1)):
            if key in kw:
                kw[key] = (list(kw[key]) + [kw[key][-1]] * stages)[:stages]
        config['patch_size'] = list(patch_size)
    return plans


def plans_at_patch(plans_file: str, configuration: str, batch_size: int, patch_size: Optional[List[int]],
                   folder: str) -> str:
    """``plans_file`` itself without ``patch_size``; with it, the path of a copy for that patch (``bench_plans``)
    written into ``folder``, with the dataset.json beside it."""
    if not patch_size:
        return plans_file
    with open(plans_file) as f:
        copied = bench_plans(json.load(f), configuration, batch_size, patch_size)
    path = os.path.join(folder, f'{BENCH_PLANS}.json')
    with open(path, 'w') as f:
        json.dump(copied, f)
    shutil.copy(os.path.join(os.path.dirname(plans_file), 'dataset.json'), folder)
    return path
