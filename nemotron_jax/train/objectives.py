"""What differs between objectives, in one place: the model, the loss, the data and how an
initial checkpoint maps onto the parameters. The loop itself never branches on the objective.

    regression      RewardModel on HelpSteer2 ratings (9-slot labels, -100 = missing)
    *_bt            RewardModel on HelpSteer2-Preference pairs [B, 2, T] (regular, margin, scaled)
    sft             Llama LM on well-rated responses (next-token loss on response tokens)
    reinforce       Llama LM on its own samples, scored by a frozen reward model (REINFORCE with
                    a leave-one-out baseline; batches come from `train/rollouts.py`)

Every objective hands the loop a batch source: `produce(params, step) -> (batches, metrics)`
plus `get_state` / `set_state` for exact resume. Supervised objectives read one batch of the
dataset per step; REINFORCE samples a rollout batch and splits it into several minibatches.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nemotron_jax import checkpoint as params_ckpt
from nemotron_jax.errors import ConfigError
from nemotron_jax.losses import get_loss
from nemotron_jax.models.llama import Llama, LlamaConfig
from nemotron_jax.models.reward import RewardModel

REWARD_OBJECTIVES = ("regression", "regular_bt", "margin_bt", "scaled_bt")
OBJECTIVES = REWARD_OBJECTIVES + ("sft", "reinforce")
BACKBONE_KEYS = ("embed_tokens", "layers", "norm")
# Fields that may differ between an init checkpoint and the run: numerics and implementation
# choices, none of which changes a parameter.
NUMERIC_FIELDS = {
    "dtype",
    "param_dtype",
    "logits_dtype",
    "remat",
    "scan_unroll",
    "attention_impl",
    "matmul_impl",
}


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    model_config: LlamaConfig
    module: Any
    loss_fn: Callable
    num_attributes: int | None
    progress_keys: tuple[str, ...]
    method: str | None = None  # the module method `apply` calls (None: __call__)

    @property
    def is_reward(self) -> bool:
        return self.name in REWARD_OBJECTIVES

    def init(self, rng):
        """Boxed (logically annotated) parameters; call under jax.eval_shape or jit."""
        tokens = jax.numpy.zeros((1, 1), jax.numpy.int32)
        if self.is_reward:
            return self.module.init(rng, tokens, attention_mask=tokens + 1)["params"]
        return self.module.init(rng, tokens)["params"]

    def apply(self, params, batch):
        return self.module.apply(
            {"params": params},
            batch["tokens"],
            attention_mask=batch["attention_mask"],
            method=self.method,
        )

    def loss(self, outputs, batch):
        return self.loss_fn(outputs, batch)

    def metadata(self) -> dict[str, Any]:
        return {
            "model_config": self.model_config.to_dict(),
            "kind": "reward_model" if self.is_reward else "causal_lm",
            "num_attributes": self.num_attributes,
            "objective": self.name,
        }

    def load_init(self, path: str, params, shardings, *, init_head: bool = True):
        """Replaces `params` leaves by those of the params checkpoint at `path`.

        A reward model takes the backbone (embed_tokens, layers, norm) and, when the checkpoint
        is a reward model and `init_head`, its head; an LM takes everything it has.
        """
        check_model_config(path, self.model_config, "init_from")
        saved = params_ckpt.saved_leaves(path)
        wanted = set(BACKBONE_KEYS)
        if not self.is_reward:
            wanted |= {"lm_head"}
        elif init_head and ("reward_head", "kernel") in saved:
            wanted |= {"reward_head"}
        target = {k: v for k, v in params.items() if k in wanted}
        flat = jax.tree_util.tree_flatten_with_path(target)[0]
        missing = [p for p, _ in flat if _path(p) not in saved]
        if missing:
            names = ["/".join(_path(p)) for p in missing[:4]]
            raise ConfigError(f"init_from {path}: checkpoint lacks {names}")
        return {**params, **restore_as(path, target, {k: shardings[k] for k in target})}


def check_model_config(path: str, model_config: LlamaConfig, what: str) -> None:
    """A params checkpoint must hold the same architecture as `model_config` (numeric fields such
    as dtype may differ); a checkpoint that records none is accepted."""
    metadata = params_ckpt.read_metadata(path)
    if "model_config" not in metadata:
        return
    theirs = LlamaConfig.from_dict(metadata["model_config"]).to_dict()
    ours = model_config.to_dict()
    diff = sorted(k for k in ours if k not in NUMERIC_FIELDS and ours[k] != theirs[k])
    if diff:
        raise ConfigError(
            f"{what} {path}: model differs from config.model in "
            + ", ".join(f"{k} ({theirs[k]} vs {ours[k]})" for k in diff)
        )


def restore_as(path: str, target, shardings):
    """The leaves of `target` (arrays or `ShapeDtypeStruct`s) from the params checkpoint at
    `path`: restored in the dtype they were saved in, then cast to the target's dtype, with
    `shardings`."""
    saved = params_ckpt.saved_leaves(path)
    abstract = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, saved[_path(p)][1]), target
    )
    restored = params_ckpt.restore_params(path, abstract, shardings=shardings)
    dtypes = jax.tree.map(lambda x: x.dtype, target)
    return jax.jit(lambda r: jax.tree.map(lambda a, d: a.astype(d), r, dtypes))(restored)


def _path(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in key_path)


def model_config(config) -> LlamaConfig:
    m = config.model
    # Optional field overrides of the preset (e.g. a benchmark-sized model): {field: value}.
    overrides = dict(m.get("overrides") or {})
    return LlamaConfig.preset(
        m.preset, **{**overrides, "dtype": m.dtype, "param_dtype": m.param_dtype, "remat": m.remat}
    )


def build(config) -> Objective:
    """The objective named by `config.objective`, its model and its loss with options bound."""
    name = config.objective
    if name not in OBJECTIVES:
        raise ConfigError(f"config.objective {name!r} is unknown; choose from {list(OBJECTIVES)}")
    mcfg = model_config(config)
    if name == "reinforce":
        loss = functools.partial(
            get_loss("reinforce"),
            implementation=config.loss.logprobs_impl,
            normalize=config.rl.normalize,
        )
        keys = ("reward_mean", "kl", "response_length")
        return Objective(name, mcfg, Llama(mcfg), loss, None, keys, method="hidden_and_head")
    if name == "sft":
        # Per-token log-probs from hidden states and the head: no [B, T, V] logits in memory.
        loss = functools.partial(get_loss("sft_fused"), implementation=config.loss.logprobs_impl)
        return Objective(
            name, mcfg, Llama(mcfg), loss, None, ("loss", "token_nll"), method="hidden_and_head"
        )
    num_attributes = config.model.num_attributes
    if name == "regression":
        loss = get_loss("regression")
        keys = ("loss", "mse")
    else:
        if not 0 <= config.loss.slot < num_attributes:
            raise ConfigError(
                f"config.loss.slot {config.loss.slot} is outside the {num_attributes}-slot head"
            )
        options = dict(slot=config.loss.slot, tie_policy=config.loss.tie_policy)
        if config.loss.get("attribute_weights"):
            weights = tuple(config.loss.attribute_weights)
            if len(weights) != num_attributes:
                raise ConfigError(
                    f"config.loss.attribute_weights has {len(weights)} entries; "
                    f"the head has {num_attributes} slots"
                )
            options["weights"] = weights
        if name == "scaled_bt":
            options["normalization"] = config.loss.normalization
        loss = functools.partial(get_loss(name), **options)
        # Bind-time check of the options, so a bad tie policy fails before data loading.
        _check_pair_loss(loss)
        keys = ("loss", "accuracy", "reward_gap")
    return Objective(name, mcfg, RewardModel(mcfg, num_attributes), loss, num_attributes, keys)


def _check_pair_loss(loss) -> None:
    outputs = np.zeros((1, 2, 9), np.float32)
    jax.eval_shape(loss, outputs, {"strength": np.ones((1,), np.int32)})


# --- data -----------------------------------------------------------------------------------


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


@dataclasses.dataclass
class DataBundle:
    train: Any  # the batch source (see the module docstring)
    eval_batches: list[dict[str, np.ndarray]]  # the whole validation split, padded
    report: dict[str, Any]
    tokenizer: Any
    # Objectives that evaluate by other means than a loss on eval_batches (REINFORCE: reward
    # and win rate of samples on held-out prompts): params -> metrics.
    evaluate: Callable[[Any], dict[str, float]] | None = None


def _tokenizer(config, data_dir: Path | None):
    from nemotron_jax.data.tokenizer import Llama3Tokenizer, SentencePieceTokenizer

    name = config.data.tokenizer
    if name == "llama3":
        return Llama3Tokenizer()
    if name:
        return SentencePieceTokenizer.load(name)
    if data_dir is None or not (data_dir / "tokenizer.model").exists():
        raise ConfigError(
            "config.data.tokenizer is empty and the data has no tokenizer.model; "
            "set it to 'llama3' or a SentencePiece model path"
        )
    return SentencePieceTokenizer.load(data_dir / "tokenizer.model")


TOKENIZER_FILE = "tokenizer.model"


def _policy_tokenizer(config):
    """The tokenizer an initial policy was trained with; its template must be the run's."""
    if not config.get("init_from"):
        raise ConfigError(
            "config.init_from must name the initial policy (e.g. an SFT run's <workdir>/params)"
        )
    metadata = params_ckpt.read_metadata(config.init_from)
    template = metadata.get("template")
    if template is not None and template != config.data.template:
        raise ConfigError(
            f"config.data.template is {config.data.template!r} but the policy {config.init_from} "
            f"was trained with {template!r}"
        )
    if config.data.tokenizer:
        return _tokenizer(config, None)
    return load_tokenizer(config.init_from, metadata)


