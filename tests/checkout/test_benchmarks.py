"""The cost benchmark runs end to end on a tiny plan, so it cannot rot; the accuracy benchmark's HD95 is right;
reports name the commands that reproduce them; the README lists every report."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import warm_commands
from helpers import doc_text
from benchmarks.accuracy import (command_line, constant_dice, default_trainers, equal_time_iterations, hd95,
                                 parse_args, point_plots, predict_in_process, report, _run_folder, step_seconds,
                                 trainer_settings)
from benchmarks.harness import malloc_note
from benchmarks.source_tree import BENCHMARKS, readme_text
from nnunet_emcad.command.scripts import nnunet_env
from tiny_plans import DATASET_JSON, make_plans



def _tiny_plans_file(tmp_path) -> str:
    """A 2D nnUNetPlans.json of 5 stages at 64x64, with its dataset.json beside it."""
    plans_dir = tmp_path / 'Dataset999_Plans'
    plans_dir.mkdir()
    plans = make_plans(5, [64, 64])
    del plans['continue_training']
    (plans_dir / 'nnUNetPlans.json').write_text(json.dumps(plans))
    (plans_dir / 'dataset.json').write_text(json.dumps(DATASET_JSON))
    return str(plans_dir / 'nnUNetPlans.json')


def test_cost_benchmark_on_a_tiny_plan(tmp_path):
    plans_file = _tiny_plans_file(tmp_path)
    trainers = ['nnUNetTrainer', 'nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_PVTb0']
    proc = warm_commands.run([sys.executable, os.path.join(BENCHMARKS, 'cost.py'), '--plans',
                              plans_file, '--trainers', *trainers, '--repeats', '2',
                              '--warmup', '1', '--train-batch', '2', '--train-repeats', '1', '--device', 'cpu',
                              '--out', str(tmp_path / 'results')], timeout=600, stderr=subprocess.PIPE)
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


def test_the_breakdown_benchmark_times_stock_and_emcad_part_by_part_at_a_patch_of_its_own(tmp_path):
    plans_file = _tiny_plans_file(tmp_path)
    # the full-resolution decoder: stages at every stride, three of them run again in backward
    proc = warm_commands.run([sys.executable, os.path.join(BENCHMARKS, 'breakdown.py'), '--plans', plans_file,
                              '--trainers', 'nnUNetTrainer', 'nnUNetTrainerEMCAD_Stride1', '--patch-size', '32', '32',
                              '--batch', '2', '--repeats', '1', '--out', str(tmp_path / 'results')],
                             timeout=600, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / 'results' / 'breakdown.json').read_text())
    stock, emcad = result['networks']
    assert (stock['name'], emcad['name']) == ('nnUNetTrainer', 'nnUNetTrainerEMCAD_Stride1')
    for network, heads in ((stock, {1, 2, 4}), (emcad, {1, 2, 4, 8})):  # 4 stages at 32x32
        assert network['patch_size'] == [32, 32] and network['step_ms'] > 0 and network['predict_ms'] > 0
        assert {r['stride'] for r in network['rows'] if r['kind'] == 'head'} == heads
    assert {r['kind'] for r in emcad['rows']} == {'encoder', 'EUCB', 'LGAG', 'CAB', 'SAB', 'MSCB', 'stage',
                                                  'recompute', 'head'}
    report = (tmp_path / 'results' / 'breakdown.md').read_text()
    assert '# Where the time goes: nnUNetTrainer, nnUNetTrainerEMCAD_Stride1 at a 32x32 patch' in report
    ratio = f"{emcad['step_ms'] / stock['step_ms']:.2f}x"
    assert any(line.startswith('| nnUNetTrainerEMCAD_Stride1 |') and f'| {ratio} |' in line
               for line in report.splitlines())
    mscb = next(r for r in emcad['rows'] if (r['kind'], r['stride']) == ('MSCB', 1))
    share = f"{(mscb['forward_ms'] + mscb['backward_ms']) / emcad['step_ms']:.1%}"
    assert any(line.startswith('| 1 | MSCB |') and f'| {share} |' in line for line in report.splitlines())
    from benchmarks.breakdown import build_parser, table_rows

    assert report.count('| | rest of the step') == 2 and 'between blocks (products, sums)' in report
    largest = report.split("## The decoder's largest parts")[1].split('## ')[0]
    first = next(line for line in largest.splitlines() if line.startswith('| nnUNetTrainerEMCAD_Stride1 |'))
    costliest = max((r for r in table_rows(emcad) if r['kind'] != 'encoder'),
                    key=lambda r: r.get('forward_ms', 0) + r.get('backward_ms', 0))
    assert first.startswith(f"| nnUNetTrainerEMCAD_Stride1 | {costliest['stride']} | {costliest['kind']} |")
    (tmp_path / 'results' / 'breakdown.md').write_text('')
    assert warm_commands.run([sys.executable, os.path.join(BENCHMARKS, 'breakdown.py'), '--republish', '--out',
                              str(tmp_path / 'results')], timeout=300).returncode == 0
    assert (tmp_path / 'results' / 'breakdown.md').read_text() == report
    command = next(line for line in report.splitlines() if line.startswith('Reproduce: '))
    words = command[len('Reproduce: `'):-1].split()
    assert words[:2] == ['python', 'benchmarks/breakdown.py'] and '--out' not in words
    again = vars(build_parser().parse_args(words[2:] + ['--out', str(tmp_path / 'results')]))
    assert again == {k: v for k, v in result['settings'].items() if k not in ('command', 'malloc')} | {'worker': None}


def test_cost_report_shows_the_cuda_measurements_when_a_gpu_measured_them():
    from benchmarks.cost import build_parser, report

    def row(name: str, scale: int) -> dict:
        parts = {'encoder': 10 * scale, 'decoder': 4 * scale, 'heads': scale}
        return {'name': name, 'trainer': name, 'network': 'Net', 'patch_size': [64, 64],
                'params': dict(parts, total=15 * scale), 'macs': dict(parts, total=15 * scale),
                'flops': {k: 2 * v for k, v in dict(parts, total=15 * scale).items()},
                'latency_ms': {'fp32': 10.0 * scale, 'amp': 1.5 * scale, 'amp_compiled': 1.25 * scale,
                               'fp32_paired': 12.0 * scale, 'stock_fp32_paired': 36.0},
                'train_step_ms': 100.0 * scale, 'cuda_train_step_ms': 20.0 * scale,
                'saved_mib_per_sample': 50.0 * scale,
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
    help_text = warm_commands.run([sys.executable, os.path.join(BENCHMARKS, 'cost.py'), '--help'],
                                  stderr=subprocess.PIPE).stdout
    assert 'Cost at a plan' in help_text and '--train-batch' in help_text


def test_hd95_measures_surface_distance_in_physical_units():
    reference = np.zeros((1, 40, 40), dtype=bool)
    reference[0, 10:20, 10:20] = True
    shifted = np.roll(reference, 3, axis=2)
    assert hd95(reference, reference, [999.0, 1.0, 1.0]) == 0
    assert hd95(reference, shifted, [999.0, 1.0, 1.0]) == pytest.approx(3.0)
    assert hd95(reference, shifted, [999.0, 1.0, 2.5]) == pytest.approx(7.5)
    volume = np.zeros((6, 30, 30), dtype=bool)
    volume[1:5, 5:15, 5:15] = True
    assert hd95(volume, np.roll(volume, 1, axis=0), [5.0, 1.0, 1.0]) == pytest.approx(5.0)


def test_a_benchmark_patch_gets_the_network_topology_nnunets_planner_gives_it(tiny_planned, nnunet_folders):
    import torch

    from benchmarks.harness import BENCH_PLANS, bench_plans
    from nnunet_emcad.nnunet.trainers import nnUNetTrainerEMCAD
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from tiny_plans import build

    preprocessed = nnunet_env(tiny_planned, package_settings=False)['nnUNet_preprocessed']
    with open(os.path.join(preprocessed, 'Dataset901_Tiny', 'nnUNetPlans.json')) as f:
        planned = json.load(f)
    config = planned['configurations']['2d']
    same = bench_plans(planned, '2d', 3, config['patch_size'])
    assert same['plans_name'] == BENCH_PLANS and same['configurations']['2d']['batch_size'] == 3
    assert same['configurations']['2d']['architecture'] == config['architecture']  # the planner's own
    small = bench_plans(planned, '2d', 3, [32, 32])['configurations']['2d']
    kw = small['architecture']['arch_kwargs']
    assert kw['n_stages'] == config['architecture']['arch_kwargs']['n_stages'] - 1 == len(kw['strides'])
    assert kw['features_per_stage'] == [32, 64, 128, 256] and len(kw['n_conv_per_stage_decoder']) == 3
    assert config['patch_size'] != [32, 32] == small['patch_size'] and config['batch_size'] != 3
    for cls in (nnUNetTrainer, nnUNetTrainerEMCAD):
        trainer = build(cls, dict(bench_plans(planned, '2d', 3, [32, 32]), continue_training=False))
        trainer.network.eval()
        with torch.no_grad():
            assert trainer.network(torch.randn(1, 1, 32, 32))[0].shape[2:] == (32, 32)
    with pytest.raises(SystemExit, match=r'--patch-size 30 30: .* rounds it up to 32 32 for its poolings; give '
                                         r'that'):
        bench_plans(planned, '2d', 3, [30, 30])


def test_the_floor_is_the_dice_of_predicting_each_class_everywhere(tmp_path):
    for case, ones, twos in (('a', 25, 0), ('b', 50, 10), ('c', 0, 0)):
        label = np.zeros(100, np.uint8)
        label[:ones] = 1
        label[ones:ones + twos] = 2
        Image.fromarray(label.reshape(10, 10)).save(tmp_path / f'{case}.png')
    floor = constant_dice(str(tmp_path), ['a', 'b'], {'file_ending': '.png', 'labels': {'background': 0, 'x': 1,
                                                                                        'y': 2}})
    assert floor['1'] == pytest.approx((50 / 125 + 100 / 150) / 2)
    assert floor['2'] == pytest.approx((0 + 20 / 110) / 2)
    assert floor['mean'] == pytest.approx((floor['1'] + floor['2']) / 2)


@pytest.mark.parametrize('argv', [
    ['--dataset', 'isbi', '--iterations', '40', '--iterations-per-epoch', '20', '--batch-size', '2',
     '--trainers', 'nnUNetTrainer', 'nnUNetTrainerEMCAD_PVTb0'],
    ['--configuration', '3d_fullres', '--fold', '3', '--no-equal-time', '--val-iterations', '1'],
    ['--iterations', '500', '--name', 'accuracy_acdc_it500'],
    ['--dataset', 'Dataset901_Tiny', '--raw', '/data/raw', '--runs', '3', '--patch-size', '96', '96',
     '--disable-tta'],
    ['--iterations', '2400', '--eval-at', '300', '1200', '--step-times', 'steps.json', '--max-minutes', '40'],
])
def test_accuracy_report_names_the_command_that_reproduces_it(argv):
    args = parse_args(argv + ['--work', '/elsewhere'])
    words = command_line(args).split()
    assert words[:2] == ['python', 'benchmarks/accuracy.py']
    again = vars(parse_args(words[2:]))
    when = ('work', 'max_minutes')  # where and when it ran, not what it measures
    assert {k: v for k, v in again.items() if k not in when} == {k: v for k, v in vars(args).items() if k not in when}
    assert '--max-minutes' not in words
    assert ('--trainers' in words) == (args.trainers != default_trainers(args.configuration))
    assert ('--name' in words) == ('--name' in argv)


def test_the_results_doc_lists_every_report_cost_first(tmp_path):
    from benchmarks.update_docs import section

    for name in ('accuracy_isbi', 'cost_3d', 'accuracy_acdc_it500', 'cost', 'accuracy_acdc'):
        (tmp_path / f'{name}.md').write_text(f'# {name}\n\n![plot]({name}.png)\n')
    (tmp_path / 'cost.json').write_text('{}')
    text = section(str(tmp_path))
    sources = [line.split('benchmarks/results/')[1].split('.md')[0] for line in text.splitlines()
               if line.startswith('<!-- from ')]
    assert sources == ['cost', 'cost_3d', 'accuracy_acdc', 'accuracy_acdc_it500', 'accuracy_isbi']
    assert '### accuracy_isbi' in text and '](../benchmarks/results/accuracy_isbi.png)' in text


def _cost(name: str, step_ms: float, predict_ms: float, saved_mib: float) -> dict:
    """One trainer's measurements as the against_stock benchmark records them (stock: 1000 ms, 100 ms, 100 MiB)."""
    timed = {'step_ms': {'stock': 1000.0, 'trainer': step_ms}, 'predict_ms': {'stock': 100.0, 'trainer': predict_ms}}
    return {'name': name, 'finest_stride': 2, 'saved_mib': {'stock': 100.0, 'trainer': saved_mib},
            'eager': timed, 'compiled': timed}


