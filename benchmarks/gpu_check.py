"""GPU check: does each trainer train under nnU-Net's CUDA defaults (float16 AMP + torch.compile), and at what cost?

For stock nnU-Net and each EMCAD trainer, built by its trainer from a plan (default: nnU-Net's ACDC plans, 2d for
2D trainers, 3d_fullres for 3D ones), on random tensors at the plan's patch and batch (same seed and batch for
every run): --steps training steps as nnUNetTrainer.train_step takes them (float16 autocast forward and loss with
deep supervision, GradScaler, unscale, gradient clipping at 12, the trainer's own optimiser), once eager and once
with the network under torch.compile. Measured per run: finite gradients and skipped steps (the GradScaler's scale
falling), the loss trajectory and its largest deviation from eager's, whether the parameters changed, the time of
the first step (compile time when compiled), the median step after it, and peak CUDA memory of the training
steps; per trainer, AMP inference latency (eager) at batch 1 and at the plan's batch, and the memory layout
inductor chooses for the training graph on CUDA (channels-last, where cuDNN's depth-wise kernels are fast, or
the default; benchmarks.inductor_layout). Compiled, an EMCAD trainer's own train_step (nnU-Net's, then the
divergence guard) is timed in turn with nnUNetTrainer.train_step alone, on the same trainer and batch: what the
guard costs a step. Each run is a process of its own. Exits 1 when a compiled trainer does not train (non-finite
loss, more than half of its steps skipped, or unchanged parameters).

The default trainers are chosen to fit about 8 minutes on one H100/H200 (compiling one training graph took about
a minute on an H200; the whole default run is not timed yet); it leaves out nnUNetTrainerEMCAD_NoRecompute (what
recomputing costs: nnUNetTrainerEMCAD_Stride1 without it), nnUNetTrainerEMCAD_ResEnc, nnUNetTrainerEMCAD_Stride4,
nnUNetTrainerEMCAD_Stride4Light, nnUNetTrainerEMCAD_PVTb2, nnUNetTrainerEMCAD_PVTb2_MUTATION, nnUNetTrainerEMCAD3D,
nnUNetTrainerEMCAD3D_ResEnc and stock 3D: name them with --trainers (TRAINER or TRAINER:CONFIGURATION).
Writes benchmarks/results/<name>.json and .md (default name gpu) after every trainer, so that a run stopped at a
time limit keeps the trainers it finished (the report names those still to come).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

if __package__ in (None, ''):  # run as python benchmarks/<name>.py: import benchmarks.* from the checkout's root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.harness import (STOCK, WorkerFailed, acdc_plans, add_output_options, answer_worker, machine,
                                reproduce_command, run_worker, write_results)

DEFAULT_TRAINERS = [STOCK, 'nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_Stride1', 'nnUNetTrainerEMCAD_PVTb0']
LOSS_TOLERANCE = 0.02
"""Largest relative deviation of a compiled run's loss from eager's, per step, that still counts as following it."""
MAX_SKIPPED_FRACTION = 0.5
"""More skipped steps than this fraction means a run does not train (a few skips while the GradScaler's scale
settles are normal)."""


@dataclass
class Rig:
    """A trainer's network, loss, optimiser and GradScaler on a fixed random batch, ready for training steps."""

    trainer: object
    network: object
    data: object
    target: list
    scaler: object


