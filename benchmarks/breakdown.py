"""Where the time goes: stock nnU-Net's network and nnUNetTrainerEMCAD's, block by block and stride by stride.

Per trainer, in a process of its own, at a plan's patch (or at ``--patch-size`` through a plans copy with the
topology nnU-Net's planner gives that patch): the whole training step (the trainer's own loss with deep
supervision, and optimiser) and prediction's forward at batch 1, eager and, with ``--compiled``, under
``torch.compile`` (inductor on the CPU) with the seconds the first call took beyond a later one's (compiling,
which nnU-Net does at every start of every fold); then each block and decoder stage on its own
(``benchmarks.profiling``): forward, backward, prediction, each as a share of the whole, with the
operators it runs and the bytes they read and write (eager: a roofline-style estimate of its memory traffic).
Writes benchmarks/results/<name>.json and .md.

Default plans: nnU-Net's own 2D plans for ../shared/data/Dataset027_ACDC (planned once into benchmarks/.cache).
"""
import argparse
import os
import sys
import tempfile
from typing import Dict, List

import torch
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

if __package__ in (None, ''):  # run as python benchmarks/<name>.py: import benchmarks.* from the checkout's root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.harness import (STOCK, add_output_options, add_plans_options, add_republish_option, answer_worker,
                                machine, measure_trainers, plans_at_patch, republish, start_plans_benchmark,
                                write_results)
from benchmarks.profiling import STAGE, breakdown, build_trainer, first_call_s, median_ms, training_step

DEFAULT_TRAINERS = [STOCK, 'nnUNetTrainerEMCAD']
EMCAD_BLOCKS = ('EUCB', 'LGAG', 'CAB', 'SAB', 'MSCB')
STOCK_BLOCKS = ('transposed conv', 'conv stage')
BETWEEN = 'between blocks (products, sums)'


def _whole(step, predict, repeats: int) -> Dict[str, float]:
    """A training step's and prediction's median milliseconds, and the seconds their first calls took beyond."""
    first_step, first_predict = first_call_s(step), first_call_s(predict)
    timed = {'step_ms': median_ms(step, repeats, warmup=0), 'predict_ms': median_ms(predict, repeats, warmup=0)}
    timed['compile_s'] = max(0.0, first_step - timed['step_ms'] / 1000) + max(0.0, first_predict -
                                                                               timed['predict_ms'] / 1000)
    return timed


def measure(spec: dict) -> dict:
    """One trainer's network (runs in a worker process): the whole step and prediction, then block by block."""
    torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    trainer = build_trainer(spec['plans'], spec['trainer'], spec['configuration'])
    patch = list(trainer.configuration_manager.patch_size)
    channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager,
                                            trainer.dataset_json)
    classes = trainer.label_manager.num_segmentation_heads

    def build(deep_supervision: bool):
        return trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, channels,
                                                  classes, deep_supervision)

    net = build(False).eval()
    x = torch.randn(1, channels, *patch)
    result = {'name': spec['trainer'], 'patch_size': patch, 'batch': spec['batch'],
              'network': type(net).__name__}
    modes = [False, True] if spec['compiled'] else [False]
    for compiled in modes:  # compiled first thing after eager: an inductor cache no block has filled yet
        run = torch.compile(net) if compiled else net
        step = training_step(trainer, build(True), spec['batch'], channels, classes, compiled=compiled)
        timed = _whole(step, torch.no_grad()(lambda: run(x)), spec['repeats'])
        if not compiled:
            del timed['compile_s']
        result.update({f"{'compiled_' if compiled else ''}{k}": v for k, v in timed.items()})
        torch._dynamo.reset()
    result['rows'] = breakdown(build(True), torch.randn(spec['batch'], channels, *patch), spec['repeats'],
                               spec['compiled'])
    return result


def table_rows(result: dict) -> List[dict]:
    """A network's rows in report order: the encoder; per stride, finest last, the blocks, what runs between
    them in an EMCAD stage (the stage timed whole, less its blocks), the stage's recompute and the head; then
    the rest of the whole step (loss, optimiser, output interpolation; negative where the blocks timed alone,
    each compiled apart, took longer than they do in the whole)."""
    by_key = {(r['kind'], r['stride']): r for r in result['rows']}
    numbers = [k for k in result['rows'][0] if k not in ('kind', 'stride')]
    rows = [by_key[('encoder', 1)]]
    for stride in sorted({r['stride'] for r in result['rows'] if r['kind'] != 'encoder'}, reverse=True):
        blocks = [by_key[(kind, stride)] for kind in EMCAD_BLOCKS + STOCK_BLOCKS if (kind, stride) in by_key]
        rows += blocks
        if (STAGE, stride) in by_key:
            stage = by_key[(STAGE, stride)]
            rows.append(dict({k: stage.get(k, 0) - sum(b.get(k, 0) for b in blocks) for k in numbers},
                             kind=BETWEEN, stride=stride))
        rows += [by_key[(kind, stride)] for kind in ('recompute', 'projection', 'refinement', 'head')
                 if (kind, stride) in by_key]
    return rows


