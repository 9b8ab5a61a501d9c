"""Cost at a plan's own patch: stock nnU-Net against every EMCAD trainer, each built by its trainer.

Per network and part (encoder / decoder / heads): parameters, multiply-adds and FLOPs (torch.utils.flop_counter,
FLOPs = 2 x multiply-adds), inference latency at batch 1 (median after warm-up, fixed thread count; on the CPU
also in turn with stock nnU-Net's network in the same process, which keeps drifts of the machine's speed out of
the ratio), one training step (forward, the trainer's own loss with deep supervision, backward, the trainer's
own optimiser) at a stated batch size, the activation bytes per sample a training forward pass keeps for
backward, and peak memory. Every network is measured in its own process. On CUDA (when present) latency uses
CUDA events under AMP, with and without torch.compile; the CPU is measured always.
Writes benchmarks/results/<name>.json and .md.

Default plans: nnU-Net's own 2D plans for ../shared/data/Dataset027_ACDC (planned once into benchmarks/.cache).
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Dict, List

if __package__ in (None, ''):  # run as python benchmarks/<name>.py: import benchmarks.* from the checkout's root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.harness import (COST_ONLY_TRAINERS, EMCAD_TRAINERS, STOCK, WorkerFailed, acdc_plans, add_output_options,
                                answer_worker, machine, malloc_note, reproduce_command, run_worker, verdict, worker_env,
                                write_results)
from benchmarks.profiling import build_trainer, training_step
from nnunet_emcad.model.counting import (flop_breakdown, paper_fidelity, paper_table, parameter_breakdown,
                                         saved_activation_bytes)

GOAL_DECODER_PARAMS = 0.10
GOAL_DECODER_MACS = 0.20
GOAL_SPEEDUP = 2.0
GOAL_SAVED = 1.0


def _median_ms(fn, warmup: int, repeats: int, cuda: bool) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _counts(spec: dict, net, channels: int, patch: List[int]) -> dict:
    """Parameters, FLOPs and multiply-adds per part of the inference network."""
    import torch

    result = {'name': spec['name'], 'trainer': spec['trainer'], 'patch_size': patch,
              'network': type(net).__name__ + (f" ({type(net.encoder).__name__})" if hasattr(net, 'encoder') else ''),
              'params': parameter_breakdown(net), 'flops': flop_breakdown(net, torch.randn(1, channels, *patch))}
    result['macs'] = {k: v // 2 for k, v in result['flops'].items()}
    return result


def _latency(spec: dict, net, x) -> Dict[str, float]:
    """Median inference latency at batch 1: fp32 on the CPU; AMP with and without torch.compile on CUDA."""
    import torch

    with torch.no_grad():
        if x.device.type == 'cpu':
            return {'fp32': _median_ms(lambda: net(x), spec['warmup'], spec['repeats'], False)}
        with torch.autocast('cuda', dtype=torch.float16):
            compiled = torch.compile(net)
            return {'amp': _median_ms(lambda: net(x), spec['warmup'], spec['repeats'], True),
                    'amp_compiled': _median_ms(lambda: compiled(x), spec['warmup'] + 2, spec['repeats'], True)}


def _paired_cpu_latency(spec: dict, net, stock_net, x) -> Dict[str, float]:
    """Median CPU latencies at batch 1 of ``net`` and stock's network, run in turn in this process (3 x repeats
    each, the order swapped every round), so that drifts in the machine's speed hit both alike."""
    import torch

    times: Dict[str, List[float]] = {'fp32_paired': [], 'stock_fp32_paired': []}
    pair = [('fp32_paired', net), ('stock_fp32_paired', stock_net)]
    with torch.no_grad():
        for _, network in pair * spec['warmup']:
            network(x)
        for i in range(3 * spec['repeats']):
            for key, network in pair if i % 2 else pair[::-1]:
                t0 = time.perf_counter()
                network(x)
                times[key].append((time.perf_counter() - t0) * 1000)
    return {key: statistics.median(values) for key, values in times.items()}


