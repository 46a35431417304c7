"""The cluster recipes in tools/launch/ parse (shell syntax, YAML) and their run.py commands name
only flags that `experiments/run.py` defines, and config keys and configs that exist."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

LAUNCH = REPO / "tools" / "launch"
SHELL = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
YAML = sorted(LAUNCH.glob("*.yaml"))
RUN_PY = "experiments/run.py"


def _run_py_flags() -> set[str]:
    """The flags run.py defines, read from absl's registry in a fresh interpreter."""
    code = (
        "import json, sys; sys.path.insert(0, 'experiments'); import run; "
        "from absl import flags; "
        "print(json.dumps([f.name for f in flags.FLAGS.get_flags_for_module(run)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out))


def _shell_command(path) -> list[str]:
    """The arguments after `experiments/run.py` in the recipe's run.py command."""
    text = re.sub(r"\\\n", " ", path.read_text())  # join continued lines
    lines = [
        line for line in text.splitlines() if RUN_PY in line and not line.lstrip().startswith("#")
    ]
    assert len(lines) == 1, f"{path.name}: expected one run.py command, found {len(lines)}"
    rest = lines[0].split(RUN_PY, 1)[1]
    return shlex.split(rest.removeprefix('"'))  # the closing quote of "$REPO/experiments/run.py"


def _yaml_commands(path) -> list[list[str]]:
    import yaml

    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs and all(d["kind"] == "JobSet" for d in docs), path.name
    commands = []
    for doc in docs:
        for job in doc["spec"]["replicatedJobs"]:
            for container in job["template"]["spec"]["template"]["spec"]["containers"]:
                command = [*container.get("command", []), *container.get("args", [])]
                assert RUN_PY in command, (
                    f"{path.name}: container {container['name']} runs no run.py"
                )
                commands.append(command[command.index(RUN_PY) + 1 :])
    return commands


def _check_flags(args: list[str], defined: set[str], where: str) -> dict[str, str]:
    """Asserts every --flag in `args` is one of run.py's (or a --config.<key> override);
    returns {flag: value} for those given as --flag=value."""
    given = {}
    for arg in args:
        if not arg.startswith("--"):
            continue
        name, _, value = arg[2:].partition("=")
        if name.startswith("config."):
            given[name] = value
            continue
        assert name in defined, (
            f"{where}: --{name} is not a flag of experiments/run.py {sorted(defined)}"
        )
        given[name] = value
    return given


def _check_config(spec: str, overrides: dict[str, str], where: str) -> None:
    """The config file named by --config exists and builds, and each --config.<key> names a key
    it has."""
    path, _, arg = spec.partition(":")
    module = path.removesuffix(".py").replace("/", ".")
    assert (REPO / path).is_file(), f"{where}: --config {path} does not exist"
    config = importlib.import_module(module).get_config(arg)
    for key in overrides:
        node = config
        for part in key.split(".")[1:]:
            assert part in node, f"{where}: --{key} is not a key of {spec}"
            node = node[part]


@pytest.mark.parametrize("path", SHELL, ids=lambda p: p.name)
def test_shell_recipe_parses_and_names_run_py_flags(path):
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, f"{path.name}: {check.stderr}"
    given = _check_flags(_shell_command(path), _run_py_flags(), path.name)
    config_keys = {k: v for k, v in given.items() if k.startswith("config.")}
    # The config comes from $CONFIG; its overrides must exist in every shipped training config.
    for name in ("rm_bt", "rm_regression", "sft", "reinforce"):
        _check_config(f"experiments/configs/{name}.py", config_keys, path.name)


@pytest.mark.parametrize("path", YAML, ids=lambda p: p.name)
def test_jobset_recipe_loads_and_names_run_py_flags(path):
    defined = _run_py_flags()
    for command in _yaml_commands(path):
        given = _check_flags(command, defined, path.name)
        assert "config" in given and "workdir" in given, f"{path.name}: --config and --workdir"
        _check_config(
            given["config"], {k: v for k, v in given.items() if k.startswith("config.")}, path.name
        )
        coordinator = [given.get(k) for k in ("coordinator_address", "num_processes", "process_id")]
        assert all(coordinator) or not any(coordinator), f"{path.name}: give all three or none"


def test_every_recipe_is_in_the_scaling_doc():
    doc = (REPO / "docs" / "scaling.md").read_text()
    recipes = [*SHELL, *YAML]
    assert len(recipes) == 4, [p.name for p in recipes]
    for path in recipes:
        assert f"tools/launch/{path.name}" in doc, f"docs/scaling.md does not mention {path.name}"
