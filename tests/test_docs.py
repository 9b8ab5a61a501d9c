"""The README stays a short user's guide, and every relative link in it and in docs/ leads somewhere."""
import glob
import os
import re

from helpers import README

ROOT = os.path.dirname(README)
DOCUMENTS = [README] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def _anchors(path: str) -> set:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    with open(path) as f:
        text = re.sub(r'```.*?```', '', f.read(), flags=re.S)
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
        with open(document) as f:
            text = re.sub(r'```.*?```', '', f.read(), flags=re.S)
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
