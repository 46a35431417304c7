"""The one training loop, shared by every objective (`nemotron_jax/train/objectives/`).

    run(config, workdir) -> final metrics

mesh -> data -> model and optimizer -> state (resume order below) -> a step jitted once with
in/out shardings and donated state -> log / validate / checkpoint.

Each step asks the objective's batch source for its batches (`produce(params, step)`): one
dataset batch for supervised objectives, a rollout batch's minibatches for REINFORCE, which then
makes one optimizer update per minibatch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from nemotron_jax import artifact, distributed, sharding
from nemotron_jax.errors import CheckpointError, ConfigError, Preempted, TrainingDiverged
from nemotron_jax.metrics import MetricWriter
from nemotron_jax.models import lora
from nemotron_jax.optim import make_optimizer
from nemotron_jax.train import objectives, settings
from nemotron_jax.train.steps import finish_metrics, make_eval_step, make_train_step, zero_sums
from nemotron_jax.train.workdir import check_resume, record_config

# Above this fraction of lost (rounded-away) 16-bit parameter updates the run warns, once.
LOST_UPDATE_WARNING = 0.1


def validate(config, mesh) -> sharding.Rules:
    """Fails at start, naming the config key, on settings the run could only fail on later;
    returns the validated sharding rules."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = grad_accum(config, mesh)
    if config.batch_size % (dp * accum):
        raise ConfigError(
            f"batch_size {config.batch_size} is not divisible by data-parallel size {dp} x "
            f"grad_accum {accum} (mesh {dict(mesh.shape)})"
        )
    if config.eval_batch_size % dp:
        raise ConfigError(f"eval_batch_size {config.eval_batch_size} is not divisible by {dp}")
    if config.num_steps <= 0:
        raise ConfigError(f"num_steps must be positive, got {config.num_steps}")
    rules = tuple(tuple(rule) for rule in config.sharding_rules)
    try:
        sharding.validate_rules(rules)
    except ConfigError as e:
        raise ConfigError(f"config.sharding_rules: {e}") from None
    return rules


@dataclasses.dataclass(frozen=True)
class Training:
    """What a run compiles, before any array exists.

    Attributes:
        tx: the optimizer.
        init_state: `() -> boxed state`; jit it with `out_shardings=state_sharding`.
        abstract_state: {"step", "params", "opt_state"} as `jax.ShapeDtypeStruct`s carrying
            their shardings (what a checkpoint restores into, what a plan lowers with).
        state_sharding: the same tree of `NamedSharding`s.
        batch_sharding: every batch leaf split on its leading axis over (data, fsdp).
        grad_accum: micro-batches per optimizer update.
        train_step: `(state, batch) -> (state, metrics)`, jitted with in/out shardings and
            donated state.
        adapters_only: LoRA: only the adapters (and a head) train; the rest is a frozen base.
    """

    tx: optax.GradientTransformation
    init_state: Callable[[], Any]
    abstract_state: Any
    state_sharding: Any
    batch_sharding: NamedSharding
    grad_accum: int
    train_step: Any
    adapters_only: bool


def grad_accum(config, mesh) -> int:
    """Micro-batches per update: batch_size / (micro_batch_size x data-parallel devices) when
    config.micro_batch_size is set, else config.grad_accum."""
    if config.micro_batch_size <= 0:
        return config.grad_accum
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.grad_accum != 1:
        raise ConfigError(
            f"config.grad_accum is {config.grad_accum} and config.micro_batch_size is "
            f"{config.micro_batch_size}: set one (micro_batch_size derives grad_accum)"
        )
    if config.batch_size % (config.micro_batch_size * dp):
        raise ConfigError(
            f"config.batch_size {config.batch_size} is not a multiple of micro_batch_size "
            f"{config.micro_batch_size} x data-parallel size {dp} (mesh {dict(mesh.shape)})"
        )
    return config.batch_size // (config.micro_batch_size * dp)


