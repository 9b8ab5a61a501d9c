"""EMCAD trainers in turn with stock nnU-Net: training step, prediction and training memory, eager and compiled,
against the cost goals of a decoder variant.

Per trainer, one worker process builds stock nnU-Net's network and the trainer's on the same plans and runs them
alternately (the order swapped every round, medians of ``--repeats``), so that drifts in the machine's speed hit
both alike: the training step (each trainer's own loss with deep supervision, and optimiser, at ``--batch``) and
prediction's forward at batch 1 (deep supervision off), eager, then under ``torch.compile`` (inductor), with the
seconds the first compiled step and prediction took beyond a later one's (compiling, from an empty inductor
cache; nnU-Net compiles at every start of every fold). Training memory: the activation bytes a training forward
keeps for backward, per sample (``counting.saved_activation_bytes``), to stock's. The goals (``GOALS``) count
for decoders that work at stride 2 or finer. Writes benchmarks/results/<name>.json and .md after each trainer.

Default plans: nnU-Net's own 2D plans for ../shared/data/Dataset027_ACDC (planned once into benchmarks/.cache).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

if __package__ in (None, ''):  # run as python benchmarks/<name>.py: import benchmarks.* from the checkout's root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.harness import (MODES, STOCK, add_output_options, add_plans_options, add_republish_option,
                                answer_worker, machine, measure_trainers, plans_at_patch, ratios, republish,
                                start_plans_benchmark, write_results)
from benchmarks.profiling import build_trainer, first_call_s, training_step
from nnunet_emcad.model.counting import saved_activation_bytes
from nnunet_emcad.model.emcad import EMCADNet, total_strides

DEFAULT_TRAINERS = ['nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_Stride1', 'nnUNetTrainerEMCAD_Stride2',
                    'nnUNetTrainerEMCAD_Stride2Refine', 'nnUNetTrainerEMCAD_Stride2NarrowRefine',
                    'nnUNetTrainerEMCAD_Stride4']
# (what, goal, stretch goal): a step's time and the training memory as fractions of stock's, prediction speed as a
# multiple of stock's
GOALS = {'step': (1.0, 0.7), 'predict': (1.5, 2.0), 'saved': (1.0, None)}
GOAL_STRIDE = 2
"""The coarsest stride a decoder may work at for the goals to count (decoding from stride 4 loses small objects)."""


def in_turn(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median milliseconds of each function, called alternately ``repeats`` times each after one warm-up call
    each, the order reversed every round."""
    items = list(fns.items())
    for _, fn in items:
        fn()
    times: Dict[str, List[float]] = {key: [] for key in fns}
    for i in range(repeats):
        for key, fn in items if i % 2 else items[::-1]:
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1000)
    return {key: statistics.median(values) for key, values in times.items()}


def finest_decoder_stride(network: torch.nn.Module) -> int:
    """The finest stride a network's decoder computes at (1 for stock nnU-Net's)."""
    if not isinstance(network, EMCADNet):
        return 1
    decoder = network.decoder
    return 1 if decoder.refine is not None else max(total_strides(network.encoder.strides)[decoder.first_output_stage])


def measure(spec: dict) -> dict:
    """One trainer in turn with stock (runs in a worker process)."""
    torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    trainers = {name: build_trainer(spec['plans'], trainer, spec['configuration'])
                for name, trainer in (('stock', STOCK), ('trainer', spec['trainer']))}
    first = trainers['trainer']
    patch = list(first.configuration_manager.patch_size)
    channels = determine_num_input_channels(first.plans_manager, first.configuration_manager, first.dataset_json)
    classes = first.label_manager.num_segmentation_heads

    def build(name: str, deep_supervision: bool) -> torch.nn.Module:
        trainer = trainers[name]
        return trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, channels,
                                                  classes, deep_supervision)

    x = torch.randn(1, channels, *patch)
    result = {'name': spec['trainer'], 'patch_size': patch, 'batch': spec['batch'],
              'finest_stride': finest_decoder_stride(build('trainer', False)),
              'saved_mib': {name: saved_activation_bytes(build(name, True).train(), x) / 2 ** 20 for name in trainers}}
    for mode in spec['modes']:
        compiled = mode == 'compiled'
        steps = {name: training_step(trainer, build(name, True), spec['batch'], channels, classes, compiled)
                 for name, trainer in trainers.items()}
        runs = {name: torch.compile(build(name, False).eval()) if compiled else build(name, False).eval()
                for name in trainers}
        predicts = {name: torch.no_grad()(lambda run=run: run(x)) for name, run in runs.items()}
        firsts = {name: first_call_s(steps[name]) + first_call_s(predicts[name]) for name in trainers}
        step_ms, predict_ms = in_turn(steps, spec['repeats']), in_turn(predicts, 3 * spec['repeats'])
        result[mode] = {'step_ms': step_ms, 'predict_ms': predict_ms}
        if compiled:
            result[mode]['compile_s'] = {name: max(0.0, firsts[name] - (step_ms[name] + predict_ms[name]) / 1000)
                                         for name in trainers}
        torch._dynamo.reset()
    return result


def goal_verdicts(result: dict) -> Dict[str, str]:
    """Each goal's verdict with its margin: 'met', 'met (stretch)' or 'missed by ...'."""
    verdicts = {}
    for key, value in ratios(result).items():
        goal, stretch = GOALS[key.split()[0]]
        higher = key.startswith('predict')  # prediction: a speed-up, the others: a fraction of stock's
        met = value >= goal if higher else value <= goal
        if not met:
            verdicts[key] = f"missed by {abs(value - goal):.2f}x"
        else:
            verdicts[key] = 'met (stretch too)' if stretch and (value >= stretch if higher else value <= stretch) \
                else 'met'
    return verdicts


