"""The GPU check: GPU-only tests, kernel timings, a ~1B reward-model step's MFU, decode tokens/s.

Run with `bash benchmarks/device_check.sh` (or `make device-check`) on a machine with one GPU;
`--no-append` only prints, `--smoke` runs tiny shapes on any backend (the CPU: Pallas in its
interpreter, cuDNN skipped) to exercise the script itself. Parts, each with a time budget (7.5
minutes in all, sized for a run of at most 8 minutes on an H100 / H200; a part over its budget
skips its remaining cases and says so):

1. tests: `pytest -m gpu` on the test files that mark GPU-only tests (in a child process, with
   `JAX_PLATFORMS` left to JAX, since tests/conftest.py defaults it to "cpu").
2. attention: `kernels.attention` fwd and fwd+bwd (a VJP), causal, bf16, GQA 32 / 8 heads of
   128, T = 2k and 8k; implementations pallas, cudnn and xla.
3. log-probs: `kernels.token_logprobs` fwd and fwd+bwd (grad of sum(logp) in hidden and
   lm_head), V = 128,256, bf16; pallas against chunked (and their max |logp| difference).
4. reward step: one training step (forward, backward, clipping, AdamW; Scaled BT loss) of a
   `RewardModel` with a ~1B Llama-3.2-1B-sized backbone, bf16 compute with float32 master
   parameters, with cuDNN and with Pallas attention, and its MFU against the GPU's published
   dense bf16 peak (`PEAK_BF16_TFLOPS`).
5. decode: `sampling.make_generate_fn`, greedy, on the same backbone with an LM head and bf16
   parameters, at batch 1 and 64: decode tokens/s = B (N - 1) / (t(N) - t(1)).

Timings are best of `--repeats` after a warm-up call, each waited for with
`block_until_ready`. A case that raises is recorded as "FAILED: <error>" in its table and the
run goes on; the exit code is 1 if anything failed. Unless `--no-append`, one section "## Device
check, <date UTC>" (device, driver and JAX versions, the tables) is appended to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np
from common import DOC, append_section, machine, train_flops  # benchmarks/common.py
from kernels_attention import bench_shape  # benchmarks/kernels_attention.py

from nemotron_jax.errors import ArgumentParser, cli_main
from nemotron_jax.kernels import token_logprobs
from nemotron_jax.losses import scaled_bt
from nemotron_jax.models.llama import Llama, LlamaConfig, init_params
from nemotron_jax.models.reward import HELPFULNESS_SLOT, RewardModel, init_reward_params
from nemotron_jax.optim import make_optimizer
from nemotron_jax.sampling import SamplingConfig, make_generate_fn
from nemotron_jax.train.steps import make_train_step

REPO = Path(__file__).resolve().parents[1]

# Published dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets:
# H100 SXM 989, H100 PCIe 756, H100 NVL 835, H200 989, A100 312, L4 121, B200 2250. Matched in
# this order against `jax.devices()[0].device_kind` (e.g. "NVIDIA H100 80GB HBM3").
PEAK_BF16_TFLOPS = [
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL4\b", 121.0),
    (r"\bB200\b", 2250.0),
]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes of one run: the real check, or the tiny smoke run."""

    attention: tuple[tuple[int, int, int, int, int], ...]  # (B, T, N, K, H)
    logprob_tokens: tuple[int, ...]
    logprob_hidden: int
    vocab: int
    model: dict  # LlamaConfig fields of the reward-step and decode backbone
    pairs: int  # reward step: pairs per batch, each 2 sequences of seq_len
    seq_len: int
    prompt: int  # decode: prompt width
    new_tokens: int
    decode_batches: tuple[int, ...]
    budgets_s: dict  # part -> seconds


