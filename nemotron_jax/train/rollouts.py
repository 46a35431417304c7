"""Online rollouts for REINFORCE: the batch source of the training loop when the objective
learns from its own samples.

One step, NeMo-Aligner's REINFORCE (`helpsteer2_spec.md` §4.2):

1. take P prompts and repeat each K times (rows p*K ... p*K + K-1 are prompt p's samples);
2. sample a response for every row with the policy (KV-cache sampler, `nemotron_jax.sampling`);
3. reward each (prompt, response) with the frozen reward model, or a Python callable;
4. per-token log-probs of the responses under the policy and the frozen reference policy;
5. KL-shaped reward R - beta * KL, a leave-one-out baseline over each prompt's K samples and
   the advantage (`nemotron_jax.losses.reinforce`; GRPO: group-normalised, the KL optionally
   a loss term instead);
6. hand the P*K sequences to the loop as minibatches of `minibatch_size`, in generation order
   (the baseline was computed on whole groups first), for that many optimizer steps; with
   `rl.epochs` > 1, each further pass in a fixed permutation.

PPO (a critic, `critic=`): the loop's parameters are {"policy", "critic"}; step 5 reads the
critic's value of every response token and computes per-token rewards and GAE advantages
and returns instead (`losses.reinforce.token_rewards`, `gae`, `whiten`).

Policy, reference and reward model live in one program on one mesh; nothing is served. The
random key of step s is `fold_in(seed, s)` and the prompt iterator is checkpointed with the
state, so a resumed run samples exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nemotron_jax import artifact, distributed
from nemotron_jax.errors import ConfigError
from nemotron_jax.losses.lm import token_logprobs
from nemotron_jax.losses.reinforce import (
    KL_ESTIMATORS,
    KL_REDUCTIONS,
    gae,
    policy_advantages,
    sequence_kl,
    token_kl,
    token_rewards,
    whiten,
)
from nemotron_jax.models.llama import Llama, LlamaConfig
from nemotron_jax.models.reward import ActorCritic, RewardModel, scalar_reward
from nemotron_jax.sampling import (
    SAMPLER_WEIGHTS,
    SamplingConfig,
    make_generate_fn,
    response_sequences,
)

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def check_settings(rl, model_config: LlamaConfig, dp: int) -> None:
    """Fails at start, naming the config key, on REINFORCE settings (`ReinforceSettings`) that
    cannot work."""
    if rl.sampler_weights not in SAMPLER_WEIGHTS:
        raise ConfigError(
            f"config.rl.sampler_weights {rl.sampler_weights!r}; choose from {SAMPLER_WEIGHTS}"
        )
    k, p = rl.num_rollouts_per_prompt, rl.prompts_per_step
    if k < 1 or p < 1:
        raise ConfigError(
            f"config.rl.num_rollouts_per_prompt ({k}) and prompts_per_step ({p}) must be positive"
        )
    # K >= 2 for RLOO and GRPO, and rl.epochs >= 1: `train.settings.check`, which runs first.
    if rl.beta < 0:
        raise ConfigError(f"config.rl.beta must be >= 0 (a KL penalty), got {rl.beta}")
    if rl.kl_estimator not in KL_ESTIMATORS:
        raise ConfigError(
            f"config.rl.kl_estimator {rl.kl_estimator!r}; choose from {KL_ESTIMATORS}"
        )
    if rl.kl_reduce not in KL_REDUCTIONS:
        raise ConfigError(f"config.rl.kl_reduce {rl.kl_reduce!r}; choose from {KL_REDUCTIONS}")
    if rl.policy_logprobs not in ("sampler", "recompute"):
        raise ConfigError(
            f"config.rl.policy_logprobs {rl.policy_logprobs!r}; choose sampler or recompute"
        )
    if rl.baseline not in ("rloo_eos", "rloo_all"):
        raise ConfigError(f"config.rl.baseline {rl.baseline!r}; choose rloo_eos or rloo_all")
    rollout = p * k
    if rollout % rl.minibatch_size:
        raise ConfigError(
            f"config.rl.prompts_per_step x num_rollouts_per_prompt = {rollout} is not a multiple "
            f"of config.batch_size {rl.minibatch_size} (the minibatch of one update)"
        )
    if rollout % dp:
        raise ConfigError(
            f"{rollout} rollouts per step do not divide over {dp} data-parallel devices"
        )
    total = rl.max_prompt_len + rl.max_new_tokens
    if total > model_config.max_position_embeddings:
        raise ConfigError(
            f"config.rl.max_prompt_len {rl.max_prompt_len} + max_new_tokens "
            f"{rl.max_new_tokens} = {total} exceeds the model's context of "
            f"{model_config.max_position_embeddings} tokens"
        )
    if bool(rl.rm_from) == bool(rl.reward_fn):
        raise ConfigError(
            "set exactly one of config.rm_from (a reward-model params checkpoint) "
            "and config.reward_fn ('module:function')"
        )


def load_reward_fn(spec: str) -> RewardFn:
    """`"package.module:function"` -> the function, which maps (prompt texts, response texts)
    to one float per response (rule-based rewards)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"config.reward_fn {spec!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config.reward_fn {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"config.reward_fn {spec!r} is not callable")
    return fn


