"""Fill the README's results section from benchmarks/results/*.md (the benchmarks' own reports).

python benchmarks/update_readme.py   # rewrites the part of README.md between the results markers
"""
import argparse
import os
import re
import sys

from nnunet_emcad.benchmarking import RESULTS
from nnunet_emcad.source_tree import SOURCE_ROOT

README = os.path.join(SOURCE_ROOT, 'README.md')
START, END = '<!-- results:start -->', '<!-- results:end -->'


def section(results_dir: str) -> str:
    """The results section: each report (cost first, then accuracy, by name), headings moved two levels down,
    image paths made README-relative."""
    names = [f[:-3] for f in os.listdir(results_dir) if f.endswith('.md')] if os.path.isdir(results_dir) else []
    parts = []
    for name in sorted(names, key=lambda n: (not n.startswith('cost'), n)):
        path = os.path.join(results_dir, f'{name}.md')
        with open(path) as f:
            text = f.read()
        text = re.sub(r'^(#+) ', lambda m: '#' * (len(m.group(1)) + 2) + ' ', text, flags=re.M)
        text = re.sub(r'\]\((?!http)([^)]+\.png)\)', lambda m: f"](benchmarks/results/{m.group(1)})", text)
        parts.append(f"<!-- from benchmarks/results/{name}.md -->\n{text.strip()}\n")
    if not parts:
        return 'No benchmark has been run yet.\n'
    return '\n'.join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--results', default=RESULTS)
    args = parser.parse_args(argv)
    with open(README) as f:
        readme = f.read()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(README, 'w') as f:
        f.write(f"{head}{START}\n{section(args.results)}{END}{tail}")
    print(f"updated {README}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