def _step_shares(row: dict, result: dict, prefix: str) -> str:
    """A row's training milliseconds (forward / backward) and share of the whole step, and its prediction's."""
    step, predict = result.get(f'{prefix}step_ms'), result.get(f'{prefix}predict_ms')
    fwd, bwd, pred = (row.get(f'{prefix}{k}', 0.0) for k in ('forward_ms', 'backward_ms', 'predict_ms'))
    return f"{fwd:.0f} / {bwd:.0f} | {(fwd + bwd) / step:.1%} | {pred:.1f} | {pred / predict:.1%}"


def _traffic(row: dict) -> str:
    fwd, bwd = row.get('bytes_forward', 0), row.get('bytes_backward', 0)
    flops = row.get('flops_forward', 0)
    intensity = f"{flops / fwd:.1f}" if fwd > 0 else ''
    return (f"{row.get('ops_forward', 0):.0f} / {row.get('ops_backward', 0):.0f} | {fwd / 2 ** 20:.0f} / "
            f"{bwd / 2 ** 20:.0f} | {flops / 1e9:.2f} | {intensity}")


def network_lines(result: dict, compiled: bool) -> List[str]:
    """A network's block-by-block table."""
    head = "| stride | block | eager fwd / bwd ms | share of step | prediction ms | share |"
    rule = '|---:|---|---:|---:|---:|---:|'
    if compiled:
        head += ' compiled fwd / bwd ms | share of step | prediction ms | share | compile s (alone) |'
        rule += '---:|---:|---:|---:|---:|'
    head += ' operators fwd / bwd | MiB moved fwd / bwd | forward GFLOP | forward FLOP/byte |'
    rule += '---:|---:|---:|---:|'
    lines = [head, rule]
    rows = table_rows(result)
    for row in rows:
        line = f"| {row['stride']} | {row['kind']} | {_step_shares(row, result, '')} |"
        if compiled:
            line += f" {_step_shares(row, result, 'compiled_')} | {row.get('compiled_compile_s', 0):.0f} |"
        lines.append(line + f" {_traffic(row)} |")
    line = '| | rest of the step (loss, optimiser, interpolation) |'
    for prefix in ('', 'compiled_') if compiled else ('',):
        step = result[f'{prefix}step_ms'] - sum(r.get(f'{prefix}forward_ms', 0) + r.get(f'{prefix}backward_ms', 0)
                                                for r in rows)
        predict = result[f'{prefix}predict_ms'] - sum(r.get(f'{prefix}predict_ms', 0) for r in rows)
        line += (f" {step:.0f} in all | {step / result[f'{prefix}step_ms']:.1%} | {predict:.1f} | "
                 f"{predict / result[f'{prefix}predict_ms']:.1%} |")
    line += ' |' if compiled else ''
    return lines + [line + ' | | | |']


def largest_lines(results: List[dict], compiled: bool, count: int = 5) -> List[str]:
    """Each network's ``count`` parts with the most eager training time, as shares of the whole step."""
    head = '| network | stride | part | training, eager | prediction, eager |'
    if compiled:
        head += ' training, compiled | prediction, compiled |'
    lines = [head, '|---|---:|---|' + '---:|' * (head.count('|') - 4)]
    for result in results:
        parts = sorted((r for r in table_rows(result) if r['kind'] != 'encoder'),
                       key=lambda r: -(r.get('forward_ms', 0) + r.get('backward_ms', 0)))[:count]
        for r in parts:
            cells = []
            for prefix in ('', 'compiled_') if compiled else ('',):
                train = r.get(f'{prefix}forward_ms', 0) + r.get(f'{prefix}backward_ms', 0)
                predict = r.get(f'{prefix}predict_ms', 0)
                cells += [f"{train:.0f} ms ({train / result[f'{prefix}step_ms']:.0%})",
                          f"{predict:.1f} ms ({predict / result[f'{prefix}predict_ms']:.0%})"]
            lines.append(f"| {result['name']} | {r['stride']} | {r['kind']} | " + ' | '.join(cells) + ' |')
    return lines


def stride_lines(results: List[dict], compiled: bool) -> List[str]:
    """Each network's decoder, stride by stride: training and prediction milliseconds and the traffic."""
    head = '| network | stride | training ms (fwd + bwd, eager) | prediction ms (eager) |'
    rule = '|---|---:|---:|---:|'
    if compiled:
        head += ' training ms (compiled) | prediction ms (compiled) |'
        rule += '---:|---:|'
    lines = [head + ' operators fwd + bwd | MiB moved fwd + bwd |', rule + '---:|---:|']
    for result in results:
        strides: Dict[int, Dict[str, float]] = {}
        for row in table_rows(result):
            if row['kind'] == 'encoder':
                continue
            total = strides.setdefault(row['stride'], {})
            for k, v in row.items():
                if k not in ('kind', 'stride'):
                    total[k] = total.get(k, 0) + v
        for stride, t in strides.items():
            line = (f"| {result['name']} | {stride} | {t.get('forward_ms', 0) + t.get('backward_ms', 0):.0f} | "
                    f"{t.get('predict_ms', 0):.1f} |")
            if compiled:
                line += (f" {t.get('compiled_forward_ms', 0) + t.get('compiled_backward_ms', 0):.0f} | "
                         f"{t.get('compiled_predict_ms', 0):.1f} |")
            lines.append(line + f" {t.get('ops_forward', 0) + t.get('ops_backward', 0):.0f} | "
                                f"{(t.get('bytes_forward', 0) + t.get('bytes_backward', 0)) / 2 ** 20:.0f} |")
    return lines


