"""Notebooks run headless at smoke size, and the committed .ipynb matches its .py source."""

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name, workdir, monkeypatch) -> str:
    """Runs a notebook headless at smoke size; returns its text outputs."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    nb = jupytext.read(NOTEBOOKS / name)
    monkeypatch.setenv("NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One fake device is enough here; the kernel must not inherit the suite's 8-device flag.
    monkeypatch.setenv("XLA_FLAGS", "")
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )


@pytest.mark.slow
def test_reward_objectives_notebook_runs(tmp_path, monkeypatch):
    outputs = _execute("01_reward_objectives.py", tmp_path / "ablation", monkeypatch)
    assert "ExPO: best alpha on validation" in outputs
    assert "1. " in outputs  # the ranking cell printed
    assert "| LoRA r=8 | Scaled BT + ExPO |" in outputs  # the full-FT vs LoRA row group
    assert (tmp_path / "ablation" / "results.md").exists()


def test_ipynb_is_paired_and_stripped():
    jupytext = pytest.importorskip("jupytext")
    for py in NOTEBOOKS.glob("*.py"):
        ipynb = py.with_suffix(".ipynb")
        assert ipynb.exists(), f"{ipynb.name} missing: run jupytext --sync {py.name}"
        paired, source = jupytext.read(ipynb), jupytext.read(py)
        assert [c.source for c in paired.cells] == [c.source for c in source.cells], ipynb.name
        assert all(not c.get("outputs") for c in paired.cells if c.cell_type == "code")


@pytest.mark.slow
def test_reinforce_notebook_runs(tmp_path, monkeypatch):
    outputs = _execute("02_reinforce.py", tmp_path / "sweep", monkeypatch)
    assert "| beta=0.01 k3 mean |" in outputs  # the held-out table
    for i in range(3):
        assert (tmp_path / "sweep" / f"run{i}" / "params").is_dir()


@pytest.mark.slow
def test_alignment_notebook_runs(tmp_path, monkeypatch):
    outputs = _execute("03_alignment.py", tmp_path / "alignment", monkeypatch)
    assert "highest win rate against the SFT policy" in outputs
    table = (tmp_path / "alignment" / "results.md").read_text()
    for name in ("Regular DPO", "Margin DPO", "Scaled DPO", "PPO", "GRPO", "REINFORCE", "SFT"):
        assert f"| {name}" in table, table