LLAMA_1B = dict(  # Llama-3.2-1B's shape: 0.97B matmul parameters, 1.2B with the embedding
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
    num_kv_heads=8, head_dim=64,
)  # fmt: skip
FULL = Sizes(
    attention=((4, 2048, 32, 8, 128), (1, 8192, 32, 8, 128)),
    logprob_tokens=(8192, 32768),
    logprob_hidden=4096,
    vocab=128256,
    model=LLAMA_1B,
    pairs=4,
    seq_len=2048,
    prompt=128,
    new_tokens=256,
    decode_batches=(1, 64),
    # 7.5 minutes in all; a case that starts inside its part's budget runs to its end.
    budgets_s={"tests": 75, "attention": 90, "log-probs": 60, "reward step": 120, "decode": 105},
)
TINY = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16,
)  # fmt: skip
SMOKE = Sizes(
    attention=((1, 64, 4, 2, 16),),
    logprob_tokens=(64,),
    logprob_hidden=32,
    vocab=1000,
    model=TINY,
    pairs=2,
    seq_len=32,
    prompt=8,
    new_tokens=8,
    decode_batches=(1, 4),
    budgets_s={"tests": 120, "attention": 60, "log-probs": 60, "reward step": 60, "decode": 60},
)


def parse_args() -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any backend")
    p.add_argument("--repeats", "-N", type=int, default=5, help="timed runs per case")
    p.add_argument("--skip-tests", action="store_true", help="leave out the pytest part")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--append", type=Path, default=DOC, help="markdown file to append to")
    out.add_argument("--no-append", dest="append", action="store_const", const=None)
    return p.parse_args()


def one_line(error: BaseException) -> str:
    """The error's type and first line of message, fit for a table cell."""
    lines = [ln for ln in str(error).splitlines() if ln.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    return text[:200]


class Part:
    """One table of the report: a header, rows, notes, and whether anything failed."""

    def __init__(self, title: str, header: list[str], budget_s: float):
        self.title, self.header, self.budget_s = title, header, budget_s
        self.rows: list[list[str]] = []
        self.notes: list[str] = []
        self.failed = False
        self.start = time.perf_counter()
        self.seconds = 0.0  # set by `finish`
        print(f"\n### {title}\n\n| " + " | ".join(header) + " |", flush=True)

    def add(self, *cells) -> None:
        row = [str(c) for c in cells]
        row += [""] * (len(self.header) - len(row))
        self.rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)

    def fail(self, labels: list, error: BaseException) -> None:
        """A row with the case's `labels` and "FAILED: <error>" in the next column."""
        self.failed = True
        self.add(*labels, f"FAILED: {one_line(error)}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def over_budget(self, what: str) -> bool:
        """True (and a note) when the part has used its time budget; `what` is skipped."""
        elapsed = time.perf_counter() - self.start
        if elapsed <= self.budget_s:
            return False
        self.note(f"skipped {what}: the part used {elapsed:.0f} s of its {self.budget_s} s")
        return True

    def finish(self) -> None:
        self.seconds = time.perf_counter() - self.start
        print(f"({self.title}: {self.seconds:.0f} s)", flush=True)

    def markdown(self) -> str:
        lines = [f"### {self.title} ({self.seconds:.0f} s)", ""]
        lines += ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(best s, median s) of `repeats` calls of `fn` after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def measure_compiled(fn, args: tuple, repeats: int) -> tuple[float, float]:
    """(best s, compiled temp MiB) of `jax.jit(fn)(*args)`."""
    compiled = jax.jit(fn).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    best, _ = best_of(lambda: compiled(*args), repeats)
    return best, temp


def peak_bf16_tflops(device_kind: str) -> float | None:
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_kind):
            return peak
    return None


# --- 1. GPU-only tests --------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    """Test files that mark tests `@pytest.mark.gpu` (or set `pytestmark` to it)."""
    files = sorted((REPO / "tests").rglob("test_*.py"))
    return [str(f.relative_to(REPO)) for f in files if "mark.gpu" in f.read_text()]


