"""Score with the real cell-eval, in a throwaway environment, for cross-checking lib.py's metrics.

Never imported by the project: cell-eval must not enter the project venv. Run it with uv:

    # VCC 2025 scorer (mode "vcc2025")
    uv run --no-project --python 3.11 --with 'cell-eval==0.6.6' --with 'pdex==0.1.26' \\
        --with 'scipy<1.16' python tests/cell_eval_reference.py REAL.h5ad PRED.h5ad OUT.json
    # current scorer (mode "current")
    uv run --no-project --python 3.11 --with 'cell-eval==0.8.2' --with 'pdex==0.3.0' \\
        python tests/cell_eval_reference.py REAL.h5ad PRED.h5ad OUT.json

Other forms:
    cell_eval_reference.py random REAL.h5ad PRED.h5ad [SEED]   # cell_eval.data.build_random_anndata pair
    cell_eval_reference.py jobs JOBS.json                      # several of the above in one process
    cell_eval_reference.py time REAL.h5ad PRED.h5ad OUT.json THREADS  # benchmark: pred only, timed

OUT.json holds the versions used, per-perturbation metrics (and cell-eval's results/agg
columns and agg table) of the prediction and of the cell-mean baseline (built by cell-eval's own `build_base_mean_adata`, written next to
OUT.json as OUT.baseline.h5ad), cell-eval's normalised score, and both DE tables.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import pathlib
import sys
import tempfile

PERT_COL = "target_gene"
CONTROL = "non-targeting"


def make_random(real_path: str, pred_path: str, seed: int = 0) -> None:
    """cell-eval's own random AnnData (as its tests use), relabelled to our column names."""
    from cell_eval.data import build_random_anndata

    for path, random_state in ((real_path, seed), (pred_path, seed + 1)):
        adata = build_random_anndata(
            n_cells=600, n_genes=60, n_perts=8, pert_col=PERT_COL, control_var=CONTROL, random_state=random_state
        )
        adata.X = adata.X.astype("float32")  # h5ad files from submissions are float32
        adata.write_h5ad(path)


def _metrics(results) -> dict:
    frame = results.to_pandas().set_index("perturbation")
    return {name: {str(k): float(v) for k, v in frame[name].items()} for name in frame.columns}


def _de_table(path: pathlib.Path) -> dict:
    import numpy as np
    import polars as pl

    frame = pl.read_csv(path, schema_overrides={"target": pl.Utf8, "feature": pl.Utf8})
    if "log2_fold_change" in frame.columns:
        lfc = frame["log2_fold_change"].to_numpy()
    else:  # pdex 0.1.2x reports fold_change; cell-eval 0.6 takes log2 itself
        lfc = np.log2(frame["fold_change"].to_numpy())
    return {
        "target": frame["target"].to_list(),
        "feature": frame["feature"].to_list(),
        "p_value": frame["p_value"].to_list(),
        "fdr": frame["fdr"].to_list(),
        "log2_fold_change": [float(v) for v in lfc],
    }


def score(real_path: str, pred_path: str, out_path: str) -> None:
    import anndata as ad
    import numpy as np
    from cell_eval import MetricsEvaluator, build_base_mean_adata, score_agg_metrics

    out_path = pathlib.Path(out_path)
    baseline_path = out_path.with_suffix(".baseline.h5ad")
    real = ad.read_h5ad(real_path)
    baseline = build_base_mean_adata(adata=real.copy(), pert_col=PERT_COL, control_pert=CONTROL)
    baseline.write_h5ad(baseline_path)
    report = {
        "versions": {
            name: importlib.metadata.version(name) for name in ("cell-eval", "pdex", "scipy", "numpy", "polars")
        }
    }
    aggs = {}
    for name, pred in (("pred", ad.read_h5ad(pred_path)), ("baseline", baseline)):
        with tempfile.TemporaryDirectory() as outdir:
            evaluator = MetricsEvaluator(
                adata_pred=pred,
                adata_real=ad.read_h5ad(real_path),
                control_pert=CONTROL,
                pert_col=PERT_COL,
                num_threads=1,
                outdir=outdir,
            )
            results, aggs[name] = evaluator.compute(profile="vcc", break_on_error=True, write_csv=False)
            report[name] = _metrics(results)
            report[f"{name}_columns"] = list(results.columns)
            report[f"{name}_agg"] = {column: aggs[name][column].to_list() for column in aggs[name].columns}
            report[f"{name}_de_real"] = _de_table(pathlib.Path(outdir) / "real_de.csv")
            report[f"{name}_de_pred"] = _de_table(pathlib.Path(outdir) / "pred_de.csv")
    normalised = score_agg_metrics(results_user=aggs["pred"], results_base=aggs["baseline"])
    report["normalised"] = {m: float(v) for m, v in zip(normalised["metric"], normalised["from_baseline"])}
    report["baseline_h5ad"] = str(baseline_path)
    report["baseline_x_dtype"] = str(np.asarray(baseline.X).dtype)
    out_path.write_text(json.dumps(report))


def time_score(real_path: str, pred_path: str, out_path: str, threads: str) -> None:
    """Wall time of one `MetricsEvaluator` run (both DE sides + metrics), files already read."""
    import time

    import anndata as ad
    from cell_eval import MetricsEvaluator

    real, pred = ad.read_h5ad(real_path), ad.read_h5ad(pred_path)
    with tempfile.TemporaryDirectory() as outdir:
        start = time.perf_counter()
        evaluator = MetricsEvaluator(
            adata_pred=pred,
            adata_real=real,
            control_pert=CONTROL,
            pert_col=PERT_COL,
            num_threads=int(threads),
            outdir=outdir,
        )
        results, _ = evaluator.compute(profile="vcc", break_on_error=True, write_csv=False)
        seconds = time.perf_counter() - start
    versions = {name: importlib.metadata.version(name) for name in ("cell-eval", "pdex", "scipy")}
    pathlib.Path(out_path).write_text(json.dumps({"seconds": seconds, "versions": versions, "pred": _metrics(results)}))


def main(argv: list[str]) -> None:
    logging.disable(logging.WARNING)  # cell-eval and pdex log every step at INFO
    if argv and argv[0] == "random":
        make_random(argv[1], argv[2], *(int(a) for a in argv[3:4]))
    elif argv and argv[0] == "time":
        time_score(*argv[1:5])
    elif argv and argv[0] == "jobs":
        for job in json.loads(pathlib.Path(argv[1]).read_text()):
            main(job)
    elif len(argv) >= 3 and len(argv) % 3 == 0:
        for i in range(0, len(argv), 3):
            score(*argv[i : i + 3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