def test_the_readme_summary_gives_each_trainers_runs_by_todays_name_against_stock_from_the_first_report_with_them(
        tmp_path):
    from benchmarks.update_docs import summary

    budgets = ('equal_iterations', 'equal_time')
    acdc = [_run('nnUNetTrainer', budget, dice, run) for budget in budgets for run, dice in ((1, 0.30), (2, 0.32))]
    acdc += [_run('nnUNetTrainerEMCAD_Stride2Narrow', budget, dice, run) for budget in budgets
             for run, dice in ((1, 0.50), (2, 0.52))]
    acdc += [_run('nnUNetTrainerEMCAD', 'equal_iterations', dice, run) for run, dice in ((1, 0.31), (2, 0.34))]
    lean = [_run('nnUNetTrainerEMCAD_Lean', 'equal_iterations', dice, run) for run, dice in ((1, 0.2), (2, 0.21))]
    reports = {'accuracy_acdc_p128_narrow': {'results': acdc},  # measured with 0.1: its EMCAD is today's _Stride1
               'accuracy_acdc_p128_lean': {'results': acdc[:4] + lean + acdc[4:]},
               'against_stock': {'trainers': [_cost('nnUNetTrainerEMCAD', 1800, 125, 86),
                                              _cost('nnUNetTrainerEMCAD_Stride2Narrow', 500, 50, 95)]},
               'against_stock_knobs': {'trainers': [_cost('nnUNetTrainerEMCAD', 900, 90, 99)]}}
    for name, payload in reports.items():
        (tmp_path / f'{name}.json').write_text(json.dumps(payload))
    rows = {line.split('`')[1]: [cell.strip() for cell in line.split('|')[2:-1]]
            for line in summary(str(tmp_path)).splitlines()[2:]}
    link = '(benchmarks/results/accuracy_acdc_p128_narrow.md)'
    assert rows['nnUNetTrainer'][:2] == [f'[0.300 / 0.320 (1.0 min)]{link}', f'[0.300 / 0.320 (50 iterations)]{link}']
    assert rows['nnUNetTrainerEMCAD'][:2] == [f'[0.500 / 0.520 (1.0 min): ahead]{link}',
                                              f'[0.500 / 0.520 (50 iterations): ahead]{link}']
    assert rows['nnUNetTrainerEMCAD_Stride1'][:2] == [f'[0.310 / 0.340 (1.0 min): tie]{link}', 'not run']
    assert rows['nnUNetTrainerEMCAD_Lean'][0] == \
        '[0.200 / 0.210 (1.0 min): behind](benchmarks/results/accuracy_acdc_p128_lean.md)'
    assert all(row[2:6] == ['not measured'] * 4 for row in rows.values())  # no curve report, no ISBI report
    cost = '(benchmarks/results/against_stock.md)'
    assert rows['nnUNetTrainerEMCAD'][6:] == [f'[0.50x / 0.50x]{cost}', f'[2.00x / 2.00x]{cost}', f'[95%]{cost}']
    assert rows['nnUNetTrainerEMCAD_Stride1'][6:] == [f'[1.80x / 1.80x]{cost}', f'[0.80x / 0.80x]{cost}',
                                                      f'[86%]{cost}']
    assert rows['nnUNetTrainerEMCAD_Lean'][6:] == ['not measured'] * 3
    assert rows['nnUNetTrainer'][6:] == ['(stock)'] * 3


