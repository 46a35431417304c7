#!/usr/bin/env bash
# The GPU check, for a machine with one GPU (benchmarks/device_check.py says what it runs):
# GPU-only tests, attention and log-prob kernel timings, a ~1B reward-model training step's MFU
# and the sampler's decode tokens/s, in at most 8 minutes on an H100 / H200. Appends one dated
# section to docs/benchmarks.md; exits non-zero if any part failed.
#
#   bash benchmarks/device_check.sh               # or: make device-check
#   bash benchmarks/device_check.sh --no-append   # print only
#   PYTHON=.venv/bin/python bash benchmarks/device_check.sh --smoke --no-append  # tiny, any machine
#
# JAX with CUDA is preinstalled on the GPU machine and is used as it is. Of the package's
# dependencies (pyproject.toml) and pytest, only those missing are installed, at the pins of
# requirements/cpu.txt, with the installed jax packages as pip constraints so that nothing
# replaces them (installing requirements/cpu.txt itself would put the CPU jaxlib in their
# place). The package runs from this checkout through PYTHONPATH, which needs no network,
# unlike the build step of `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

mapfile -t missing < <("$PYTHON" - <<'EOF'
import importlib.metadata
import re
import tomllib

def name_of(requirement):
    return re.split(r"[=<>!~\[; ]", requirement.strip())[0].lower()

pins = {}
for line in open("requirements/cpu.txt"):
    pin = line.split("#")[0].strip()
    if pin:
        pins[name_of(pin)] = pin
wanted = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] + ["pytest"]
for requirement in wanted:
    name = name_of(requirement)
    if name in ("jax", "jaxlib"):
        continue
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        print(pins.get(name, requirement))
EOF
)

if ((${#missing[@]})); then
    constraints=$(mktemp)
    "$PYTHON" -m pip freeze | grep -iE '^(jax|jaxlib|jax[-_]cuda[0-9]*[-_][a-z]+|nvidia[-_].*)==' \
        >"$constraints" || true
    for requirement in "${missing[@]}"; do  # one at a time: one that fails leaves the others
        echo "installing $requirement"
        "$PYTHON" -m pip install -q -c "$constraints" "$requirement" \
            || echo "warning: could not install $requirement; parts that need it will fail"
    done
    rm -f "$constraints"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/device_check.py "$@"
