"""Ahead-of-time plan: does a config's train step fit a cluster, before any accelerator runs it.

    python tools/plan.py --config experiments/configs/rm_bt.py:model=llama3.1-8b \
        --devices 8 --mesh 1,8,1 --hbm 80GiB [--json plan.json] [--config.model.remat=full]

Builds the run's jitted step from abstract shapes on --devices fake CPU devices, compiles it
without allocating parameters and prints, per device, the bytes of parameters, optimizer state,
gradients and temporaries, the FLOPs per step, the collectives in the compiled program, and a
verdict against --hbm (naming the lever that would make a step that does not fit fit).
REINFORCE adds the frozen reference and reward model and the sampler's KV cache. How each
figure is formed: `nemotron_jax/train/plan.py`.
"""

from __future__ import annotations

import os
import re
import sys


def _device_count(argv: list[str]) -> int:
    """--devices N, read before JAX starts: the fake CPU device count is fixed at start-up."""
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--devices="):
            value = arg.split("=", 1)[1]
        elif arg == "--devices" and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None:
            if not value.isdigit() or int(value) < 1:
                print(f"error: --devices {value!r}: expected a positive integer", file=sys.stderr)
                sys.exit(2)
            return int(value)
    return 8


_DEVICES = _device_count(sys.argv[1:])
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    + f" --xla_force_host_platform_device_count={_DEVICES}"
).strip()

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import json  # noqa: E402

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from nemotron_jax.cli import parse_config_flags  # noqa: E402
from nemotron_jax.errors import ConfigError, cli_main  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:args]")
flags.DEFINE_integer("devices", 8, "fake CPU devices to compile for")
flags.DEFINE_string("mesh", None, "data,fsdp,tensor (default: all devices on fsdp)")
flags.DEFINE_string("hbm", "80GiB", "memory of one device, e.g. 80GiB, 141GiB, 95GiB")
flags.DEFINE_string("json", None, "also write the figures as JSON here")
flags.DEFINE_string("rm_model", None, "REINFORCE: the reward model's preset (default: policy's)")


def _mesh(text: str | None) -> tuple[int, int, int]:
    if text is None:
        return (1, -1, 1)
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(x < 1 and x != -1 for x in shape):
        raise ConfigError(f"--mesh {text!r}: expected data,fsdp,tensor, e.g. 1,8,1")
    return shape


@cli_main
def main() -> int:
    config = parse_config_flags(sys.argv, _CONFIG)
    from nemotron_jax.train import plan

    hbm = plan.parse_bytes(flags.FLAGS.hbm)
    mesh = _mesh(flags.FLAGS.mesh)
    figures = plan.plan(config, mesh, hbm, rm_preset=flags.FLAGS.rm_model)
    print(plan.format_report(figures))
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    main()
