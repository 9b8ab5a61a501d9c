"""List the benchmark reports of benchmarks/results/*.md (the benchmarks' own reports) in docs/results.md.

python benchmarks/update_docs.py   # rewrites the part of docs/results.md between the results markers
"""
import argparse
import os
import re
import sys

from nnunet_emcad.benchmarking import RESULTS
from nnunet_emcad.source_tree import SOURCE_ROOT

RESULTS_DOC = os.path.join(SOURCE_ROOT, 'docs', 'results.md')
LINK = '../benchmarks/results/'  # from docs/ to the reports
START, END = '<!-- results:start -->', '<!-- results:end -->'


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--results', default=RESULTS)
    args = parser.parse_args(argv)
    with open(RESULTS_DOC) as f:
        doc = f.read()
    if START not in doc or END not in doc:
        raise SystemExit(f"{RESULTS_DOC} lacks the markers {START} ... {END}")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(RESULTS_DOC, 'w') as f:
        f.write(f"{head}{START}\n{section(args.results)}{END}{tail}")
    print(f"updated {RESULTS_DOC}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