def _check_same_inputs(policy: artifact.ModelArtifact, rm: artifact.ModelArtifact) -> None:
    """The reward model must read the policy's tokens as it was trained to: same tokenizer and
    chat template, else its scores are meaningless."""
    mine = (policy.tokenizer_name, policy.template)
    theirs = (rm.tokenizer_name, rm.template)
    unknown = [
        name
        for name, a, b in zip(("tokenizer", "template"), mine, theirs, strict=True)
        if a is None or b is None
    ]
    if unknown:  # e.g. a checkpoint converted without recording them: nothing to compare
        print(
            f"warning: cannot check that the reward model {rm.path} and the policy use the same "
            f"{' and '.join(unknown)} (not recorded in both checkpoints)"
        )
    if any(a is not None and b is not None and a != b for a, b in zip(mine, theirs, strict=True)):
        raise ConfigError(
            f"reward model {rm.path} was trained with tokenizer/template {theirs} but the policy "
            f"{policy.path} with {mine}; they must match"
        )
    a, b = (Path(m.path) / artifact.TOKENIZER_FILE for m in (policy, rm))
    if (
        mine[0] == "sentencepiece"
        and a.exists()
        and b.exists()
        and a.read_bytes() != b.read_bytes()
    ):
        raise ConfigError(
            f"reward model {rm.path} and policy {policy.path} use different SentencePiece models"
        )


def sequence_logprobs(module: Llama, params, tokens, attention_mask, implementation: str):
    """log pi(tokens[t] | tokens[<t]) as float32 [B, T] (0 at t = 0), through the fused kernel."""
    hidden, head = module.apply(
        {"params": params}, tokens, attention_mask=attention_mask, method="hidden_and_head"
    )
    logp = token_logprobs(hidden[:, :-1], head, tokens[:, 1:], implementation)
    return jnp.pad(logp, ((0, 0), (1, 0)))


@dataclasses.dataclass
class PromptSet:
    tokens: np.ndarray  # int32 [N, Tp], right-padded
    mask: np.ndarray  # int32 [N, Tp]


