"""List the benchmark reports of benchmarks/results/*.md (the benchmarks' own reports) in docs/results.md with the
verdict per budget of the accuracy curves, and write the README's summary table from them.

python benchmarks/update_docs.py   # rewrites the parts of docs/results.md and README.md between their markers
"""
import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ''):  # run as python benchmarks/<name>.py: import benchmarks.* from the checkout's root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.harness import RESULTS, STOCK, point_records, point_summaries, ratios, runs_summary, versus_stock
from benchmarks.source_tree import README, SOURCE_ROOT
from nnunet_emcad.nnunet.trainers.base import RENAMED_TRAINERS

RESULTS_DOC = os.path.join(SOURCE_ROOT, 'docs', 'results.md')
LINK = '../benchmarks/results/'  # from docs/ to the reports
START, END = '<!-- results:start -->', '<!-- results:end -->'
SUMMARY_START, SUMMARY_END = '<!-- summary:start -->', '<!-- summary:end -->'
VERDICTS_START, VERDICTS_END = '<!-- verdicts:start -->', '<!-- verdicts:end -->'

# The README's summary: these trainers, by today's names; a cell comes from the first report of its column that
# measured the trainer. Dice: two runs of the accuracy benchmark on held-out cases, per data set.
SUMMARY_TRAINERS = (STOCK, 'nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_Lean', 'nnUNetTrainerEMCAD_Stride1')
ACCURACY_REPORTS = {'ACDC': ('accuracy_acdc_p128_narrow', 'accuracy_acdc_p128_lean'),
                    'ISBI 2012': ('accuracy_isbi_runs2', 'accuracy_isbi_lean')}
# The longest budget per data set: the accuracy benchmark's curve reports (Dice at each point of --eval-at).
CURVE_REPORTS = {'ACDC': 'accuracy_acdc_p128_curves', 'ISBI 2012': 'accuracy_isbi_curves'}
COST_REPORTS = ('against_stock', 'against_stock_knobs')
# Reports measured with nnunet-emcad 0.1, whose nnUNetTrainerEMCAD is today's nnUNetTrainerEMCAD_Stride1.
MEASURED_WITH_0_1 = ('against_stock', 'accuracy_acdc_p128_narrow', 'accuracy_isbi_runs2')
# Today's default under the name the reports measured it with before it became the default (the same network).
SAME_NETWORK = {'nnUNetTrainerEMCAD_Stride2Narrow': 'nnUNetTrainerEMCAD'}


def section(results_dir: str) -> str:
    """The list of reports (cost first, then accuracy, by name): each one's title, a link to it, the machine it
    was measured on and links to its plots; the reports themselves hold the tables."""
    names = [f[:-3] for f in os.listdir(results_dir) if f.endswith('.md')] if os.path.isdir(results_dir) else []
    parts = []
    for name in sorted(names, key=lambda n: (not n.startswith('cost'), n)):
        with open(os.path.join(results_dir, f'{name}.md')) as f:
            text = f.read()
        title = re.search(r'^#+ (.*)$', text, re.M)
        machine = re.search(r'^(Machine: .*?\.)(?: |$)', text, re.M)
        plots = [f"[{label or 'plot'}]({LINK}{png})"
                 for label, png in re.findall(r'!\[([^]]*)\]\((?!http)([^)]+\.png)\)', text)]
        lines = [f"<!-- from benchmarks/results/{name}.md -->", f"#### {title.group(1) if title else name}", '',
                 ' '.join([f"[{name}.md]({LINK}{name}.md)."] + ([machine.group(1)] if machine else [])
                          + ([f"Plots: {', '.join(plots)}."] if plots else []))]
        parts.append('\n'.join(lines) + '\n')
    if not parts:
        return 'No benchmark has been run yet.\n'
    return '\n'.join(parts)


def todays_name(report: str, trainer: str) -> str:
    """The name a trainer of ``report`` goes by today."""
    if report in MEASURED_WITH_0_1:
        trainer = RENAMED_TRAINERS.get(trainer, trainer)
    return SAME_NETWORK.get(trainer, trainer)


