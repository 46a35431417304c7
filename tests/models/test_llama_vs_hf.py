"""Logit parity with transformers' LlamaForCausalLM on random tiny configs (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.convert import config_from_hf, load_hf
from nemotron_jax.models import Llama
from nemotron_jax.models.llama import rope_inv_freq
from tests import tolerances
from tests.hf_utils import hf_logits, make_hf_llama, padded_batch

pytestmark = pytest.mark.hf

# Group sizes 1, 2, 4, 8 (8 query heads); llama3 scaling with a shrunken original context (32)
# so the batch (up to 48 tokens) runs past it; plain RoPE; tied and untied embeddings.
CASES = [
    dict(num_kv_heads=8),
    dict(num_kv_heads=4, tie=True),
    dict(num_kv_heads=2, rope="default"),
    dict(num_kv_heads=1),
    dict(num_kv_heads=2, rope="default", tie=True),
    dict(num_kv_heads=2, attention_impl="cpu"),  # the fused CPU attention kernel
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_logits_match_transformers(case, tmp_path):
    case = dict(case)
    attention_impl = case.pop("attention_impl", "auto")
    model = make_hf_llama(**case)
    model.save_pretrained(tmp_path)
    config, params = load_hf(tmp_path, attention_impl=attention_impl)
    assert config.num_kv_heads == case["num_kv_heads"]
    assert config.tie_word_embeddings == case.get("tie", False)
    assert config.rope_type == case.get("rope", "llama3")

    tokens, mask = padded_batch(config.vocab_size, [48, 37, 5, 20])
    want = hf_logits(model, tokens, mask)
    got = jax.jit(lambda p, t, m: Llama(config).apply({"params": p}, t, attention_mask=m))(
        params, tokens, mask
    )
    real = mask.astype(bool)
    diff = np.abs(np.asarray(got)[real] - want[real]).max()
    assert diff <= tolerances.LOGITS_F32, f"max abs logit diff {diff:.3g}"


def test_inv_freq_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = make_hf_llama(num_heads=2, num_kv_heads=2, hidden=256, original_max=8192)
    config = config_from_hf(model.config.to_dict())
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, torch.device("cpu"))
    got = rope_inv_freq(config)
    assert np.abs(got - want.numpy()).max() <= tolerances.SIMPLE_F32 * np.abs(want.numpy()).max()
    # The scaling really changed something: low frequencies are divided by the factor.
    plain = rope_inv_freq(config.replace(rope_type="default"))
    assert np.isclose(got[-1], plain[-1] / 8.0)


def test_bf16_compute_close_to_f32(tmp_path):
    model = make_hf_llama(num_kv_heads=2)
    model.save_pretrained(tmp_path)
    config, params = load_hf(tmp_path)
    tokens, mask = padded_batch(config.vocab_size, [24, 16])
    ref = Llama(config).apply({"params": params}, tokens, attention_mask=mask)
    bf16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    got = Llama(bf16).apply({"params": params16}, tokens, attention_mask=mask)
    assert got.dtype == jnp.float32
    real = mask.astype(bool)
    scale = np.abs(np.asarray(ref)[real]).max()
    diff = np.abs(np.asarray(got)[real] - np.asarray(ref)[real]).max()
    assert diff <= tolerances.BF16 * scale, f"bf16 diff {diff:.3g} at logit scale {scale:.3g}"
