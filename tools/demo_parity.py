"""The `make demo` job: a tiny random Llama-3.1 built in JAX, exported to Hugging Face format,
reloaded by transformers, and compared logit for logit.

    python tools/demo_parity.py [--out runs/demo]

Steps: random `tiny` preset params -> `save_hf` (safetensors + config.json) -> transformers
`LlamaForCausalLM.from_pretrained` -> the same right-padded batch through both -> max abs logit
difference (float32; the tolerance is 1e-4) -> `load_hf` back, checked bit for bit.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from check_logits_vs_hf import DEFAULT_ATOL, compare_logits  # noqa: E402

from nemotron_jax.errors import ArgumentParser, cli_main  # noqa: E402


@cli_main
def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="working directory for the export")
    args = parser.parse_args()

    import jax

    from nemotron_jax.convert import load_hf, save_hf
    from nemotron_jax.models import LlamaConfig, count_params, init_params

    start = time.time()
    config = LlamaConfig.preset("tiny")
    print(
        f"[1/4] tiny Llama-3.1: {count_params(config):,} params, {config.num_layers} layers, "
        f"{config.num_heads} heads / {config.num_kv_heads} kv heads, llama3 RoPE scaling"
    )
    params = init_params(config, jax.random.PRNGKey(0))
    # HF's init (std 0.02) gives near-zero logits at this size, which would make any comparison
    # look perfect; weights of std 0.2 give logits of order 10.
    params = jax.tree.map(lambda x: 10.0 * x if x.ndim > 2 else x, params)
    params["embed_tokens"] = 10.0 * params["embed_tokens"]
    params["lm_head"] = 10.0 * params["lm_head"]

    hf_dir = os.path.join(args.out, "tiny-llama-hf")
    shutil.rmtree(hf_dir, ignore_errors=True)
    save_hf(hf_dir, config, params)
    print(f"[2/4] exported to {hf_dir}: {sorted(os.listdir(hf_dir))}")

    worst, mean, scale = compare_logits(hf_dir)
    ok = worst <= DEFAULT_ATOL
    print(
        f"[3/4] transformers reload: max abs logit diff {worst:.2e} (mean {mean:.2e}, "
        f"max |logit| {scale:.3g}), "
        f"tolerance {DEFAULT_ATOL:.0e}: {'PASS' if ok else 'FAIL'}"
    )

    _, reloaded = load_hf(hf_dir)
    same = all(
        np.array_equal(np.asarray(a), b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reloaded), strict=True)
    )
    print(f"[4/4] HF -> nemotron_jax round trip bit-exact: {same}")
    print(f"done in {time.time() - start:.1f}s")
    return 0 if ok and same else 1


if __name__ == "__main__":
    main()
