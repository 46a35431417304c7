"""DPO (regular, margin, scaled; `nemotron_jax/losses/dpo.py`): a Llama LM on
HelpSteer2-Preference pairs against a frozen reference policy.

Data: the preference pairs as `lm_pairs` [B, 2, T] (the Bradley-Terry pairs' templates and
truncation, plus each side's response mask), ties dropped; chosen and rejected follow the sign
of the strength. The reference's summed response log-probs ride in the batch as
`reference_logprobs` [B, 2]:

- `config.dpo.reference = "precomputed"` (default): one pass of the frozen reference over the
  train and validation pairs before step 0, stored in `<workdir>/reference_logprobs/<key>.npz`.
  The key hashes the reference checkpoint's files (names, sizes, modification times), every
  token of the encoded pairs, the compute and parameter dtypes and the log-prob kernel, so a
  resumed run reads the file and a changed reference or data computes a new one; process 0
  decides for every process whether to read it. The reference is dropped from device memory
  before training.
- `"resident"`: the reference stays on the devices and scores each training batch as it comes
  (the validation pairs are still scored once, at start).

Log-probs go through `token_logprobs`, the fused path: no [2B, T, V] logits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nemotron_jax import artifact, distributed, sharding
from nemotron_jax.errors import CheckpointError, ConfigError
from nemotron_jax.losses import get_loss
from nemotron_jax.losses.dpo import response_logprobs
from nemotron_jax.models import lora
from nemotron_jax.models.llama import Llama
from nemotron_jax.train.objective import (
    DataBundle,
    Objective,
    model_config,
    supervised_batch_spec,
    supervised_data,
)

CACHE_DIR = "reference_logprobs"


def reference_path(config) -> str:
    """The frozen reference: config.reference_from, else the initial policy config.init_from."""
    path = config.reference_from or config.init_from
    if not path:
        raise ConfigError(
            "config.reference_from is empty and so is config.init_from: DPO needs a frozen "
            "reference policy (e.g. an SFT run's <workdir>/params; it is also where the policy "
            "starts when init_from is that)"
        )
    return path


class ReferenceScorer:
    """The frozen reference on the mesh: summed response log-probs [N, 2] of pair examples.

    With `adapters_off` (a LoRA run whose reference stays resident) nothing is loaded: the
    reference is the policy's own params with its adapters off, passed to `score_batch`.
    """

    def __init__(
        self,
        path: str,
        mcfg,
        mesh,
        rules,
        batch_size: int,
        implementation: str,
        progress=True,
        adapters_off: bool = False,
    ):
        self.params = None
        if not adapters_off:  # the base weights (a LoRA checkpoint's adapters merged)
            self.params = artifact.load_frozen(
                path, mcfg, mesh, rules, what="the DPO reference policy"
            )
        self.path, self.mesh, self.rules, self.batch_size = path, mesh, rules, batch_size
        self.progress = progress and distributed.is_primary()
        self.batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
        module = Llama(mcfg if adapters_off else lora.base_config(mcfg))

        def score(params, batch):
            b, _, t = batch["tokens"].shape
            if adapters_off:
                params = lora.adapters_off(params)
            outputs = module.apply(
                {"params": params},
                batch["tokens"].reshape(b * 2, t),
                attention_mask=batch["attention_mask"].reshape(b * 2, t),
                method="hidden_and_head",
            )
            return response_logprobs(outputs, batch, implementation)[0]

        self._score = jax.jit(score, out_shardings=self.batch_sharding)

    def score_batch(self, batch: dict[str, Any], policy_params=None) -> jax.Array:
        """[B, 2] float32, a global array on the batch sharding, for a global batch;
        `policy_params`: the policy's (with `adapters_off`)."""
        keys = ("tokens", "attention_mask", "loss_mask")
        params = self.params if self.params is not None else policy_params
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._score(params, {k: batch[k] for k in keys})

    def score_all(self, encoded, desc: str) -> np.ndarray:
        """[N, 2] float32 for every example of an `EncodedDataset`, in order, in every process."""
        from tqdm import tqdm

        n, size = len(encoded), self.batch_size
        out = np.zeros((n, 2), np.float32)
        starts = range(0, n, size)
        bar = tqdm(starts, desc=desc, unit="batch", disable=not self.progress)
        for start in bar:
            idx = [min(i, n - 1) for i in range(start, start + size)]  # pad with the last row
            examples = [encoded[i] for i in idx]
            batch = {
                k: np.stack([ex[k] for ex in examples])
                for k in ("tokens", "attention_mask", "loss_mask")
            }
            scores = distributed.fetch(
                self.score_batch(distributed.put_global(batch, self.batch_sharding))
            )
            stop = min(start + size, n)
            out[start:stop] = scores[: stop - start]
        return out

    def release(self) -> None:
        """Frees the reference's device memory (precomputed mode, before training)."""
        jax.tree.map(lambda x: x.delete(), self.params)
        self.params = None


