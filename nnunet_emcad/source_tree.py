"""Where things are in a source checkout: its root (which holds ``benchmarks/``), the README's sections and the
project's shared data beside it. Torch-free, like the package's import."""
import os
import re

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The folder above the package: in a source checkout its root, which holds benchmarks/ and sits next to shared/."""
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


def shared_data_dir() -> str:
    """The project's shared data folder: ``$NNUNET_EMCAD_SHARED_DATA``, else ``shared/data`` beside the source
    checkout or beside the working directory, the first that exists; where none does, the one beside the
    source checkout (for messages that name it). Callers check for the data set they need."""
    candidates = [os.environ.get('NNUNET_EMCAD_SHARED_DATA'), os.path.join(SOURCE_ROOT, '..', 'shared', 'data'),
                  os.path.join(os.getcwd(), '..', 'shared', 'data')]
    found = next((path for path in candidates if path and os.path.isdir(path)), candidates[1])
    return os.path.abspath(found)
