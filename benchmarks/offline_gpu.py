"""The GPU check on an offline CUDA machine that has PyTorch but not nnU-Net (like the GPU this project borrows).

Here, with PyPI reachable, in the project's environment::

    python -m benchmarks.offline_gpu pack       # writes benchmarks/.cache/offline_gpu/

packs wheels of this package's dependencies at the versions installed here, for the other machine's Python
(--python-version, default 3.12; manylinux x86_64), less PyTorch and its CUDA libraries and the scientific stack
that machine already has (``MACHINE_HAS``); a stand-in ``SimpleITK`` package (nnU-Net imports it at module level,
the check reads no images, and its wheel alone would take most of a 64 MiB carry); and the plans to measure on
(default: nnU-Net's ACDC 2D plans, with their dataset.json). There, from the checkout's root, with the bundle
carried along::

    python3 -m benchmarks.offline_gpu run [gpu_check options]

installs the bundle's wheels of the distributions that machine lacks into a folder of their own (nothing it has
is replaced), and runs ``benchmarks/gpu_check.py`` on the bundle's plans with them on the path, writing its
report into ``$OUT`` where set (the device tool's output folder), else into benchmarks/results. Exits with the
check's exit code.
"""
import argparse
import glob
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

if __package__ in (None, ''):  # run as python benchmarks/<name>.py: import benchmarks.* from the checkout's root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.harness import CACHE, RESULTS, acdc_plans
from benchmarks.source_tree import BENCHMARKS, SOURCE_ROOT
from nnunet_emcad._startup import register_trainer_dir

BUNDLE = os.path.join(CACHE, 'offline_gpu')
PROJECT = 'nnunet-emcad'
MACHINE_HAS = ('torch', 'torchvision', 'numpy', 'scipy', 'pandas', 'matplotlib', 'scikit-image', 'seaborn')
"""Distributions the borrowed GPU machine had (../shared/gpu/README.md): left out of the bundle with everything
they require."""
LEFT_OUT = ('simpleitk', 'imagecodecs')
"""Left out although missing there: SimpleITK has a stand-in, tifffile runs without imagecodecs."""
PLATFORMS = ('manylinux_2_28_x86_64', 'manylinux_2_17_x86_64', 'manylinux2014_x86_64')
CARRY_LIMIT_MB = 64
"""What the borrowed GPU machine's runner carries along with the checkout, in MiB."""
SIMPLEITK_STAND_IN = ('"""Stand-in for SimpleITK on a machine without it: nnU-Net imports SimpleITK at module level, '
                      'and the GPU check\nreads no images (benchmarks/offline_gpu.py)."""\n')


def dependencies(root: str = PROJECT, machine_has: Tuple[str, ...] = MACHINE_HAS) -> Dict[str, str]:
    """Canonical name -> installed version of every distribution ``root`` requires here, transitively (no extras;
    markers as this interpreter evaluates them), less ``machine_has`` and what those require, less ``LEFT_OUT``,
    and less backports of standard-library modules (``argparse``: on the path, its wheel would shadow Python's)."""
    stop = {canonicalize_name(name) for name in machine_has + LEFT_OUT + tuple(sys.stdlib_module_names)}
    found: Dict[str, str] = {}
    pending = [canonicalize_name(requirement.name) for requirement in _requirements(root)]
    while pending:
        name = pending.pop()
        if name in found or name in stop:
            continue
        pending += [canonicalize_name(requirement.name) for requirement in _requirements(name)]
        found[name] = importlib.metadata.version(name)
    return found


def _requirements(name: str) -> List[Requirement]:
    try:
        texts = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{name} is not installed here: pack in the project's environment (bash bootstrap.sh "
                         f"test --co -q sets it up in .venv)") from None
    requirements = [Requirement(text) for text in texts]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({'extra': ''})]


def download_wheels(pins: Dict[str, str], wheel_dir: str, python_version: str) -> List[str]:
    """Wheels of ``pins`` for CPython ``python_version`` on manylinux x86_64 in ``wheel_dir``: binary wheels
    where PyPI has them, else built here from the source distribution (pure-Python ones only)."""
    os.makedirs(wheel_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as downloads:
        _pip('download', '--no-deps', '--python-version', python_version, '--implementation', 'cp',
             *[arg for platform in PLATFORMS for arg in ('--platform', platform)], '-d', downloads,
             *[f'{name}=={version}' for name, version in sorted(pins.items())])
        for path in sorted(glob.glob(os.path.join(downloads, '*'))):
            if path.endswith('.whl'):
                shutil.move(path, os.path.join(wheel_dir, os.path.basename(path)))
                continue
            built = tempfile.mkdtemp(dir=downloads)
            _pip('wheel', '--no-deps', '-w', built, path)
            wheel = glob.glob(os.path.join(built, '*.whl'))[0]
            if not wheel.endswith('-py3-none-any.whl'):
                raise SystemExit(f"{os.path.basename(path)} has no wheel for CPython {python_version} on PyPI, and "
                                 f"the one built here ({os.path.basename(wheel)}) would not run there")
            shutil.move(wheel, os.path.join(wheel_dir, os.path.basename(wheel)))
    return sorted(glob.glob(os.path.join(wheel_dir, '*.whl')))


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, '-m', 'pip', *args, '--disable-pip-version-check'],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = '\n'.join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"pip {args[0]} failed (exit code {proc.returncode}); is PyPI reachable?\n{tail}")


