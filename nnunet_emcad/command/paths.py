"""Where the package looks outside itself: the project's shared data (the demo's ACDC) and the benchmarks of the
source checkout it is installed from (editable installs; a wheel has none). Torch-free, like the package's import."""
import os

import nnunet_emcad

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(nnunet_emcad.__file__)))
"""The folder that holds the package: in a source checkout its root, which holds benchmarks/ and sits next to
shared/."""


def shared_data_dir() -> str:
    """The project's shared data folder: ``$NNUNET_EMCAD_SHARED_DATA``, else ``shared/data`` beside the source
    checkout or beside the working directory, the first that exists; where none does, the one beside the
    source checkout (for messages that name it). Callers check for the data set they need."""
    candidates = [os.environ.get('NNUNET_EMCAD_SHARED_DATA'), os.path.join(CHECKOUT, '..', 'shared', 'data'),
                  os.path.join(os.getcwd(), '..', 'shared', 'data')]
    found = next((path for path in candidates if path and os.path.isdir(path)), candidates[1])
    return os.path.abspath(found)


def checkout_benchmark(name: str) -> str:
    """The path of the source checkout's ``benchmarks/<name>.py`` (absent where the package came from a wheel)."""
    return os.path.join(CHECKOUT, 'benchmarks', f'{name}.py')
