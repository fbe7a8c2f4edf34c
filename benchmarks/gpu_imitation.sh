#!/usr/bin/env bash
# The GPU call's dry run in an imitation of the GPU machine, before the one real call:
#
#   bash benchmarks/gpu_imitation.sh [KIT]        # KIT: the GPU kit folder, default ../shared/gpu
#
# The GPU machine has only the packages of KIT/device-packages.txt and what KIT/prepare.sh packs into .gpu/
# (plus benchmarks/gpu_extra_wheels.txt); the project runs from the checkout through PYTHONPATH, not installed.
# This builds that here: a fresh Python 3.11 venv (.gpu-imitation/venv, git-ignored) holding the project's own
# requirements and the kit's wheels' requirements that the device list names (and what pip pulls in for them,
# which is checked against the list), a copy of the tracked tree with the kit packed for Python 3.11
# (NAS_GPU_PYTHON=3.11), then run.sh runs
# `python benchmarks/gpu_checks.py --cpu` there exactly as the GPU call would. A module-level import of a
# package that machine lacks fails here, not in the call. Figures and logs: .gpu-imitation/results/.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
kit=$(cd "${1:-$root/../shared/gpu}" && pwd)
work=$root/.gpu-imitation
cd "$root"
mkdir -p "$work"

# The device's packages that the project asks for (pyproject dependencies and dev extra), by name.
wanted=$(python3.11 - "$kit/device-packages.txt" <<'PY'
import re, sys, tomllib
device = {line.strip() for line in open(sys.argv[1]) if line.strip()}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
names = {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}
print(" ".join(sorted(n for n in names if n in device)))
PY
)
# The tracked tree (and the untracked files git does not ignore), as the device tool copies it.
rm -rf "$work/tree" && mkdir -p "$work/tree"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work/tree"
[ -f .gpu/cifar10.tar.gz ] && mkdir -p "$work/tree/.gpu" && cp .gpu/cifar10.tar.gz "$work/tree/.gpu/"
(cd "$work/tree" && git init -q && NAS_GPU_PYTHON=3.11 bash "$kit/prepare.sh" 500 100 >/dev/null)


# The device's packages that the kit's wheels need (it packs only what the device lacks): their Requires-Dist.
needed=$(python3.11 - "$work/tree/.gpu/whl" "$kit/device-packages.txt" <<'PY'
import pathlib, re, sys, zipfile
device = {line.strip() for line in open(sys.argv[2]) if line.strip()}
names = set()
for wheel in pathlib.Path(sys.argv[1]).glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                name = re.split(r"[\s\[<>=!~;(]", line.split(":", 1)[1].strip(), maxsplit=1)[0]
                names.add(name.lower().replace("_", "-").replace(".", "-"))
print(" ".join(sorted(names & device)))
PY
)
if [ ! -x "$work/venv/bin/python" ]; then
  python3.11 -m venv "$work/venv"
  "$work/venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
fi
"$work/venv/bin/pip" install -q $wanted $needed
# What pip pulled in beyond the device's list would hide a missing package: name it.
extra=$("$work/venv/bin/pip" list --format=freeze 2>/dev/null | cut -d= -f1 | tr 'A-Z_.' 'a-z--' |
        grep -vxF -f "$kit/device-packages.txt" | grep -vx 'pip\|setuptools\|wheel' || true)
[ -z "$extra" ] || echo "note: the imitation holds packages the device list lacks: $(echo $extra)"

cd "$work/tree"
rm -rf "$work/results"
PATH=$work/venv/bin:$PATH NAS_GPU_RESULTS=$work/results NAS_BENCH_RESULTS=$work/results \
  bash .gpu/run.sh 'python benchmarks/gpu_checks.py --cpu'
