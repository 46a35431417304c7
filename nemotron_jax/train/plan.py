"""Ahead-of-time plan of a training run: per-device memory, FLOPs and collectives of its step,
from abstract shapes, on whatever devices JAX sees (`tools/plan.py` fakes N CPU devices).

    figures = plan(config, mesh_shape=(1, 8, 1), hbm=80 * GiB)

The step is the loop's own (`train.loop.build_training`), lowered with the abstract sharded
state and an abstract batch (`Objective.batch_spec`) and compiled; no parameter is allocated
and no data is read. Per device:

    params, optimizer   the state's shard sizes (the state is donated: its output aliases it)
    gradients           a params-shaped tree in the param dtype, shard sizes (with LoRA, of the
                        trainable leaves only: adapters and heads); they live inside the step,
                        so `temporary` already holds them: shown as their own line, not added
                        again
    temporary           memory_analysis().temp_size_in_bytes: the step's peak of live buffers
                        other than its arguments and outputs
    total               argument + output - alias + temporary (memory_analysis): state and
                        batch, the outputs that do not reuse a donated buffer (the metrics),
                        and the temporaries

REINFORCE adds the frozen models that stay on the devices (the reference policy and the reward
model, in the run's dtypes, as `train/rollouts.py` restores them) and, while sampling, the KV
cache of the rollout batch and the sampler's copy of the policy's layer weights. With LoRA the
reference is the policy's own base with the adapters off, so it adds nothing
(`sampling.unstack_layers`). Its total is the larger of two phases: the update (the step's total
plus the frozen models) and the rollout (state, frozen models, cache and weight copy).

The figures are the CPU compiler's: its fusion and buffer scheduling differ from the GPU and
TPU compilers', so the temporaries are an estimate; the state figures are exact.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from nemotron_jax import sharding
from nemotron_jax.errors import ConfigError
from nemotron_jax.models import lora
from nemotron_jax.models.llama import LlamaConfig, abstract_params, init_cache
from nemotron_jax.models.reward import abstract_reward_params
from nemotron_jax.sampling import SAMPLER_WEIGHTS
from nemotron_jax.train import objectives
from nemotron_jax.train.loop import build_training, validate

GiB = 1 << 30
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def parse_bytes(text: str) -> int:
    """ "80GiB", "141GB", "95 GiB", "1024MiB" -> bytes (GB and GiB both read as 2^30: HBM sizes
    are quoted in GB but meant in GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B)\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--hbm {text!r}: expected a size like 80GiB, 141GB or 95GiB")
    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match[2][0].upper()]
    return int(float(match[1]) * unit)


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (device 0's
    shard of each leaf; shards are equal because the mesh divides every sharded axis)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def sampler_weight_bytes(layers, model_config: LlamaConfig, mesh, weights: str) -> int:
    """Per-device bytes of the policy's layer weights as the sampler holds them
    (`sampling.SamplingConfig.weights`), in the compute dtype the sampler casts them to. XLA
    all-gathers a layer's weights over data and fsdp before using them, leaving the tensor
    split: "gathered" keeps every layer gathered for the whole rollout, "per_step" about two
    (the one running and the next one's gather)."""
    if weights not in SAMPLER_WEIGHTS:
        raise ConfigError(f"config.rl.sampler_weights {weights!r}; choose from {SAMPLER_WEIGHTS}")
    itemsize = np.dtype(model_config.dtype).itemsize
    gathered = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(layers)) * itemsize
    gathered //= mesh.shape["tensor"]
    if weights == "per_step":
        return 2 * gathered // model_config.num_layers
    return gathered


# --- the compiled HLO ----------------------------------------------------------------------

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\s+([a-z][a-z0-9-]*)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")


def _array_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO type, e.g. "(f32[8,64]{1,0}, bf16[4])"."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        size = _ITEMSIZE.get(dtype, 1)  # f8 variants: 1 byte
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _dims(type_text: str) -> list[int]:
    match = _ARRAY.search(type_text)
    return [int(d) for d in match[2].split(",") if d] if match else []