def _load(results_dir: str, report: str) -> Optional[dict]:
    path = os.path.join(results_dir, f'{report}.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _accuracy_cells(results_dir: str, reports: tuple) -> Dict[str, List[str]]:
    """Per trainer, its Dice cells at equal iterations and in stock's training time, from the first report that
    ran it: each run's Dice, and against stock's runs of that report ('ahead', 'tie', 'behind')."""
    cells = {}
    for report in reports:
        data = _load(results_dir, report)
        if data is None:
            continue
        results = [dict(r, trainer=todays_name(report, r['trainer'])) for r in data['results']]
        link = f"(benchmarks/results/{report}.md)"
        for trainer in SUMMARY_TRAINERS:
            if trainer in cells or runs_summary(results, trainer, 'equal_iterations') is None:
                continue
            cells[trainer] = []
            for budget in ('equal_iterations', 'equal_time'):
                mine, stock = runs_summary(results, trainer, budget), runs_summary(results, STOCK, budget)
                if mine is None:
                    cells[trainer].append('not run')
                    continue
                dice = ' / '.join(f'{d:.3f}' for d in mine['dice_per_run'])
                when = (f"{mine['train_seconds'] / 60:.1f} min" if budget == 'equal_iterations'
                        else f"{mine['iterations']:.0f} iterations")
                side = '' if trainer == STOCK else f": {versus_stock(mine, stock)[0]}"
                cells[trainer].append(f"[{dice} ({when}){side}]{link}")
    return cells


def _cost_cells(results_dir: str) -> Dict[str, List[str]]:
    """Per trainer, its training step and prediction against stock's (eager / compiled) and its saved
    activations, from the first cost report that ran it."""
    cells = {}
    for report in COST_REPORTS:
        data = _load(results_dir, report)
        for result in data['trainers'] if data else []:
            trainer = todays_name(report, result['name'])
            if trainer in SUMMARY_TRAINERS and trainer not in cells:
                ratio, link = ratios(result), f"(benchmarks/results/{report}.md)"
                cells[trainer] = [f"[{ratio['step eager']:.2f}x / {ratio['step compiled']:.2f}x]{link}",
                                  f"[{ratio['predict eager']:.2f}x / {ratio['predict compiled']:.2f}x]{link}",
                                  f"[{ratio['saved']:.0%}]{link}"]
    return cells


def _points(data: dict) -> List[Tuple[int, str, dict, Optional[dict]]]:
    """A curve report's ``point_summaries`` (trainers by today's names), its stopped runs' points included."""
    records = point_records(data['results'] + data.get('stopped_runs', []))
    return point_summaries([dict(r, trainer=SAME_NETWORK.get(r['trainer'], r['trainer'])) for r in records],
                           data['settings']['eval_at'])


def _longest_cells(results_dir: str, report: str) -> Dict[str, str]:
    """Per trainer, its runs' Dice at the curve report's longest budget (its last point) and the verdict there
    against stock's runs ('spread unknown' while one side has one run)."""
    data = _load(results_dir, report)
    if data is None:
        return {}
    longest = data['settings']['eval_at'][-1]
    cells = {}
    for iterations, trainer, mine, stock in _points(data):
        if iterations == longest and trainer in SUMMARY_TRAINERS:
            dice = ' / '.join(f'{d:.3f}' for d in mine['dice_per_run'])
            side = '' if trainer == STOCK or stock is None else f": {versus_stock(mine, stock)[0]}"
            cells[trainer] = f"[{dice} ({iterations} iterations){side}](benchmarks/results/{report}.md)"
    return cells


def summary(results_dir: str) -> str:
    """The README's summary table: per trainer, each run's Dice on the held-out cases of each data set at stock's
    iterations, in stock's training time and at the longest budget measured, and its cost against stock's."""
    accuracy = {name: _accuracy_cells(results_dir, reports) for name, reports in ACCURACY_REPORTS.items()}
    longest = {name: _longest_cells(results_dir, report) for name, report in CURVE_REPORTS.items()}
    cost = _cost_cells(results_dir)
    head = ['trainer'] + [f"{name} Dice, {budget}" for name in ACCURACY_REPORTS
                          for budget in ("stock's iterations", "stock's training time", 'longest budget')]
    head += ['step time vs stock', 'prediction speed vs stock', 'activations vs stock']
    lines = ['| ' + ' | '.join(head) + ' |', '|---|' + '---|' * (len(head) - 1)]
    missing = ['not measured'] * 2
    for trainer in SUMMARY_TRAINERS:
        row = [f'`{trainer}`']
        for name in ACCURACY_REPORTS:
            row += accuracy[name].get(trainer, missing) + [longest[name].get(trainer, 'not measured')]
        row += ['(stock)'] * 3 if trainer == STOCK else cost.get(trainer, ['not measured'] * 3)
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines) + '\n'