def run_gpu_tests(part: Part) -> None:
    files = gpu_test_files()
    if not files:
        part.note("no test is marked gpu")
        return
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "")  # "": JAX's own choice (conftest would pick "cpu")
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # the parent takes the GPU's memory later
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={report}", *files]  # fmt: skip
        try:
            done = subprocess.run(
                cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=part.budget_s
            )
        except subprocess.TimeoutExpired as e:
            part.fail(["pytest -m gpu"], e)
            return
        if not report.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
            part.fail(["pytest -m gpu"], RuntimeError(f"exit {done.returncode}: {tail[0]}"))
            return
        cases = ElementTree.parse(report).getroot().iter("testcase")
        outcomes = []
        for case in cases:
            name = f"{case.get('file') or case.get('classname')}::{case.get('name')}"
            outcome, detail = "passed", ""
            for kind in ("failure", "error", "skipped"):
                child = case.find(kind)
                if child is not None:
                    outcome = "skipped" if kind == "skipped" else "FAILED"
                    detail = (child.get("message") or "").splitlines()[0][:160].replace("|", "/")
            outcomes.append(outcome)
            part.add(name, outcome, f"{float(case.get('time', 0)):.1f}", detail)
    if "FAILED" in outcomes or done.returncode not in (0, 5):  # 5: nothing collected
        part.failed = True
        part.note(f"pytest exited {done.returncode}")


# --- 2. attention -------------------------------------------------------------------------


def attention_flops(b: int, t: int, n: int, h: int) -> float:
    """Causal attention forward: 2 matmuls of 2 B T^2 N H, halved by the mask."""
    return 2 * 2 * b * t * t * n * h / 2


def run_attention(part: Part, sizes: Sizes, implementations: list[str], repeats: int) -> None:
    for shape in sizes.attention:
        b, t, n, k, h = shape
        fwd_flops = attention_flops(b, t, n, h)
        for impl in implementations:
            label = [f"{b}, {t}, {n} / {k}, {h}", impl]
            if part.over_budget(f"{impl} at T={t}"):
                continue
            try:
                # `repeats` runs after a warm-up; the interpreter only once (it is slow).
                runs = 1 if impl == "pallas_interpret" else repeats
                (fwd, _, _), (fwd_bwd, _, temp) = bench_shape(shape, impl, jnp.bfloat16, True, runs)
            except Exception as e:  # recorded in the table
                part.fail(label, e)
                continue
            part.add(
                *label, f"{fwd * 1e3:.2f}", f"{fwd_flops / fwd / 1e12:.1f}",
                f"{fwd_bwd * 1e3:.2f}", f"{3 * fwd_flops / fwd_bwd / 1e12:.1f}",
                f"{temp / 2**20:.0f}",
            )  # fmt: skip


# --- 3. log-probs -------------------------------------------------------------------------


def run_logprobs(part: Part, sizes: Sizes, implementations: list[str], repeats: int) -> None:
    d, v = sizes.logprob_hidden, sizes.vocab
    for n in sizes.logprob_tokens:
        keys = jax.random.split(jax.random.key(0), 3)
        hidden = jax.random.normal(keys[0], (n, d), jnp.bfloat16)
        lm_head = (jax.random.normal(keys[1], (d, v), jnp.float32) * d**-0.5).astype(jnp.bfloat16)
        labels = jax.random.randint(keys[2], (n,), 0, v)
        first_logp = None
        for impl in implementations:
            label = [n, d, v, impl]
            if part.over_budget(f"{impl} at N={n}"):
                continue

            def fwd(h, w, y, impl=impl):
                return token_logprobs(h, w, y, implementation=impl)

            def fwd_bwd(h, w, y, fwd=fwd):
                return jax.grad(lambda h, w: jnp.sum(fwd(h, w, y)), argnums=(0, 1))(h, w)

            try:
                runs = 1 if impl == "pallas_interpret" else repeats
                fwd_s, _ = measure_compiled(fwd, (hidden, lm_head, labels), runs)
                fwd_bwd_s, temp = measure_compiled(fwd_bwd, (hidden, lm_head, labels), runs)
                logp = np.asarray(jax.jit(fwd)(hidden, lm_head, labels))
            except Exception as e:  # recorded in the table
                part.fail(label, e)
                continue
            if first_logp is None:
                first_logp, diff = logp, "-"
            else:
                diff = f"{np.max(np.abs(logp - first_logp)):.2e}"
            part.add(*label, f"{fwd_s * 1e3:.2f}", f"{fwd_bwd_s * 1e3:.2f}", f"{temp:.0f}", diff)
    part.note(f"max abs logp difference against {implementations[0]}")