def _curve_run(trainer: str, run: int, dice_at: dict) -> dict:
    """One equal-iteration run of the accuracy benchmark with --eval-at: its Dice at each point it reached."""
    points = [{'iterations': n, 'dice_per_class': {'1': d}, 'dice_mean': d} for n, d in dice_at.items()]
    return dict(_run(trainer, 'equal_iterations', dice_at[max(dice_at)], run), points=points)


def test_the_longest_budget_and_the_verdict_per_budget_come_from_each_point_of_the_curve_reports(tmp_path):
    from benchmarks.update_docs import default_behind_from, summary, verdicts

    runs = [_curve_run('nnUNetTrainer', 1, {100: 0.30, 400: 0.80}), _curve_run('nnUNetTrainer', 2, {100: 0.32,
                                                                                                    400: 0.81}),
            _curve_run('nnUNetTrainerEMCAD', 1, {100: 0.50, 400: 0.70}),
            _curve_run('nnUNetTrainerEMCAD', 2, {100: 0.52, 400: 0.72}),
            _curve_run('nnUNetTrainerEMCAD_Lean', 1, {100: 0.40, 400: 0.805})]
    stopped = dict(_curve_run('nnUNetTrainerEMCAD_Lean', 2, {100: 0.41}), stopped=True)  # not at 400 yet
    report = {'settings': {'eval_at': [100, 400]}, 'results': runs, 'stopped_runs': [stopped],
              'step_seconds': {'nnUNetTrainer': 1.2, 'nnUNetTrainerEMCAD': 0.6}}
    (tmp_path / 'accuracy_acdc_p128_curves.json').write_text(json.dumps(report))
    rows = {line.split('`')[1]: [cell.strip() for cell in line.split('|')[2:-1]]
            for line in summary(str(tmp_path)).splitlines()[2:]}
    link = '(benchmarks/results/accuracy_acdc_p128_curves.md)'
    assert rows['nnUNetTrainer'][2] == f'[0.800 / 0.810 (400 iterations)]{link}'
    assert rows['nnUNetTrainerEMCAD'][2] == f'[0.700 / 0.720 (400 iterations): behind]{link}'
    assert rows['nnUNetTrainerEMCAD_Lean'][2] == f'[0.805 (400 iterations): spread unknown]{link}'
    assert rows['nnUNetTrainerEMCAD_Stride1'][2] == 'not measured' and rows['nnUNetTrainer'][5] == 'not measured'
    text = verdicts(str(tmp_path))
    assert '`nnUNetTrainerEMCAD` against stock at 100 / 400 iterations: ahead / behind' in text
    assert '`nnUNetTrainerEMCAD_Lean` against stock at 100 / 400 iterations: ahead / spread unknown' in text
    assert '| 400 | 4.0 / 8.0 | nnUNetTrainerEMCAD | 0.700, 0.720 | 0.710 | 0.805 | -9.5 points, beyond the ' \
           '2.0-point spread: behind |' in text
    assert '| 400 | not measured / 8.0 | nnUNetTrainerEMCAD_Lean | 0.805 |' in text
    assert '**ISBI 2012**: not measured yet' in text
    assert 'iterations: ahead / behind, behind from 400 on;' in text
    assert default_behind_from(str(tmp_path)) == {'ACDC': 400}


