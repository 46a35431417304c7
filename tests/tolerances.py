"""The one table of numeric tolerances (max abs difference). Never loosen one to make a test
pass: a failure means a numeric bug or a reference that is not what it claims to be."""

# Full-model logits against transformers (torch, CPU), float32.
LOGITS_F32 = 1e-4
# A single simple op (RoPE frequencies, RMSNorm) against its reference, float32.
SIMPLE_F32 = 1e-5
# Sharded (8 fake devices) against single-device forward, float32: only reduction order differs.
SHARDED_F32 = 1e-5
# bf16 compute against the float32 reference, relative to the logits' scale.
BF16 = 2e-2
# A loss or metric against hand-computed numbers of order 1, float32 (a few ulps).
LOSS_F32 = 1e-6
# Fused token log-probs (nemotron_jax.kernels.logprobs) against the full-logits reference, for
# O(1) logits (N=100, D=64, V=300): values and d hidden / d lm_head, float32 inputs. Measured
# max 8e-6 (only the summation order over V and D differs).
LOGPROBS_F32 = 5e-5
# Same, bf16 inputs against the reference on the same bf16 inputs (float32 accumulation in
# both), relative to max(1, max |reference|): the backward rounds dz to bf16 before its matmuls.
LOGPROBS_BF16 = 2e-2
# Attention kernels (tests/kernels/test_attention.py) against the frozen naive reference; the
# error is max abs difference / max(1, max |reference|). float32 values and gradients only
# differ in summation order (online vs two-pass softmax); bf16 inputs are the same bf16 values
# the reference upcasts, so the bf16 error is the rounding of p and of the outputs.
ATTENTION_F32 = 1e-5
ATTENTION_GRAD_F32 = 1e-5
ATTENTION_BF16 = 2e-2
ATTENTION_GRAD_BF16 = 2e-2
# KV-cache decoding (prefill + one-token steps, `Llama.decode`) against the full forward over the
# same sequence, float32: the same ops, but keys sit in a longer cache whose empty or padded slots
# get probability exactly 0, so only summation order/length differs. Measured max 1.2e-7 on
# O(1)-O(10) logits and log-probs.
KV_CACHE_F32 = 1e-5
# Parameter change after 20 AdamW steps at lr 1e-6 (tests/train/test_precision.py): float32
# master weights with bf16 compute against an all-float32 run, same initialisation and batch.
# bf16 gradients flip the sign of Adam's early, nearly sign-like updates on some small-gradient
# weights; cosine of the two parameter deltas >= 1 - this, and their norms within this ratio.
# Measured: cosine 0.9934, norm ratio 0.987.
MIXED_PRECISION_UPDATE_COSINE = 0.05
MIXED_PRECISION_UPDATE_NORM = 0.05
# LoRA adapters merged into their weights (W + (alpha / R) A @ B, float32) against the unmerged
# forward (x @ W + (x @ A) @ B * alpha / R): the same sums, rounded in another order. Measured max
# 3.7e-7 on O(1) logits of the tiny model with every projection adapted.
LORA_MERGE_F32 = 1e-5