def _cpu_compiled_latency(spec: dict, net, x) -> Dict[str, float]:
    """Median CPU inference latency at batch 1 under torch.compile (fp32), and the first call's seconds."""
    import torch

    compiled = torch.compile(net)
    start = time.perf_counter()
    compiled(x)
    return {'fp32_compile_s': time.perf_counter() - start,
            'fp32_compiled': _median_ms(lambda: compiled(x), spec['warmup'], spec['repeats'], False)}


def measure(spec: dict) -> dict:
    """Measure one network (runs in a worker process): counts, latency, a training step, peak memory."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    trainer = build_trainer(spec['plans'], spec['trainer'], spec['configuration'], spec['device'])
    device = trainer.device
    patch = list(trainer.configuration_manager.patch_size)
    channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager,
                                            trainer.dataset_json)
    classes = trainer.label_manager.num_segmentation_heads

    def build(deep_supervision: bool, of=trainer):
        return of.build_network_architecture(of.plans_manager, of.configuration_manager, channels, classes,
                                             deep_supervision)

    net = build(False).eval()
    result = _counts(spec, net, channels, patch)
    net = net.to(device)
    result['latency_ms'] = _latency(spec, net, torch.randn(1, channels, *patch, device=device))
    if device.type == 'cpu':
        is_stock = spec['trainer'] == STOCK and spec['plans'] == spec['stock_plans']
        stock = build_trainer(spec['stock_plans'], STOCK, spec['configuration'], spec['device'])
        stock_net = net if is_stock else build(False, stock).eval()
        result['latency_ms'].update(_paired_cpu_latency(spec, net, stock_net, torch.randn(1, channels, *patch)))
        del stock, stock_net
    result['peak_rss_after_inference_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    result['train_batch'] = spec['train_batch']
    step = training_step(trainer, build(True), spec['train_batch'], channels, classes)
    result['saved_mib_per_sample'] = saved_activation_bytes(
        trainer.network, torch.randn(1, channels, *patch, device=device)) / 2 ** 20
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    result['train_step_ms'] = _median_ms(step, 1, spec['train_repeats'], device.type == 'cuda')
    result['peak_rss_after_train_step_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == 'cuda':
        result['peak_cuda_train_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    if spec['cpu_compile'] and device.type == 'cpu':  # last: compiling leaves worker processes and memory behind
        with torch.no_grad():
            result['latency_ms'].update(_cpu_compiled_latency(spec, net, torch.randn(1, channels, *patch)))
    return result


def _fmt(n: float, unit: str = '') -> str:
    for div, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def report(rows: List[dict], fidelity: List[dict], args: argparse.Namespace, info: Dict[str, str]) -> str:
    """The Markdown report, goals included."""
    stock = next((r for r in rows if r['name'] == STOCK), None)
    lines = [f"# Cost at the plan's patch ({os.path.relpath(args.plans, os.getcwd())}, configuration "
             f"{args.configuration})", '',
             f"Machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}; torch {info['torch']}; "
             f"{args.threads} CPU threads; {args.malloc}. Latency: batch 1, median of {args.repeats} runs after "
             f"{args.warmup} warm-up runs; in turn with stock: the network and stock nnU-Net's (on these plans) "
             f"run alternately in one process, median of {3 * args.repeats} runs each, so that drifts in the "
             f"machine's speed hit both alike. Training step: batch {args.train_batch}, the trainer's own loss (deep "
             f"supervision on) and optimiser, median of {args.train_repeats}. MACs = multiply-adds = FLOPs / 2 "
             f"(torch.utils.flop_counter). Saved activations: bytes the forward pass of training (train mode, deep "
             f"supervision on, float32) keeps for backward, per sample, each storage once, parameters left out "
             f"(counting.saved_activation_bytes; it tracks peak training memory on a GPU). Peak RSS is the whole "
             f"worker process's high-water mark.", '',
             f"Reproduce: `{args.command}`", '',
             '| network | trainer | patch | params (enc / dec / heads) | MACs (enc / dec / heads) | GFLOPs | '
             'CPU latency | train step | saved activations | peak RSS |', '|---|---|---|---|---|---:|---:|---:|---:|---:|']
    for r in rows:
        p, m = r['params'], r['macs']
        lines.append(f"| {r['network']} | {r['trainer']} | {'x'.join(map(str, r['patch_size']))} | "
                     f"{_fmt(p['total'])} ({_fmt(p['encoder'])} / {_fmt(p['decoder'])} / {_fmt(p['heads'])}) | "
                     f"{_fmt(m['total'])} ({_fmt(m['encoder'])} / {_fmt(m['decoder'])} / {_fmt(m['heads'])}) | "
                     f"{r['flops']['total'] / 1e9:.2f} | {r['latency_ms'].get('fp32', float('nan')):.0f} ms | "
                     f"{r['train_step_ms'] / 1000:.2f} s | {r['saved_mib_per_sample']:.0f} MiB | "
                     f"{r['peak_rss_after_train_step_mb']:.0f} MB |")
    if any('amp' in r['latency_ms'] for r in rows):
        lines += ['', f"On {info['gpu']}: latency at batch 1 under AMP (float16 autocast), CUDA events; the training "
                  f"step at batch {args.train_batch} under AMP.", '',
                  '| network | CUDA AMP latency | AMP + torch.compile | train step (AMP) | peak CUDA memory (train step) |',
                  '|---|---:|---:|---:|---:|']
        lines += [f"| {r['name']} | {r['latency_ms']['amp']:.2f} ms | {r['latency_ms']['amp_compiled']:.2f} ms | "
                  f"{r['cuda_train_step_ms']:.0f} ms | {r['peak_cuda_train_mb']:.0f} MB |"
                  for r in rows if 'amp' in r['latency_ms']]
    if any('fp32_compiled' in r['latency_ms'] for r in rows):
        lines += ['', "CPU inference under torch.compile (inductor), as `nnUNet_compile=1 nnUNetv2_predict` runs it: "
                  "latency at batch 1 (float32), the first call's compile time (an empty inductor cache; later "
                  "runs reuse it), and speed against stock nnU-Net compiled and eager.", '',
                  '| trainer | eager | compiled | compile time | speed vs stock compiled | speed vs stock eager |',
                  '|---|---:|---:|---:|---:|---:|']
        base = stock['latency_ms'] if stock is not None else {}
        for r in rows:
            lat = r['latency_ms']
            lines.append(f"| {r['name']} | {lat['fp32']:.0f} ms | {lat['fp32_compiled']:.0f} ms | "
                         f"{lat['fp32_compile_s']:.0f} s | "
                         f"{base.get('fp32_compiled', float('nan')) / lat['fp32_compiled']:.2f}x | "
                         f"{base.get('fp32', float('nan')) / lat['fp32_compiled']:.2f}x |")
    if stock is not None:
        lines += ['', f"## Goals against stock nnU-Net ({stock['network']})", '',
                  f"| trainer | decoder params vs stock (goal <= {GOAL_DECODER_PARAMS:.0%}) | decoder MACs vs stock "
                  f"(goal <= {GOAL_DECODER_MACS:.0%}) | CPU inference speed-up (goal >= {GOAL_SPEEDUP:.0f}x) | "
                  f"CPU inference speed-up, in turn with stock | CPU train step vs stock | saved activations vs "
                  f"stock (goal <= {GOAL_SAVED:.0%}) |",
                  '|---|---:|---:|---:|---:|---:|---:|']
        for r in rows:
            if r is stock:
                continue
            dp = r['params']['decoder'] / stock['params']['decoder']
            dm = r['macs']['decoder'] / stock['macs']['decoder']
            sp = stock['latency_ms'].get('fp32', float('nan')) / r['latency_ms'].get('fp32', float('nan'))
            paired = r['latency_ms'].get('stock_fp32_paired', float('nan')) / r['latency_ms'].get('fp32_paired',
                                                                                                  float('nan'))
            st = r['train_step_ms'] / stock['train_step_ms']
            sa = r['saved_mib_per_sample'] / stock['saved_mib_per_sample']
            lines.append(f"| {r['name']} | {dp:.1%} ({verdict(dp <= GOAL_DECODER_PARAMS)}) | "
                         f"{dm:.1%} ({verdict(dm <= GOAL_DECODER_MACS)}) | "
                         f"{sp:.2f}x ({verdict(sp >= GOAL_SPEEDUP)}) | {paired:.2f}x | {st:.2f}x | "
                         f"{sa:.0%} ({verdict(sa <= GOAL_SAVED)}) |")
    lines += ['', '## Fidelity: our EMCAD decoders at 224x224 (3 channels, 9 classes) next to the paper', '',
              *paper_table(fidelity)]
    lines += ['', 'Our decoder MACs count the convolutions of CAB, SAB, LGAG, MSCB and EUCB; the paper\'s tool '
              'presumably also counted normalisation, activation or upsampling.', '']
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--plans', help='nnUNetPlans.json (dataset.json beside it); default: ACDC from ../shared')
    parser.add_argument('--resenc-plans', help='ResEnc plans for the stock ResEnc row; default: ACDC ResEnc M')
    parser.add_argument('--configuration', default='2d')
    parser.add_argument('--trainers', nargs='+', default=[STOCK] + EMCAD_TRAINERS + COST_ONLY_TRAINERS)
    parser.add_argument('--threads', type=int, default=2, help='CPU threads (default 2)')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--train-batch', type=int, default=8)
    parser.add_argument('--train-repeats', type=int, default=3)
    parser.add_argument('--device', choices=['cpu', 'cuda', 'auto'], default='auto')
    parser.add_argument('--cpu-compile', action='store_true',
                        help='also measure CPU inference under torch.compile (inductor compiles each network '
                             'with the C++ compiler: tens of seconds per network on 2 cores)')
    parser.add_argument('--glibc-malloc-defaults', action='store_true',
                        help="measure a 2D configuration under glibc malloc's own defaults instead of "
                             "nnunet_emcad.command.scripts.MALLOC_SETTINGS (which nnU-Net's commands get from this "
                             "project's scripts for 2D; 3D is measured under glibc's defaults)")
    add_output_options(parser, 'cost')
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if answer_worker(args, measure):
        return 0
    args.command = reproduce_command('benchmarks/cost.py', parser, args, leave_out=('out', 'worker'))

    import torch

    if args.plans is None:
        plans = acdc_plans()
        args.plans, args.resenc_plans = plans['default'], args.resenc_plans or plans['resenc_m']
    args.plans = os.path.abspath(args.plans)
    devices = ['cpu'] + (['cuda'] if args.device != 'cpu' and torch.cuda.is_available() else [])
    jobs = [(t, t, args.plans) for t in args.trainers]
    if args.resenc_plans:
        jobs.insert(1, (f'{STOCK} (ResEnc M plans)', STOCK, os.path.abspath(args.resenc_plans)))
    env = worker_env(args.configuration, args.glibc_malloc_defaults)
    args.malloc = malloc_note(env)
    rows = []
    for name, trainer, plans_file in jobs:
        row = None
        for device in devices:
            spec = dict(name=name, trainer=trainer, plans=plans_file, configuration=args.configuration,
                        stock_plans=args.plans, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                        device=device, cpu_compile=args.cpu_compile, train_batch=args.train_batch,
                        train_repeats=args.train_repeats)
            print(f"measuring {name} on {device} ...", flush=True)
            # an empty inductor cache for each network: compile times are those of a first compiled run
            with tempfile.TemporaryDirectory(prefix='inductor-cache-') as cache:
                try:
                    measured = run_worker(__file__, spec, dict(env, TORCHINDUCTOR_CACHE_DIR=cache))
                except WorkerFailed as e:
                    raise RuntimeError(f"measuring {name} failed:\n{e}") from e
            if row is None:
                row = measured
            else:
                row['latency_ms'].update(measured['latency_ms'])
                row['peak_cuda_train_mb'] = measured['peak_cuda_train_mb']
                row['cuda_train_step_ms'] = measured['train_step_ms']
        rows.append(row)
        print(f"  {row['network']}: {row['params']['total']:,} params, {row['flops']['total'] / 1e9:.2f} GFLOPs, "
              f"{row['latency_ms'].get('fp32', float('nan')):.0f} ms, train step {row['train_step_ms'] / 1000:.2f} s",
              flush=True)
    info = machine()
    fidelity = paper_fidelity()
    payload = {'machine': info, 'settings': {k: v for k, v in vars(args).items() if k != 'worker'},
               'networks': rows, 'fidelity_224': fidelity}
    write_results(args.name, payload, report(rows, fidelity, args, info), args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