def counts(result: dict) -> bool:
    """Whether the goals count for a trainer: its decoder works at ``GOAL_STRIDE`` or finer."""
    return result['finest_stride'] <= GOAL_STRIDE


def ranked(results: List[dict], mode: str) -> List[dict]:
    """Trainers whose goals count first, by goals met (most first), then by their step time in ``mode``."""
    return sorted(results, key=lambda r: (not counts(r), -sum(v.startswith('met') for v in goal_verdicts(r).values()),
                                          ratios(r)[f'step {mode}']))


def report(results: List[dict], args: argparse.Namespace, info: Dict[str, str]) -> str:
    """The Markdown report."""
    patch = 'x'.join(map(str, results[0]['patch_size']))
    keys = list(ratios(results[0]))
    compiled = 'compiled' in args.modes
    lines = [f"# EMCAD trainers in turn with stock nnU-Net at a {patch} patch", '',
             f"Machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}; torch {info['torch']}; "
             f"{args.threads} CPU threads; {args.malloc}. Plans: {os.path.relpath(args.plans, os.getcwd())} "
             f"({args.configuration}"
             f"{', patch through a plans copy with the topology nnU-Net plans for it' if args.patch_size else ''}). "
             f"Training step at batch {args.batch} (each trainer's own loss with deep supervision, and optimiser), "
             f"prediction at batch 1; each trainer and stock nnU-Net run alternately in one process, medians of "
             f"{args.repeats} steps and {3 * args.repeats} predictions each; compiled: torch.compile (inductor).",
             *(['', "GPU numbers: pending (this run had none); on a GPU `python benchmarks/gpu_check.py` measures "
                    "the compiled AMP step and peak memory of stock and the EMCAD trainers (docs/gpu.md)."]
               if info['gpu'] == 'none' else []),
             '', f"Reproduce: `{args.command}`", '',
             f"Goals (for decoders working at stride {GOAL_STRIDE} or finer): training step <= "
             f"{GOALS['step'][0]}x stock's time (stretch {GOALS['step'][1]}x), prediction >= "
             f"{GOALS['predict'][0]}x stock's speed (stretch {GOALS['predict'][1]}x), saved activations <= stock's, "
             f"{' and '.join(args.modes)}. Ranked: goals met, then the {args.modes[-1]} step.", '',
             '| rank | trainer | finest decoder stride | ' + ' | '.join(f'{k} vs stock' for k in keys)
             + (' | compile s (stock)' if compiled else '') + ' | goals met |',
             '|---:|---|' + '---:|' * (len(keys) + 1 + compiled) + '---|']
    for rank, r in enumerate(ranked(results, args.modes[-1]), 1):
        ratio, verdict = ratios(r), goal_verdicts(r)
        met = sum(verdict[k].startswith('met') for k in keys)
        compile_s = r['compiled']['compile_s'] if compiled else {}
        lines.append(f"| {rank} | {r['name']} | {r['finest_stride']} | "
                     + ' | '.join(f"{ratio[k]:.2f}x" if k != 'saved' else f"{ratio[k]:.0%}" for k in keys)
                     + (f" | {compile_s['trainer']:.0f} ({compile_s['stock']:.0f})" if compiled else '') + ' | '
                     + (f"{met} of {len(keys)}" if counts(r) else f"n/a: decodes from stride {r['finest_stride']}")
                     + ' |')
    lines += ['', '## Each goal', '', '| trainer | ' + ' | '.join(keys) + ' |', '|---|' + '---|' * len(keys)]
    for r in ranked(results, args.modes[-1]):
        lines.append(f"| {r['name']} | " + ' | '.join(goal_verdicts(r)[k] for k in keys) + ' |')
    lines += ['', '## Measured', '', '| trainer | mode | step (stock) | prediction (stock) |', '|---|---|---:|---:|']
    for r in results:
        for mode in args.modes:
            t = r[mode]
            lines.append(f"| {r['name']} | {mode} | {t['step_ms']['trainer']:.0f} ms ({t['step_ms']['stock']:.0f}) | "
                         f"{t['predict_ms']['trainer']:.1f} ms ({t['predict_ms']['stock']:.1f}) |")
    lines += ['', 'Saved activations per sample: ' + ', '.join(
        f"{r['name']} {r['saved_mib']['trainer']:.0f} MiB" for r in results)
        + f" (stock nnU-Net {results[0]['saved_mib']['stock']:.0f} MiB).", '']
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plans_options(parser)
    parser.add_argument('--trainers', nargs='+', default=DEFAULT_TRAINERS)
    parser.add_argument('--batch', type=int, default=8, help='training batch (default 8)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=2, help='CPU threads (default 2)')
    parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES),
                        help='eager, compiled (torch.compile; minutes per pair on 2 cores), or both (default)')
    add_republish_option(parser)
    add_output_options(parser, 'against_stock')
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if answer_worker(args, measure):
        return 0
    if args.republish:
        republish(args, report, 'trainers')
        return 0
    env = start_plans_benchmark('benchmarks/against_stock.py', parser, args)
    info = machine()

    def publish(results: List[dict]) -> None:
        payload = {'machine': info, 'settings': {k: v for k, v in vars(args).items() if k != 'worker'},
                   'trainers': results}
        write_results(args.name, payload, report(results, args, info), args.out)

    with tempfile.TemporaryDirectory(prefix='against-stock-') as tmp:
        spec = dict(plans=plans_at_patch(args.plans, args.configuration, args.batch, args.patch_size, tmp),
                    configuration=args.configuration, batch=args.batch, repeats=args.repeats, threads=args.threads,
                    modes=args.modes)
        measure_trainers(__file__, args.trainers, spec, env, tmp, publish)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