# --- 4. reward-model training step --------------------------------------------------------


def time_train_step(config: LlamaConfig, batch: dict, tx, loss_fn, repeats: int) -> dict:
    """Parameter count, first call (compile and one step), best and median step seconds and the
    first step's loss of the jitted reward-model train step. Everything it allocates is freed
    when it returns or raises."""
    model = RewardModel(config)

    def apply(params, batch):
        return model.apply(
            {"params": params}, batch["tokens"], attention_mask=batch["attention_mask"]
        )

    step = jax.jit(make_train_step(apply, loss_fn, tx), donate_argnums=0)
    # Initialised with XLA attention (the parameters do not depend on it), so that no kernel
    # runs on init's one-token input.
    params = init_reward_params(config.replace(attention_impl="xla"), jax.random.PRNGKey(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    box = {"state": {"step": jnp.zeros((), jnp.int32), "params": params,
                     "opt_state": tx.init(params)}}  # fmt: skip
    del params  # the step donates its state: `box` keeps the newest

    def one_step():
        box["state"], metrics = step(box["state"], batch)
        return metrics

    t0 = time.perf_counter()
    metrics = jax.block_until_ready(one_step())
    first_call_s = time.perf_counter() - t0
    best, median = best_of(one_step, repeats)
    loss = float(metrics["loss"][0]) / float(metrics["loss"][1])
    return dict(params=n_params, first_call_s=first_call_s, best=best, median=median, loss=loss)


def run_reward_step(
    part: Part, sizes: Sizes, implementations: list[str], repeats: int, device_kind: str
) -> None:
    peak = peak_bf16_tflops(device_kind)
    m, b, t = sizes.model, sizes.pairs, sizes.seq_len
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(1, m["vocab_size"], size=(b, 2, t), dtype=np.int32),
        "attention_mask": np.ones((b, 2, t), np.int32),
        "strength": rng.choice([-3, -2, -1, 1, 2, 3], size=b).astype(np.int32),
        "example_weight": np.ones(b, np.float32),
    }
    batch = jax.tree.map(jnp.asarray, batch)
    flops = train_flops(
        layers=m["num_layers"], hidden=m["hidden_size"], heads=m["num_heads"],
        kv_heads=m["num_kv_heads"], head_dim=m["head_dim"],
        intermediate=m["intermediate_size"], seqs=2 * b, seq_len=t,
    )  # fmt: skip
    optim = ml_collections.ConfigDict(
        dict(lr=1e-5, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
             warmup_steps=0, schedule="constant", min_lr=0.0)
    )  # fmt: skip
    tx = make_optimizer(optim, total_steps=1000)
    loss_fn = functools.partial(scaled_bt, slot=HELPFULNESS_SLOT)
    for impl in implementations:
        if part.over_budget(f"the step with {impl} attention"):
            continue
        config = LlamaConfig(
            **m, dtype="bfloat16", param_dtype="float32", attention_impl=impl, pad_token_id=0
        )
        try:
            r = time_train_step(config, batch, tx, loss_fn, repeats)
        except Exception as e:  # recorded in the table
            part.fail([impl], e)
            continue
        best, n_params = r["best"], r["params"]
        tflops = flops / best / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "peak unknown"
        size = f"{n_params / 1e9:.2f} B" if n_params >= 1e8 else f"{n_params / 1e6:.2f} M"
        part.add(
            impl, size, f"{2 * b * t:,}", f"{r['first_call_s']:.0f}",
            f"{best * 1e3:.1f} / {r['median'] * 1e3:.1f}", f"{2 * b * t / best:,.0f}",
            f"{tflops:.1f}", mfu, f"{r['loss']:.4f}",
        )  # fmt: skip
    part.note(
        f"{b} pairs x 2 x {t} tokens, no padding; bf16 compute, float32 parameters and AdamW "
        f"moments; model FLOPs {flops / 1e12:.1f} TFLOP per step (6 x matmul parameters x "
        "tokens + causal attention); "
        + (f"MFU against {peak:g} TFLOP/s, the published dense bf16 peak of {device_kind}"
           if peak else f"MFU: no published peak known for {device_kind!r}")
    )  # fmt: skip


# --- 5. decode ----------------------------------------------------------------------------


def run_decode(part: Part, sizes: Sizes, repeats: int) -> None:
    # Decoding attends through the KV cache's explicit mask, which runs on XLA attention anyway.
    config = LlamaConfig(
        **sizes.model, dtype="bfloat16", param_dtype="bfloat16", attention_impl="xla",
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    )  # fmt: skip
    model = Llama(config)
    params = init_params(config, jax.random.PRNGKey(0))
    p, n = sizes.prompt, sizes.new_tokens
    generate = {
        count: make_generate_fn(model, SamplingConfig(count, temperature=0.0, stop_tokens=()))
        for count in (n, 1)
    }
    rng = np.random.default_rng(0)
    for b in sizes.decode_batches:
        label = [b, p, n]
        if part.over_budget(f"batch {b}"):
            continue
        tokens = rng.integers(3, config.vocab_size, size=(b, p)).astype(np.int32)
        mask = np.ones((b, p), np.int32)
        try:
            t_n, _ = best_of(functools.partial(generate[n], params, tokens, mask, None), repeats)
            t_1, _ = best_of(functools.partial(generate[1], params, tokens, mask, None), repeats)
        except Exception as e:  # recorded in the table
            part.fail(label, e)
            continue
        decode_s = max(t_n - t_1, 1e-9)
        part.add(
            *label, f"{t_n * 1e3:.1f}", f"{t_1 * 1e3:.1f}", f"{b * (n - 1) / decode_s:,.0f}",
            f"{decode_s * 1e3 / (n - 1):.2f}",
        )  # fmt: skip
    part.note(
        "greedy, no stop tokens, bf16 parameters; decode tokens/s = B (N - 1) / (t(N) - t(1)), "
        "the prefill and first token taken out"
    )


# --- the report ---------------------------------------------------------------------------


def run_part(parts: list[Part], title: str, header: list[str], budget_s: float, body) -> None:
    """Runs `body(part)`; an error that escapes it becomes the part's FAILED row."""
    part = Part(title, header, budget_s)
    parts.append(part)
    try:
        body(part)
    except Exception as e:  # recorded in the table
        part.fail(["-"], e)
    part.finish()
    gc.collect()


def describe_machine() -> str:
    device = jax.devices()[0]
    driver = "no nvidia-smi"
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout
        driver = "driver " + (driver.strip().splitlines() or ["unknown"])[0]
    except (OSError, subprocess.SubprocessError):
        pass
    platform = getattr(device.client, "platform_version", "") or ""
    return (
        f"- Device: {device.device_kind} ({jax.device_count()} x {device.platform}); {driver}; "
        f"{platform.strip() or 'no platform version'}\n"
        f"- Versions: jax {jax.__version__}, jaxlib {jaxlib.__version__}, python "
        f"{sys.version.split()[0]}\n- Host: {machine()}\n"
    )


def main() -> int:
    args = parse_args()
    sizes = SMOKE if args.smoke else FULL
    parts: list[Part] = []
    started = time.perf_counter()
    if not args.skip_tests:  # first: before this process initialises the GPU and takes memory
        run_part(
            parts, "GPU-only tests (`pytest -m gpu`)", ["test", "outcome", "s", "detail"],
            sizes.budgets_s["tests"], run_gpu_tests,
        )  # fmt: skip

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.smoke:
        print(f"error: the backend is {jax.default_backend()!r}, not a GPU; use --smoke")
        return 2
    device_kind = jax.devices()[0].device_kind
    if parts:  # the tests' verdict needs the backend
        passed = any(row[1] == "passed" for row in parts[0].rows)
        if on_gpu and not passed:
            parts[0].failed = True
            parts[0].note("no GPU test passed on a GPU machine")
        elif not on_gpu:
            parts[0].note("no GPU here: the GPU tests skip")
    if on_gpu:
        kernels = ["pallas", "cudnn", "xla"]
        logprob_impls = ["chunked", "pallas"]
        step_impls = ["cudnn", "pallas"]
    else:  # the smoke run on a CPU: Pallas in its interpreter, no cuDNN
        kernels = ["pallas_interpret", "xla"]
        logprob_impls = ["chunked", "pallas_interpret"]
        step_impls = ["xla"]
    budgets = sizes.budgets_s

    def attention_part(part: Part) -> None:
        if not on_gpu:
            part.note("no GPU: cudnn skipped; pallas_interpret is the Pallas interpreter, not "
                      "GPU performance")  # fmt: skip
        part.note("TFLOP/s: causal model FLOPs, fwd+bwd = 3 x fwd")
        run_attention(part, sizes, kernels, args.repeats)

    run_part(
        parts, "Attention (bf16, causal)",
        ["B, T, N / K, H", "implementation", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms",
         "fwd+bwd TFLOP/s", "fwd+bwd temp MiB"],
        budgets["attention"], attention_part,
    )  # fmt: skip
    run_part(
        parts, "Token log-probs (bf16)",
        ["N", "D", "V", "implementation", "fwd ms", "fwd+bwd ms", "fwd+bwd temp MiB",
         "max abs logp diff"],
        budgets["log-probs"],
        lambda part: run_logprobs(part, sizes, logprob_impls, args.repeats),
    )  # fmt: skip
    run_part(
        parts, "Reward-model train step (Scaled BT, AdamW)",
        ["attention", "params", "tokens / step", "first call s", "step ms (best / median)",
         "tokens/s", "TFLOP/s", "MFU", "loss"],
        budgets["reward step"],
        lambda part: run_reward_step(part, sizes, step_impls, args.repeats, device_kind),
    )  # fmt: skip
    run_part(
        parts, "Decode (`sampling.make_generate_fn`)",
        ["batch", "prompt", "new tokens", "t(N) ms", "t(1) ms", "decode tokens/s",
         "ms / decode step"],
        budgets["decode"], lambda part: run_decode(part, sizes, args.repeats),
    )  # fmt: skip

    failed = [p.title for p in parts if p.failed]
    elapsed = time.perf_counter() - started
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    model = ", ".join(f"{k} {v}" for k, v in sizes.model.items())
    section = (
        f"\n## Device check{' (smoke)' if args.smoke else ''}, {stamp}\n\n"
        + describe_machine()
        + f"- Run: `benchmarks/device_check.sh{' --smoke' if args.smoke else ''}`, "
        f"{elapsed:.0f} s; best of {args.repeats} after a warm-up; backbone {model}\n"
        + f"- Result: {'FAILED: ' + ', '.join(failed) if failed else 'every part ran'}\n\n"
        + "\n".join(p.markdown() for p in parts)
    )
    print(section)
    if args.append is not None:
        append_section(args.append, section)
    return 1 if failed else 0


if __name__ == "__main__":
    cli_main(main)()