def test_a_trainer_is_behind_from_the_first_point_after_which_it_stays_behind():
    from benchmarks.update_docs import behind_from

    assert behind_from({300: 'behind', 600: 'tie', 1200: 'behind', 2400: 'behind'}) == 1200
    assert behind_from({300: 'behind', 600: 'behind'}) == 300
    assert behind_from({300: 'behind', 600: 'tie'}) is None
    assert behind_from({300: 'ahead', 600: 'spread unknown'}) is None


def _run(trainer: str, budget: str, dice: float, run: int = 1, predict_seconds: float = 20.0) -> dict:
    """One run's measurements as the accuracy benchmark records them."""
    return {'trainer': trainer, 'budget': budget, 'run': run, 'iterations': 50, 'train_seconds': 60.0,
            'dice_per_class': {'1': dice}, 'dice_mean': dice, 'predict_seconds': predict_seconds,
            'validation_cases': 4}


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_accuracy_report_gives_each_trainers_runs_mean_and_spread_and_calls_a_difference_inside_it_a_tie():
    dice = {'nnUNetTrainer': (0.60, 0.62), 'nnUNetTrainerEMCAD': (0.61, 0.63),
            'nnUNetTrainerEMCAD_PVTb0': (0.70, 0.71), 'nnUNetTrainerEMCAD_PVTb2': (0.50, 0.52)}
    args = parse_args(['--trainers', *dice, '--iterations', '50', '--runs', '2', '--no-equal-time'])
    results = [_run(t, 'equal_iterations', d[run - 1], run, predict_seconds=30.0 if t == 'nnUNetTrainer' else 10.0)
               for run in (1, 2) for t, d in dice.items()]
    text = report(results, dict.fromkeys(dice, 1.0), args, {'cpu': 'CPU', 'cores': '2', 'gpu': 'none'})
    assert 'Runs: 2 per trainer and budget, all on fold 0' in text
    assert '| nnUNetTrainerEMCAD_PVTb2 | equal iterations | 2 | 50 |' in text  # the second run's own row
    stock = _line(text, '| nnUNetTrainer | equal iterations | 2 | 50 | 1.0 min | 0.600, 0.620 | 0.610 | 2.0 |')
    assert stock.endswith('|  | 30 s |')
    assert '| 0.610, 0.630 | 0.620 | 2.0 | +1.0 points, inside the 2.0-point spread: a tie | 10 s |' in text
    assert '| 0.700, 0.710 | 0.705 | 1.0 | +9.5 points, beyond the 2.0-point spread: ahead |' in text
    assert '| 0.500, 0.520 | 0.510 | 2.0 | -10.0 points, beyond the 2.0-point spread: behind |' in text
    goals = text.split('## Goals')[1]
    assert '| nnUNetTrainerEMCAD | +1.0 points, inside the 2.0-point spread: a tie (met) | not run | 3.00x (met) |' \
        in goals
    assert _line(goals, '| nnUNetTrainerEMCAD_PVTb2 |').startswith(
        '| nnUNetTrainerEMCAD_PVTb2 | -10.0 points, beyond the 2.0-point spread: behind (missed) |')
    assert 'not measured yet' not in text
    assert 'Floor:' not in text
    floored = report(results, dict.fromkeys(dice, 1.0), args, {'cpu': 'CPU', 'cores': '2', 'gpu': 'none'},
                     {'1': 0.25, 'mean': 0.25})
    assert 'Floor: predicting a class everywhere, as an untrained network may, scores a mean Dice of 0.250 on these ' \
           "cases (class 1: 0.250); stock nnU-Net's mean at equal iterations lies 36.0 points above it." in floored


def _with_points(run: dict, dice_at: dict) -> dict:
    """``run`` with its Dice at each --eval-at point (the last its final Dice)."""
    points = [dict(_run(run['trainer'], run['budget'], d, run['run']), iterations=n) for n, d in dice_at.items()]
    return dict(run, points=points, dice_mean=points[-1]['dice_mean'], iterations=points[-1]['iterations'])


def _step_times(path, batch: int, patch: list) -> str:
    """An against_stock report's JSON with stock at 1.0 s and the default at 0.5 s per eager step."""
    step = {'eager': {'step_ms': {'stock': 1000.0, 'trainer': 500.0}}}
    path.write_text(json.dumps({'trainers': [dict(step, name='nnUNetTrainerEMCAD', batch=batch, patch_size=patch)]}))
    return str(path)


def test_accuracy_report_gives_the_dice_at_each_eval_point_on_minutes_from_step_times_and_the_points_reached(
        tmp_path):
    args = parse_args(['--trainers', 'nnUNetTrainer', 'nnUNetTrainerEMCAD', '--iterations', '200', '--runs', '2',
                       '--no-equal-time', '--eval-at', '100', '--step-times', 'against_stock_p128.json'])
    assert args.eval_at == [100, 200]
    stock = [_with_points(_run('nnUNetTrainer', 'equal_iterations', 0, run), {100: d, 200: d + 0.2})
             for run, d in ((1, 0.40), (2, 0.42))]
    emcad = _with_points(_run('nnUNetTrainerEMCAD', 'equal_iterations', 0, 1), {100: 0.50, 200: 0.60})
    stopped = dict(_with_points(_run('nnUNetTrainerEMCAD', 'equal_iterations', 0, 2), {100: 0.52}), stopped=True)
    seconds = step_seconds(_step_times(tmp_path / 'steps.json', 8, [128, 128]), 8, [128, 128])
    assert seconds == {'nnUNetTrainerEMCAD': 0.5, 'nnUNetTrainer': 1.0}
    text = report([*stock, emcad], {'nnUNetTrainer': 1.0, 'nnUNetTrainerEMCAD': 1.0}, args,
                  {'cpu': 'CPU', 'cores': '2', 'gpu': 'none'}, stopped=[stopped], seconds=seconds)
    points = text.split('## Dice at each evaluated iteration')[1]
    assert '| nnUNetTrainer | 100 | 1.7 | 2 | 0.400, 0.420 | 0.410 | 2.0 |  |' in points
    assert '| nnUNetTrainerEMCAD | 100 | 0.8 | 2 | 0.500, 0.520 | 0.510 | 2.0 | +10.0 points, beyond the 2.0-point ' \
           'spread: ahead |' in points
    assert '| nnUNetTrainerEMCAD | 200 | 1.7 | 1 | 0.600 | 0.600 | 0.0 | -1.0 points; one run, so its spread is ' \
           'unknown |' in points  # the stopped run has not reached 200
    assert 'measured in turn with stock (against_stock_p128.json; the step alone' in points
    assert "nnU-Net's learning rate decays over all 200 iterations" in points
    assert 'Points reached: nnUNetTrainer run 1: 100, 200; nnUNetTrainer run 2: 100, 200; nnUNetTrainerEMCAD run ' \
           '1: 100, 200; nnUNetTrainerEMCAD run 2: 100 (stopped; the same command continues it).' in points
    png = point_plots([*stock, emcad, stopped], seconds, str(tmp_path / 'curves'))
    assert os.path.getsize(png) > 0
    with pytest.raises(SystemExit, match=r'patch 128x128.* at batch 8, patch 96x96\. Measure with: python '
                                         r'benchmarks/against_stock\.py --batch 8 --patch-size 96 96 --modes eager'):
        step_seconds(str(tmp_path / 'steps.json'), 8, [96, 96])


