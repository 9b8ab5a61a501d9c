"""Where things are in a source checkout: its root (which holds ``benchmarks/``), its README and the README's
sections."""
import os
import re

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The source checkout's root: the folder that holds benchmarks/."""
BENCHMARKS = os.path.join(SOURCE_ROOT, 'benchmarks')
README = os.path.join(SOURCE_ROOT, 'README.md')


def readme_text() -> str:
    """The README, whole."""
    with open(README) as f:
        return f.read()


def readme_section(heading: str) -> str:
    """The README's text under ``heading`` (e.g. '### Predicting on a CPU'), up to the next heading of level 2 or 3."""
    return re.split(r'\n#{2,3} ', readme_text().split(f'\n{heading}\n', 1)[1], maxsplit=1)[0]


def code_block(text: str, language: str) -> str:
    """The first ``language`` code block in ``text``."""
    return re.search(rf'```{language}\n(.*?)```', text, re.S).group(1)

