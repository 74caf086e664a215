"""Benchmark: our scorer (lib.py's metrics) against the real cell-eval on the same files, same threads.

Not part of the test suite. Writes a synthetic VCC-shaped pair (NB counts -> log1p, float32),
scores it with our code in each mode and with cell-eval in its throwaway uv environment,
and prints times, ratios measured in this run, and the largest metric differences.

    # scaled (the reference takes ~1 ms per perturbation-gene pair): 100 perts x 1000 cells
    .venv/bin/python benchmarks/bench_metrics.py --genes 300
    # ours only at full VCC size (18,080 genes; needs ~16 GB for the two matrices)
    .venv/bin/python benchmarks/bench_metrics.py --genes 18080 --skip-reference

Both implementations are linear in the number of genes, so the ratio at a reduced gene
count carries over; the printed per-gene seconds make the extrapolation explicit.

    # the whole job, process start to written CSVs, on VCC-shaped sparse files (10,500 cells =
    # 100 perturbations x 100 + 500 controls, 18,080 genes, log1p, ~80% zeros): our scoring
    # command against `cell-eval run --profile vcc` (0.8.2 = mode current), wall time and peak RSS
    .venv/bin/python benchmarks/bench_metrics.py --vcc-shape --threads 2
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import lib

REPO_DIR = pathlib.Path(__file__).resolve().parents[1]

REFERENCE_ENVS = {
    "vcc2025": ["--with", "cell-eval==0.6.6", "--with", "pdex==0.1.26", "--with", "scipy<1.16"],
    "current": ["--with", "cell-eval==0.8.2", "--with", "pdex==0.3.0"],
}


def make_pair(n_genes: int, n_perts: int, n_cells: int, n_control: int, seed: int = 0, base_log_mean: float = -0.5):
    """Real and predicted AnnData: the prediction is a fresh draw with half-size effects."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    genes = np.array([f"G{i:05d}" for i in range(n_genes)])
    base_mu = rng.lognormal(base_log_mean, 1.5, n_genes).astype(np.float32)
    # Perturbations named after measured genes when there are enough (PDS excludes the target gene).
    perts = (
        genes[rng.choice(n_genes, n_perts, replace=False)]
        if n_genes >= n_perts
        else np.array([f"P{i:03d}" for i in range(n_perts)])
    )
    labels = np.concatenate([["non-targeting"] * n_control, np.repeat(perts, n_cells)])
    effect_pg = np.where(rng.random((n_perts, n_genes)) < 0.05, rng.normal(0, 1, (n_perts, n_genes)), 0).astype(
        np.float32
    )

    # row k of fold_kg: the multiplicative effect of group k (last row: control, no effect)
    order = np.argsort(perts)
    perts, effect_pg = perts[order], effect_pg[order]
    code_c = np.where(labels == "non-targeting", n_perts, np.searchsorted(perts, labels))

    def draw(scale: float):
        fold_kg = np.vstack([np.exp(scale * effect_pg), np.ones((1, n_genes), np.float32)])
        library = rng.lognormal(0, 0.3, labels.size).astype(np.float32)
        x = np.empty((labels.size, n_genes), dtype=np.float32)
        for start in range(0, labels.size, 2000):  # bounded scratch memory
            rows = slice(start, min(start + 2000, labels.size))
            mu = base_mu * fold_kg[code_c[rows]] * library[rows, None]
            counts = rng.poisson(rng.gamma(2.0, mu / 2.0)).astype(np.float32)  # negative binomial
            x[rows] = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
        obs = pd.DataFrame({"target_gene": labels}, index=[f"c{i}" for i in range(labels.size)])
        return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))

    return draw(1.0), draw(0.5)


def run_reference(mode: str, real_path, pred_path, threads: int, work: pathlib.Path) -> dict:
    out = work / f"ref_{mode}.json"
    cmd = [
        "uv",
        "run",
        "--no-project",
        "--python",
        "3.11",
        *REFERENCE_ENVS[mode],
        "python",
        str(REPO_DIR / "tests" / "cell_eval_reference.py"),
        "time",
        str(real_path),
        str(pred_path),
        str(out),
        str(threads),
    ]
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one command. The RSS comes from GNU time wrapped around
    it: rusage of a child forked from this process would count this process's own pages (the
    data it made), since exec records the forked memory's high-water mark."""
    start = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb %M", *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{run.stderr[-3000:]}")
    maxrss_kb = int(run.stderr.strip().splitlines()[-1].split()[-1])
    return seconds, maxrss_kb / 1e6