@pytest.mark.parametrize('eval_at, message', [(['110'], 'multiples of --iterations-per-epoch (25)'),
                                              (['400'], 'up to --iterations (200)')])
def test_accuracy_benchmark_refuses_eval_points_it_cannot_save(eval_at, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(['--iterations', '200', '--eval-at', *eval_at])
    assert message in capsys.readouterr().err


def test_accuracy_report_judges_no_goal_on_one_run_and_wants_equal_time_ahead_beyond_the_spread():
    trainers = ['nnUNetTrainer', 'nnUNetTrainerEMCAD']
    alone = report([_run('nnUNetTrainer', 'equal_iterations', 0.6)], {'nnUNetTrainer': 1.0},
                   parse_args(['--trainers', 'nnUNetTrainer', '--no-equal-time']),
                   {'cpu': 'CPU', 'cores': '2', 'gpu': 'none'})
    assert '## Mean and spread over the runs' in alone and '## Goals' not in alone  # nothing to compare
    one = report([_run(t, 'equal_iterations', d) for t, d in zip(trainers, (0.6, 0.5))], dict.fromkeys(trainers, 1.0),
                 parse_args(['--trainers', *trainers, '--no-equal-time']), {'cpu': 'CPU', 'cores': '2', 'gpu': 'none'})
    assert '| nnUNetTrainerEMCAD | -10.0 points; one run, so its spread is unknown (not judged) | not run |' in one
    args = parse_args(['--trainers', *trainers, '--runs', '2'])
    results = [_run(t, budget, d + 0.01 * run, run) for budget, values in (('equal_iterations', (0.6, 0.7)),
                                                                             ('equal_time', (0.6, 0.61)))
               for run in (1, 2) for t, d in zip(trainers, values)]
    goals = report(results, dict.fromkeys(trainers, 1.0), args, {'cpu': 'CPU', 'cores': '2', 'gpu': 'none'})
    assert '| nnUNetTrainerEMCAD | +10.0 points, beyond the 1.0-point spread: ahead (met) | ' \
           '+1.0 points, inside the 1.0-point spread: a tie (missed) | 1.00x (missed) |' in goals.split('## Goals')[1]
    assert "equal time = stock nnU-Net's mean training time over its runs" in goals


@pytest.mark.parametrize('no_equal_time', [False, True])
def test_accuracy_report_says_which_runs_are_missing(no_equal_time):
    trainers = ['nnUNetTrainer', 'nnUNetTrainerEMCAD_PVTb0', 'nnUNetTrainerEMCAD_PVTb2']
    args = parse_args(['--trainers', *trainers, '--iterations', '50', '--runs', '2']
                      + ['--no-equal-time'] * no_equal_time)
    results = [_run(t, 'equal_iterations', 0.6, run) for run in (1, 2) for t in trainers] \
        + [_run('nnUNetTrainer', 'equal_iterations', 0.6, 3)]
    results = [r for r in results if (r['trainer'], r['run']) != ('nnUNetTrainerEMCAD_PVTb2', 2)]
    if not no_equal_time:
        results += [_run('nnUNetTrainer', 'equal_time', 0.6, run) for run in (1, 2)]
    text = report(results, dict.fromkeys(trainers, 1.0), args, {'cpu': 'CPU', 'cores': '2', 'gpu': 'none'})
    assert 'Equal iterations not measured yet for nnUNetTrainerEMCAD_PVTb2 (1 of 2 runs): the benchmark was ' \
           'stopped (or is still running); the same command resumes it' in text
    assert ('Equal time not measured yet for nnUNetTrainerEMCAD_PVTb0 (0 of 2 runs), nnUNetTrainerEMCAD_PVTb2 '
            '(0 of 2 runs):' in text) != no_equal_time
    assert ('not run (--no-equal-time)' in text) == no_equal_time
    assert 'device cpu; glibc malloc at its defaults. Budget:' in text  # runs from before the malloc settings


def test_accuracy_report_without_stock_has_no_goals():
    args = parse_args(['--trainers', 'nnUNetTrainerEMCAD', 'nnUNetTrainer', '--iterations', '50', '--no-equal-time'])
    text = report([_run('nnUNetTrainerEMCAD', 'equal_iterations', 0.7)], {'nnUNetTrainerEMCAD': 1.0,
                                                                         'nnUNetTrainer': 2.0},
                  args, {'cpu': 'CPU', 'cores': '2', 'gpu': 'none'})
    assert '| nnUNetTrainerEMCAD | equal iterations | 1 | 50 |' in text
    assert 'Equal iterations not measured yet for nnUNetTrainer (0 of 1 runs): the benchmark was stopped' in text
    assert '## Goals' not in text  # no stock run to compare with


def test_accuracy_report_says_how_glibc_malloc_was_set_in_its_runs():
    run = {'trainer': 'nnUNetTrainer', 'budget': 'equal_iterations', 'iterations': 50, 'train_seconds': 60.0,
           'dice_per_class': {'1': 0.5}, 'dice_mean': 0.5, 'predict_seconds': 9.0, 'validation_cases': 4,
           'malloc': malloc_note(nnunet_env('/tmp/unused'))}
    text = report([run], {'nnUNetTrainer': 1.0}, parse_args(['--trainers', 'nnUNetTrainer', '--no-equal-time']),
                  {'cpu': 'CPU', 'cores': '2', 'gpu': 'none'})
    assert f"device cpu; glibc malloc keeps freed memory (MALLOC_MMAP_THRESHOLD_={2 ** 31}, " \
           f"MALLOC_TRIM_THRESHOLD_={2 ** 31}). Budget:" in text


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_as_a_cpu_dry_run_with_the_readmes_trainers(tmp_path):
    # the GPU notes' way to price recomputing on the GPU
    trainers = re.search(r'`--trainers ([\w\s]+)` prices recomputing', doc_text('gpu')).group(1).split()
    plans_dir = tmp_path / 'Dataset999_Plans'
    plans_dir.mkdir()
    (plans_dir / 'nnUNetPlans.json').write_text(json.dumps(make_plans(3, [32, 32])))
    (plans_dir / 'dataset.json').write_text(json.dumps(DATASET_JSON))
    proc = warm_commands.run([sys.executable, os.path.join(BENCHMARKS, 'gpu_check.py'), '--plans',
                              str(plans_dir / 'nnUNetPlans.json'), '--trainers', *trainers,
                              '--steps', '3', '--batch-size', '2', '--device', 'cpu', '--backend', 'aot_eager',
                              '--out', str(tmp_path)], timeout=600, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = json.loads((tmp_path / 'gpu.json').read_text())['runs']
    assert [r['trainer'] for r in runs] == ['nnUNetTrainer', 'nnUNetTrainerEMCAD_Stride1',
                                            'nnUNetTrainerEMCAD_NoRecompute']
    for run in runs:
        assert run['verdict']['trains'] and run['verdict']['follows_eager']
        assert len(run['eager']['losses']) == len(run['compiled']['losses']) == 3
        assert run['eager']['inference_ms']['batch_1'] > 0 and 'inference_ms' not in run['compiled']
        assert run['eager']['inductor_channels_last'] is (run['trainer'] != 'nnUNetTrainer')
        guard = run['compiled']['guard']  # the divergence guard's cost: EMCAD's own train_step against nnU-Net's
        assert guard is None if run['trainer'] == 'nnUNetTrainer' else guard['guarded_ms'] > 0 < guard['unguarded_ms']
    report = (tmp_path / 'gpu.md').read_text()
    assert 'Every compiled trainer trained.' in report
    assert re.search(r'- nnUNetTrainerEMCAD_Stride1 \(2d\): [\d.]+ ms with the guard, [\d.]+ ms without \([+-]', report)
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
    proc = warm_commands.run([sys.executable, os.path.join(BENCHMARKS, 'gpu_check.py'), '--help'],
                             timeout=120, stderr=subprocess.PIPE)
    assert proc.returncode == 0
    for promise in ('torch.compile', 'skipped steps', 'peak CUDA memory', 'inference latency', 'leaves out',
                    'Exits 1 when a compiled trainer does not train', 'channels-last'):
        assert promise in ' '.join(proc.stdout.split()), promise


@pytest.mark.slow
def test_accuracy_benchmark_on_tiny_data_scores_each_eval_point_and_continues_a_stopped_run_from_its_checkpoint(
        tmp_path, tiny_planned):
    from tiny_data import copy_planned

    work, out = tmp_path / 'work', tmp_path / 'results'
    copy_planned(tiny_planned, nnunet_env(str(work / 'Dataset901_Tiny'), raw=str(tmp_path / 'raw')))
    command = [sys.executable, os.path.join(BENCHMARKS, 'accuracy.py'), '--dataset', 'Dataset901_Tiny', '--raw',
               str(tmp_path / 'raw'), '--trainers', 'nnUNetTrainer', '--no-equal-time', '--iterations', '2',
               '--iterations-per-epoch', '1', '--val-iterations', '1', '--batch-size', '2', '--patch-size', '32', '32',
               '--disable-tta', '--eval-at', '1', '--work', str(work), '--out', str(out)]
    log = work / 'Dataset901_Tiny' / 'commands.log'

    def benchmark(*extra: str) -> str:
        """The benchmark with ``extra`` options; what it appended to the command log."""
        before = log.read_text() if log.exists() else ''
        proc = warm_commands.run(command + list(extra), timeout=600, stderr=subprocess.PIPE)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return log.read_text()[len(before):]

    # stopped at the time limit before its first checkpoint: the report says so, nothing is scored
    assert re.findall(r'nnUNetv2_train 901 2d 0 -tr (\S+)', benchmark('--max-minutes', '0.01')) == \
        ['Bench_nnUNetTrainer_it2']
    report = (out / 'accuracy_Dataset901_Tiny.md').read_text()
    assert 'Points reached: nnUNetTrainer run 1: none yet (stopped; the same command continues it).' in report
    assert json.loads((out / 'accuracy_Dataset901_Tiny.json').read_text())['results'] == []

    new = benchmark('--runs', '1')
    assert re.findall(r'nnUNetv2_train 901 2d 0 -tr (\S+)', new) == ['Bench_nnUNetTrainer_it2']
    # the point of --eval-at predicted in the benchmark's process, the final checkpoint by nnUNetv2_predict (timed)
    predicted = [line for line in new.splitlines() if line.startswith(('$ nnUNetv2_predict ', '$ nnUNetPredictor '))]
    assert [(line.split()[1], line.split(' -chk ')[1]) for line in predicted] == [
        ('nnUNetPredictor', 'checkpoint_it1.pth --disable_tta'),
        ('nnUNetv2_predict', 'checkpoint_final.pth --disable_tta')]
    # in this process, the final checkpoint gives nnUNetv2_predict's segmentations
    model = work / 'Dataset901_Tiny' / 'results' / 'Dataset901_Tiny' / 'Bench_nnUNetTrainer_it2__nnUNetBenchPlans__2d'
    env = nnunet_env(str(work / 'Dataset901_Tiny'), raw=str(tmp_path / 'raw'),
                     trainer_dir=str(work / 'Dataset901_Tiny' / 'trainers'))
    predict_in_process(env, parse_args(command[2:]), str(model), 'checkpoint_final.pth',
                       str(model / 'val_inputs_0'), str(tmp_path / 'in_process'), str(tmp_path / 'in_process.log'))
    cases = sorted(p.name for p in (model / 'val_predictions_0').glob('*.png'))
    assert cases and sorted(p.name for p in (tmp_path / 'in_process').glob('*.png')) == cases
    for case in cases:
        assert np.array_equal(*(np.asarray(Image.open(folder / case)) for folder in (model / 'val_predictions_0',
                                                                                     tmp_path / 'in_process')))
    first = json.loads((out / 'accuracy_Dataset901_Tiny.json').read_text())['results']
    assert [(p['iterations'], p['epochs']) for p in first[0]['points']] == [(1, 1), (2, 2)]
    assert first[0]['points'][-1]['dice_mean'] == first[0]['dice_mean']

    # a second run stopped after its first epoch: the checkpoint nnU-Net saved then, and nothing measured
    folders = work / 'Dataset901_Tiny' / 'results' / 'Dataset901_Tiny'
    stopped = folders / 'Bench_nnUNetTrainer_it2_run2__nnUNetBenchPlans__2d' / 'fold_0'
    shutil.copytree(folders / 'Bench_nnUNetTrainer_it2__nnUNetBenchPlans__2d' / 'fold_0', stopped)
    for name in ('checkpoint_final.pth', 'benchmark.json', 'points.json'):
        (stopped / name).unlink()
    shutil.copy(stopped / 'checkpoint_it1.pth', stopped / 'checkpoint_latest.pth')
    new = benchmark('--runs', '2')
    # the first run reused, the stopped one continued from epoch 1 (nnU-Net's --c), not trained again
    assert re.findall(r'nnUNetv2_train 901 2d 0 -tr (\S+) .* --c\n', new) == ['Bench_nnUNetTrainer_it2_run2']
    assert re.findall(r': Epoch (\d+)$', new, re.MULTILINE) == ['1']
    result = json.loads((out / 'accuracy_Dataset901_Tiny.json').read_text())
    assert result['results'][0] == first[0] and (stopped / 'benchmark.json').is_file()
    assert [(r['run'], r['budget']) for r in result['results']] == [(1, 'equal_iterations'), (2, 'equal_iterations')]
    dice = [r['dice_mean'] for r in result['results']]
    report = (out / 'accuracy_Dataset901_Tiny.md').read_text()
    assert f"| {', '.join(f'{d:.3f}' for d in dice)} | {np.mean(dice):.3f} | {100 * (max(dice) - min(dice)):.1f} |" \
        in report
    at_one = [r['points'][0]['dice_mean'] for r in result['results']]
    assert f"| nnUNetTrainer | 1 | not measured | 2 | {', '.join(f'{d:.3f}' for d in at_one)} |" in report
    assert 'Points reached: nnUNetTrainer run 1: 1, 2; nnUNetTrainer run 2: 1, 2.' in report
    assert (out / 'accuracy_Dataset901_Tiny_dice_at_iterations.png').is_file()
    assert '--runs 2' in _line(report, 'Reproduce: ') and '--eval-at 1 2' in _line(report, 'Reproduce: ')
    assert 'patch 32x32 (--patch-size' in report
    assert "prediction without nnU-Net's test-time mirroring (--disable-tta)" in report
    assert 0 < result['constant_dice']['mean'] < 1 and f"Dice of {result['constant_dice']['mean']:.3f}" in report


def test_equal_time_gives_the_nearest_whole_epoch_of_stocks_time_and_at_least_one():
    assert equal_time_iterations(200.0, 5.0, 20) == 40  # stock's pace
    assert equal_time_iterations(200.0, 12.0, 20) == 20  # 16.7 iterations: one epoch is nearer than none
    assert equal_time_iterations(200.0, 3.0, 20) == 60  # 66.7
    assert equal_time_iterations(200.0, 2.4, 20) == 80  # 83.3
    assert equal_time_iterations(200.0, 40.0, 20) == 20  # 5 iterations: still one epoch


def test_the_results_docs_accuracy_benchmark_options_parse():
    text = doc_text('results')
    runs = re.search(r'`(--runs \d+)`\s+trains\s+every\s+trainer', text).group(1).split()
    own = re.search(r'`(--dataset DatasetNNN_Name --raw FOLDER)`\s+runs\s+the\s+benchmark', text).group(1)
    assert parse_args(runs).runs == int(runs[1])
    args = parse_args(own.replace('NNN_Name', '901_Tiny').split())
    assert (args.dataset, args.raw, args.name) == ('Dataset901_Tiny', 'FOLDER', 'accuracy_Dataset901_Tiny')
    patch = re.search(r'`(--patch-size[\d ]+)`\s+trains\s+every\s+trainer\s+on\s+a\s+smaller', text).group(1).split()
    assert parse_args(patch).patch_size == [int(p) for p in patch[1:]]
    assert re.search(r'`--disable-tta`\s+predicts\s+without', text) and parse_args(['--disable-tta']).disable_tta
    curve = re.search(r'`(--eval-at[\d ]+--iterations \d+)`\s+scores\s+every\s+run', text).group(1).split()
    assert parse_args(curve).eval_at == [int(n) for n in curve[1:-2]]
    steps = re.search(r'`(--step-times \S+)`', text).group(1).split()
    assert parse_args(curve + steps).step_times == steps[1]
    stop = re.search(r'`(--max-minutes \d+)`\s+stops\s+it', text).group(1).split()
    assert parse_args(stop).max_minutes == float(stop[1])


def test_the_results_docs_breakdown_command_and_its_small_patch_parse():
    from benchmarks.breakdown import build_parser

    text = doc_text('results')
    command = re.search(r'`python (benchmarks/breakdown\.py[^`]*)`\s+\(add\s+`([^`]+)`\s+for\s+a\s+small', text)
    assert command, 'docs/results.md names the breakdown command and its small-patch option'
    words = command.group(1).split()[1:] + command.group(2).split()
    args = build_parser().parse_args(words)
    assert args.compiled and args.patch_size == [96, 96] and args.trainers == ['nnUNetTrainer', 'nnUNetTrainerEMCAD']


def test_the_against_stock_benchmark_runs_each_trainer_in_turn_with_stock_and_judges_only_fine_decoders(tmp_path):
    plans_file = _tiny_plans_file(tmp_path)
    script = os.path.join(BENCHMARKS, 'against_stock.py')
    trainers = ['nnUNetTrainerEMCAD_Stride4', 'nnUNetTrainerEMCAD_Stride2NarrowRefine']
    proc = warm_commands.run([sys.executable, script, '--plans', plans_file, '--patch-size', '32', '32', '--batch', '2',
                              '--repeats', '1', '--modes', 'eager', '--trainers', *trainers,
                              '--out', str(tmp_path / 'results')], timeout=600, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / 'results' / 'against_stock.json').read_text())
    stride4, refined = result['trainers']
    assert [stride4['name'], refined['name']] == trainers and 'compiled' not in refined
    # the refinement computes at stride 1; 4 stages at a 32x32 patch through the plans copy
    assert (stride4['finest_stride'], refined['finest_stride']) == (4, 1) and refined['patch_size'] == [32, 32]
    for r in result['trainers']:
        pair = {'stock', 'trainer'}
        assert set(r['eager']['step_ms']) == set(r['eager']['predict_ms']) == set(r['saved_mib']) == pair
        assert all(v > 0 for timed in r['eager'].values() for v in timed.values())
    report = (tmp_path / 'results' / 'against_stock.md').read_text()
    step = refined['eager']['step_ms']['trainer'] / refined['eager']['step_ms']['stock']
    first = _line(report, '| 1 |')
    assert first.startswith('| 1 | nnUNetTrainerEMCAD_Stride2NarrowRefine | 1 |') and f'| {step:.2f}x |' in first
    assert first.endswith(' of 3 |') and _line(report, '| 2 |').endswith('| n/a: decodes from stride 4 |')
    assert ('GPU numbers: pending' in report) == (result['machine']['gpu'] == 'none')  # a CPU run says so
    (tmp_path / 'results' / 'against_stock.md').write_text('')
    assert warm_commands.run([sys.executable, script, '--republish', '--out', str(tmp_path / 'results')],
                             timeout=300).returncode == 0
    assert (tmp_path / 'results' / 'against_stock.md').read_text() == report
    words = _line(report, 'Reproduce: ')[len('Reproduce: `'):-1].split()
    assert words[:2] == ['python', 'benchmarks/against_stock.py'] and '--out' not in words


def test_the_cost_goals_are_met_stretched_or_missed_by_a_margin_and_fine_decoders_rank_first():
    from benchmarks.against_stock import goal_verdicts, ranked

    def measured(name: str, stride: int, step: float, predict: float, saved: float) -> dict:
        timed = {'step_ms': {'stock': 1000.0, 'trainer': 1000.0 * step},
                 'predict_ms': {'stock': 100.0, 'trainer': 100.0 / predict}}
        return {'name': name, 'finest_stride': stride, 'eager': timed, 'compiled': timed,
                'saved_mib': {'stock': 100.0, 'trainer': 100.0 * saved}}

    narrow = measured('narrow', 2, 0.6, 1.6, 1.1)
    assert goal_verdicts(narrow) == {'step eager': 'met (stretch too)', 'step compiled': 'met (stretch too)',
                                     'predict eager': 'met', 'predict compiled': 'met', 'saved': 'missed by 0.10x'}
    assert goal_verdicts(measured('slow', 1, 1.25, 1.0, 0.5))['step eager'] == 'missed by 0.25x'
    coarse = measured('coarse', 4, 0.3, 3.0, 0.5)  # meets every goal, but decodes from stride 4
    full = measured('full', 1, 0.9, 2.5, 0.9)
    assert [r['name'] for r in ranked([coarse, narrow, full], 'compiled')] == ['full', 'narrow', 'coarse']


def test_the_readmes_against_stock_command_parses_to_the_variants_eager_and_compiled():
    from benchmarks.against_stock import DEFAULT_TRAINERS, build_parser

    command = re.search(r'`python (benchmarks/against_stock\.py[^`]*)`', readme_text())
    assert command, 'the README names the against-stock command'
    args = build_parser().parse_args(command.group(1).split()[1:])
    assert args.modes == ['eager', 'compiled'] and args.trainers == DEFAULT_TRAINERS
    assert {'nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_Stride1', 'nnUNetTrainerEMCAD_Stride2'} <= set(args.trainers)


def test_a_finished_run_is_predicted_again_from_its_checkpoint_when_only_test_time_mirroring_changes(tmp_path):
    trained = {'batch_size': 8, 'patch_size': [128, 128], 'device': 'cpu'}
    output = tmp_path / 'fold_0'
    assert _run_folder(str(output), trained) is None  # a new run: stamped, nothing measured
    (output / 'checkpoint_final.pth').write_text('weights')
    (output / 'benchmark.json').write_text(json.dumps({'dice_mean': 0.5}))
    assert _run_folder(str(output), dict(trained)) == {'dice_mean': 0.5}  # same settings: reused
    assert _run_folder(str(output), dict(trained, disable_tta=True)) is None  # predicted again ...
    assert (output / 'checkpoint_final.pth').is_file() and not (output / 'benchmark.json').exists()  # ... not trained
    assert json.loads((output / 'benchmark_settings.json').read_text())['disable_tta'] is True
    assert _run_folder(str(output), dict(trained, batch_size=4, disable_tta=True)) is None  # trained otherwise:
    assert not (output / 'checkpoint_final.pth').exists()  # trained again from the start


def test_a_run_of_a_trainer_whose_settings_changed_is_trained_again_and_one_stamped_before_they_were_is_reused(
        tmp_path):
    narrow = trainer_settings('nnUNetTrainerEMCAD')
    assert narrow['decoder_stride'] == '2' and narrow['decoder_width'] == '32'
    assert 'skipped_steps' not in narrow  # a run's state, not a setting
    assert trainer_settings('nnUNetTrainerEMCAD_Stride1')['decoder_stride'] == '1'
    trained = {'batch_size': 8, 'device': 'cpu'}
    # stamped before a setting was added and with one since removed: the settings they share decide
    other_names = {**{k: v for k, v in narrow.items() if k != 'decoder_width'}, 'skipped_steps': '0'}
    for output, stamped in ((tmp_path / 'before', trained), (tmp_path / 'changed', dict(trained, trainer_settings={
            **narrow, 'decoder_stride': '1'})), (tmp_path / 'renamed', dict(trained, trainer_settings=other_names))):
        output.mkdir()
        (output / 'benchmark_settings.json').write_text(json.dumps(stamped))
        (output / 'checkpoint_final.pth').write_text('weights')
        (output / 'benchmark.json').write_text(json.dumps({'dice_mean': 0.5}))
    now = dict(trained, trainer_settings=narrow)
    assert _run_folder(str(tmp_path / 'before'), now) == {'dice_mean': 0.5}
    assert _run_folder(str(tmp_path / 'renamed'), now) == {'dice_mean': 0.5}
    assert _run_folder(str(tmp_path / 'changed'), now) is None
    assert not (tmp_path / 'changed' / 'checkpoint_final.pth').exists()  # trained again from the start
    assert _run_folder(str(tmp_path / 'changed'), now) is None  # (stamped now, nothing measured yet)
    assert json.loads((tmp_path / 'changed' / 'benchmark_settings.json').read_text()) == now