def _checkpoint_fingerprint(path: str) -> list:
    root = Path(path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [str(root)] + [
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files
    ]


def cache_key(config, reference: str, splits_) -> str:
    """What the reference log-probs depend on (module docstring), hashed."""
    digest = hashlib.sha256()
    digest.update(json.dumps(_checkpoint_fingerprint(reference)).encode())
    digest.update(
        json.dumps(
            [
                config.model.dtype,
                config.model.param_dtype,
                config.loss.logprobs_impl,
                config.data.max_len,
            ],
            sort_keys=True,
        ).encode()
    )
    for encoded in (splits_.train, splits_.validation):
        digest.update(str(len(encoded)).encode())
        for ex in encoded.examples:
            for side in ex["tokens"]:
                digest.update(np.asarray(side, np.int32).tobytes())
            digest.update(np.asarray(ex["response_start"], np.int32).tobytes())
    return digest.hexdigest()[:20]


def _attach(encoded, values: np.ndarray) -> None:
    """Adds `reference_logprobs` [2] to each encoded example (pad_example passes it through)."""
    for ex, v in zip(encoded.examples, values, strict=True):
        ex["reference_logprobs"] = np.asarray(v, np.float32)


def _precomputed(config, scorer: ReferenceScorer, splits_, workdir: str | None) -> dict:
    """{split: [N, 2]} from the workdir's cache, or computed now (and stored there)."""
    path = None
    if workdir is not None:
        key = cache_key(config, scorer.path, splits_)
        path = Path(workdir) / CACHE_DIR / f"{key}.npz"
        # Process 0 decides for all (file systems may show the file to some hosts first).
        if distributed.broadcast_flag(path.exists()):
            with np.load(path) as cached:
                values = {k: cached[k] for k in ("train", "validation")}
            if all(len(values[k]) == len(getattr(splits_, k)) for k in values):
                if distributed.is_primary():
                    print(f"reference log-probs: reusing {path}")
                distributed.sync("dpo_reference_read")
                return values
            raise CheckpointError(f"{path}: its row counts do not match the data; delete it")
    values = {
        "train": scorer.score_all(splits_.train, "reference log-probs (train)"),
        "validation": scorer.score_all(splits_.validation, "reference log-probs (validation)"),
    }
    if path is not None and distributed.is_primary():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **values)
        os.replace(tmp, path)  # whole or absent: a crash mid-write leaves no half file
        (path.with_suffix(".json")).write_text(
            json.dumps(
                {"reference": str(Path(scorer.path).resolve()), "train": len(values["train"]),
                 "validation": len(values["validation"])},
                indent=2,
            )
        )  # fmt: skip
    distributed.sync("dpo_reference_written")
    return values


class ResidentReferenceSource:
    """A supervised batch source whose batches get `reference_logprobs` from the co-resident
    reference as they are produced."""

    def __init__(self, inner, scorer: ReferenceScorer):
        self.inner, self.scorer = inner, scorer
        self.updates_per_step = inner.updates_per_step

    def produce(self, params, step: int):
        batches, metrics = self.inner.produce(params, step)
        out = []
        for local in batches:
            batch = distributed.global_batch(local, self.scorer.batch_sharding)
            batch["reference_logprobs"] = self.scorer.score_batch(batch, params)
            out.append(batch)
        return out, metrics

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state) -> None:
        self.inner.set_state(state)


def _data(config, mcfg, mesh, rules, workdir) -> DataBundle:
    path = reference_path(config)  # first: a run without a reference fails before any work
    resident = config.dpo.reference == "resident"
    mesh = sharding.make_mesh(tuple(config.mesh)) if mesh is None else mesh
    rules = sharding.DEFAULT_RULES if rules is None else rules
    # LoRA: the resident reference is the trained policy with its adapters off.
    adapters_off = resident and mcfg.lora_rank > 0
    scorer_args = (mesh, rules, config.eval_batch_size, config.loss.logprobs_impl)
    scorer = ReferenceScorer(
        path, mcfg, *scorer_args, progress=config.progress, adapters_off=adapters_off
    )

    def prepare(splits_):
        if resident:  # only the validation pairs are scored ahead; training batches as they come
            # (before the policy exists: with LoRA, by the base loaded for this pass alone)
            ahead = scorer
            if adapters_off:
                ahead = ReferenceScorer(path, mcfg, *scorer_args, progress=config.progress)
            values = ahead.score_all(splits_.validation, "reference log-probs (validation)")
            _attach(splits_.validation, values)
            if ahead is not scorer:
                ahead.release()
            return
        values = _precomputed(config, scorer, splits_, workdir)
        _attach(splits_.train, values["train"])
        _attach(splits_.validation, values["validation"])
        scorer.release()

    bundle = supervised_data(config, mcfg, "lm_pairs", mesh, drop_ties=True, prepare=prepare)
    if resident:
        bundle.train = ResidentReferenceSource(bundle.train, scorer)
    return bundle


def build(config) -> Objective:
    mcfg = model_config(config)
    d = config.dpo
    loss = functools.partial(
        get_loss("dpo"),
        beta=d.beta,
        variant=d.variant,
        label_smoothing=d.label_smoothing,
        sft_weight=d.sft_weight,
        strength_scale=d.strength_scale,
        implementation=config.loss.logprobs_impl,
    )
    return Objective(
        name="dpo",
        model_config=mcfg,
        module=Llama(mcfg),
        loss_fn=loss,
        progress_keys=("loss", "accuracy", "margin"),
        make_data=lambda mesh, rules, workdir=None: _data(config, mcfg, mesh, rules, workdir),
        batch_spec=supervised_batch_spec("lm_pairs"),
        seq_len=config.data.max_len,
        method="hidden_and_head",
    )
