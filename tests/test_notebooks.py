"""The notebooks run headless as scripts and, exported to ipynb, under nbmake.

The pipeline runs once in order on the tiny world (each stage reads what the one before
wrote); then each notebook runs again under nbmake against the same data root.
"""

import os
import shlex
import subprocess
import sys

import pytest

import lib

NB_DIR = lib.REPO_DIR / "nb"
# Flags that keep each stage small enough for CI; everything else is the default.
NB_FLAGS = {
    "01_download": ["--size", "tiny"],
    "02_eda": [],
    "03_hvg": ["--n-hvg", "200", "--n-hvg-per-dataset", "200", "--offline"],
    "04_normalise": ["--chunk-cells", "500"],
    "05_train": [
        "--steps",
        "20",
        "--eval-every",
        "10",
        "--hidden",
        "32",
        "--n-heads",
        "2",
        "--set-size",
        "8",
        "--sets-per-batch",
        "4",
        "--val-control-cells",
        "32",
        "--wandb-mode",
        "offline",
    ],
    "06_eval": ["--n-control", "100", "--max-cells-per-pert", "40"],
    "07_submit": ["--chunk-cells", "256"],
}


def _run(args, env=None, timeout=600):
    result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    assert result.returncode == 0, (
        f"{shlex.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


@pytest.fixture(scope="session")
def pipeline_root(tmp_path_factory):
    data_root = tmp_path_factory.mktemp("pipeline")
    for name, flags in NB_FLAGS.items():
        _run([sys.executable, NB_DIR / f"{name}.py", "--data-root", str(data_root), *flags])
    return data_root


@pytest.mark.slow  # a fresh interpreter importing jax per notebook; 02 stays in the fast tier below
@pytest.mark.parametrize("name", list(NB_FLAGS))
def test_notebook_help_lists_flags_with_defaults(name):
    out = _run([sys.executable, NB_DIR / f"{name}.py", "--help"]).stdout
    assert "--data-root" in out and "default" in out


def test_notebook_rejects_unknown_flag():
    result = subprocess.run([sys.executable, NB_DIR / "02_eda.py", "--no-such-flag"], capture_output=True, text=True)
    assert result.returncode == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NB_FLAGS))
def test_notebook_runs_under_nbmake(name, pipeline_root, tmp_path):
    ipynb = tmp_path / f"{name}.ipynb"
    _run([sys.executable, "-m", "marimo", "export", "ipynb", NB_DIR / f"{name}.py", "-o", ipynb])
    flags = shlex.join(["--data-root", str(pipeline_root), *NB_FLAGS[name]])
    _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake", str(ipynb)],
        env={"VCELL_NB_ARGS": flags},
    )


@pytest.mark.parametrize("split", ["validation", "test"])
def test_submit_default_is_the_trained_model_on_both_splits(split, pipeline_root):
    """07's default predictor is the model: from 05's checkpoint it writes a validated .vcc for
    either split (features for perturbations never seen in the target, non-HVG genes filled) and
    prints the normalised score against the synthetic truth at the end."""
    out = _run([sys.executable, NB_DIR / "07_submit.py", "--data-root", str(pipeline_root), "--split", split]).stdout
    assert (pipeline_root / "submissions" / "synthetic" / f"model_{split}.prep.vcc").exists(), out
    assert "normalised:" in out.strip().splitlines()[-1], out[-2000:]
