#!/usr/bin/env bash
# The oldest releases setup.py declares, checked: installs the minimum torch (and its torchvision), timm and nnU-Net
# into a virtual environment of its own through bootstrap.sh, then runs the test suite there (by default the tests
# not marked slow: every block, network and trainer builds, runs forward and trains a step, eager and compiled).
# Not run by CI (it downloads about 3 GB); run it after changing a minimum in setup.py or using a newer API:
#   bash tests/check_minimum_versions.sh [VENV] [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/nnunet-emcad-minimum}
[ $# -gt 0 ] && shift
minimum() {  # the version after NAME>= in setup.py, as X.Y.Z
  local version
  version=$(grep -oP "'$1>=\K[0-9.]+" setup.py)
  [[ $version =~ ^[0-9]+\.[0-9]+$ ]] && version=$version.0
  echo "$version"
}
torch=$(minimum torch)
timm=$(minimum timm)
nnunet=$(minimum nnunetv2)
minor=$(echo "$torch" | cut -d. -f2)
torchvision=0.$((minor + 15)).0  # torchvision's release for torch 2.N is 0.(N+15)
constraints="$venv.constraints.txt"
mkdir -p "$(dirname "$venv")"
printf 'torch==%s\ntorchvision==%s\ntimm==%s\nnnunetv2==%s\n' "$torch" "$torchvision" "$timm" "$nnunet" > "$constraints"
echo "check_minimum_versions: $(tr '\n' ' ' < "$constraints")into $venv"
export PIP_CONSTRAINT=$constraints NNUNET_EMCAD_VENV=$venv TORCH_PACKAGES="torch==$torch torchvision==$torchvision"
bash bootstrap.sh test --version
"$venv/bin/python" - "$torch" "$torchvision" "$timm" "$nnunet" <<'EOF'
import sys
from importlib.metadata import version

wanted = dict(zip(('torch', 'torchvision', 'timm', 'nnunetv2'), sys.argv[1:]))
found = {name: version(name).split('+')[0] for name in wanted}
assert found == wanted, f'installed {found}, not the minimum {wanted}'
print('check_minimum_versions: installed', found)
EOF
if [ $# -eq 0 ]; then
  set -- -n 2 -m 'not slow'
fi
bash bootstrap.sh test "$@"
