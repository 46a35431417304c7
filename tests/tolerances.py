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
