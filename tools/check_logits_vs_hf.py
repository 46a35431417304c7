"""Golden-logit check: nemotron_jax against transformers on the same HF checkpoint.

    python tools/check_logits_vs_hf.py --hf-dir /path/to/Llama-3.1-8B-Instruct

Loads the directory twice, with transformers (torch, CPU, float32) and with nemotron_jax
(float32), runs one fixed right-padded batch of token ids (seeded, so every run sees the same
batch), and prints the max and mean absolute logit difference over real (non-padding) tokens.
Exits 1 when the max exceeds the tolerance.

Tolerance: 1e-4 (float32), the same figure the test-suite asserts on tiny random models, where
the measured difference is about 3e-6. Deep real-size models accumulate more float32 rounding
(different summation orders over 32-126 layers), so pass `--atol` to set a larger bound there
and report the figure you measured. Memory: both copies are float32, i.e. 8 bytes per parameter
in total (an 8B model needs about 64 GB of host memory).
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nemotron_jax.errors import ArgumentParser, cli_main  # noqa: E402

DEFAULT_ATOL = 1e-4


def fixed_batch(vocab_size: int, lengths=(24, 17, 5), seed: int = 0):
    """Right-padded token ids [B, T] and their 0/1 mask (pad id 0)."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = rng.integers(0, vocab_size, size=(len(lengths), t))
    mask = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask, tokens, 0), mask


def compare_logits(hf_dir, lengths=(24, 17, 5)) -> tuple[float, float, float]:
    """(max, mean) |logits_jax - logits_torch| over real tokens of the fixed batch, and the
    largest |logit| (the scale the difference should be read against)."""
    import jax
    import torch
    import transformers

    from nemotron_jax.convert import load_hf
    from nemotron_jax.errors import CheckpointError
    from nemotron_jax.models import Llama

    config, params, kind = load_hf(hf_dir, dtype="float32", param_dtype="float32", return_kind=True)
    if kind.kind != "causal_lm":
        raise CheckpointError(
            f"{hf_dir} holds a {kind.kind} model; this tool compares causal-LM logits"
        )
    tokens, mask = fixed_batch(config.vocab_size, lengths)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = (
            model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask))
            .logits.float()
            .numpy()
        )
    del model
    forward = jax.jit(lambda p, t, m: Llama(config).apply({"params": p}, t, attention_mask=m))
    got = np.asarray(forward(params, tokens, mask))
    diff = np.abs(got - want)[mask.astype(bool)]
    return float(diff.max()), float(diff.mean()), float(np.abs(want[mask.astype(bool)]).max())


@cli_main
def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF model directory (safetensors)")
    parser.add_argument(
        "--atol",
        type=float,
        default=DEFAULT_ATOL,
        help=f"max abs logit difference allowed (default {DEFAULT_ATOL})",
    )
    args = parser.parse_args()
    worst, mean, scale = compare_logits(args.hf_dir)
    ok = worst <= args.atol
    print(
        f"max abs logit diff {worst:.3e}  mean {mean:.3e}  (max |logit| {scale:.3g})  "
        f"tolerance {args.atol:.1e}  "
        f"{'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    main()