def report(results: List[dict], args: argparse.Namespace, info: Dict[str, str]) -> str:
    """The Markdown report."""
    patch = 'x'.join(map(str, results[0]['patch_size']))
    stock = next((r for r in results if r['name'] == STOCK), None)
    lines = [f"# Where the time goes: {', '.join(r['name'] for r in results)} at a {patch} patch", '',
             f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}; {args.threads} CPU threads; "
             f"{args.malloc}. Plans: {os.path.relpath(args.plans, os.getcwd())} ({args.configuration}"
             f"{', patch through a plans copy with the topology nnU-Net plans for it' if args.patch_size else ''}"
             f"). Training at batch {args.batch}, prediction at batch 1; medians of {args.repeats}.", '',
             f"Reproduce: `{args.command}`", '', '## The whole network', '']
    compiled = args.compiled
    head = '| network | training step eager | prediction eager | step vs stock | prediction speed vs stock |'
    if compiled:
        head += (' training step compiled | prediction compiled | compile s | step vs stock compiled | '
                 'prediction speed vs stock compiled |')
    lines += [head, '|---|' + '---:|' * (head.count('|') - 2)]
    for r in results:
        base = stock or r
        line = (f"| {r['name']} | {r['step_ms']:.0f} ms | {r['predict_ms']:.1f} ms | "
                f"{r['step_ms'] / base['step_ms']:.2f}x | {base['predict_ms'] / r['predict_ms']:.2f}x |")
        if compiled:
            line += (f" {r['compiled_step_ms']:.0f} ms | {r['compiled_predict_ms']:.1f} ms | "
                     f"{r['compiled_compile_s']:.0f} s | {r['compiled_step_ms'] / base['compiled_step_ms']:.2f}x | "
                     f"{base['compiled_predict_ms'] / r['compiled_predict_ms']:.2f}x |")
        lines.append(line)
    lines += ['', "Whole-network numbers run the network as nnU-Net does (with stock nnU-Net's own network "
              "measured in the same run); compile s: the first compiled training step's and prediction's "
              "seconds beyond a later one's, from an empty inductor cache. The tables below time each part alone "
              "on the inputs it gets in that network's training forward pass.", '',
              "## The decoder's largest parts", '', 'Training: forward + backward (recompute: the forward again), '
              'with its share of the whole training step; prediction: with its share of the whole prediction.', '',
              *largest_lines(results, compiled), '', '## The decoder stride by stride', '',
              *stride_lines(results, compiled)]
    for r in results:
        lines += ['', f"## {r['name']} ({r['network']}), block by block", '', *network_lines(r, compiled)]
    lines += ['', "Each part is timed alone (benchmarks.profiling): forward, and backward as forward + backward "
              "less forward, on copies of the inputs it got; prediction on the first sample in eval mode without "
              "autograd. An EMCAD stage is timed whole too: 'between blocks' is the stage less its blocks (the "
              "attention products and the skip sum; compiled, also what fusing the blocks together saves). "
              "'recompute' is the forward of a stage that runs again in backward. Compiled, each part is "
              "compiled on its own ('compile s (alone)'). Operators: the aten operators run (views left out); "
              "MiB moved: the bytes they read and write, each operator's inputs and outputs in full, as eager "
              "execution moves them; FLOP/byte: forward FLOPs per forward byte (torch.utils.flop_counter).", '']
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plans_options(parser)
    parser.add_argument('--trainers', nargs='+', default=DEFAULT_TRAINERS)
    parser.add_argument('--batch', type=int, default=8, help='training batch (default 8)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2, help='CPU threads (default 2)')
    parser.add_argument('--compiled', action='store_true',
                        help='also under torch.compile (inductor compiles the whole network and every part: '
                             'minutes per network on 2 cores)')
    add_republish_option(parser)
    add_output_options(parser, 'breakdown')
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if answer_worker(args, measure):
        return 0
    if args.republish:
        republish(args, report, 'networks')
        return 0
    env = start_plans_benchmark('benchmarks/breakdown.py', parser, args)
    with tempfile.TemporaryDirectory(prefix='breakdown-') as tmp:
        spec = dict(plans=plans_at_patch(args.plans, args.configuration, args.batch, args.patch_size, tmp),
                    configuration=args.configuration, batch=args.batch, repeats=args.repeats, threads=args.threads,
                    compiled=args.compiled)
        results = measure_trainers(__file__, args.trainers, spec, env, tmp)
    info = machine()
    payload = {'machine': info, 'settings': {k: v for k, v in vars(args).items() if k != 'worker'},
               'networks': results}
    write_results(args.name, payload, report(results, args, info), args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