def hlo_summary(hlo_text: str) -> tuple[float, dict[str, dict[str, float]]]:
    """(matmul FLOPs, collectives) of one device's compiled program, each instruction counted
    as often as it runs: a while body (the layer scan, the micro-batch scan) as many times as
    its known trip count. XLA's cost_analysis counts a loop body once.

    FLOPs are 2 x the output size x the contracted size of every dot (elementwise work is left
    out). Collectives: {kind: {"ops": in the program, "runs": per step, "bytes": result bytes
    moved per step}}.
    """
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header:
                current = header[1]
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        inst = _INSTRUCTION.match(line)
        if inst:
            computations[current].append(inst.groups())
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    # How many times each computation runs per step, from the entry down the call graph.
    runs: dict[str, float] = {}

    def visit(name: str, times: float) -> None:
        runs[name] = runs.get(name, 0.0) + times
        for _, _, opcode, rest in computations.get(name, []):
            if opcode == "while":
                trip = re.search(r'"known_trip_count":\{"n":"([0-9]+)"', rest)
                body = re.search(r"body=%([^\s,]+)", rest)
                visit(body[1], times * (int(trip[1]) if trip else 1))
            else:
                for callee in re.findall(
                    r"(?:calls|true_computation|false_computation)=%([^\s,]+)", rest
                ):  # noqa: E501
                    visit(callee, times)
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                for callee in re.findall(r"%([^\s,]+)", branches[1]) if branches else ():
                    visit(callee, times)

    visit(entry, 1.0)
    flops = 0.0
    collectives: dict[str, dict[str, float]] = {}
    for name, instructions in computations.items():
        times = runs.get(name, 0.0)
        if not times:
            continue
        shapes = {inst_name: type_text for inst_name, type_text, _, _ in instructions}
        for _, type_text, opcode, rest in instructions:
            if opcode == "dot":
                lhs = re.match(r"\s*%([^\s,)]+)", rest)
                contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
                lhs_dims = _dims(shapes.get(lhs[1], "")) if lhs else []
                k = math.prod(lhs_dims[int(i)] for i in contracting[1].split(",") if i)
                flops += times * 2 * math.prod(_dims(type_text)) * k
            kind = opcode.removesuffix("-start")
            if kind in COLLECTIVES:
                entry_ = collectives.setdefault(kind, {"ops": 0, "runs": 0.0, "bytes": 0.0})
                entry_["ops"] += 1
                entry_["runs"] += times
                # An async start's result is (operand, result): count the result only.
                moved = _array_bytes(type_text)
                if opcode.endswith("-start"):
                    moved = max(_array_bytes(t) for t in type_text.strip("()").split(", "))
                entry_["bytes"] += times * moved
    return flops, collectives


# --- the plan ------------------------------------------------------------------------------


def _boxed_like(tree: Any, names: tuple[str | None, ...]) -> Any:
    return jax.tree.map(lambda x: nn.LogicallyPartitioned(x, names[: len(x.shape)]), tree)


def _kv_cache_bytes(model_config: LlamaConfig, batch: int, length: int, mesh, rules) -> int:
    """Per-device bytes of the sampler's KV cache for `batch` rows of `length` slots, sharded
    as `init_cache` constrains it (rows over data and fsdp, KV heads over tensor)."""
    cache = jax.eval_shape(lambda: init_cache(model_config, batch, length))
    boxed = {
        "k": _boxed_like(cache["k"], ("act_batch", "act_heads", "act_seq", None)),
        "v": _boxed_like(cache["v"], ("act_batch", "act_heads", "act_seq", None)),
        "positions": _boxed_like(cache["positions"], ("act_batch", "act_seq")),
        "valid": _boxed_like(cache["valid"], ("act_batch", "act_seq")),
        "index": cache["index"],
    }
    return shard_bytes(sharding.sharded_shapes(boxed, mesh, rules))


def _reinforce_resident(config, objective, mesh, rules, rm_preset: str | None):
    """Per-device bytes of what REINFORCE keeps beside the policy's state."""
    policy = objective.model_config
    base = lora.base_config(policy)
    rm_config = (
        base
        if not rm_preset
        else LlamaConfig.preset(
            rm_preset, dtype=policy.dtype, param_dtype=policy.param_dtype, remat=policy.remat
        )
    )
    reference = 0  # with LoRA: the policy's base, adapters off (`rollouts`), no second copy
    if not policy.lora_rank:
        reference = shard_bytes(
            sharding.sharded_shapes(abstract_params(base, boxed=True), mesh, rules)
        )
    reward_model = shard_bytes(
        sharding.sharded_shapes(
            abstract_reward_params(rm_config, config.model.num_attributes, boxed=True),
            mesh,
            rules,
        )
    )
    rl = config.rl
    rows = rl.prompts_per_step * rl.num_rollouts_per_prompt
    # The sampler's cache holds prompt + new tokens - 1 slots (the last token is never fed back).
    kv_cache = _kv_cache_bytes(policy, rows, rl.max_prompt_len + rl.max_new_tokens - 1, mesh, rules)
    return {"reference": reference, "reward_model": reward_model, "kv_cache": kv_cache}