def build_rig(trainer_name: str, plans: dict, dataset_json: dict, configuration: str, device: str,
              batch_size: Optional[int] = None, backend: Optional[str] = None, seed: int = 0) -> Rig:
    """The trainer's deep-supervised network (under torch.compile with ``backend`` if given), its loss and
    optimiser, and a random batch with targets at every deep-supervision scale, seeded so that every run of a
    trainer starts the same.

    Needs ``nnUNet_preprocessed`` and ``nnUNet_results`` set: the trainer writes its log there."""
    import torch
    import torch.nn.functional as F
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    plans = dict(json.loads(json.dumps(plans)), continue_training=False)
    trainer = recursive_find_trainer_class_by_name(trainer_name)(plans, configuration, 0, dataset_json,
                                                                 device=torch.device(device))
    patch = list(trainer.configuration_manager.patch_size)
    batch = batch_size or trainer.configuration_manager.batch_size
    channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager, dataset_json)
    classes = trainer.label_manager.num_segmentation_heads
    torch.manual_seed(seed)
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                         channels, classes, True).to(device).train()
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, channels, *patch, generator=generator).to(device)
    labels = torch.randint(0, classes, (batch, 1, *patch), generator=generator).float().to(device)
    target = [F.interpolate(labels, size=[round(p * s) for p, s in zip(patch, scale)], mode='nearest')
              for scale in trainer._get_deep_supervision_scales()]
    network = torch.compile(trainer.network, backend=backend) if backend else trainer.network
    return Rig(trainer, network, data, target, torch.amp.GradScaler(torch.device(device).type))


def amp_train_step(rig: Rig, amp_dtype) -> Dict[str, float]:
    """One step as ``nnUNetTrainer.train_step`` takes it on CUDA, under ``amp_dtype`` autocast on any device;
    returns the loss, whether every gradient was finite, and the GradScaler's scale after the step."""
    import torch

    trainer = rig.trainer
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(rig.data.device.type, dtype=amp_dtype):
        loss = trainer.loss(rig.network(rig.data), rig.target)
    rig.scaler.scale(loss).backward()
    rig.scaler.unscale_(trainer.optimizer)
    torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
    grads = [p.grad for p in trainer.network.parameters() if p.grad is not None]
    finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    rig.scaler.step(trainer.optimizer)
    rig.scaler.update()
    return {'loss': float(loss.detach()), 'grads_finite': finite, 'scale': rig.scaler.get_scale()}


T = TypeVar('T')


def timed_ms(fn: Callable[[], T], cuda: bool) -> Tuple[T, float]:
    """``fn()``'s result and the milliseconds it took, with ``cuda`` its CUDA work included (synchronised before
    and after)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    return result, (time.perf_counter() - start) * 1000


def train(rig: Rig, steps: int, amp_dtype) -> dict:
    """``steps`` AMP training steps: the per-step records, first-step and median later step time (ms),
    whether the parameters changed, peak CUDA memory (MB)."""
    import torch

    cuda = rig.data.device.type == 'cuda'
    before = [p.detach().clone() for p in rig.trainer.network.parameters()]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    records, times = [], []
    initial_scale = rig.scaler.get_scale()
    for _ in range(steps):
        record, ms = timed_ms(lambda: amp_train_step(rig, amp_dtype), cuda)
        records.append(record)
        times.append(ms)
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, rig.trainer.network.parameters()))
    scales = [initial_scale] + [r['scale'] for r in records]
    return {'losses': [r['loss'] for r in records], 'grads_finite': [r['grads_finite'] for r in records],
            'skipped': sum(b < a for a, b in zip(scales, scales[1:])), 'params_changed': changed,
            'first_step_ms': times[0], 'step_ms': statistics.median(times[1:]) if steps > 1 else times[0],
            'peak_memory_mb': torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None}


def guard_cost(rig: Rig, steps: int) -> Optional[Dict[str, float]]:
    """The trainer's own ``train_step`` (nnU-Net's step, then the divergence guard) against
    ``nnUNetTrainer.train_step`` alone, on the same trainer, network, batch and GradScaler, the two taken in turn
    ``steps`` times each: their median ms after the first of each. None for a trainer without a step of its own."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = rig.trainer
    if type(trainer).train_step is nnUNetTrainer.train_step:
        return None
    cuda = rig.data.device.type == 'cuda'
    network, trainer.network, trainer.grad_scaler = trainer.network, rig.network, rig.scaler  # as nnU-Net sets them
    batch = {'data': rig.data, 'target': rig.target}
    take = {'guarded': lambda: trainer.train_step(batch),
            'unguarded': lambda: nnUNetTrainer.train_step(trainer, batch)}
    times = {key: [] for key in take}
    for i in range(steps):
        for key, step in take.items():
            _, ms = timed_ms(step, cuda)
            if i or steps == 1:
                times[key].append(ms)
    trainer.network = network
    return {f'{key}_ms': statistics.median(values) for key, values in times.items()}