def cell_eval_executable(work: pathlib.Path) -> str:
    """`cell-eval` 0.8.2 in a venv of its own under `work` (uv's cache makes this seconds), so the
    timing below is cell-eval's process alone, not uv's environment resolution."""
    venv = work / "cell_eval_venv"
    subprocess.run(["uv", "venv", "--quiet", "--python", "3.11", str(venv)], check=True)
    packages = [arg for arg in REFERENCE_ENVS["current"] if arg != "--with"]
    subprocess.run(["uv", "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), *packages], check=True)
    return str(venv / "bin" / "cell-eval")


def bench_vcc_shape(args) -> None:
    """Whole processes on the same files: our scoring command vs `cell-eval run --profile vcc`."""
    import pandas as pd
    import scipy.sparse

    t0 = time.perf_counter()
    real, pred = make_pair(args.genes, args.perts, args.cells_per_pert, args.control, base_log_mean=args.base_log_mean)
    for adata in (real, pred):
        adata.X = scipy.sparse.csr_matrix(adata.X)
    zeros = 1 - real.X.nnz / (real.n_obs * real.n_vars)
    print(
        f"data: {args.perts} perts x {args.cells_per_pert} cells + {args.control} control = {real.n_obs} cells, "
        f"{args.genes} genes, CSR float32 log1p, {zeros:.1%} zeros ({time.perf_counter() - t0:.0f} s to make)"
    )
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_vcc_"))
    try:
        real.write_h5ad(work / "real.h5ad")
        pred.write_h5ad(work / "pred.h5ad")
        # The floor: the same command on 5 control cells and 5 cells of each of 2 perturbations
        # (same genes), i.e. starting the process, its imports and first numba call, and writing.
        for name, adata in (("real", real), ("pred", pred)):
            labels = adata.obs["target_gene"].to_numpy(dtype=str)
            perts = np.unique(labels[labels != "non-targeting"])[:2]
            keep = np.concatenate([np.flatnonzero(labels == label)[:5] for label in ["non-targeting", *perts]])
            adata[np.sort(keep)].copy().write_h5ad(work / f"{name}_tiny.h5ad")
        del real, pred
        env = {**os.environ, "NUMBA_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
        # Both sides as a user runs them: Python writes .pyc files on first import (uv installs
        # without them), so the warm-up runs below leave both environments compiled. With
        # PYTHONDONTWRITEBYTECODE set (some shells and CI set it) every timed run would compile
        # the source of every module it imports again, several seconds for each side.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        files = ["--pred", str(work / "pred.h5ad"), "--real", str(work / "real.h5ad")]
        ours_cmd = [sys.executable, str(REPO_DIR / "nb" / "06_eval.py"), *files, "--mode", "current"]
        ours_cmd += ["--threads", str(args.threads), "--out", str(work / "ours")]
        theirs_cmd = [cell_eval_executable(work), "run", "-ap", str(work / "pred.h5ad"), "-ar", str(work / "real.h5ad")]
        theirs_cmd += ["--pert-col", "target_gene", "--control-pert", "non-targeting", "--profile", "vcc"]
        theirs_cmd += ["--num-threads", str(args.threads), "-o", str(work / "theirs")]
        cold_s, _ = run_timed(ours_cmd, env)  # warm-up: .pyc files and numba's on-disk caches
        run_timed(theirs_cmd, env)
        print(
            f"ours, first run (compiles what is not cached yet; numba kernels once per lib.py version): {cold_s:.1f} s"
        )
        print(f"load before: {open('/proc/loadavg').read().split()[:3]} (2 cores shared: compare within one run)")
        ours_s, ours_gb = run_timed(ours_cmd, env)
        theirs_s, theirs_gb = run_timed(theirs_cmd, env)
        # twice more after cell-eval, so load drifts show; the ratio uses the median of the three
        ours_s2, ours_gb2 = run_timed(ours_cmd, env)
        ours_s3, ours_gb3 = run_timed(ours_cmd, env)
        tiny_cmd = [sys.executable, str(REPO_DIR / "nb" / "06_eval.py"), "--pred", str(work / "pred_tiny.h5ad")]
        tiny_cmd += ["--real", str(work / "real_tiny.h5ad"), "--mode", "current", "--threads", str(args.threads)]
        floor_s, _ = run_timed([*tiny_cmd, "--out", str(work / "ours_tiny")], env)
        # the floor's imports alone: what the command's file imports first (marimo), then lib
        imports_s, _ = run_timed([sys.executable, "-c", "import marimo, lib"], env)
        print(f"load after: {open('/proc/loadavg').read().split()[:3]}")
        ours_t = pd.read_csv(work / "ours" / "results.csv").set_index("perturbation")
        theirs_t = pd.read_csv(work / "theirs" / "results.csv").set_index("perturbation").loc[ours_t.index]
        diff = (ours_t - theirs_t).abs().max()
        print(
            f"ours (nb/06_eval.py --pred, mode current): {ours_s:.1f} s, {ours_s2:.1f} s, {ours_s3:.1f} s, "
            f"peak RSS {max(ours_gb, ours_gb2, ours_gb3):.2f} GB"
        )
        print(f"cell-eval 0.8.2 run --profile vcc:          {theirs_s:.1f} s, peak RSS {theirs_gb:.2f} GB")
        print(f"ours on 15 cells of the same genes (start-up, imports, first numba call): {floor_s:.1f} s")
        print(f"of which `python -c 'import marimo, lib'`: {imports_s:.1f} s")
        print(f"ratio (cell-eval / ours, median of ours): {theirs_s / np.median([ours_s, ours_s2, ours_s3]):.1f}x")
        print("max |diff| per perturbation: " + " ".join(f"{k} {v:.1e}" for k, v in diff.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, default=300)
    parser.add_argument("--perts", type=int, default=100)
    parser.add_argument("--cells-per-pert", type=int, default=1000)
    parser.add_argument("--control", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=list(lib.SCORE_MODES))
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--vcc-shape", action="store_true", help="whole-process command vs cell-eval run (see top)")
    parser.add_argument("--base-log-mean", type=float, default=None, help="log of the genes' mean level (sparsity)")
    args = parser.parse_args()
    if args.vcc_shape:
        defaults = {"genes": 18080, "perts": 100, "cells_per_pert": 100, "control": 500, "base_log_mean": -2.0}
        for name, value in defaults.items():  # the VCC shape unless a flag was given
            if f"--{name.replace('_', '-')}" not in sys.argv:
                setattr(args, name, value)
        return bench_vcc_shape(args)
    if args.base_log_mean is None:
        args.base_log_mean = -0.5

    t0 = time.perf_counter()
    real, pred = make_pair(args.genes, args.perts, args.cells_per_pert, args.control, base_log_mean=args.base_log_mean)
    n_cells = real.n_obs
    print(
        f"data: {args.perts} perts x {args.cells_per_pert} cells + {args.control} control = {n_cells} cells, "
        f"{args.genes} genes, float32, {real.X.size * 4 * 2 / 1e9:.1f} GB for both ({time.perf_counter() - t0:.0f} s to make)"
    )
    print(f"load: {open('/proc/loadavg').read().split()[:3]} (2 cores shared: compare within one run)")
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_metrics_"))
    try:
        if not args.skip_reference:
            real.write_h5ad(work / "real.h5ad")
            pred.write_h5ad(work / "pred.h5ad")
        for mode in args.modes:
            start = time.perf_counter()
            ours = lib.score(real, pred, mode=mode, threads=args.threads)
            ours_s = time.perf_counter() - start
            line = f"{mode:8s} ours {ours_s:8.1f} s ({ours_s / args.genes * 1e3:.2f} ms/gene)"
            if not args.skip_reference:
                ref = run_reference(mode, work / "real.h5ad", work / "pred.h5ad", args.threads, work)
                table = ours["per_perturbation"]
                diffs = {
                    name: max(abs(table.loc[p, name] - v) for p, v in ref["pred"][their].items())
                    for name, their in (("des", "overlap_at_N"), ("pds", "discrimination_score_l1"), ("mae", "mae"))
                }
                line += (
                    f" | cell-eval {ref['versions']['cell-eval']} {ref['seconds']:8.1f} s"
                    f" | ratio {ref['seconds'] / ours_s:6.1f}x | max |diff| "
                    + " ".join(f"{k} {v:.1e}" for k, v in diffs.items())
                )
            line += f" | des {ours['des']:.4f} pds {ours['pds']:.4f} mae {ours['mae']:.5f}"
            print(line, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