class RolloutSource:
    """Produces each step's REINFORCE minibatches from the current policy parameters.

    `produce(params, step) -> (minibatches, metrics)` is what the loop calls; `evaluate(params)`
    scores samples on held-out prompts against the reference policy's; `get_state` /
    `set_state` checkpoint the prompt iterator.
    """

    def __init__(
        self, rl, model_config, mesh, rules, policy, tokenizer, prompts, eval_prompts, critic=None
    ):
        self.rl, self.model_config, self.mesh, self.rules = rl, model_config, mesh, rules
        self.tokenizer = tokenizer
        self.k, self.p = rl.num_rollouts_per_prompt, rl.prompts_per_step
        # PPO: (architecture, head size) of the critic, whose values GAE reads; the loop's
        # params are then {"policy", "critic"}.
        self.critic = critic
        self.updates_per_step = rl.epochs * self.p * self.k // rl.minibatch_size
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self._order = np.random.default_rng(rl.seed).permutation(len(prompts.tokens))
        self._cursor = 0
        self.batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
        self.model = Llama(model_config)
        self.impl = rl.logprobs_impl
        from nemotron_jax.data.tokenizer import generation_stop_ids

        self.sampling = SamplingConfig(
            max_new_tokens=rl.max_new_tokens,
            temperature=rl.temperature,
            top_k=rl.top_k,
            top_p=rl.top_p,
            stop_tokens=generation_stop_ids(tokenizer, rl.template),
            pad_id=tokenizer.pad_id,
            weights=rl.sampler_weights,
        )
        self.eval_sampling = dataclasses.replace(self.sampling, temperature=rl.eval_temperature)
        self._load_models(policy)
        self._reference_eval: dict[str, Any] | None = None

    # --- set-up -----------------------------------------------------------------------------

    def _load_models(self, policy: artifact.ModelArtifact) -> None:
        rl = self.rl
        # With LoRA the reference is the policy with its adapters off (`_reference`): the
        # frozen base it trains on, so no second copy of the weights is loaded.
        self.ref_params = None
        if not self.model_config.lora_rank:
            self.ref_params = artifact.load_frozen(
                rl.reference_from, self.model_config, self.mesh, self.rules, what="reference policy"
            )

        self.reward_fn = None
        self.rm = None
        if rl.reward_fn:
            self.reward_fn = load_reward_fn(rl.reward_fn)
        else:
            self.rm = artifact.load(
                rl.rm_from, kind="reward_model", mesh=self.mesh, rules=self.rules
            )
            _check_same_inputs(policy, self.rm)
            if self.rm.config.vocab_size < self.model_config.vocab_size:
                raise ConfigError(
                    f"reward model {self.rm.path} has a smaller vocabulary than the policy"
                )
        self._compile()

    def _compile(self) -> None:
        rl, model = self.rl, self.model
        generate = make_generate_fn(model, self.sampling)
        eval_generate = make_generate_fn(model, self.eval_sampling)
        pad_id = self.sampling.pad_id

        def sample(params, tokens, mask, rng, fn):
            rollout = fn(params, tokens, mask, rng)
            return rollout, response_sequences(tokens, mask, rollout, pad_id)

        self._generate = jax.jit(lambda *a: sample(*a, generate))
        self._eval_generate = jax.jit(lambda *a: sample(*a, eval_generate))
        self._logprobs = jax.jit(
            lambda params, tokens, mask: sequence_logprobs(model, params, tokens, mask, self.impl)
        )
        if self.rm is not None:
            rm_model = RewardModel(self.rm.config, self.rm.num_attributes)
            slot = self.rl.rm_slot
            self._rm_score = jax.jit(
                lambda params, tokens, mask: scalar_reward(
                    rm_model.apply({"params": params}, tokens, attention_mask=mask), slot=slot
                )
            )

        def advantages(logp, ref_logp, response_mask, rewards, is_end):
            kl = sequence_kl(
                logp, ref_logp, response_mask, estimator=rl.kl_estimator, reduce=rl.kl_reduce
            )
            shape = (-1, self.k)
            out = policy_advantages(
                rewards.reshape(shape),
                kl.reshape(shape),
                is_end.reshape(shape),
                beta=rl.beta,
                advantage=rl.advantage,
                kl_in=rl.kl_in,
                eos_only=rl.baseline == "rloo_eos",
            )
            return kl, {name: v.reshape(-1) for name, v in out.items()}

        def gae_advantages(logp, ref_logp, response_mask, rewards, values):
            kl_t = token_kl(logp, ref_logp, rl.kl_estimator)
            per_token = token_rewards(rewards, kl_t, response_mask, beta=rl.beta)
            adv, returns = gae(per_token, values, response_mask, gamma=rl.gamma, lam=rl.lam)
            if rl.whiten_advantages:
                adv = whiten(adv, response_mask)
            kl = sequence_kl(
                logp, ref_logp, response_mask, estimator=rl.kl_estimator, reduce=rl.kl_reduce
            )
            shaped = jnp.sum(per_token, axis=-1)  # the score less beta * the summed KL
            return kl, {"shaped": shaped, "token_advantage": adv, "returns": returns}

        self._advantages = jax.jit(gae_advantages if self.critic else advantages)
        if self.critic:
            critic_config, heads = self.critic
            actor_critic = ActorCritic(self.model_config, critic_config, heads, rl.rm_slot)
            self._values = jax.jit(
                lambda params, tokens, mask: actor_critic.apply(
                    {"params": {"critic": params}}, tokens, attention_mask=mask, method="values"
                )
            )
        size, count = rl.minibatch_size, self.updates_per_step
        # The rollout's minibatches, each split over the data-parallel devices as the train
        # step expects (one program: also across processes). `order` [epochs * P * K]: the
        # rows of each update in turn (`_update_order`).
        self._split = jax.jit(
            lambda batch, order: [
                jax.tree.map(lambda x, i=i: x[order[i * size : (i + 1) * size]], batch)
                for i in range(count)
            ],
            out_shardings=self.batch_sharding,
        )

    def _update_order(self, step: int) -> np.ndarray:
        """The rollout's rows for each update: the first epoch in generation order (the
        baseline was computed on whole groups first), each further one (PPO's epochs) a fresh
        permutation fixed by (seed, step, epoch), so a resumed run repeats it."""
        n = self.p * self.k
        orders = [np.arange(n)] + [
            np.random.default_rng((self.rl.seed, step, epoch)).permutation(n)
            for epoch in range(1, self.rl.epochs)
        ]
        return np.concatenate(orders).astype(np.int32)

    # --- the three frozen-model calls -------------------------------------------------------

    def _score(self, seqs, rollout) -> jax.Array:
        """Rewards [B] float32 of the sequences."""
        if self.rm is not None:
            return self._rm_score(self.rm.params, seqs["tokens"], seqs["attention_mask"])
        # Every process decodes and scores all rows (text rewards are cheap; the same values
        # everywhere), then places its own.
        host = distributed.fetch(
            {k: seqs[k] for k in ("tokens", "response_mask", "prompt_lengths")}
        )
        tokens, prompt_len = host["tokens"], host["prompt_lengths"]
        response = host["response_mask"].astype(bool)
        stops = set(self.sampling.stop_tokens)
        prompts, responses = [], []
        for row, rmask, n in zip(tokens, response, prompt_len, strict=True):
            prompts.append(self.tokenizer.decode(row[:n]))
            ids = [int(t) for t in row[rmask]]
            responses.append(self.tokenizer.decode([t for t in ids if t not in stops]))
        rewards = np.asarray(self.reward_fn(prompts, responses), np.float32)
        if rewards.shape != (len(prompts),):
            raise ValueError(
                f"config.reward_fn returned shape {rewards.shape}, expected ({len(prompts)},)"
            )
        return distributed.put_global(rewards, self.batch_sharding)

    # --- the loop's interface ---------------------------------------------------------------

    def get_state(self) -> dict[str, int]:
        return {"cursor": int(self._cursor)}

    def set_state(self, state: dict[str, int]) -> None:
        self._cursor = int(state["cursor"])

    def _next_prompts(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self._order)
        # Epochs of one fixed permutation, reshuffled per epoch from the seed: resumable by cursor.
        orders = {0: self._order}
        idx = []
        for c in range(self._cursor, self._cursor + self.p):
            epoch, i = divmod(c, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng((self.rl.seed, epoch)).permutation(n)
            idx.append(orders[epoch][i])
        self._cursor += self.p
        idx = np.asarray(idx)
        return self.prompts.tokens[idx], self.prompts.mask[idx]

    def _put(self, x):
        """Host rows every process holds whole -> a global array split over the batch axis."""
        return distributed.put_global(np.asarray(x), self.batch_sharding)

    def _policy_params(self, params):
        return params["policy"] if self.critic else params

    def _reference(self, policy_params):
        """The reference policy's params: the frozen ones, or with LoRA the policy's own with
        every adapter's B zeroed (`lora.adapters_off`), placed like the adapters."""
        if self.ref_params is not None:
            return self.ref_params

        def off(path, x):
            if not str(getattr(path[-1], "key", path[-1])).endswith("_lora_b"):
                return x
            return jax.jit(jnp.zeros_like, out_shardings=x.sharding)(x)

        return jax.tree_util.tree_map_with_path(off, policy_params)

    def produce(self, params, step: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
        all_params, params = params, self._policy_params(params)
        tokens, mask = self._next_prompts()
        tokens = self._put(np.repeat(tokens, self.k, axis=0))  # [P*K, Tp], prompt-major
        mask = self._put(np.repeat(mask, self.k, axis=0))
        rng = jax.random.fold_in(jax.random.PRNGKey(self.rl.seed), step)
        t0 = time.perf_counter()
        rollout, seqs = jax.block_until_ready(self._generate(params, tokens, mask, rng))
        t1 = time.perf_counter()
        rewards = jax.block_until_ready(self._score(seqs, rollout))
        t2 = time.perf_counter()
        if self.rl.policy_logprobs == "recompute":
            logp = self._logprobs(params, seqs["tokens"], seqs["attention_mask"])
        else:  # the sampler's: the same model, the same float32 log-softmax, no second pass
            logp = seqs["logprobs"]
        logp = jax.block_until_ready(logp)
        t3 = time.perf_counter()
        ref_logp = jax.block_until_ready(
            self._logprobs(self._reference(params), seqs["tokens"], seqs["attention_mask"])
        )
        t4 = time.perf_counter()
        timings = {
            "time_generate": t1 - t0,
            "time_score": t2 - t1,
            "time_policy_logprobs": t3 - t2,
            "time_reference_logprobs": t4 - t3,
        }
        batch = {
            "tokens": seqs["tokens"],
            "attention_mask": seqs["attention_mask"],
            "response_mask": seqs["response_mask"],
            "is_end": rollout.is_end,
            "ref_logprobs": ref_logp,
            "old_logprobs": logp,  # the rollout policy's, for a clipped ratio
        }
        if self.critic:
            values = jax.block_until_ready(
                self._values(all_params["critic"], seqs["tokens"], seqs["attention_mask"])
            )
            timings["time_values"] = time.perf_counter() - t4
            kl, adv = self._advantages(logp, ref_logp, seqs["response_mask"], rewards, values)
            batch |= {"old_values": values, **{k: adv[k] for k in ("token_advantage", "returns")}}
            # Per-token statistics over the response tokens, as per-sequence means.
            n_response = jnp.maximum(seqs["response_mask"].sum(-1), 1)
            adv = {
                "shaped": adv["shaped"],
                "advantage": adv["token_advantage"].sum(-1) / n_response,  # 0 off the response
                "value": (values * seqs["response_mask"]).sum(-1) / n_response,
            }
        else:
            kl, adv = self._advantages(
                logp, ref_logp, seqs["response_mask"], rewards, rollout.is_end
            )
            batch["advantage"] = adv["advantage"]
        host = distributed.fetch(  # the rollout's global arrays, gathered to every process
            {
                "rewards": rewards,
                "kl": kl,
                **adv,
                "lengths": rollout.lengths,
                "is_end": rollout.is_end,
            }
        )
        metrics = {
            "reward_mean": float(np.mean(host["rewards"])),
            "reward_std": float(np.std(host["rewards"])),
            "kl": float(np.mean(host["kl"])),
            "shaped_reward_mean": float(np.mean(host["shaped"])),
            "advantage_mean": float(np.mean(host["advantage"])),
            "advantage_std": float(np.std(host["advantage"])),
            "advantage_abs_mean": float(np.mean(np.abs(host["advantage"]))),
            "response_length": float(np.mean(host["lengths"])),
            "eos_rate": float(np.mean(host["is_end"])),
            **timings,
        }
        if self.critic:
            metrics["rollout_value_mean"] = float(np.mean(host["value"]))
        order = distributed.put_global(self._update_order(step), NamedSharding(self.mesh, P()))
        return self._split(batch, order), metrics

    def _sample_eval(self, params):
        """Samples for every held-out prompt, with the evaluation key (the same at each call)."""
        size = self.rl.eval_batch_size
        out = {"rewards": [], "kl": [], "lengths": [], "is_end": []}
        rng = jax.random.PRNGKey(self.rl.seed + 1)
        for i in range(0, len(self.eval_prompts.tokens), size):
            tokens = self._put(self.eval_prompts.tokens[i : i + size])
            mask = self._put(self.eval_prompts.mask[i : i + size])
            rollout, seqs = self._eval_generate(params, tokens, mask, jax.random.fold_in(rng, i))
            rewards = self._score(seqs, rollout)
            logp = self._logprobs(params, seqs["tokens"], seqs["attention_mask"])
            ref = self._logprobs(self._reference(params), seqs["tokens"], seqs["attention_mask"])
            kl = sequence_kl(
                logp,
                ref,
                seqs["response_mask"],
                estimator=self.rl.kl_estimator,
                reduce=self.rl.kl_reduce,
            )
            for name, v in (
                ("rewards", rewards),
                ("kl", kl),
                ("lengths", rollout.lengths),
                ("is_end", rollout.is_end),
            ):
                out[name].append(distributed.fetch(v))
        return {k: np.concatenate(v) for k, v in out.items()}

    def evaluate(self, params) -> dict[str, float]:
        """On the held-out prompts: the policy's mean reward, its win rate against the reference
        policy's samples as judged by the reward model (ties count half), KL, length, EOS rate."""
        if self._reference_eval is None:  # the reference never changes: sample it once
            reference = self._reference(self._policy_params(params))
            self._reference_eval = self._sample_eval(reference)
        ref, pol = self._reference_eval, self._sample_eval(self._policy_params(params))
        wins = np.mean(pol["rewards"] > ref["rewards"]) + 0.5 * np.mean(
            pol["rewards"] == ref["rewards"]
        )
        return {
            "reward_mean": float(np.mean(pol["rewards"])),
            "reference_reward_mean": float(np.mean(ref["rewards"])),
            "win_rate_vs_reference": float(wins),
            "kl": float(np.mean(pol["kl"])),
            "response_length": float(np.mean(pol["lengths"])),
            "eos_rate": float(np.mean(pol["is_end"])),
        }


def _prompt_set(encoded) -> PromptSet:
    n, t = len(encoded), encoded.max_len
    tokens = np.full((n, t), encoded.pad_id, np.int32)
    mask = np.zeros((n, t), np.int32)
    for i in range(n):
        ex = encoded[i]
        tokens[i], mask[i] = ex["tokens"], ex["attention_mask"]
    return PromptSet(tokens, mask)


def build(rl, model_config: LlamaConfig, mesh, rules, policy, data, critic=None):
    """The REINFORCE batch source and its data report, from `ReinforceSettings`, the initial
    policy's artifact and the encoded prompt splits (`nemotron_jax.data.splits`, kind
    "prompts"); `critic` as for `RolloutSource` (PPO)."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    check_settings(rl, model_config, dp)
    prompts = _prompt_set(data.train)
    if len(prompts.tokens) < rl.prompts_per_step:
        raise ConfigError(
            f"only {len(prompts.tokens)} training prompts fit config.rl.max_prompt_len "
            f"{rl.max_prompt_len} ({data.report['train_encoding']}); need at least "
            f"prompts_per_step {rl.prompts_per_step}"
        )
    eval_prompts = _prompt_set(data.validation)
    # Whole evaluation batches only (they must divide over the devices); the count is reported.
    n_eval = min(rl.eval_prompts, len(eval_prompts.tokens))
    n_eval -= n_eval % rl.eval_batch_size
    eval_prompts = PromptSet(eval_prompts.tokens[:n_eval], eval_prompts.mask[:n_eval])
    source = RolloutSource(
        rl, model_config, mesh, rules, policy, data.tokenizer, prompts, eval_prompts, critic
    )
    report = {
        **data.report,
        "train_prompts": len(prompts.tokens),
        "eval_prompts": n_eval,
        "stop_tokens": list(source.sampling.stop_tokens),
    }
    return source, report
