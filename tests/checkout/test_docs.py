"""The README stays a short user's guide, every relative link in it and in docs/ leads somewhere, and every
measurement in them is in a benchmark report they link."""
import ast
import glob
import io
import os
import re
import subprocess
import tokenize

import pytest

import nnunet_emcad
from benchmarks.harness import RESULTS
from benchmarks.source_tree import README, readme_section

ROOT = os.path.dirname(README)
DOCUMENTS = [README] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def _without_code(path: str) -> str:
    """A Markdown file's text, its code blocks left out."""
    with open(path) as f:
        return re.sub(r'```.*?```', '', f.read(), flags=re.S)


def _anchors(path: str) -> set:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    text = _without_code(path)
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-')
            for h in re.findall(r'^#+ (.*)$', text, re.M)}


def test_the_readme_is_under_300_lines_and_the_design_notes_live_in_docs():
    with open(README) as f:
        lines = f.read().splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines: move design notes and measurements to docs/"
    assert {'design.md', 'gpu.md', 'results.md'} <= {os.path.basename(p) for p in DOCUMENTS}


def test_every_relative_link_in_the_readme_and_docs_leads_to_a_file_and_heading_that_exist():
    broken = []
    for document in DOCUMENTS:
        text = _without_code(document)
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+:', target):
                continue  # http(s), mailto
            path, _, anchor = target.partition('#')
            resolved = os.path.normpath(os.path.join(os.path.dirname(document), path)) if path else document
            if not os.path.exists(resolved):
                broken.append(f"{os.path.relpath(document, ROOT)}: {target} (no such file)")
            elif anchor and (not resolved.endswith('.md') or anchor not in _anchors(resolved)):
                broken.append(f"{os.path.relpath(document, ROOT)}: {target} (no such heading)")
    assert not broken, '\n'.join(broken)


# a ratio, share, time or size, or a Dice-like score (0.ddd)
MEASUREMENT = re.compile(r'(?<![\w.])(\d+(?:\.\d+)?)(?:x|\s?(?:%|ms|s|min|minutes|MiB|GB))(?!\w)'
                         r'|(?<![\w.])(0\.\d{3})(?!\d)')


def _paragraphs(path: str) -> list:
    """Paragraphs, list items and table rows of a Markdown file, code blocks left out."""
    return re.split(r'\n\s*\n|\n(?=- |\| )', _without_code(path))


def _unsourced(prose: str, text: str) -> list:
    """The measurements of ``prose`` (links and inline code left out) that ``text`` does not hold."""
    prose = re.sub(r'\]\([^)]*\)', ']', re.sub(r'`[^`]*`', '', prose))
    return [match.group(0) for match in MEASUREMENT.finditer(prose)
            if not re.search(rf'(?<![\d.]){re.escape(match.group(1) or match.group(2))}(?![\d])', text)]


def test_every_measurement_in_the_readme_is_in_a_report_its_paragraph_links():
    unsourced = []
    for paragraph in _paragraphs(README):
        cited = re.findall(r'\]\(((?:benchmarks/results|docs)/[^)#]+\.md)', paragraph)
        text = ''.join(open(p).read() for p in (os.path.join(ROOT, c) for c in cited) if os.path.isfile(p))
        unsourced += [f"{number!r} in: {' '.join(paragraph.split())[:120]}" for number in _unsourced(paragraph, text)]
    assert not unsourced, 'numbers without a report that holds them:\n' + '\n'.join(unsourced)


def test_every_measurement_in_docs_is_in_a_benchmark_report_its_section_links():
    """Sections, not paragraphs: a table's numbers come from the reports its section links. Reports a later run
    overwrote are kept as they were in benchmarks/results/history."""
    unsourced = []
    for document in DOCUMENTS[1:]:
        for section in re.split(r'\n(?=#+ )', _without_code(document)):
            cited = [os.path.normpath(os.path.join(os.path.dirname(document), c))
                     for c in re.findall(r'\]\(([^)#\s]+\.md)', section)]
            text = ''.join(open(p).read() for p in cited
                           if os.path.isfile(p) and os.path.join('benchmarks', 'results') in p)
            unsourced += [f"{os.path.basename(document)}, {section.splitlines()[0]}: {number!r}"
                          for number in _unsourced(section, text)]
    assert not unsourced, 'numbers without a report that holds them:\n' + '\n'.join(unsourced)


def test_the_readme_summary_the_results_list_and_the_verdicts_are_what_update_docs_writes_from_the_reports():
    from benchmarks.update_docs import (END, RESULTS_DOC, START, SUMMARY_END, SUMMARY_START, VERDICTS_END,
                                        VERDICTS_START, section, summary, verdicts)

    fix = 'run python benchmarks/update_docs.py'
    with open(README) as f:
        assert f.read().split(SUMMARY_START)[1].split(SUMMARY_END)[0] == '\n' + summary(RESULTS), fix
    with open(RESULTS_DOC) as f:
        doc = f.read()
    assert doc.split(START)[1].split(END)[0] == '\n' + section(RESULTS), fix
    assert doc.split(VERDICTS_START)[1].split(VERDICTS_END)[0] == '\n' + verdicts(RESULTS), fix


def test_where_the_default_falls_behind_stock_at_length_the_readme_says_from_which_budget_on():
    from benchmarks.update_docs import default_behind_from

    advice = readme_section('## Which trainer')
    for name, iterations in default_behind_from(RESULTS).items():
        assert re.search(rf'{name}[^.]*behind[^.]*from {iterations} iterations', advice), \
            f"on {name} the default is behind stock from {iterations} iterations on: the README's Which trainer " \
            f"must say so, and which trainer to use for long training"


HISTORY = sorted(glob.glob(os.path.join(ROOT, 'benchmarks', 'results', 'history', '*_*.md')))


@pytest.mark.parametrize('report', HISTORY, ids=os.path.basename)
def test_each_earlier_report_is_the_report_as_its_commit_left_it(report):
    name, commit = os.path.basename(report)[:-3].rsplit('_', 1)
    git = subprocess.run(['git', 'show', f'{commit}:benchmarks/results/{name}.md'], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    if git.returncode != 0:
        pytest.skip(f'commit {commit} is not in this clone (a shallow one?): {git.stderr.strip()[:200]}')
    with open(report) as f:
        assert f.read() == git.stdout


def _docstrings_and_comments(path: str) -> list:
    """(line, text) of every docstring and comment in a Python file."""
    with open(path) as f:
        source = f.read()
    found = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
             if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring is not None:
                found.append((node.body[0].lineno, docstring))
    return found


def test_the_packages_docstrings_and_comments_name_no_benchmark_report_and_quote_no_measurement():
    """A report is rerun and renamed, and its numbers change; docs/results.md lists the current ones, and the code
    points there."""
    reports = {os.path.splitext(name)[0] for name in os.listdir(RESULTS) if name.endswith('.md')}
    named = []
    for path in glob.glob(os.path.join(os.path.dirname(nnunet_emcad.__file__), '**', '*.py'), recursive=True):
        for line, text in _docstrings_and_comments(path):
            names = [n for n in re.findall(r'[\w/]+\.md\b', text) if os.path.basename(n)[:-3] in reports]
            measured = re.findall(r'\b\d+(?:\.\d+)?(?:x\b|\s?%|\s(?:ms|s|min)\b)', text)
            named += [f'{os.path.basename(path)}:{line}: {n}'
                      for n in names + measured + re.findall(r'benchmarks/results', text)]
    assert not named, named