def behind_from(sides: Dict[int, str]) -> Optional[int]:
    """The evaluated iteration count from which a trainer stays behind stock (``sides``: its verdict per
    iteration count, ascending), or None when it is not behind at the longest."""
    start = None
    for iterations, side in sides.items():
        start = (start or iterations) if side == 'behind' else None
    return start


def default_behind_from(results_dir: str) -> Dict[str, int]:
    """Per data set whose curve report has the default behind stock at its longest budget: from which iteration
    count on (the README's advice for long training must say so)."""
    out = {}
    for name, report in CURVE_REPORTS.items():
        data = _load(results_dir, report)
        sides = {iterations: versus_stock(mine, stock)[0] for iterations, trainer, mine, stock in
                 (_points(data) if data else []) if trainer == 'nnUNetTrainerEMCAD' and stock}
        if behind_from(sides) is not None:
            out[name] = behind_from(sides)
    return out


def verdicts(results_dir: str) -> str:
    """docs/results.md's verdict per budget: for each data set's curve report, every EMCAD trainer's verdict
    against stock at each evaluated iteration, then the table it comes from (training minutes from the report's
    step times, trainer / stock)."""
    parts = []
    for name, report in CURVE_REPORTS.items():
        data = _load(results_dir, report)
        if data is None:
            parts.append(f"**{name}**: not measured yet (the accuracy benchmark's run with `--name {report}`).\n")
            continue
        seconds = data.get('step_seconds') or {}
        rows, said = [], {}
        for iterations, trainer, mine, stock in _points(data):
            if trainer == STOCK:
                continue
            side, words = versus_stock(mine, stock) if stock else ('stock not measured',) * 2
            said.setdefault(trainer, {})[iterations] = side
            minutes = ' / '.join(f"{iterations * seconds[t] / 60:.1f}" if t in seconds else 'not measured'
                                 for t in (trainer, STOCK))
            stock_dice = 'not measured' if stock is None else f"{stock['dice']:.3f}"
            rows.append(f"| {iterations} | {minutes} | {trainer} | "
                        f"{', '.join(f'{d:.3f}' for d in mine['dice_per_run'])} | {mine['dice']:.3f} | "
                        f"{stock_dice} | {words} |")
        lines = [f"**{name}** ([{report}.md]({LINK}{report}.md)): "
                 + '; '.join(f"`{trainer}` against stock at {' / '.join(map(str, sides))} iterations: "
                             f"{' / '.join(sides.values())}"
                             + ('' if behind_from(sides) is None else f", behind from {behind_from(sides)} on")
                             for trainer, sides in said.items()) + '.', '',
                 "| iterations | minutes (trainer / stock) | trainer | Dice per run | mean Dice | stock's mean Dice | "
                 "against stock |", '|---:|---|---|---|---:|---:|---|'] + rows
        parts.append('\n'.join(lines) + '\n')
    return '\n'.join(parts)


def replace_between(path: str, start: str, end: str, text: str) -> None:
    """Rewrite the part of ``path`` between its ``start`` and ``end`` markers with ``text``."""
    with open(path) as f:
        doc = f.read()
    if start not in doc or end not in doc:
        raise SystemExit(f"{path} lacks the markers {start} ... {end}")
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, 'w') as f:
        f.write(f"{head}{start}\n{text}{end}{tail}")
    print(f"updated {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--results', default=RESULTS)
    args = parser.parse_args(argv)
    replace_between(RESULTS_DOC, START, END, section(args.results))
    replace_between(RESULTS_DOC, VERDICTS_START, VERDICTS_END, verdicts(args.results))
    replace_between(README, SUMMARY_START, SUMMARY_END, summary(args.results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
