"""What the training loop needs of an objective: the model, the loss, a batch source and how an
initial checkpoint maps onto the parameters. The loop never branches on the objective; each
family (`nemotron_jax/train/objectives/`) builds one `Objective`.

A batch source has `produce(params, step) -> (batches, metrics)`, `updates_per_step` and
`get_state` / `set_state` for exact resume. Supervised objectives read one dataset batch per
step (`DatasetSource`); REINFORCE samples a rollout batch and splits it into minibatches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from nemotron_jax import artifact
from nemotron_jax.data.helpsteer2 import NUM_LABEL_SLOTS
from nemotron_jax.errors import ConfigError
from nemotron_jax.models import lora
from nemotron_jax.models.llama import LlamaConfig


@dataclasses.dataclass
class DataBundle:
    train: Any  # the batch source (see the module docstring)
    eval_batches: list[dict[str, np.ndarray]]  # the whole validation split, padded
    report: dict[str, Any]
    tokenizer: Any
    # Objectives that evaluate by other means than a loss on eval_batches (REINFORCE: reward
    # and win rate of samples on held-out prompts): params -> metrics.
    evaluate: Callable[[Any], dict[str, float]] | None = None


@dataclasses.dataclass(frozen=True)
class Objective:
    """One objective, bound to its options.

    Attributes:
        name: config.objective, recorded in the trained model's metadata.
        model_config: the architecture trained.
        module: the Flax module (`Llama` or `RewardModel`).
        loss_fn: `(outputs, batch) -> (per-example loss [B], weight [B], metrics)`.
        progress_keys: metrics shown on the progress bar.
        make_data: `(mesh, rules, workdir=None) -> DataBundle`; the mesh and rules place
            frozen models that online objectives sample or score with; the workdir holds what
            an objective computes once per run (DPO's reference log-probs).
        batch_spec: `(batch_size, seq_len) -> {key: jax.ShapeDtypeStruct}`, the keys, shapes
            and dtypes of one training batch as the batch source yields it, without reading
            data (what an ahead-of-time plan lowers the step with).
        seq_len: T of the training batches: config.data.max_len, or for REINFORCE the prompt
            plus the new tokens.
        num_attributes: the reward head's slots A; None for a causal LM.
        method: the module method `apply` calls (None: `__call__`).
        make_optimizer: `(total_updates) -> optax transform`; None: `optim.make_optimizer`
            from config.optim (PPO: one optimizer per model).
    """

    name: str
    model_config: LlamaConfig
    module: Any
    loss_fn: Callable
    progress_keys: tuple[str, ...]
    make_data: Callable[..., DataBundle]
    batch_spec: Callable[[int, int], dict[str, jax.ShapeDtypeStruct]]
    seq_len: int
    num_attributes: int | None = None
    method: str | None = None
    make_optimizer: Callable[[int], Any] | None = None

    @property
    def kind(self) -> str:
        return "causal_lm" if self.num_attributes is None else "reward_model"

    def init(self, rng):
        """Boxed (logically annotated) parameters; call under jax.eval_shape or jit."""
        tokens = jax.numpy.zeros((1, 1), jax.numpy.int32)
        return self.module.init(rng, tokens, attention_mask=tokens + 1)["params"]

    def apply(self, params, batch, rng=None):
        """The module's outputs on `batch`; `rng` draws the LoRA adapters' dropout."""
        tokens, mask = batch["tokens"], batch["attention_mask"]
        if self.kind == "causal_lm" and tokens.ndim == 3:  # pairs [B, 2, T] -> rows [2B, T]
            b, k, t = tokens.shape
            tokens, mask = tokens.reshape(b * k, t), mask.reshape(b * k, t)
        rngs = None if rng is None else {"dropout": rng}
        return self.module.apply(
            {"params": params}, tokens, attention_mask=mask, method=self.method, rngs=rngs
        )

    def loss(self, outputs, batch):
        return self.loss_fn(outputs, batch)

    def load_init(self, path: str, params, shardings, *, init_head: bool = True):
        """Replaces `params` leaves by those of the trained model at `path`: the backbone, and
        the head of our kind. An LM's head always comes along; a reward head only with
        `init_head` and when the checkpoint has one (an LM checkpoint has none)."""
        return restore_into(
            path, params, shardings, self.model_config, self.kind, init_head, "init_from"
        )

    def exports(self, params) -> dict[str, tuple[Any, LlamaConfig, str, int | None]]:
        """What the run writes as trained models: {workdir subdirectory: (params, architecture,
        kind, num_attributes)}. "params" is what `init_from` and the export tools read."""
        return {"params": (params, self.model_config, self.kind, self.num_attributes)}


def restore_into(path: str, params, shardings, arch: LlamaConfig, kind: str, init_head, what):
    """`params` (placed, of architecture `arch`) with the leaves of the trained model at `path`
    put in: the backbone, and the head of `kind` (an LM's always; a reward head with
    `init_head` when the checkpoint has one). `what` names the config key in errors."""
    model = artifact.load(path, restore=False)
    model.check_architecture(arch, what)
    head = artifact.HEAD_KEY[kind]
    wanted = set(artifact.BACKBONE_KEYS)
    if kind == "causal_lm" or (init_head and (head, "kernel") in model.saved_leaves()):
        wanted.add(head)
    # The run's own adapters (if any) keep their fresh init; saved adapters merge (`restore`).
    target = {k: v for k, v in params.items() if k in wanted}
    target, target_shardings = (
        _without_adapters(tree) for tree in (target, {k: shardings[k] for k in target})
    )
    return lora.combine(model.restore(target, target_shardings), params)


def _without_adapters(tree):
    from flax import traverse_util

    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if not lora.is_adapter(p)})


def model_config(config) -> LlamaConfig:
    """The `LlamaConfig` that `config.model` describes."""
    m = config.model
    fields = dict(
        m.overrides,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        remat=m.remat,
        attention_impl=m.attention_impl,
        lora_rank=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_targets=tuple(config.lora.targets),
        lora_dropout=config.lora.dropout,
    )
    try:
        return LlamaConfig.preset(m.preset, **fields)
    except ConfigError as e:
        where = "config.lora" if str(e).startswith("lora_") else "config.model"
        raise ConfigError(f"{where}: {e}") from None


def supervised_batch_spec(kind: str):
    """`(batch_size, seq_len) -> {key: ShapeDtypeStruct}` of the dataset batches of `kind`
    (regression, pairs or sft), as `nemotron_jax.data.formatting` pads each example."""

    def spec(batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        paired = kind in ("pairs", "lm_pairs")
        tokens = (batch_size, 2, seq_len) if paired else (batch_size, seq_len)
        extra = {
            "regression": {"labels": ((batch_size, NUM_LABEL_SLOTS), np.float32)},
            "pairs": {"strength": ((batch_size,), np.int32)},
            "lm_pairs": {
                "strength": ((batch_size,), np.int32),
                "loss_mask": (tokens, np.int32),
                "reference_logprobs": ((batch_size, 2), np.float32),
            },
            "sft": {"loss_mask": (tokens, np.int32)},
        }[kind]
        shapes = {
            "index": ((batch_size,), np.int32),
            "tokens": (tokens, np.int32),
            "attention_mask": (tokens, np.int32),
            **extra,
        }
        return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}

    return spec


class DatasetSource:
    """One dataset batch per step; the state is the grain iterator's position."""

    updates_per_step = 1

    def __init__(self, dataset):
        self._iter = iter(dataset)

    def produce(self, params, step: int) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
        del params, step
        return [next(self._iter)], {}

    def get_state(self):
        return self._iter.get_state()

    def set_state(self, state) -> None:
        self._iter.set_state(state)


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Completes a short last batch by repeating its first row with example_weight 0."""
    n = len(next(iter(batch.values())))
    weight = np.concatenate([np.ones(n, np.float32), np.zeros(size - n, np.float32)])
    out = {k: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) for k, v in batch.items()}
    out["example_weight"] = weight
    return out


def supervised_data(
    config, model_config: LlamaConfig, kind: str, mesh, drop_ties=False, prepare=None
) -> DataBundle:
    """A dataset batch per step and the whole validation split as eval batches, for `kind`
    examples (see `nemotron_jax.data.splits`). Each process materialises only its rows of every
    global training batch (those its devices hold on `mesh`); the validation batches are whole
    (the loop places each process's rows). `mesh` None reads whole training batches.
    `prepare(splits)`, when given, runs on the encoded splits before batching (DPO adds the
    reference's log-probs to each example there)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from nemotron_jax import distributed
    from nemotron_jax.data import splits
    from nemotron_jax.data.pipeline import make_dataset

    data = splits.load(config.data, kind, drop_ties=drop_ties)
    artifact.check_vocabulary(data.tokenizer, model_config)
    if prepare is not None:
        prepare(data)
    rows = None  # no mesh (a test reading batches): whole batches
    if mesh is not None:
        rows = distributed.local_rows(NamedSharding(mesh, P(("data", "fsdp"))), config.batch_size)
    train_ds = make_dataset(data.train, batch_size=config.batch_size, seed=config.seed, rows=rows)
    eval_batches = []
    if len(data.validation):
        eval_ds = make_dataset(
            data.validation,
            batch_size=config.eval_batch_size,
            seed=0,
            shuffle=False,
            num_epochs=1,
            drop_remainder=False,
        )
        for batch in eval_ds:
            batch = dict(batch)
            n = len(batch["tokens"])
            if n < config.eval_batch_size:
                batch = _pad_batch(batch, config.eval_batch_size)
            else:  # same keys in every eval batch: one compiled eval step
                batch["example_weight"] = np.ones(n, np.float32)
            eval_batches.append(batch)
    return DataBundle(DatasetSource(train_ds), eval_batches, data.report, data.tokenizer)
