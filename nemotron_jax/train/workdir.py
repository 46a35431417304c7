"""A workdir belongs to one run: what is recorded there about the config, and what may change
when it resumes.

    check_resume(workdir, config, step)    # before restoring: refuses another run's config
    record_config(workdir, config, step)   # before step 0 or the first resumed step

`<workdir>/config.json` is the config the run started with; it is never overwritten once a
checkpoint exists. Every start (the first and each resume) appends one line to
`<workdir>/config_history.jsonl`: the time, the step it starts from, the full config and the
keys that changed since the previous start. Resuming with a changed field that defines the run
(the objective, loss, model, data, batch size, optimizer, seed, init checkpoints) is refused
with one line listing each such key with its old and new value.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from nemotron_jax.errors import ConfigError

# Fields a resumed run may change: how it is logged, checkpointed, shown, laid out on devices
# or computed, none of what it computes. num_steps may change under a constant learning rate;
# under a cosine schedule (whose length it is) it may only grow.
MAY_CHANGE = (
    "name",
    "num_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "max_to_keep",
    "progress",
    "tensorboard",
    "validation",
    "nan_policy",
    "nan_max_skips",
    "eval_batch_size",
    "micro_batch_size",
    "grad_accum",
    "mesh",
    "sharding_rules",
    "model.remat",
    "model.attention_impl",
    "model.overrides.scan_unroll",
    "loss.logprobs_impl",
    "data.tfds_dir",
    "rl.eval_prompts",
    "rl.eval_temperature",
    "rl.sampler_weights",
)
# Compared as absolute paths, so that a relative and an absolute spelling are the same run.
_PATHS = ("init_from", "reference_from", "rm_from", "data.dir")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def as_json(config) -> dict[str, Any]:
    """The config as its JSON record holds it (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def _normalised(flat: dict[str, Any]) -> dict[str, Any]:
    out = dict(flat)
    for key in _PATHS:
        if out.get(key):
            out[key] = os.path.abspath(out[key])
    return out


def changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (old value, new value)} of the leaf keys that differ (None where absent)."""
    a, b = _normalised(flatten(old)), _normalised(flatten(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _may_change(key: str, old, new, schedule: str = "constant") -> bool:
    if key.startswith("stages."):  # a multi-stage experiment: judge each stage's own keys
        key = key.split(".", 2)[2] if key.count(".") >= 2 else key
    if key == "num_steps":  # the learning-rate schedule's length, unless it is constant
        return old is not None and new is not None and (new >= old or schedule == "constant")
    return key in MAY_CHANGE


def _saved(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); move it aside to start over") from None


def check_resume(workdir: str, config, resume_step: int) -> None:
    """Refuses (`ConfigError`) to resume `workdir`'s checkpoint `resume_step` with a config
    whose run-defining fields differ from the saved config.json, listing each."""
    saved = _saved(workdir)
    if saved is None:
        return
    known = flatten(saved)
    # A key the saved config lacks is one added to the code since; it is only recorded.
    refused = {
        k: v
        for k, v in changes(saved, as_json(config)).items()
        if k in known and not _may_change(k, *v, schedule=known.get("optim.schedule", "constant"))
    }
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"{workdir} holds a run of another config (checkpoint step {resume_step}); "
            f"changed: {listed}. Use a new --workdir, or the saved config.json"
        )


def record_config(workdir: str, config, start_step: int | None) -> None:
    """Records this start of the run (module docstring): config.json when the run is new
    (`start_step` None: no checkpoint), and one line of config_history.jsonl. In a
    multi-process run only process 0 writes; the others wait until it has."""
    from nemotron_jax import distributed

    if distributed.is_primary():
        _record(workdir, config, start_step)
    distributed.sync("config_recorded")


def _record(workdir: str, config, start_step: int | None) -> None:
    new = as_json(config)
    path = os.path.join(workdir, "config.json")
    saved = _saved(workdir)
    diff = changes(saved, new) if saved is not None else {}
    if start_step is None or saved is None:
        with open(path + ".tmp", "w") as f:
            json.dump(new, f, indent=2)
            f.write("\n")
        os.replace(path + ".tmp", path)
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "start_step": start_step or 0,
        "changed": {k: {"old": old, "new": new_} for k, (old, new_) in diff.items()},
        "config": new,
    }
    history = os.path.join(workdir, "config_history.jsonl")
    with open(history, "a") as f:
        f.write(json.dumps(record) + "\n")
    if start_step is not None and diff:
        listed = ", ".join(f"{k} {old!r} -> {new_!r}" for k, (old, new_) in diff.items())
        print(f"resumed with changed settings (recorded in {history}): {listed}")
