"""The cost benchmark runs end to end on a tiny plan, so it cannot rot; the accuracy benchmark's HD95 is right;
reports name the commands that reproduce them; the README lists every report."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import readme_text
from nnunet_emcad.benchmarking import malloc_note
from nnunet_emcad.scripts import nnunet_env
from test_trainers import DATASET_JSON, make_plans

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')


def test_cost_benchmark_on_a_tiny_plan(tmp_path):
    plans_dir = tmp_path / 'Dataset999_Plans'
    plans_dir.mkdir()
    plans = make_plans(5, [64, 64])
    del plans['continue_training']
    (plans_dir / 'nnUNetPlans.json').write_text(json.dumps(plans))
    (plans_dir / 'dataset.json').write_text(json.dumps(DATASET_JSON))
    trainers = ['nnUNetTrainer', 'nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_PVTb0']
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, 'cost.py'), '--plans',
                           str(plans_dir / 'nnUNetPlans.json'), '--trainers', *trainers, '--repeats', '2',
                           '--warmup', '1', '--train-batch', '2', '--train-repeats', '1', '--device', 'cpu',
                           '--out', str(tmp_path / 'results')], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / 'results' / 'cost.json').read_text())
    rows = {r['name']: r for r in result['networks']}
    assert list(rows) == trainers
    for row in rows.values():
        assert row['params']['total'] == sum(row['params'][k] for k in ('encoder', 'decoder', 'heads'))
        assert row['flops']['total'] >= row['flops']['encoder'] + row['flops']['decoder'] > 0
        assert row['latency_ms']['fp32'] > 0 and row['train_step_ms'] > 0 and row['saved_mib_per_sample'] > 0
        assert row['latency_ms']['fp32_paired'] > 0 and row['latency_ms']['stock_fp32_paired'] > 0
    assert rows['nnUNetTrainerEMCAD']['params']['encoder'] == rows['nnUNetTrainer']['params']['encoder']
    assert rows['nnUNetTrainerEMCAD']['macs']['decoder'] < rows['nnUNetTrainer']['macs']['decoder']
    report = (tmp_path / 'results' / 'cost.md').read_text()
    assert 'Goals against stock nnU-Net' in report and 'EMCAD-B2' in report
    b0 = rows['nnUNetTrainerEMCAD_PVTb0']['latency_ms']
    in_turn = f"{b0['stock_fp32_paired'] / b0['fp32_paired']:.2f}x"
    assert any(line.startswith('| nnUNetTrainerEMCAD_PVTb0 |') and f'| {in_turn} |' in line
               for line in report.splitlines()), in_turn
    assert f"CPU threads; glibc malloc keeps freed memory (MALLOC_MMAP_THRESHOLD_={2 ** 31}" in report
    assert result['settings']['malloc'].startswith('glibc malloc keeps freed memory')
    from benchmarks.cost import build_parser

    command = next(line for line in report.splitlines() if line.startswith('Reproduce: '))
    words = command[len('Reproduce: `'):-1].split()
    assert words[:2] == ['python', 'benchmarks/cost.py'] and '--out' not in words
    again = vars(build_parser().parse_args(words[2:] + ['--out', str(tmp_path / 'results')]))
    derived = ('command', 'malloc')  # set by the benchmark, not options
    assert again == {k: v for k, v in result['settings'].items() if k not in derived} | {'worker': None}


def test_cost_report_shows_the_cuda_measurements_when_a_gpu_measured_them():
    from benchmarks.cost import build_parser, report

    def row(name: str, scale: int) -> dict:
        parts = {'encoder': 10 * scale, 'decoder': 4 * scale, 'heads': scale}
        return {'name': name, 'trainer': name, 'network': 'Net', 'patch_size': [64, 64],
                'params': dict(parts, total=15 * scale), 'macs': dict(parts, total=15 * scale),
                'flops': {k: 2 * v for k, v in dict(parts, total=15 * scale).items()},
                'latency_ms': {'fp32': 10.0 * scale, 'amp': 1.5 * scale, 'amp_compiled': 1.25 * scale,
                               'fp32_paired': 12.0 * scale, 'stock_fp32_paired': 36.0},
                'train_step_ms': 100.0 * scale, 'cuda_train_step_ms': 20.0 * scale, 'saved_mib_per_sample': 50.0 * scale,
                'peak_cuda_train_mb': 300.0 * scale, 'peak_rss_after_train_step_mb': 1000.0}

    args = build_parser().parse_args(['--plans', '/data/nnUNetPlans.json', '--trainers', 'nnUNetTrainer',
                                      'nnUNetTrainerEMCAD'])
    args.command, args.malloc = 'python benchmarks/cost.py', 'glibc malloc at its defaults'
    info = {'cpu': 'CPU', 'cores': '2', 'gpu': 'Some GPU', 'torch': '2'}
    text = report([row('nnUNetTrainer', 4), row('nnUNetTrainerEMCAD', 1)], [], args, info)
    assert 'On Some GPU: latency at batch 1 under AMP' in text
    assert '| nnUNetTrainer | 6.00 ms | 5.00 ms | 80 ms | 1200 MB |' in text
    assert '| nnUNetTrainerEMCAD | 1.50 ms | 1.25 ms | 20 ms | 300 MB |' in text
    assert '| nnUNetTrainerEMCAD | 25.0% (missed) | 25.0% (missed) | 4.00x (met) | 3.00x | 0.25x | 25% (met) |' in text
    assert '| 0.40 s | 200 MiB | 1000 MB |' in text and '| 0.10 s | 50 MiB | 1000 MB |' in text
    assert 'under torch.compile (inductor)' not in text  # measured only with --cpu-compile
    compiled = [row('nnUNetTrainer', 4), row('nnUNetTrainerEMCAD', 1)]
    for r, (ms, seconds) in zip(compiled, ((30.0, 20.0), (15.0, 35.0))):
        r['latency_ms'].update(fp32_compiled=ms, fp32_compile_s=seconds)
    text = report(compiled, [], args, info)
    assert 'CPU inference under torch.compile (inductor), as `nnUNet_compile=1 nnUNetv2_predict` runs it' in text
    assert '| nnUNetTrainer | 40 ms | 30 ms | 20 s | 1.00x | 1.33x |' in text
    assert '| nnUNetTrainerEMCAD | 10 ms | 15 ms | 35 s | 2.00x | 2.67x |' in text
    help_text = subprocess.run([sys.executable, os.path.join(BENCHMARKS, 'cost.py'), '--help'],
                               capture_output=True, text=True).stdout
    assert 'Cost at a plan' in help_text and '--train-batch' in help_text


def test_hd95_measures_surface_distance_in_physical_units():
    from benchmarks.accuracy import hd95

    reference = np.zeros((1, 40, 40), dtype=bool)
    reference[0, 10:20, 10:20] = True
    shifted = np.roll(reference, 3, axis=2)
    assert hd95(reference, reference, [999.0, 1.0, 1.0]) == 0
    assert hd95(reference, shifted, [999.0, 1.0, 1.0]) == pytest.approx(3.0)
    assert hd95(reference, shifted, [999.0, 1.0, 2.5]) == pytest.approx(7.5)
    volume = np.zeros((6, 30, 30), dtype=bool)
    volume[1:5, 5:15, 5:15] = True
    assert hd95(volume, np.roll(volume, 1, axis=0), [5.0, 1.0, 1.0]) == pytest.approx(5.0)


@pytest.mark.parametrize('argv', [
    ['--dataset', 'isbi', '--iterations', '40', '--iterations-per-epoch', '20', '--batch-size', '2',
     '--trainers', 'nnUNetTrainer', 'nnUNetTrainerEMCAD_PVTb0'],
    ['--configuration', '3d_fullres', '--fold', '3', '--no-equal-time', '--val-iterations', '1'],
    ['--iterations', '500', '--name', 'accuracy_acdc_it500'],
])
def test_accuracy_report_names_the_command_that_reproduces_it(argv):
    from benchmarks.accuracy import command_line, default_trainers, parse_args

    args = parse_args(argv + ['--work', '/elsewhere'])
    words = command_line(args).split()
    assert words[:2] == ['python', 'benchmarks/accuracy.py']
    again = vars(parse_args(words[2:]))
    assert {k: v for k, v in again.items() if k != 'work'} == {k: v for k, v in vars(args).items() if k != 'work'}
    assert ('--trainers' in words) == (args.trainers != default_trainers(args.configuration))
    assert ('--name' in words) == ('--name' in argv)


def test_readme_results_list_every_report_cost_first(tmp_path):
    from benchmarks.update_readme import section

    for name in ('accuracy_isbi', 'cost_3d', 'accuracy_acdc_it500', 'cost', 'accuracy_acdc'):
        (tmp_path / f'{name}.md').write_text(f'# {name}\n\n![plot]({name}.png)\n')
    (tmp_path / 'cost.json').write_text('{}')
    text = section(str(tmp_path))
    sources = [line.split('benchmarks/results/')[1].split('.md')[0] for line in text.splitlines()
               if line.startswith('<!-- from ')]
    assert sources == ['cost', 'cost_3d', 'accuracy_acdc', 'accuracy_acdc_it500', 'accuracy_isbi']
    assert '### accuracy_isbi' in text and '](benchmarks/results/accuracy_isbi.png)' in text


@pytest.mark.parametrize('no_equal_time', [False, True])
def test_accuracy_report_says_which_equal_time_runs_are_missing(no_equal_time):
    from benchmarks.accuracy import parse_args, report

    def run(trainer: str, budget: str, dice: float, seconds: float) -> dict:
        return {'trainer': trainer, 'budget': budget, 'iterations': 50, 'train_seconds': 60.0,
                'dice_per_class': {'1': dice}, 'dice_mean': dice, 'predict_seconds': seconds, 'validation_cases': 4}

    trainers = ['nnUNetTrainer', 'nnUNetTrainerEMCAD_PVTb0', 'nnUNetTrainerEMCAD_PVTb2']
    args = parse_args(['--trainers', *trainers, '--iterations', '50'] + ['--no-equal-time'] * no_equal_time)
    results = [run(t, 'equal_iterations', d, s) for t, d, s in zip(trainers, (0.6, 0.5, 0.7), (30, 10, 40))]
    if not no_equal_time:
        results += [run('nnUNetTrainer', 'equal_time', 0.6, 30), run('nnUNetTrainerEMCAD_PVTb0', 'equal_time', 0.8, 10)]
    text = report(results, dict.fromkeys(trainers, 1.0), args, {'cpu': 'CPU', 'cores': '2', 'gpu': 'none'})
    assert '| nnUNetTrainerEMCAD_PVTb0 | -10.0 (missed) | ' + ('not run' if no_equal_time else '+20.0 (met)') \
        + ' | 3.00x (met) |' in text
    assert '| nnUNetTrainerEMCAD_PVTb2 | +10.0 (met) | not run | 0.75x (missed) |' in text
    assert ('Equal time not measured yet for nnUNetTrainerEMCAD_PVTb2:' in text) != no_equal_time
    assert ('not run (--no-equal-time)' in text) == no_equal_time
    assert 'device cpu; glibc malloc at its defaults. Budget:' in text  # runs from before the malloc settings


def test_accuracy_report_says_which_equal_iteration_runs_are_missing():
    from benchmarks.accuracy import parse_args, report

    args = parse_args(['--trainers', 'nnUNetTrainerEMCAD', 'nnUNetTrainer', '--iterations', '50', '--no-equal-time'])
    emcad = {'trainer': 'nnUNetTrainerEMCAD', 'budget': 'equal_iterations', 'iterations': 50, 'train_seconds': 60.0,
             'dice_per_class': {'1': 0.7}, 'dice_mean': 0.7, 'predict_seconds': 20.0, 'validation_cases': 4}
    text = report([emcad], {'nnUNetTrainerEMCAD': 1.0, 'nnUNetTrainer': 2.0}, args,
                  {'cpu': 'CPU', 'cores': '2', 'gpu': 'none'})
    assert '| nnUNetTrainerEMCAD | equal iterations | 50 |' in text
    assert 'Equal iterations not measured yet for nnUNetTrainer: the benchmark was stopped' in text
    assert '## Goals' not in text  # no stock run to compare with


def test_accuracy_report_says_how_glibc_malloc_was_set_in_its_runs():
    from benchmarks.accuracy import parse_args, report

    run = {'trainer': 'nnUNetTrainer', 'budget': 'equal_iterations', 'iterations': 50, 'train_seconds': 60.0,
           'dice_per_class': {'1': 0.5}, 'dice_mean': 0.5, 'predict_seconds': 9.0, 'validation_cases': 4,
           'malloc': malloc_note(nnunet_env('/tmp/unused'))}
    text = report([run], {'nnUNetTrainer': 1.0}, parse_args(['--trainers', 'nnUNetTrainer', '--no-equal-time']),
                  {'cpu': 'CPU', 'cores': '2', 'gpu': 'none'})
    assert f"device cpu; glibc malloc keeps freed memory (MALLOC_MMAP_THRESHOLD_={2 ** 31}, " \
           f"MALLOC_TRIM_THRESHOLD_={2 ** 31}). Budget:" in text


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_as_a_cpu_dry_run_with_the_readmes_trainers(tmp_path):
    # the README's way to price recomputing on the GPU
    trainers = re.search(r'`--trainers ([\w\s]+)` prices recomputing', readme_text()).group(1).split()
    plans_dir = tmp_path / 'Dataset999_Plans'
    plans_dir.mkdir()
    (plans_dir / 'nnUNetPlans.json').write_text(json.dumps(make_plans(3, [32, 32])))
    (plans_dir / 'dataset.json').write_text(json.dumps(DATASET_JSON))
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, 'gpu_check.py'), '--plans',
                           str(plans_dir / 'nnUNetPlans.json'), '--trainers', *trainers,
                           '--steps', '3', '--batch-size', '2', '--device', 'cpu', '--backend', 'aot_eager',
                           '--out', str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = json.loads((tmp_path / 'gpu.json').read_text())['runs']
    assert [r['trainer'] for r in runs] == ['nnUNetTrainer', 'nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_NoRecompute']
    for run in runs:
        assert run['verdict']['trains'] and run['verdict']['follows_eager']
        assert len(run['eager']['losses']) == len(run['compiled']['losses']) == 3
        assert run['eager']['inference_ms']['batch_1'] > 0 and 'inference_ms' not in run['compiled']
        assert run['eager']['inductor_channels_last'] is (run['trainer'] != 'nnUNetTrainer')
    report = (tmp_path / 'gpu.md').read_text()
    assert 'Every compiled trainer trained.' in report
    assert '`python benchmarks/gpu_check.py --plans' in report and '--backend aot_eager' in report


def _gpu_run(losses, skipped, step_ms, memory_mb, compiled, channels_last):
    return {'losses': losses, 'grads_finite': [True] * len(losses), 'skipped': skipped, 'params_changed': True,
            'first_step_ms': 65000.0 if compiled else 300.0, 'step_ms': step_ms, 'peak_memory_mb': memory_mb,
            'batch': 56, 'params': 12_600_000, 'inference_ms': {'batch_1': 13.0, 'batch_plan': 40.0},
            'inductor_channels_last': channels_last}


def test_gpu_check_report_compares_with_stock_and_names_trainers_that_do_not_train():
    from benchmarks.gpu_check import report, training_verdict

    rows = []
    for trainer, compiled_losses, skipped, step, memory, channels_last in (
            ('nnUNetTrainer', [1.47, 1.36], 0, 35.0, 5000.0, False),
            ('nnUNetTrainerEMCAD', [1.25, 1.25], 2, 17.5, 2500.0, True)):
        eager = _gpu_run([compiled_losses[0], compiled_losses[0] - 0.1], 0, 2 * step, memory, False, channels_last)
        compiled = _gpu_run(compiled_losses, skipped, step, memory, True, channels_last)
        rows.append({'trainer': trainer, 'configuration': '2d', 'eager': eager, 'compiled': compiled,
                     'verdict': training_verdict(eager, compiled)})
    settings = {'plans': 'nnUNetPlans.json', 'device': 'cuda', 'steps': 2, 'amp_dtype': 'float16',
                'command': 'python benchmarks/gpu_check.py'}
    text = report(rows, settings, {'gpu': 'NVIDIA H200', 'torch': '2.11.0'})
    stock, emcad = (next(line for line in text.splitlines() if line.startswith(f'| {t} |'))
                    for t in ('nnUNetTrainer', 'nnUNetTrainerEMCAD'))
    assert '| yes |' in stock and '| 1.00x | default |' in stock and '4.9 GB / 4.9 GB' in stock
    assert '| **no** |' in emcad and '| 0.50x | channels-last |' in emcad and '2 / 2' not in emcad and '0 / 2' in emcad
    assert 'Compiled trainers that do not train: nnUNetTrainerEMCAD.' in text and 'NVIDIA H200' in text


def test_gpu_check_writes_its_report_after_every_trainer_naming_those_still_to_come(tmp_path):
    from benchmarks.gpu_check import save, training_verdict

    eager = _gpu_run([1.47, 1.37], 0, 70.0, 5000.0, False, False)
    compiled = _gpu_run([1.47, 1.36], 0, 35.0, 5000.0, True, False)
    rows = [{'trainer': 'nnUNetTrainer', 'configuration': '2d', 'eager': eager, 'compiled': compiled,
             'verdict': training_verdict(eager, compiled)}]
    settings = {'plans': 'nnUNetPlans.json', 'device': 'cuda', 'steps': 2, 'amp_dtype': 'float16',
                'command': 'python benchmarks/gpu_check.py', 'name': 'gpu', 'out': str(tmp_path),
                'trainers': ['nnUNetTrainer', 'nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_PVTb0']}
    save(rows, settings, {'gpu': 'NVIDIA H200', 'torch': '2.11.0'})
    text = (tmp_path / 'gpu.md').read_text()
    assert '| nnUNetTrainer | 2d |' in text
    assert 'Not measured yet when this was written: nnUNetTrainerEMCAD, nnUNetTrainerEMCAD_PVTb0.' in text
    assert [r['trainer'] for r in json.loads((tmp_path / 'gpu.json').read_text())['runs']] == ['nnUNetTrainer']
    save(rows + [dict(rows[0], trainer=t) for t in settings['trainers'][1:]], settings, {'gpu': 'H200', 'torch': ''})
    assert 'Not measured yet' not in (tmp_path / 'gpu.md').read_text()


def test_gpu_check_help_says_what_it_measures():
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, 'gpu_check.py'), '--help'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for promise in ('torch.compile', 'skipped steps', 'peak CUDA memory', 'inference latency', 'leaves out',
                    'Exits 1 when a compiled trainer does not train', 'channels-last'):
        assert promise in ' '.join(proc.stdout.split()), promise