def build_training(config, objective, mesh, rules, total_updates: int) -> Training:
    """The optimizer, the abstract sharded state and the jitted train step of `objective` on
    `mesh`; nothing is allocated. `total_updates` sets the learning-rate schedule's length."""
    if objective.make_optimizer is not None:
        tx = objective.make_optimizer(total_updates)
    else:
        tx = make_optimizer(config.optim, total_updates)
    rng = jax.random.PRNGKey(config.seed)
    # LoRA: only the adapters (and a reward or value head) train; the optimizer holds state
    # for those alone.
    adapters_only = objective.model_config.lora_rank > 0

    def init_state():
        params = objective.init(rng)  # boxed: logical names travel into the optimizer state
        trainable = lora.split(params)[0] if adapters_only else params
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(trainable)}

    abstract_boxed = jax.eval_shape(init_state)
    abstract_state = sharding.sharded_shapes(abstract_boxed, mesh, rules)
    state_sharding = jax.tree.map(lambda a: a.sharding, abstract_state)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    accum = grad_accum(config, mesh)
    train_step = jax.jit(
        make_train_step(
            objective.apply,
            objective.loss,
            tx,
            accum,
            adapters_only=adapters_only,
            dropout_seed=config.seed if objective.model_config.lora_dropout > 0 else None,
        ),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, NamedSharding(mesh, P())),
        donate_argnames=("state",),
    )
    return Training(
        tx,
        init_state,
        abstract_state,
        state_sharding,
        batch_sharding,
        accum,
        train_step,
        adapters_only,
    )


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# Running sums carried through one computation each: every update depends on the last, so
# they run in order instead of piling up as independent multi-device computations.
@jax.jit
def _add_trees(total, more):
    return jax.tree.map(jnp.add, total, more)


@jax.jit
def _add_tokens(total, attention_mask) -> jax.Array:
    return total + jnp.sum(attention_mask, dtype=jnp.int32)