def inference_latency(rig: Rig, amp_dtype, repeats: int = 10) -> Dict[str, float]:
    """AMP inference latency (eager, deep supervision off) at batch 1 and at the rig's batch, median ms."""
    import torch

    trainer = rig.trainer
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    cuda = rig.data.device.type == 'cuda'
    result = {}
    with torch.no_grad(), torch.autocast(rig.data.device.type, dtype=amp_dtype):
        for key, x in (('batch_1', rig.data[:1]), ('batch_plan', rig.data)):
            times = []
            for i in range(repeats + 2):
                _, ms = timed_ms(lambda: trainer.network(x), cuda)
                if i >= 2:
                    times.append(ms)
            result[key] = statistics.median(times)
    trainer.set_deep_supervision_enabled(True)
    trainer.network.train()
    return result


def measure(spec: dict) -> dict:
    """One run (a worker process): build the rig, train, and for eager runs time inference."""
    import torch
    import torch._inductor.config

    from benchmarks.inductor_layout import inductor_lays_out_channels_last

    amp_dtype = getattr(torch, spec['amp_dtype'])
    with open(spec['plans']) as f:
        plans = json.load(f)
    with open(os.path.join(os.path.dirname(spec['plans']), 'dataset.json')) as f:
        dataset_json = json.load(f)
    torch._inductor.config.fallback_random = True  # eager's random numbers (drop path), so the losses compare
    rig = build_rig(spec['trainer'], plans, dataset_json, spec['configuration'], spec['device'], spec['batch_size'],
                    spec['backend'] if spec['compiled'] else None)
    result = dict(trainer=spec['trainer'], configuration=spec['configuration'], compiled=spec['compiled'],
                  batch=int(rig.data.shape[0]), patch=list(rig.data.shape[2:]),
                  params=sum(p.numel() for p in rig.trainer.network.parameters()))
    if not spec['compiled']:
        result['inductor_channels_last'] = inductor_lays_out_channels_last(rig.trainer.network, rig.data.shape)
    result.update(train(rig, spec['steps'], amp_dtype))
    if spec['compiled']:  # the step nnU-Net takes on CUDA
        result['guard'] = guard_cost(rig, spec['steps'])
    else:
        result['inference_ms'] = inference_latency(rig, amp_dtype)
    return result


def training_verdict(eager: dict, compiled: dict) -> dict:
    """Whether the compiled run trained, and how far its loss strayed from eager's (largest relative deviation)."""
    deviation = max(abs(c - e) / max(abs(e), 1e-12) for c, e in zip(compiled['losses'], eager['losses']))
    finite = all(x == x and abs(x) != float('inf') for x in compiled['losses'])
    trains = finite and compiled['params_changed'] and \
        compiled['skipped'] <= MAX_SKIPPED_FRACTION * len(compiled['losses'])
    return {'trains': trains, 'loss_deviation': deviation, 'follows_eager': trains and deviation <= LOSS_TOLERANCE}


def parse_trainers(words: List[str], default_2d: str = '2d') -> List[tuple]:
    """``TRAINER[:CONFIGURATION]`` -> (trainer, configuration); EMCAD 3D trainers default to 3d_fullres."""
    jobs = []
    for word in words:
        trainer, _, configuration = word.partition(':')
        jobs.append((trainer, configuration or ('3d_fullres' if 'EMCAD3D' in trainer else default_2d)))
    return jobs


def _ms(value: Optional[float]) -> str:
    return '-' if value is None else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _mb(value: Optional[float]) -> str:
    return '-' if value is None else f"{value / 1024:.1f} GB"


