"""Bad input, end to end: each case is a command a user could type (the training entry point,
the tools, a benchmark) with one thing wrong in its flags, config, data, checkpoint or files.
Each must exit with status 2 and print exactly one line, `error: ...`, naming what is wrong,
and no traceback."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from tests.conftest import REPO

RUN = REPO / "experiments" / "run.py"
CONFIGS = REPO / "experiments" / "configs"
SMOKE = "--config.progress=False"


def _gz_lines(path: Path) -> list[bytes]:
    with gzip.open(path, "rb") as f:
        return f.read().splitlines(keepends=True)


def _write_gz(path: Path, lines: list[bytes]) -> None:
    with gzip.open(path, "wb") as f:
        f.writelines(lines)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    """Data directories with one defect each, and random models of the wrong kinds."""
    from nemotron_jax.data.splits import data_dir
    from nemotron_jax.train.objectives.reinforce import write_random_models

    root = tmp_path_factory.mktemp("bad_input")
    data = ml_collections.ConfigDict(
        {"source": "synthetic", "synthetic_prompts": 200, "synthetic_seed": 0}
    )
    clean = data_dir(data)
    out = {"clean": clean}

    def variant(name, relpath, edit):
        target = root / name
        shutil.copytree(clean, target)
        lines = _gz_lines(target / relpath)
        _write_gz(target / relpath, edit(lines))
        out[name] = target

    pref = "preference/preference.jsonl.gz"
    variant("malformed_json", pref, lambda ls: ls[:5] + [b'{"prompt": "x",\n'] + ls[5:])
    variant("not_utf8", pref, lambda ls: ls[:6] + [b'{"prompt": "\xff"}\n'] + ls[6:])

    def strength(ls):
        rec = json.loads(ls[3])
        rec["preference_strength"] = 7
        return ls[:3] + [json.dumps(rec).encode() + b"\n"] + ls[4:]

    def no_response(ls):
        rec = json.loads(ls[2])
        del rec["response"]
        return ls[:2] + [json.dumps(rec).encode() + b"\n"] + ls[3:]

    variant("out_of_range", pref, strength)
    variant("missing_field", "train.jsonl.gz", no_response)
    variant("empty_validation", "validation.jsonl.gz", lambda ls: [])

    config = ml_collections.ConfigDict(
        {
            "model": {
                "preset": "tiny",
                "dtype": "float32",
                "param_dtype": "float32",
                "remat": "none",
                "num_attributes": 9,
                "attention_impl": "auto",
                "overrides": {},
            },
            "lora": {"rank": 0, "alpha": 16.0, "targets": ("q_proj",), "dropout": 0.0},
            "data": {**data, "tokenizer": "", "template": "nemo", "max_len": 64},
            "seed": 0,
            "init_from": "random",
            "rm_from": "random",
        }
    )
    models = write_random_models(config, root / "models")
    out["policy"], out["reward_model"] = Path(models["init_from"]), Path(models["rm_from"])
    return out


def _run(*args, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=600,
    )  # fmt: skip


def _cfg(name: str) -> str:
    return str(CONFIGS / name)


# (id, argv as format strings over the fixtures and {wd} (a fresh workdir), expected text)
CASES = [
    # The command line and the config file.
    ("no_config", [RUN, "--workdir", "{wd}"], "--config must have a value"),
    ("no_workdir", [RUN, "--config", _cfg("rm_bt.py:smoke")], "--workdir must have a value"),
    ("config_file_missing", [RUN, "--config", _cfg("nope.py"), "--workdir", "{wd}"], "nope.py"),
    ("unknown_flag", [RUN, "--config", _cfg("rm_bt.py:smoke"), "--workdir", "{wd}", "--bogus=1"],
     "unknown flag --bogus"),
    ("unknown_config_arg", [RUN, "--config", _cfg("rm_bt.py:smoke,lss=1"), "--workdir", "{wd}"],
     "did you mean loss?"),
    ("bad_loss", [RUN, "--config", _cfg("rm_bt.py:loss=hinge"), "--workdir", "{wd}"],
     "loss='hinge'; choose from ['margin', 'regular', 'scaled']"),
    ("bad_model", [RUN, "--config", _cfg("sft.py:model=llama9"), "--workdir", "{wd}"],
     "unknown model 'llama9'"),
    ("arg_not_int", [RUN, "--config", _cfg("reinforce.py:smoke,k=two"), "--workdir", "{wd}"],
     "k='two' is not int"),
    ("misspelt_override", [RUN, "--config", _cfg("rm_bt.py:smoke"), "--workdir", "{wd}",
                           "--config.optim.lrr=1"], "did you mean --config.optim.lr?"),
    ("override_not_float", [RUN, "--config", _cfg("rm_bt.py:smoke"), "--workdir", "{wd}",
                            "--config.optim.lr=fast"], "--config.optim.lr=fast"),
    # Settings checked at start, before anything is compiled.
    ("checkpoint_every_0", [RUN, "--config", _cfg("rm_bt.py:smoke"), "--workdir", "{wd}",
                            "--config.checkpoint_every=0"], "config.checkpoint_every is 0"),
    ("log_every_negative", [RUN, "--config", _cfg("sft.py:smoke"), "--workdir", "{wd}",
                            "--config.log_every=-5"], "config.log_every is -5"),
    ("on_bad_row_ignore", [RUN, "--config", _cfg("rm_bt.py:smoke"), "--workdir", "{wd}",
                           "--config.data.on_bad_row=ignore"], "choose from ['raise', 'skip']"),
    ("unknown_objective", [RUN, "--config", _cfg("rm_bt.py:smoke"), "--workdir", "{wd}",
                           "--config.objective=kto"], "config.objective is 'kto'"),
    ("negative_lr", [RUN, "--config", _cfg("rm_regression.py:smoke"), "--workdir", "{wd}",
                     "--config.optim.lr=-0.1"], "config.optim.lr is -0.1"),
    ("b2_one", [RUN, "--config", _cfg("rm_bt.py:smoke"), "--workdir", "{wd}",
                "--config.optim.b2=1.0"], "config.optim.b2 is 1.0; it must be < 1"),
    ("mesh_too_big", [RUN, "--config", _cfg("rm_bt.py:smoke"), "--workdir", "{wd}",
                      "--config.mesh=(4,4,4)"], "needs 64 devices"),
    ("batch_indivisible", [RUN, "--config", _cfg("rm_bt.py:smoke"), "--workdir", "{wd}",
                           "--config.batch_size=7"], "batch_size 7 is not divisible"),
    ("data_dir_missing", [RUN, "--config", _cfg("rm_bt.py:smoke,data={tmp}/nope"),
                          "--workdir", "{wd}"], "config.data.dir {tmp}/nope"),
    ("init_from_missing", [RUN, "--config", _cfg("rm_bt.py:smoke,init_from={tmp}/nope"),
                           "--workdir", "{wd}"], "config.init_from {tmp}/nope"),
    ("rl_truncated_bad", [RUN, "--config", _cfg("reinforce.py:smoke"), "--workdir", "{wd}",
                          "--config.rl.truncated=drop"], "config.rl.truncated is 'drop'"),
    ("stage_override_unparsable", [RUN, "--config", _cfg("rm_recipe.py:smoke"), "--workdir",
                                   "{wd}", "--config.stages.2_scaled_bt.optim.lr=1"],
     "a stage is named by subscript"),
    ("rl_k_one", [RUN, "--config", _cfg("reinforce.py:smoke,k=1"), "--workdir", "{wd}"],
     "config.rl.num_rollouts_per_prompt is 1"),
    ("later_stage_checked_first", [RUN, "--config", _cfg("rm_recipe.py:smoke"), "--workdir",
                                   "{wd}", "--config.stages['2_scaled_bt'].optim.warmup_steps=-1"],
     "config.stages.2_scaled_bt.optim.warmup_steps is -1"),
    # Checkpoints of the wrong kind.
    ("reward_model_as_policy", [RUN, "--config",
                                _cfg("reinforce.py:smoke,policy={reward_model},rm={reward_model}"),
                                "--workdir", "{wd}"], "config.init_from (the policy)"),
    ("policy_as_reward_model", [RUN, "--config",
                                _cfg("reinforce.py:smoke,policy={policy},rm={policy}"),
                                "--workdir", "{wd}"], "not a reward model checkpoint"),
    # Data files with one bad row, read with the default on_bad_row=raise.
    ("malformed_json_row", [RUN, "--config", _cfg("rm_bt.py:smoke,data={malformed_json}"),
                            "--workdir", "{wd}"], "preference.jsonl.gz, line 6: malformed JSON"),
    ("non_utf8_row", [RUN, "--config", _cfg("rm_bt.py:smoke,data={not_utf8}"),
                      "--workdir", "{wd}"], "line 7: byte 0xff at column 13 is not UTF-8"),
    ("strength_out_of_range", [RUN, "--config", _cfg("rm_bt.py:smoke,data={out_of_range}"),
                               "--workdir", "{wd}"], "field 'preference_strength'"),
    ("missing_response", [RUN, "--config", _cfg("rm_regression.py:smoke,data={missing_field}"),
                          "--workdir", "{wd}"], "line 3: field 'response'"),
    ("empty_validation", [RUN, "--config", _cfg("rm_regression.py:smoke,data={empty_validation}"),
                          "--workdir", "{wd}"], "config.validation=False"),
    # The tools and a benchmark.
    ("tool_bad_flag", [REPO / "tools" / "convert_to_hf.py", "--ckpt", "x", "--out", "y",
                       "--bogus"], "unrecognized arguments: --bogus"),
    ("tool_missing_flag", [REPO / "tools" / "expo.py"], "the following arguments are required"),
    ("eval_needs_data", [REPO / "tools" / "eval_rewardbench.py", "--ckpt", "{reward_model}"],
     "pass --ckpt and --data"),
    ("eval_policy_checkpoint", [REPO / "tools" / "eval_rewardbench.py", "--ckpt", "{policy}",
                                "--data", "{clean}/rewardbench/filtered.jsonl"],
     "not a reward model checkpoint"),
    ("plan_bad_override", [REPO / "tools" / "plan.py", "--config", _cfg("rm_bt.py:smoke"),
                           "--config.optim.lrr=1"], "lrr"),
    ("benchmark_bad_flag", [REPO / "benchmarks" / "checkpoint_memory.py", "--bogus"],
     "unrecognized arguments: --bogus"),
]  # fmt: skip


@pytest.mark.parametrize("case,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(tmp_path, fixtures, case, argv, expected):
    values = {k: str(v) for k, v in fixtures.items()} | {"wd": tmp_path / "wd", "tmp": tmp_path}
    r = _run(*(str(a).format(**values) for a in argv))
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1, r.stderr[-3000:]
    assert expected.format(**values) in errors[0], errors[0]
    # The error is the last line; a few lines before it are progress (data summary, warnings).
    assert lines[-1] == errors[0]


def test_the_table_covers_thirty_cases():
    assert len(CASES) >= 30