def pack(bundle: str, plans: str, python_version: str) -> None:
    """Write the bundle: ``wheels/``, ``plans/<dataset>/`` (the plans file and dataset.json beside it) and
    ``stand_ins/SimpleITK``; an earlier bundle there is replaced, any other folder with files is left alone."""
    if os.path.isdir(bundle) and os.listdir(bundle) and not os.path.isdir(os.path.join(bundle, 'wheels')):
        raise SystemExit(f"{bundle} holds files but no packed bundle: name a new or empty folder with --bundle")
    shutil.rmtree(bundle, ignore_errors=True)
    wheels = download_wheels(dependencies(), os.path.join(bundle, 'wheels'), python_version)
    plans_dir = os.path.join(bundle, 'plans', os.path.basename(os.path.dirname(os.path.abspath(plans))))
    os.makedirs(plans_dir)
    shutil.copy(plans, os.path.join(plans_dir, 'nnUNetPlans.json'))
    shutil.copy(os.path.join(os.path.dirname(plans), 'dataset.json'), plans_dir)
    os.makedirs(os.path.join(bundle, 'stand_ins', 'SimpleITK'))
    with open(os.path.join(bundle, 'stand_ins', 'SimpleITK', '__init__.py'), 'w') as f:
        f.write(SIMPLEITK_STAND_IN)
    size = sum(os.path.getsize(os.path.join(top, name)) for top, _, names in os.walk(bundle) for name in names)
    print(f"packed {len(wheels)} wheels and {plans_dir} into {bundle} ({size / 2 ** 20:.1f} MiB)")
    if size > CARRY_LIMIT_MB * 2 ** 20:
        raise SystemExit(f"the bundle is larger than the {CARRY_LIMIT_MB} MiB the GPU machine's runner carries: add the "
                         f"largest distributions the machine has to MACHINE_HAS")
    where = os.path.abspath(bundle)
    if where.startswith(SOURCE_ROOT + os.sep):
        where = os.path.relpath(where, SOURCE_ROOT)
    print(f"on the GPU machine, from the checkout's root, with {where} carried: "
          f"python3 -m benchmarks.offline_gpu run [gpu_check options]")


def wheel_distribution(wheel: str) -> str:
    """The canonical distribution name of a wheel file."""
    return parse_wheel_filename(os.path.basename(wheel))[0]


def missing_wheels(wheel_dir: str) -> List[str]:
    """The wheels in ``wheel_dir`` of distributions this interpreter does not have."""
    def installed(name: str) -> bool:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True
    return [w for w in sorted(glob.glob(os.path.join(wheel_dir, '*.whl'))) if not installed(wheel_distribution(w))]


def install(wheels: List[str], site: str) -> None:
    """Install ``wheels`` into ``site`` without their dependencies and without the network."""
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-index', '--no-deps', '--no-compile', '--quiet',
                    '--disable-pip-version-check', '--upgrade', '--target', site, *wheels], check=True)


def run(bundle: str, site: str, check_args: List[str]) -> int:
    """Install what this machine lacks from the bundle into ``site``, then run the GPU check on the bundle's plans;
    its exit code."""
    plans = glob.glob(os.path.join(bundle, 'plans', '*', 'nnUNetPlans.json'))
    if not plans:
        raise SystemExit(f"no bundle at {bundle}: run python -m benchmarks.offline_gpu pack where PyPI is "
                         f"reachable, and bring its folder along")
    wheels = missing_wheels(os.path.join(bundle, 'wheels'))
    if wheels:
        print(f"installing {len(wheels)} missing distributions into {site}: "
              f"{', '.join(wheel_distribution(w) for w in wheels)}", flush=True)
        install(wheels, site)
    else:
        print("this machine has every distribution in the bundle", flush=True)
    paths = [site, SOURCE_ROOT]
    if importlib.util.find_spec('SimpleITK') is None:
        paths.insert(0, os.path.join(bundle, 'stand_ins'))
    register_trainer_dir()  # what the package's .pth does at start-up where it is installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    out = os.environ.get('OUT') or RESULTS
    return subprocess.call([sys.executable, os.path.join(BENCHMARKS, 'gpu_check.py'), '--plans', plans[0],
                            '--out', out, *check_args], env=env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--bundle', default=BUNDLE, help='the bundle folder (default %(default)s)')
    commands = parser.add_subparsers(dest='command', required=True)
    pack_parser = commands.add_parser('pack', help='write the bundle (here, with PyPI reachable)')
    pack_parser.add_argument('--plans', help="nnUNetPlans.json (dataset.json beside it); default: ACDC's from "
                                             "../shared")
    pack_parser.add_argument('--python-version', default='3.12', help="the GPU machine's Python (default 3.12)")
    run_parser = commands.add_parser('run', help='install what is missing and run the GPU check (there)')
    run_parser.add_argument('--site', default=os.path.join(tempfile.gettempdir(), 'offline_gpu_site'),
                            help='where to install the missing wheels (default %(default)s)')
    args, check_args = parser.parse_known_args(argv)
    if args.command == 'pack':
        if check_args:
            parser.error(f"unrecognized arguments: {' '.join(check_args)}")
        pack(args.bundle, args.plans or acdc_plans()['default'], args.python_version)
        return 0
    return run(args.bundle, args.site, check_args)


if __name__ == '__main__':
    sys.exit(main())