def report(rows: List[dict], settings: dict, info: Dict[str, str]) -> str:
    """The Markdown report: per trainer, eager against compiled, and ratios against stock of the same
    configuration measured in the same run."""
    lines = [f"# GPU check: training under AMP + torch.compile ({settings['plans']})", '',
             f"Device: {info['gpu']} ({settings['device']}); torch {info['torch']}. {settings['steps']} training "
             f"steps per run as nnUNetTrainer.train_step takes them ({settings['amp_dtype']} autocast, GradScaler, "
             f"clipping at 12, the trainer's optimiser and deep-supervised loss), random tensors at the plan's patch "
             f"and batch, same seed and batch for every run. Step time: median after the first step (the first "
             f"includes compiling). Memory: peak CUDA memory of the training steps. Inference: AMP, eager, median. "
             f"'follows eager': loss within {LOSS_TOLERANCE:.0%} of eager's at every step (compiled runs draw eager's "
             f"random numbers, inductor's fallback_random). Layout: the memory layout inductor chooses for the "
             f"training graph on CUDA (channels-last or the default).", '',
             f"Reproduce: `{settings['command']}`", '',
             '| trainer | config | batch | params | trains (compiled) | skipped steps (eager / compiled) | '
             'loss first -> last (eager / compiled) | follows eager | compile (first step) | step eager / compiled | '
             'vs stock (compiled) | layout | peak memory eager / compiled | vs stock (compiled) | '
             'inference batch 1 / plan |',
             '|---|---|---:|---:|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|']
    stock = {r['configuration']: r for r in rows if r['trainer'] == STOCK}
    for r in rows:
        e, c, v = r['eager'], r['compiled'], r['verdict']
        base = stock.get(r['configuration'])
        step_ratio = f"{c['step_ms'] / base['compiled']['step_ms']:.2f}x" if base else '-'
        memory_ratio = f"{c['peak_memory_mb'] / base['compiled']['peak_memory_mb']:.2f}x" \
            if base and c['peak_memory_mb'] and base['compiled']['peak_memory_mb'] else '-'
        lines.append(
            f"| {r['trainer']} | {r['configuration']} | {e['batch']} | {e['params'] / 1e6:.1f}M | "
            f"{'yes' if v['trains'] else '**no**'} | {e['skipped']} / {c['skipped']} | "
            f"{e['losses'][0]:.3f} -> {e['losses'][-1]:.3f} / {c['losses'][0]:.3f} -> {c['losses'][-1]:.3f} | "
            f"{'yes' if v['follows_eager'] else 'no'} ({v['loss_deviation']:.1%}) | "
            f"{c['first_step_ms'] / 1000:.0f} s | {_ms(e['step_ms'])} / {_ms(c['step_ms'])} | {step_ratio} | "
            f"{'channels-last' if e['inductor_channels_last'] else 'default'} | "
            f"{_mb(e['peak_memory_mb'])} / {_mb(c['peak_memory_mb'])} | {memory_ratio} | "
            f"{_ms(e['inference_ms']['batch_1'])} / {_ms(e['inference_ms']['batch_plan'])} |")
    failed = [r['trainer'] for r in rows if not r['verdict']['trains']]
    lines += ['', f"Compiled trainers that do not train: {', '.join(failed)}." if failed else
              'Every compiled trainer trained.', '']
    guarded = [r for r in rows if r['compiled'].get('guard')]
    if guarded:
        lines += ["The divergence guard, compiled: the trainer's own train_step (nnU-Net's step, then the guard) "
                  "against nnUNetTrainer.train_step alone, on the same trainer, batch and GradScaler, taken in turn "
                  f"{settings['steps']} times each (median after the first):", '']
        for r in guarded:
            g = r['compiled']['guard']
            lines.append(f"- {r['trainer']} ({r['configuration']}): {_ms(g['guarded_ms'])} with the guard, "
                         f"{_ms(g['unguarded_ms'])} without ({g['guarded_ms'] / g['unguarded_ms'] - 1:+.1%})")
        lines.append('')
    return '\n'.join(lines)