def tokenizer_metadata(config, tokenizer) -> dict[str, Any]:
    """How to rebuild the run's tokenizer and inputs from its params checkpoint alone."""
    from nemotron_jax.data.tokenizer import Llama3Tokenizer

    name = "llama3" if isinstance(tokenizer, Llama3Tokenizer) else "sentencepiece"
    return {"tokenizer": name, "template": config.data.template, "max_len": config.data.max_len}


def save_tokenizer(tokenizer, params_dir: str) -> None:
    """A SentencePiece model travels with the params (`<params>/tokenizer.model`); the Llama-3.1
    tokenizer comes from the llama-models package and is never copied."""
    from nemotron_jax.data.tokenizer import SentencePieceTokenizer

    if isinstance(tokenizer, SentencePieceTokenizer):
        tokenizer.save(Path(params_dir) / TOKENIZER_FILE)


def load_tokenizer(params_dir: str, metadata: dict[str, Any]):
    """The tokenizer recorded in a params checkpoint's metadata (see `tokenizer_metadata`)."""
    from nemotron_jax.data.tokenizer import Llama3Tokenizer, SentencePieceTokenizer

    name = metadata.get("tokenizer")
    if name == "llama3":
        return Llama3Tokenizer()
    path = Path(params_dir) / TOKENIZER_FILE
    if name == "sentencepiece" and path.exists():
        return SentencePieceTokenizer.load(path)
    raise ConfigError(
        f"{params_dir}: records no usable tokenizer (metadata tokenizer={name!r}); "
        f"pass one explicitly"
    )