@contextlib.contextmanager
def stop_requests():
    """While training: SIGTERM or SIGINT asks the loop to stop after the current step (it then
    checkpoints that step); a second signal exits at once. Yields a callable `(step) -> name of
    the signal received, or None`, called once per step. Outside the main thread (where
    handlers cannot be installed) nothing is caught.

    With several processes the processes must stop at the same step, and a scheduler's SIGTERM
    reaches them at different times: JAX's preemption service (which `jax.distributed`
    installs for SIGTERM) agrees on the step, `reached_preemption_sync_point`."""
    received: list[str] = []
    if distributed.process_count() > 1:
        from jax.experimental import multihost_utils

        yield (
            lambda step: "SIGTERM" if multihost_utils.reached_preemption_sync_point(step) else None
        )
        return
    if threading.current_thread() is not threading.main_thread():
        yield lambda step: None
        return

    def handler(signum, frame):
        if received:  # the second signal: leave now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        received.append(signal.Signals(signum).name)
        print(f"{received[0]}: stopping after this step (again to exit now)", file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda step: received[0] if received else None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _stderr_captured():
    """Sends file descriptor 2 to a temporary file (TensorStore's threads report a failed
    read there, as tracebacks of their own); yields a callable returning what was written."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        text: list[str] = []
        try:
            yield lambda: "".join(text)
        finally:
            time.sleep(0.2)  # let late callbacks of a failed read land here, not on the console
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read().decode(errors="replace"))


class _AbandonedReads(logging.Filter):
    """A failed restore leaves orbax's other read tasks unawaited; asyncio logs each one's
    exception when it is garbage-collected ("Task exception was never retrieved"), at any later
    moment, as a traceback. The failure is already reported in one line: drop those records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Task exception was never retrieved")


_ABANDONED_READS = _AbandonedReads()


def restore_intact(manager: ocp.CheckpointManager, args) -> tuple[int, Any]:
    """(step, restored) of the newest checkpoint that restores. Newer ones that are
    incomplete, unreadable or empty (a crash mid-write, a full disk, a truncated copy) are each
    reported in one line and moved aside into `<checkpoints>.corrupt/`, never deleted.

    Raises:
        CheckpointError: no step restores; nothing is moved, the directory is named.
    """
    directory = os.fspath(manager.directory)
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        with _stderr_captured() as captured:
            try:
                restored = manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - any failure to read a step: try the next
                lines = str(e).strip().splitlines()
                failures.append((step, f"{type(e).__name__}: {lines[0][:200] if lines else ''}"))
                restored = None
                logging.getLogger("asyncio").addFilter(_ABANDONED_READS)
        if restored is None:  # what the failed read printed is in the one line below
            continue
        sys.stderr.write(captured())
        for bad, reason in failures if distributed.is_primary() else ():
            aside = os.path.join(directory + ".corrupt", f"{bad}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            os.replace(os.path.join(directory, str(bad)), aside)
            print(
                f"warning: checkpoint step {bad} in {directory} is unreadable ({reason}); "
                f"moved to {aside}; resuming from step {step}",
                file=sys.stderr,
            )
        if failures:
            distributed.sync("corrupt_checkpoints_moved")
            manager.reload()
        return step, restored
    listed = "; ".join(f"step {s}: {r}" for s, r in failures)
    raise CheckpointError(
        f"{directory}: no checkpoint restores ({listed}); move the directory aside to start over"
    )


def run(config, workdir: str) -> dict[str, float]:
    settings.check(config)
    os.makedirs(workdir, exist_ok=True)
    jax.config.update("jax_threefry_partitionable", True)
    mesh = sharding.make_mesh(tuple(config.mesh))
    rules = validate(config, mesh)
    primary = distributed.is_primary()  # process 0 writes the workdir's files and the console

    objective = objectives.build(config)
    if jnp.dtype(objective.model_config.param_dtype).itemsize < 4 and primary:
        print(
            f"warning: config.model.param_dtype is {config.model.param_dtype}: parameters, "
            f"gradients and Adam moments in 16 bits (pure bf16); updates below a weight's "
            f"resolution are lost. float32 master weights: model.param_dtype=float32",
            file=sys.stderr,
        )
    data = objective.make_data(mesh, rules, workdir)
    if "summary" in data.report and primary:
        print(data.report["summary"])
    has_eval = bool(data.eval_batches) or data.evaluate is not None
    if config.validation and not has_eval:
        raise ConfigError(
            f"the validation split of {data.report.get('data_dir', 'the data')} is empty; "
            f"config.validation=False trains without one"
        )
    if not config.validation:
        has_eval = False
    # Online objectives make several optimizer updates per step (one per rollout minibatch).
    training = build_training(
        config, objective, mesh, rules, config.num_steps * data.train.updates_per_step
    )
    abstract_state, state_sharding = training.abstract_state, training.state_sharding
    batch_sharding, train_step = training.batch_sharding, training.train_step
    replicated = NamedSharding(mesh, P())

    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.max_to_keep, enable_async_checkpointing=True
        ),
    )
    source = data.train

    # Where the state comes from, first match wins:
    #   1. the workdir's newest intact checkpoint: exact resume (state and data-iterator
    #      position), if the config still describes the same run (`workdir.check_resume`);
    #   2. config.init_from: parameters only (an HF-converted backbone or an earlier model);
    #   3. from scratch.
    #
    # With LoRA a checkpoint holds the adapters, heads and optimizer state but not the frozen
    # base (for a 70B base, 140 GB less per save): a resume rebuilds the base as step 0 built it
    # (seed, then init_from) and checks its fingerprint against the one saved with the step.
    adapters_only = training.adapters_only

    def saved(tree):  # the part of the state (or its abstract shapes) that a checkpoint holds
        return {**tree, "params": lora.split(tree["params"])[0]} if adapters_only else tree

    def initial_state(announce: bool):
        init_state = training.init_state
        state = jax.jit(lambda: nn.unbox(init_state()), out_shardings=state_sharding)()
        if config.init_from:
            state["params"] = objective.load_init(
                config.init_from,
                state["params"],
                state_sharding["params"],
                init_head=config.init_head,
            )
            if primary and announce:
                print(f"initialised parameters from {config.init_from}")
        return state

    def base_fingerprint_of(params) -> int:
        return int(distributed.fetch(lora.fingerprint(lora.split(params)[1])))

    start = manager.latest_step()
    if start is not None:
        check_resume(workdir, config, start)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if start is not None:
            items = dict(
                state=ocp.args.StandardRestore(saved(abstract_state)), data=ocp.args.JsonRestore()
            )
            if adapters_only:
                items["base"] = ocp.args.JsonRestore()
            start, restored = restore_intact(manager, ocp.args.Composite(**items))
            state = restored.state
            if adapters_only:
                rebuilt = initial_state(announce=False)["params"]
                base_fingerprint = base_fingerprint_of(rebuilt)
                if base_fingerprint != restored.base["fingerprint"]:
                    # PPO's critic base comes from the reward model.
                    keys = "config.init_from" + (
                        " or config.rm_from" if "critic" in rebuilt else ""
                    )
                    raise ConfigError(
                        f"{keys} ({config.init_from}): the frozen base differs from the one "
                        f"that {workdir}/checkpoints step {start} was trained on (LoRA "
                        f"checkpoints hold only the adapters and heads); give that base back, "
                        f"or train in a new workdir"
                    )
                state = {**state, "params": lora.combine(state["params"], lora.split(rebuilt)[1])}
            source.set_state(restored.data)
            if primary:
                print(f"resumed from {workdir}/checkpoints step {start}")
            record_config(workdir, config, start)
        else:
            state = initial_state(announce=True)
            if adapters_only:  # saved with every step: the base never changes
                base_fingerprint = base_fingerprint_of(state["params"])
            record_config(workdir, config, None)
            start = 0

        eval_step = jax.jit(
            make_eval_step(objective.apply, objective.loss),
            in_shardings=(state_sharding["params"], batch_sharding, replicated),
            out_shardings=replicated,
        )

        eval_zeros = []

        def evaluate(params) -> dict[str, float]:
            if data.evaluate is not None:
                return data.evaluate(params)
            total = None
            for batch in data.eval_batches:  # whole batches: each process places its rows
                batch = distributed.put_global(batch, batch_sharding)
                if total is None:
                    if not eval_zeros:  # traced once: every eval batch has the same shapes
                        eval_zeros.append(zero_sums(objective.apply, objective.loss, params, batch))
                    total = distributed.put_global(eval_zeros[0], replicated)
                total = eval_step(params, batch, total)
            return finish_metrics(distributed.fetch(total)) if total is not None else {}

        writer = MetricWriter(
            workdir, tensorboard=config.tensorboard, resume_step=start, enabled=primary
        )
        if primary:
            with open(os.path.join(workdir, "data_report.json"), "w") as f:
                json.dump(data.report, f, indent=2)
        bar = tqdm(
            total=config.num_steps,
            initial=start,
            desc=config.name,
            disable=not (config.progress and primary),
        )
        last_eval: dict[str, float] = {}
        # Real tokens since the last log, summed on the device: no per-step host sync.
        no_tokens = distributed.put_global(np.zeros((), np.int32), replicated)
        tokens, t0 = no_tokens, time.perf_counter()
        warned_lost_updates = False

        def diverged(done, what):
            manager.wait_until_finished()
            good = manager.latest_step()
            kept = f"{workdir}/checkpoints step {good}" if good is not None else "none"
            raise TrainingDiverged(
                f"step {done}: {what}; stopped, last good checkpoint: {kept} (kept; lower "
                f"config.optim.lr or check the data)"
            )

        # Non-finite steps (their updates were not applied), counted on the device and read
        # with the metrics and before each save: no host sync per step.
        nonfinite = distributed.put_global(
            {"count": np.zeros((), np.int32), "first": np.full((), -1, np.int32)}, replicated
        )

        def note_nonfinite(step_metrics, done):
            flag = step_metrics.pop("nonfinite")[0] > 0
            first = nonfinite["first"]
            nonfinite["first"] = jnp.where((first < 0) & flag, done, first)
            nonfinite["count"] = nonfinite["count"] + flag.astype(jnp.int32)

        def check_nonfinite(done) -> int:
            """Stops the run as config.nan_policy says; returns the steps skipped so far."""
            count, first = (
                int(x) for x in distributed.fetch((nonfinite["count"], nonfinite["first"]))
            )
            if count and config.nan_policy == "stop":
                diverged(first, "the loss or the gradient norm is not finite (update not applied)")
            if count > config.nan_max_skips:
                diverged(
                    first,
                    f"{count} steps since it had a non-finite loss or gradient norm, more than "
                    f"config.nan_max_skips={config.nan_max_skips}",
                )
            return count

        def save(done, state):  # the state and the data iterator's position, as one step
            # One reduction per save: a non-finite state is never checkpointed.
            check_nonfinite(done)
            kept = saved(state)
            if not distributed.fetch(_all_finite(kept["params"])):
                diverged(done, "the parameters are not finite")
            items = dict(
                state=ocp.args.StandardSave(kept),
                data=ocp.args.JsonSave(source.get_state()),
            )
            if adapters_only:
                items["base"] = ocp.args.JsonSave({"fingerprint": base_fingerprint})
            manager.save(done, args=ocp.args.Composite(**items))

        with stop_requests() as stop_signal:
            for step in range(start, config.num_steps):
                batches, produced = source.produce(state["params"], step)
                t_update = time.perf_counter()
                metrics = None
                for batch in batches:  # one, or a rollout's minibatches
                    # This process's rows (numpy) into one global batch; a rollout's minibatches
                    # already are global arrays on batch_sharding.
                    batch = distributed.global_batch(batch, batch_sharding)
                    tokens = _add_tokens(tokens, batch["attention_mask"])
                    state, m = train_step(state, batch)
                    note_nonfinite(m, step + 1)
                    metrics = m if metrics is None else _add_trees(metrics, m)
                if produced:  # an online step: time its updates too
                    jax.block_until_ready(state)
                    produced["time_update"] = time.perf_counter() - t_update
                done = step + 1
                if done % config.log_every == 0 or done == config.num_steps:
                    skipped = check_nonfinite(done)
                    metrics = {**finish_metrics(distributed.fetch(metrics)), **produced}
                    if config.nan_policy == "skip":
                        metrics["skipped_steps"] = skipped
                    lost = metrics.get("lost_update_fraction", 0.0)
                    if lost > LOST_UPDATE_WARNING and not warned_lost_updates and primary:
                        print(
                            f"warning: step {done}: {lost:.0%} of the {config.model.param_dtype} "
                            f"parameter updates were below the parameters' resolution and lost; "
                            f"model.param_dtype=float32 keeps float32 master weights",
                            file=sys.stderr,
                        )
                        warned_lost_updates = True
                    if not np.isfinite(metrics["loss"]) and config.nan_policy == "stop":
                        diverged(done, f"the loss is {metrics['loss']}")
                    elapsed = time.perf_counter() - t0
                    tokens_seen = int(distributed.fetch(tokens))
                    metrics["tokens_per_s"] = tokens_seen / max(elapsed, 1e-9)
                    tokens, t0 = no_tokens, time.perf_counter()
                    writer.write(done, "train", metrics)
                    bar.set_postfix(
                        {k: f"{metrics[k]:.3g}" for k in objective.progress_keys if k in metrics}
                        | {"tok/s": f"{metrics['tokens_per_s']:.0f}"}
                    )
                if has_eval and (done % config.eval_every == 0 or done == config.num_steps):
                    last_eval = evaluate(state["params"])
                    writer.write(done, "eval", last_eval)
                if done % config.checkpoint_every == 0 or done == config.num_steps:
                    save(done, state)
                bar.update(1)
                stopped_by = stop_signal(done)
                if stopped_by and done < config.num_steps:
                    if done % config.checkpoint_every:
                        save(done, state)
                    manager.wait_until_finished()
                    bar.close()
                    writer.close()
                    manager.close()
                    raise Preempted(
                        f"{stopped_by}: stopped after step {done} of {config.num_steps}; its "
                        f"checkpoint is in {workdir}/checkpoints: rerun the same command to resume"
                    )
        bar.close()
        if has_eval and not last_eval:  # resumed a finished run: report it anyway
            last_eval = evaluate(state["params"])
        manager.wait_until_finished()
        writer.close()

        # The trained parameters as params checkpoints: <workdir>/params is what `init_from`
        # and the export tools read (PPO also writes its critic).
        for name, (params, arch, kind, heads) in objective.exports(state["params"]).items():
            export = os.path.join(workdir, name)
            stale = export + ".stale"
            if os.path.exists(export) and primary:  # from a shorter run of this workdir
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(export, stale)
            distributed.sync(f"old_{name}_moved")
            artifact.save(
                export,
                params,
                config=arch,
                kind=kind,
                num_attributes=heads,
                tokenizer=data.tokenizer,
                template=config.data.template,
                max_len=config.data.max_len,
                extra={"objective": objective.name},
            )
            if primary:
                shutil.rmtree(stale, ignore_errors=True)
    manager.close()
    return last_eval
