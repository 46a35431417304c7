"""Shared pieces of experiment configs: argument parsing, defaults, the `smoke` shrinker."""

from __future__ import annotations

import difflib

import ml_collections

from nemotron_jax import sharding
from nemotron_jax.errors import ConfigError

MODELS = ("tiny", "llama3.1-8b", "llama3.1-70b", "llama3.1-405b")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """`"loss=scaled,smoke"` -> ConfigDict(loss="scaled", smoke=True, ...), typed by `defaults`.

    A bare name sets a boolean to True; an unknown name fails, listing the valid ones.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown config arg {key!r}{hint}; valid: {sorted(defaults)}")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                value = raw.lower() in ("", "1", "true", "yes") if raw else True
            elif isinstance(default, int):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError:
            kind = type(default).__name__
            raise ConfigError(f"config arg {key}={raw!r} is not {kind}") from None
        values[key] = value
    return ml_collections.ConfigDict(values)


def base_config(name: str, objective: str) -> ml_collections.ConfigDict:
    """Defaults for every training config; each file changes a handful of fields.

    Every field the training code reads is declared here, so that `--config.<field>=<value>`
    reaches it and a misspelt one fails.
    """
    c = ml_collections.ConfigDict()
    c.name = name  # the progress bar's label
    c.seed = 0  # parameter init, data order and sampling all derive from it
    # regression | regular_bt | margin_bt | scaled_bt | sft | reinforce | dpo
    # (nemotron_jax/train/objectives/__init__.py: OBJECTIVES)
    c.objective = objective

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # tiny | llama3.1-8b | llama3.1-70b | llama3.1-405b
    c.model.dtype = "float32"  # compute dtype; matmuls accumulate in float32 regardless
    # Storage dtype of the parameters, and so of the gradients and Adam moments. float32 is the
    # master-weight policy; "bfloat16" (pure bf16) is an explicit opt-in, warned about at start,
    # and the run reports lost_update_fraction (updates rounded away) and warns when it is high.
    c.model.param_dtype = "float32"
    c.model.remat = "none"  # none | full | dots
    c.model.num_attributes = 9  # NeMo's 9-slot head (slot 4 = helpfulness)
    # auto | xla | cudnn | pallas | pallas_interpret | cpu (models.llama.ATTENTION_IMPLS): auto
    # picks the fused CPU kernel on one CPU device, else XLA's; cudnn and pallas run on GPU,
    # pallas_interpret is the Pallas kernel interpreted on CPU (tests).
    c.model.attention_impl = "auto"
    # Other LlamaConfig fields changed from the preset, e.g. {"num_layers": 4} (a benchmark-
    # sized model) or {"scan_unroll": 4}; set from Python (the locked dict takes no new keys).
    c.model.overrides = ml_collections.ConfigDict()

    # LoRA adapters (`nemotron_jax/models/lora.py`): rank 0 trains every parameter; rank > 0
    # freezes the base in model.param_dtype and trains only the adapters (float32), plus the
    # reward or value head. The reference of DPO, REINFORCE, PPO and GRPO is then the base with
    # the adapters off (no second copy of the weights). `lora=RANK` on any training config.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0  # the adapter's output is scaled by alpha / rank, as in PEFT
    # Any of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj (models.llama.LORA_TARGETS).
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    c.lora.dropout = 0.0  # on the adapters' input, training steps only

    c.loss = ml_collections.ConfigDict()
    c.loss.slot = 4  # head slot the BT losses compare (helpfulness, as in the paper)
    c.loss.tie_policy = "drop"  # drop: ties get weight 0 | nemo: label >= 0 means row 1 wins
    c.loss.normalization = "pairs"  # scaled_bt: pairs (NeMo) | sum_m
    # Per-token log-probs (sft): chunked (pure JAX, CPU default) | pallas (GPU) | reference
    c.loss.logprobs_impl = "chunked"
    # BT reward = sum_a w_a * o_a instead of slot `slot` when given (one weight per head slot).
    c.loss.attribute_weights = ml_collections.config_dict.placeholder(tuple)

    c.data = ml_collections.ConfigDict()
    # synthetic (generated, offline) | dir (official files, read directly) | tfds (the same files
    # prepared once into ArrayRecord by the TFDS builders under data.tfds_dir)
    c.data.source = "synthetic"
    c.data.dir = ""  # the downloaded HelpSteer2 files when source is dir or tfds
    c.data.tfds_dir = ""  # default: <data.dir>/tfds
    c.data.template = "nemo"  # nemo (<extra_id_*>, as NeMo trained) | llama3 (chat template)
    # "" = the data's own tokenizer.model (the synthetic set has one) | "llama3" | "synthetic"
    # (the synthetic set's SentencePiece model, for the tiny model on real text) | a .model path
    c.data.tokenizer = ""
    c.data.max_len = 128
    c.data.truncation = "truncate"  # truncate (prompt from the left, response whole) | skip
    c.data.attributes = "helpfulness"  # regression targets: helpfulness | all
    c.data.on_bad_row = "raise"  # raise | skip (skipped rows are counted, on the console too)
    c.data.max_rows = 0  # > 0: only the first N rows of each split, in file order (smoke)
    c.data.synthetic_prompts = 1500  # size of the generated set (source synthetic)
    c.data.synthetic_seed = 0
    c.data.sft_min_helpfulness = 3  # sft: train on responses rated at least this helpful (0-4)

    c.batch_size = 32  # global, in examples (a pair counts once)
    c.eval_batch_size = 32
    # Examples per data-parallel device in one forward/backward (NeMo's micro_batch_size; a
    # pair counts once). > 0 derives the accumulation: grad_accum = batch_size / (micro_batch_size
    # x data x fsdp devices); 0 keeps grad_accum as given.
    c.micro_batch_size = 0
    c.grad_accum = 1  # micro-batches per step when micro_batch_size is 0
    c.num_steps = 300
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 100
    c.max_to_keep = 2
    # False: no validation pass (an empty validation split is then allowed; else an error).
    c.validation = True
    # A step whose loss or gradient norm is not finite (checked on the device every step):
    # stop (the run ends naming the last good checkpoint, which is kept) | skip (the update is
    # not applied and is counted as skipped_steps; more than nan_max_skips skips stop the run).
    c.nan_policy = "stop"
    c.nan_max_skips = 10

    # NeMo-Aligner RM defaults, except the learning rate, which suits a tiny model from scratch.
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.warmup_steps = 10
    c.optim.schedule = "constant"  # constant | cosine
    c.optim.min_lr = 0.0
    # PPO's critic has its own optimizer (and state); the same fields as c.optim.
    c.critic_optim = ml_collections.ConfigDict(c.optim.to_dict())

    c.mesh = (1, -1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    # (logical axis, mesh axis or axes or None) for every logical axis the models name; why each
    # maps where it does is commented in nemotron_jax/sharding.py. Override the whole table, e.g.
    # --config.sharding_rules="(('embed', None), ...)".
    c.sharding_rules = sharding.DEFAULT_RULES
    # params checkpoint: HF-converted backbone or an earlier run's <workdir>/params (REINFORCE:
    # the initial policy)
    c.init_from = ""
    c.init_head = True  # also take the reward head from init_from when it has one
    c.tensorboard = True  # TensorBoard events beside metrics.jsonl
    c.progress = True  # a tqdm bar

    # REINFORCE only (experiments/configs/reinforce.py sets them); NeMo-Aligner's defaults.
    c.reference_from = ""  # frozen KL reference policy; "" = init_from
    c.rm_from = ""  # reward-model params checkpoint ...
    c.reward_fn = ""  # ... or a Python callable "module:function" (prompts, responses) -> rewards
    c.rm_slot = 4  # head slot read as the reward (helpfulness)
    c.rl = ml_collections.ConfigDict()
    c.rl.num_rollouts_per_prompt = 4  # K
    c.rl.prompts_per_step = 16  # P; a step samples P * K responses
    c.rl.beta = 0.01  # KL penalty: reward - beta * KL
    c.rl.kl_estimator = "abs_k1"  # abs_k1 (NeMo) | k1 (TRL) | k3
    c.rl.kl_reduce = "mean"  # mean over response tokens (NeMo) | sum (TRL)
    c.rl.baseline = "rloo_eos"  # rloo_eos: EOS-terminated siblings only (NeMo) | rloo_all (TRL)
    c.rl.normalize = "sequence"  # sequence: each response weighs 1 (NeMo) | token
    # rloo: leave-one-out baseline (NeMo, TRL RLOO) | group_norm: (R - group mean) / group std
    # (GRPO; experiments/configs/grpo.py)
    c.rl.advantage = "rloo"
    c.rl.kl_in = "reward"  # reward: R - beta * KL (NeMo) | loss: beta * k3 per token (GRPO)
    # plain: -A log pi (NeMo REINFORCE) | clipped: the ratio surrogate against the rollout
    # policy's log-probs, clipped to [1 - clip_eps, 1 + clip_eps] (PPO, GRPO)
    c.rl.policy_loss = "plain"
    c.rl.clip_eps = 0.2  # in (0, 1); read by policy_loss=clipped and by PPO
    # PPO only (advantage=gae, experiments/configs/ppo.py; NeMo-Aligner's PPO defaults): the
    # discount and GAE's lambda, the critic's value clip (reward units; 0: none), and whether
    # the advantages are whitened over each rollout batch.
    c.rl.gamma = 1.0
    c.rl.lam = 0.95
    c.rl.value_clip = 0.2
    c.rl.whiten_advantages = True
    # Passes over each rollout batch, in minibatches of batch_size (PPO's epochs; the first in
    # generation order, each further one shuffled).
    c.rl.epochs = 1
    # Log-probs of the samples under the policy, for the KL: the sampler's own (sampler), or a
    # second forward pass (recompute; NeMo-Aligner must, its TensorRT-LLM sampler being another
    # program). They agree to about 1e-7 in float32 but differ by ~5e-4 per token in bf16
    # (the sampler's KV cache rounds), enough for the |k1| KL to start above 0. auto: sampler in
    # float32 compute, recompute in 16-bit compute (so the KL starts at 0, as in NeMo).
    c.rl.policy_logprobs = "auto"
    # Responses that hit max_new_tokens without EOS: zero_loss (NeMo: loss 0, still counted in
    # the mean, as its micro-batch of one with no ended response gets) | keep (full gradient).
    c.rl.truncated = "zero_loss"
    c.rl.max_prompt_len = 96  # longer prompts are cut as data.truncation says
    c.rl.max_new_tokens = 32
    c.rl.temperature = 1.0
    c.rl.top_k = 0  # 0: no top-k filter
    c.rl.top_p = 1.0
    c.rl.eval_prompts = 64  # held-out prompts scored at each evaluation
    c.rl.eval_temperature = 1.0
    # How the sampler holds a sharded policy (nemotron_jax.sampling.SamplingConfig.weights):
    # gathered (one all-gathered copy for the rollout; fastest, fits up to ~8B on 80 GB) |
    # per_step (each decode step gathers each layer as it runs it; 70B on 80 GB)
    c.rl.sampler_weights = "gathered"

    # DPO only (experiments/configs/dpo.py; nemotron_jax/losses/dpo.py). The policy starts from
    # init_from; the frozen reference is reference_from ("" = init_from).
    c.dpo = ml_collections.ConfigDict()
    c.dpo.variant = "regular"  # regular | margin | scaled
    c.dpo.beta = 0.1  # > 0
    c.dpo.label_smoothing = 0.0  # conservative DPO's epsilon, in [0, 0.5)
    c.dpo.sft_weight = 0.0  # RPO-style NLL term on the chosen response
    # m = |preference_strength| * strength_scale: 1.0 gives m in 1..3, 1/3 gives 1/3..1.
    c.dpo.strength_scale = 1.0
    # precomputed: the reference's log-probs in a pre-pass, stored in
    # <workdir>/reference_logprobs keyed by the reference checkpoint and the data, reused on
    # resume; training holds no reference | resident: the reference stays on the devices and
    # scores each training batch.
    c.dpo.reference = "precomputed"
    return c


def real_model(c: ml_collections.ConfigDict, model: str) -> None:
    """Settings for a real Llama-3.1 size: float32 master parameters and Adam moments with bf16
    compute (as NeMo / Megatron train), remat, micro-batches of one example per device, the real
    tokenizer and chat data."""
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose from {list(MODELS)}")
    c.model.preset = model
    if model != "tiny":
        # bf16 weights would lose most updates at NeMo's rates (1e-6: below 2^-9 of a weight)
        # and all of the weight decay; the products still run in bf16 (`kernels.dense`).
        c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
        c.model.remat = "full"
        c.micro_batch_size = 1
        c.data.tokenizer = "llama3"
        c.data.max_len = 4096  # NeMo's encoder_seq_length
        c.data.source = "dir"
        c.batch_size = c.eval_batch_size = 128


def lora(c: ml_collections.ConfigDict, rank: int) -> None:
    """LoRA of `rank` (0: off). At real sizes the frozen base is then kept in bf16: it takes no
    updates, so float32 master weights would only double its memory; the adapters and heads
    that train stay float32 whatever `param_dtype` is."""
    c.lora.rank = rank
    if rank and c.model.preset != "tiny":
        c.model.param_dtype = "bfloat16"


def smoke(c: ml_collections.ConfigDict) -> None:
    """Shrinks any config to seconds on a laptop CPU: the tiny model on a small slice of the
    same data (never other data): 200 generated prompts for the synthetic set, else the first
    200 rows of each split of data.dir, read with the synthetic set's small vocabulary. With no
    data.dir (a real model's config given no data=), the synthetic set."""
    c.model.preset = "tiny"
    c.model.dtype = c.model.param_dtype = "float32"
    c.model.remat = "none"
    if c.data.source == "synthetic" or not c.data.dir:
        c.data.source, c.data.tokenizer = "synthetic", ""
        c.data.synthetic_prompts = 200
    else:
        c.data.tokenizer = "synthetic"
        c.data.max_rows = 200
    c.data.max_len = 64
    c.batch_size = c.eval_batch_size = 8
    c.num_steps = 6
    c.log_every = c.eval_every = c.checkpoint_every = 3
    c.tensorboard = False