def plan(config, mesh_shape, hbm: int, *, rm_preset: str | None = None) -> dict[str, Any]:
    """Compiles `config`'s train step for a mesh of `mesh_shape` (data, fsdp, tensor) over the
    visible devices and returns the figures (see the module docstring; bytes are per device).

    Args:
        config: an experiment config (`experiments/configs/*.py`).
        mesh_shape: (data, fsdp, tensor); its product must be the device count.
        hbm: memory of one device in bytes, for the verdict.
        rm_preset: REINFORCE: the reward model's preset (default: the policy's architecture).
    """
    try:
        mesh = sharding.make_mesh(tuple(mesh_shape))
    except ValueError as e:
        raise ConfigError(f"--mesh: {e}") from None
    rules = validate(config, mesh)
    objective = objectives.build(config)
    updates_per_step = 1
    if config.objective == "reinforce":
        rollout = config.rl.prompts_per_step * config.rl.num_rollouts_per_prompt
        if rollout % config.batch_size:
            raise ConfigError(
                f"config.rl.prompts_per_step x num_rollouts_per_prompt = {rollout} is not a "
                f"multiple of config.batch_size {config.batch_size}"
            )
        updates_per_step = rollout // config.batch_size
    training = build_training(config, objective, mesh, rules, config.num_steps * updates_per_step)
    batch = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=training.batch_sharding),
        objective.batch_spec(config.batch_size, objective.seq_len),
    )

    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = training.train_step.lower(training.abstract_state, batch).compile()
    compile_seconds = time.perf_counter() - start

    memory = compiled.memory_analysis()
    state = training.abstract_state
    params = shard_bytes(state["params"])
    lora_rank = objective.model_config.lora_rank
    trainable = lora.split(state["params"])[0] if lora_rank else state["params"]
    per_device = {
        "params": params,
        "optimizer": shard_bytes(state["opt_state"]),
        "gradients": shard_bytes(trainable),  # a trainable-params-shaped tree, their dtypes
        "temporary": int(memory.temp_size_in_bytes),
        "total": int(
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
        ),
    }
    phases = {"update": per_device["total"]}
    if config.objective == "reinforce":
        resident = _reinforce_resident(config, objective, mesh, rules, rm_preset)
        per_device.update(resident)
        frozen = resident["reference"] + resident["reward_model"]
        sampler_weights = sampler_weight_bytes(
            state["params"]["layers"], objective.model_config, mesh, config.rl.sampler_weights
        )
        per_device["sampler_weights"] = sampler_weights
        phases = {
            "update": per_device["total"] + frozen,
            "rollout": params + per_device["optimizer"] + frozen + resident["kv_cache"]
            + sampler_weights,
        }  # fmt: skip
        per_device["total"] = max(phases.values())

    flops, collectives = hlo_summary(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    devices = mesh.devices.size
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    figures = {
        "objective": config.objective,
        "model": config.model.preset,
        "mesh": {axis: int(mesh.shape[axis]) for axis in mesh.axis_names},
        "devices": int(devices),
        "batch_size": int(config.batch_size),
        "seq_len": int(objective.seq_len),
        "updates_per_step": updates_per_step,  # REINFORCE: one per rollout minibatch
        "grad_accum": int(training.grad_accum),
        "micro_batch_per_device": config.batch_size // (dp * training.grad_accum),
        "remat": config.model.remat,
        "param_dtype": config.model.param_dtype,
        "dtype": config.model.dtype,
        "lora": None,
        "per_device": per_device,
        "phases": phases,
        "flops_per_step": flops * devices,
        "flops_per_device": flops,
        "xla_cost_analysis_flops": float(cost.get("flops", 0.0)),
        "collectives": collectives,
        "compile_seconds": round(compile_seconds, 1),
        "hbm": int(hbm),
        "fits": per_device["total"] <= hbm,
    }
    if lora_rank:
        trained, total = lora.count(state["params"])
        figures["lora"] = {
            "rank": int(lora_rank),
            "targets": list(objective.model_config.lora_targets),
            "trainable_params": trained,
            "total_params": total,
        }
    figures["levers"] = [] if figures["fits"] else levers(figures)
    return figures


def levers(figures: dict[str, Any]) -> list[str]:
    """What would make a step that does not fit fit, most effective first, each with a rough
    per-device estimate (state scales as 1/fsdp; activations with the per-device micro-batch)."""
    d, hbm = figures["per_device"], figures["hbm"]
    mesh = figures["mesh"]
    sharded = d["params"] + d["optimizer"] + d["gradients"]
    sharded += d.get("reference", 0) + d.get("reward_model", 0)
    rest = d["total"] - sharded  # activations, batch, cache: not sharded by fsdp
    activations = max(d["temporary"] - d["gradients"], 0)
    state_levers, activation_levers = [], []

    def gib(n):
        return f"{n / GiB:.1f} GiB"

    if rest < hbm:
        fsdp = mesh["fsdp"]
        target = fsdp * 2
        while sharded * fsdp / target + rest > hbm and target < 1 << 16:
            target *= 2
        if mesh["data"] > 1 and target <= mesh["data"] * fsdp:
            how = f"--mesh 1,{mesh['data'] * fsdp},{mesh['tensor']} (data axis folded into fsdp)"
        else:
            how = f"fsdp {target} ({target * mesh['data'] * mesh['tensor']} devices)"
        estimate = sharded * fsdp / target + rest
        state_levers.append(f"more fsdp: {how}: about {gib(estimate)}")
    if figures["remat"] == "none" and activations > 0:
        activation_levers.append(
            "remat: --config.model.remat=full keeps one layer's activations, not all"
        )
    if figures["micro_batch_per_device"] > 1:
        micro = figures["micro_batch_per_device"] // 2
        estimate = d["total"] - activations / 2
        activation_levers.append(
            f"smaller micro-batch: --config.micro_batch_size={micro} "
            f"(grad_accum {figures['grad_accum'] * 2}): about {gib(estimate)}"
        )
    # The larger of the two parts first.
    if activations > sharded:
        out = activation_levers + state_levers
    else:
        out = state_levers + activation_levers
    if activations > sharded and not activation_levers:
        out.append(
            "shorter sequences (--config.data.max_len, REINFORCE --config.rl.max_new_tokens) "
            "or sequence parallelism (not implemented yet): the [B, T, D] residual stream each "
            "layer saves is not sharded over fsdp or tensor"
        )
    if not figures.get("lora") and (activations <= sharded or rest >= hbm):
        # Adapters of rank 16 on the attention projections are well under 1% of the model:
        # their optimizer state and gradients are left out of the estimate.
        estimate = d["total"] - d["optimizer"] - d["gradients"] - d.get("reference", 0)
        out.append(
            "LoRA: lora=16 (--config.lora.rank=16) trains adapters only; the optimizer state "
            f"and gradients of the base{' and the reference' if 'reference' in d else ''} go "
            f"away: about {gib(estimate)}"
        )
    return out


def format_report(figures: dict[str, Any]) -> str:
    """The figures as the text `tools/plan.py` prints."""
    d = figures["per_device"]
    mesh = figures["mesh"]

    def gib(n):
        return f"{n / GiB:8.2f} GiB"

    lines = [
        f"{figures['objective']} {figures['model']} on {figures['devices']} devices, mesh "
        f"data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}; batch "
        f"{figures['batch_size']} x {figures['seq_len']} tokens, grad_accum "
        f"{figures['grad_accum']} ({figures['micro_batch_per_device']} per device and "
        f"micro-batch), remat {figures['remat']}, params {figures['param_dtype']}, compute "
        f"{figures['dtype']}; compiled in {figures['compile_seconds']:.0f} s",
    ]
    if figures.get("lora"):
        a = figures["lora"]
        lines.append(
            f"LoRA rank {a['rank']} on {', '.join(a['targets'])}: {a['trainable_params']:,} of "
            f"{a['total_params']:,} parameters train "
            f"({100 * a['trainable_params'] / a['total_params']:.2f}%)"
        )
    lines += [
        "per device:",
        f"  params          {gib(d['params'])}",
        f"  optimizer       {gib(d['optimizer'])}",
        f"  gradients       {gib(d['gradients'])}   (inside temporary)",
        f"  temporary       {gib(d['temporary'])}",
    ]
    for key, label in (
        ("reference", "reference"),
        ("reward_model", "reward model"),
        ("kv_cache", "KV cache"),
        ("sampler_weights", "sampler copy"),
    ):
        if key in d:
            why = (
                "   (the base, adapters off)" if key == "reference" and figures.get("lora") else ""
            )
            lines.append(f"  {label:<15} {gib(d[key])}{why}")
    lines.append(f"  total           {gib(d['total'])}")
    if len(figures["phases"]) > 1:
        phases = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in figures["phases"].items())
        lines.append(f"  (largest phase of: {phases})")
    step = "step"
    if figures["updates_per_step"] > 1:
        step = f"update ({figures['updates_per_step']} per rollout step; sampling not counted)"
    lines.append(
        f"FLOPs per {step} {figures['flops_per_step']:.3e} "
        f"({figures['flops_per_device']:.3e} per device, matmuls)"
    )
    lines.append(f"collectives per {step.split()[0]}, per device:")
    for kind, c in sorted(figures["collectives"].items()):
        lines.append(
            f"  {kind:<19} {c['ops']:4d} ops, {c['runs']:6.0f} runs, {c['bytes'] / GiB:8.2f} GiB"
        )
    if not figures["collectives"]:
        lines.append("  none")
    hbm = figures["hbm"] / GiB
    if figures["fits"]:
        free = (figures["hbm"] - d["total"]) / GiB
        lines.append(f"verdict: fits in {hbm:.0f} GiB ({free:.1f} GiB free)")
    else:
        lines.append(f"verdict: does not fit in {hbm:.0f} GiB; levers:")
        lines.extend(f"  - {lever}" for lever in figures["levers"])
    return "\n".join(lines)