def save(rows: List[dict], settings: dict, info: Dict[str, str]) -> None:
    """Write the JSON and the report of the trainers measured so far; the report names those still to come."""
    failed = ''.join(f"\n{r['trainer']} ({r['configuration']}) failed to run:\n\n```\n{r['error'][-1500:]}\n```\n"
                     for r in rows if 'error' in r)
    pending = settings['trainers'][len(rows):]
    to_come = f"\nNot measured yet when this was written: {', '.join(pending)}.\n" if pending else ''
    write_results(settings['name'], {'machine': info, 'settings': settings, 'runs': rows},
                  report([r for r in rows if 'error' not in r], settings, info) + failed + to_come, settings['out'])


def build_parser() -> argparse.ArgumentParser:
    """The check's command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--plans', help='nnUNetPlans.json (dataset.json beside it); default: ACDC from ../shared')
    parser.add_argument('--trainers', nargs='+', default=DEFAULT_TRAINERS,
                        help='TRAINER or TRAINER:CONFIGURATION (default: %(default)s)')
    parser.add_argument('--steps', type=int, default=20, help='training steps per run (default 20)')
    parser.add_argument('--batch-size', type=int, help="batch size (default: the plan's)")
    parser.add_argument('--device', default='cuda', help='cuda (default) or cpu (a dry run of the check)')
    parser.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'),
                        help="autocast dtype (default float16, nnU-Net's)")
    parser.add_argument('--backend', default='inductor',
                        help="torch.compile backend (default inductor, nnU-Net's; aot_eager for a quick dry run)")
    add_output_options(parser, 'gpu')
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if answer_worker(args, measure):
        return 0
    command = reproduce_command('benchmarks/gpu_check.py', parser, args, leave_out=('out', 'worker'))
    plans = os.path.abspath(args.plans or acdc_plans()['default'])
    scratch = tempfile.mkdtemp(prefix='gpu_check_')
    env = dict(os.environ, nnUNet_preprocessed=os.path.join(scratch, 'preprocessed'),
               nnUNet_results=os.path.join(scratch, 'results'))
    settings = dict(vars(args), plans=plans, command=command)
    settings.pop('worker')
    info = machine()
    rows = []
    for trainer, configuration in parse_trainers(args.trainers):
        row = {'trainer': trainer, 'configuration': configuration}
        for compiled in (False, True):
            spec = dict(trainer=trainer, configuration=configuration, plans=plans, device=args.device,
                        batch_size=args.batch_size, compiled=compiled, backend=args.backend, steps=args.steps,
                        amp_dtype=args.amp_dtype)
            print(f"{trainer} ({configuration}, {'compiled' if compiled else 'eager'}) ...", flush=True)
            try:  # each run in a process of its own: a fresh CUDA context and compile cache
                row['compiled' if compiled else 'eager'] = run_worker(__file__, spec, dict(
                    env, nnUNet_compile='t' if compiled else 'f'))
            except WorkerFailed as e:
                row['compiled' if compiled else 'eager'] = {'error': str(e)}
        failed = [key for key in ('eager', 'compiled') if 'error' in row[key]]
        if failed:
            print(f"  failed:\n{row[failed[0]]['error']}", flush=True)
            row['verdict'] = {'trains': False, 'loss_deviation': float('nan'), 'follows_eager': False}
            row['error'] = row[failed[0]]['error']
        else:
            row['verdict'] = training_verdict(row['eager'], row['compiled'])
            print(f"  trains: {row['verdict']['trains']}, loss deviation {row['verdict']['loss_deviation']:.2%}, "
                  f"step {row['eager']['step_ms']:.0f} / {row['compiled']['step_ms']:.0f} ms", flush=True)
        rows.append(row)
        save(rows, settings, info)  # after every trainer: a run stopped at a time limit keeps what it finished
    return 0 if all(r['verdict']['trains'] for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