def data_dir(config) -> Path:
    from nemotron_jax.data import synthetic

    d = config.data
    if d.source == "synthetic":
        root = Path(os.environ.get("NEMOTRON_JAX_CACHE", ".cache")) / "synthetic"
        out = root / f"prompts{d.synthetic_prompts}-seed{d.synthetic_seed}"
        if not (out / "tokenizer.model").exists():
            # Generate beside the target and rename, so a crash never leaves a partial dataset.
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=root))
            synthetic.generate(tmp, num_prompts=d.synthetic_prompts, seed=d.synthetic_seed)
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished first: keep its copy
                shutil.rmtree(tmp, ignore_errors=True)
        return out
    if d.source in ("dir", "tfds"):
        if not d.dir:
            raise ConfigError("config.data.source is 'dir' but config.data.dir is empty")
        path = Path(d.dir)
        if not path.is_dir():
            raise FileNotFoundError(f"config.data.dir {path}: no such directory")
        return path
    raise ConfigError(f"config.data.source {d.source!r} is unknown; choose synthetic, dir or tfds")


def _rows(config, objective: Objective, data_dir: Path) -> tuple[list, list, dict]:
    """(train rows, validation rows, read report) from the files, or through the TFDS builders
    when config.data.source is "tfds" (prepared once into ArrayRecord, then random access)."""
    from nemotron_jax.data import helpsteer2
    from nemotron_jax.data.pipeline import preference_splits

    ratings = objective.name in ("regression", "sft")
    if config.data.source == "tfds":
        from nemotron_jax.data import tfds_builders

        name = "helpsteer2" if ratings else "helpsteer2_preference"
        tfds_dir = Path(config.data.get("tfds_dir") or data_dir / "tfds")
        sources = tfds_builders.data_sources(name, data_dir=tfds_dir, source=data_dir)
        rows = {
            split: [tfds_builders.row_from_record(src[i]) for i in range(len(src))]
            for split, src in sources.items()
        }
        train, val = rows.get("train", []), rows.get("validation", [])
        report: dict = {"tfds": {"name": name, "data_dir": str(tfds_dir)}}
    elif ratings:
        report = {}
        split_rows = {}
        for split in ("train", "validation"):
            path = helpsteer2.find_helpsteer2_file(data_dir, split)
            split_rows[split], rep = helpsteer2.read_ratings(
                path, on_bad_row=config.data.on_bad_row
            )
            report[split] = dataclasses.asdict(rep)
        train, val = split_rows["train"], split_rows["validation"]
    else:
        path = helpsteer2.find_helpsteer2_file(data_dir, "preference")
        rows, rep = helpsteer2.read_preferences(path, on_bad_row=config.data.on_bad_row)
        splits = preference_splits(rows)
        train, val, report = (
            splits["train"],
            splits["validation"],
            {"preference": dataclasses.asdict(rep)},
        )
    if objective.name == "sft":
        keep = config.data.get("sft_min_helpfulness", 3)
        train, val = ([r for r in rows if r.helpfulness >= keep] for rows in (train, val))
    return train, val, report


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Completes a short last batch by repeating its first row with example_weight 0."""
    n = len(next(iter(batch.values())))
    weight = np.concatenate([np.ones(n, np.float32), np.zeros(size - n, np.float32)])
    out = {k: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) for k, v in batch.items()}
    out["example_weight"] = weight
    return out


def build_data(config, objective: Objective, mesh=None, rules=None) -> DataBundle:
    """The objective's batch source, validation data and data report. `mesh` and `rules` place
    the frozen models of online objectives (REINFORCE's reference and reward model)."""
    from nemotron_jax.data.pipeline import encode, make_dataset

    root = data_dir(config)
    if objective.name == "reinforce":  # the policy's own tokenizer reads the prompts
        tokenizer = _policy_tokenizer(config)
    else:
        tokenizer = _tokenizer(config, root)
    if tokenizer.vocab_size > objective.model_config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{objective.model_config.vocab_size}"
        )
    train_rows, eval_rows, read_report = _rows(config, objective, root)
    if objective.name == "reinforce":
        from nemotron_jax import sharding
        from nemotron_jax.train import rollouts

        mesh = sharding.make_mesh(tuple(config.mesh)) if mesh is None else mesh
        rules = sharding.DEFAULT_RULES if rules is None else rules
        source, report = rollouts.build(
            config, objective, mesh, rules, tokenizer, train_rows, eval_rows, read_report
        )
        report = {"data_dir": str(root), **report}
        return DataBundle(source, [], report, tokenizer, evaluate=source.evaluate)
    kind = {"regression": "regression", "sft": "sft"}.get(objective.name, "pairs")
    options = dict(
        kind=kind,
        tokenizer=tokenizer,
        template=config.data.template,
        max_len=config.data.max_len,
        truncation=config.data.truncation,
        attributes=config.data.attributes,
        drop_ties=objective.is_reward and kind == "pairs" and config.loss.tie_policy == "drop",
    )
    train = encode(train_rows, **options)
    evals = encode(eval_rows, **options)
    train_ds = make_dataset(train, batch_size=config.batch_size, seed=config.seed)
    eval_batches = []
    if len(evals):
        eval_ds = make_dataset(
            evals,
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
    report = {
        "data_dir": str(root),
        "read": read_report,
        "train_encoding": train.report.summary(),
        "eval_encoding": evals.report.summary(),
        "train_examples": len(train),
        "eval_examples": len(evals),
    }
    return DataBundle(DatasetSource(train_ds), eval_batches, report, tokenizer)
