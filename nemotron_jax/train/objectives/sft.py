"""Supervised fine-tuning: a Llama LM on well-rated HelpSteer2 responses (next-token loss on the
response tokens only; rows of helpfulness >= config.data.sft_min_helpfulness)."""

from __future__ import annotations

import functools

from nemotron_jax.losses import get_loss
from nemotron_jax.models.llama import Llama
from nemotron_jax.train.objective import (
    Objective,
    model_config,
    supervised_batch_spec,
    supervised_data,
)


def build(config) -> Objective:
    mcfg = model_config(config)
    # Per-token log-probs from hidden states and the head: no [B, T, V] logits in memory.
    loss = functools.partial(get_loss("sft_fused"), implementation=config.loss.logprobs_impl)
    return Objective(
        name="sft",
        model_config=mcfg,
        module=Llama(mcfg),
        loss_fn=loss,
        progress_keys=("loss", "token_nll"),
        make_data=lambda mesh, rules, workdir=None: supervised_data(config, mcfg, "sft", mesh),
        batch_spec=supervised_batch_spec("sft"),
        seq_len=config.data.max_len,
        method="hidden_and_head",
    )
