import shutil
import subprocess
import sys
import tarfile
import time

import anndata
import numpy as np
import pandas as pd
import pytest
import zstandard
from conftest import get_uv

import lib

GENES = [f"G{i:03d}" for i in range(40)]
PERT_COUNTS = pd.DataFrame(
    {"target_gene": ["A", "B", "C"], "n_cells": [5, 7, 3], "median_umi_per_cell": [1e4, 1e4, 1e4]}
)


def _random_predictor(seed=0):
    """log1p CP10K of random counts (what a valid submission holds), made independently of lib."""

    def predict_chunk(start, stop):
        rng = np.random.default_rng([seed, start])
        counts = rng.negative_binomial(2, 0.05, (stop - start, len(GENES))) * (
            rng.random((stop - start, len(GENES))) < 0.4
        )
        counts[:, 0] += 1  # no empty cell
        return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)

    return predict_chunk


def _write(path, obs=None, predict_chunk=None, **kw):
    obs = lib.make_submission_obs(PERT_COUNTS, n_control=6) if obs is None else obs
    return lib.write_submission(
        path, gene_names=GENES, obs=obs, predict_chunk=predict_chunk or _random_predictor(), chunk_cells=4, **kw
    )


def test_submission_has_requested_cells_controls_and_gene_order(tmp_path):
    adata = anndata.read_h5ad(_write(tmp_path / "sub.h5ad"))
    assert list(adata.var_names) == GENES
    counts = adata.obs["target_gene"].value_counts()
    assert counts.to_dict() == {"A": 5, "B": 7, "C": 3, "non-targeting": 6}
    assert adata.X.dtype == np.float32 and adata.X.format == "csr"
    # chunked writing equals the one-shot prediction
    expected = np.concatenate([_random_predictor()(a, min(a + 4, 21)) for a in range(0, 21, 4)]).astype(np.float32)
    assert np.array_equal(adata.X.toarray(), expected)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda a, b: np.full((b - a, len(GENES)), np.nan), "NaN"),
        (lambda a, b: -np.ones((b - a, len(GENES))), "negative"),
        (lambda a, b: np.full((b - a, len(GENES)), 30.0), "raw counts"),
        (lambda a, b: np.zeros((b - a, len(GENES) - 1)), "shape"),
    ],
)
def test_bad_predictions_raise_one_clear_error_and_keep_the_old_file(tmp_path, bad, message):
    path = _write(tmp_path / "sub.h5ad")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message):
        _write(path, predict_chunk=bad)
    assert path.read_bytes() == before, "a failed write must not touch the previous submission"


def test_missing_controls_and_too_many_cells_raise(tmp_path):
    with pytest.raises(ValueError, match="control"):
        _write(tmp_path / "a.h5ad", obs=lib.make_submission_obs(PERT_COUNTS, n_control=0))
    with pytest.raises(ValueError, match="exceed"):
        _write(tmp_path / "b.h5ad", max_cells=10)


def _unpack(vcc_path, out_dir):
    with tarfile.open(vcc_path) as tar:
        names = sorted(tar.getnames())
        tar.extractall(out_dir, filter="data")
    with open(out_dir / "pred.h5ad.zst", "rb") as src, open(out_dir / "pred.h5ad", "wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(src, dst)
    return names, anndata.read_h5ad(out_dir / "pred.h5ad"), (out_dir / "watermark.txt").read_text()


@pytest.mark.slow
def test_pack_vcc_matches_cell_eval_prep(tmp_path):
    """Our .vcc holds what `cell-eval prep` (run in a throwaway env) makes of the same file.

    prep itself shells out to the `zstd` program (.ci/run installs it)."""
    h5ad = _write(tmp_path / "sub.h5ad")
    ours = lib.pack_vcc(h5ad, tmp_path / "ours.vcc")
    genes_csv = tmp_path / "gene_names.csv"
    genes_csv.write_text("\n".join(GENES) + "\n")
    uv = get_uv()
    subprocess.run(
        [
            uv,
            "run",
            "--no-project",
            "--python",
            "3.11",
            "--with",
            "cell-eval==0.8.2",
            "cell-eval",
            "prep",
            "-i",
            str(h5ad),
            "-g",
            str(genes_csv),
            "-o",
            str(tmp_path / "prep.vcc"),
            "--expected-gene-dim",
            "-1",
        ],
        check=True,
        capture_output=True,
    )
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    names_ours, adata_ours, mark_ours = _unpack(ours, tmp_path / "a")
    names_prep, adata_prep, mark_prep = _unpack(tmp_path / "prep.vcc", tmp_path / "b")
    assert names_ours == names_prep == ["pred.h5ad.zst", "watermark.txt"]
    assert mark_ours == mark_prep
    assert list(adata_ours.var_names) == list(adata_prep.var_names)
    assert list(adata_ours.obs["target_gene"]) == list(adata_prep.obs["target_gene"])
    assert list(adata_ours.obs_names) == list(adata_prep.obs_names)
    assert adata_ours.X.dtype == adata_prep.X.dtype and adata_ours.X.format == adata_prep.X.format
    assert np.array_equal(adata_ours.X.toarray(), adata_prep.X.toarray())


def _counts(n_cells=21, seed=1):
    """Cells like a Perturb-seq screen's: Zipf-shaped gene proportions, log-normal library sizes."""
    rng = np.random.default_rng(seed)
    p_g = 1 / np.arange(1, len(GENES) + 1)
    depth_c = 3_000 * rng.lognormal(0, 0.3, (n_cells, 1))
    return rng.poisson(depth_c * p_g / p_g.sum()).astype(np.float64) + np.eye(1, len(GENES))


def _cp10k(counts):
    return counts / counts.sum(1, keepdims=True) * 1e4


# mistake -> (the transform, what the error must say: the mistake, then the fix)
WRONG_TRANSFORMS = {
    "log1p twice": (lambda k: np.log1p(np.log1p(_cp10k(k))), "log1p applied twice.*apply np.log1p once"),
    "log2": (lambda k: np.log2(1 + _cp10k(k)), "log2 instead of the natural log.*use np.log1p"),
    "log10": (lambda k: np.log10(1 + _cp10k(k)), "log10 instead of the natural log.*use np.log1p"),
    "log1p of raw counts": (lambda k: np.log1p(k), "raw counts, not normalised.*normalize_total to 10000 per cell"),
    "log1p of CP1M": (lambda k: np.log1p(_cp10k(k) * 100), "100 x 10000.*not log1p of counts per 10k"),
}


@pytest.mark.parametrize("mistake", WRONG_TRANSFORMS)
def test_wrong_log_transforms_are_refused_by_writer_packer_and_scorer_naming_the_fix(tmp_path, mistake):
    transform, message = WRONG_TRANSFORMS[mistake]
    x_cg = transform(_counts())
    path = _write(tmp_path / "sub.h5ad")
    before = path.read_bytes()
    with pytest.raises(lib.UserError, match=message):  # a user error: 07 prints it as one line
        _write(path, predict_chunk=lambda a, b: x_cg[a:b])
    assert path.read_bytes() == before
    # A file written around the writer is refused by the packer and the scoring path's check too.
    obs = lib.make_submission_obs(PERT_COUNTS, n_control=6)
    bad = tmp_path / "bad.h5ad"
    anndata.AnnData(X=x_cg.astype(np.float32), obs=obs, var=pd.DataFrame(index=GENES)).write_h5ad(bad)
    with pytest.raises(lib.UserError, match=message):
        lib.pack_vcc(bad, tmp_path / "bad.vcc")
    assert not (tmp_path / "bad.vcc").exists()
    with pytest.raises(ValueError, match=message):
        lib.validate_submission(bad)


def test_right_log1p_cp10k_and_shifted_or_mean_predictions_pass():
    """Honest predictions are not exact log1p CP10K cells: means in log space, shifts, clipping."""
    y_cg = np.log1p(_cp10k(_counts(200)))
    mean_cg = np.repeat(y_cg.mean(0, keepdims=True), 200, 0)  # the cell-mean baseline's cells
    shifted_cg = np.clip(y_cg + np.random.default_rng(0).normal(0, 0.3, len(GENES)), 0, 14)
    for x_cg in (y_cg, mean_cg, shifted_cg):
        lib.check_log1p(x_cg.astype(np.float32), source="prediction", check_transform=True)


@pytest.mark.slow
def test_kill_9_during_07_leaves_a_zero_filled_pool_that_the_next_07_removes(tiny_store, tmp_path):
    data_root = tmp_path / "data"
    shutil.copytree(tiny_store, data_root)
    out_dir = lib.get_submission_dir(data_root, "synthetic")
    flags = ["--data-root", str(data_root), "--predictor", "cell_mean", "--chunk-cells", "1", "--no-score"]
    proc = subprocess.Popen([sys.executable, str(lib.REPO_DIR / "nb" / "07_submit.py"), *flags], cwd=lib.REPO_DIR)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out_dir.glob(".control_pool_*_x.npy.tmp-*")):
        time.sleep(0.01)
    proc.kill()  # SIGKILL mid-scan: the pool's temporary file is still all zeros in most rows
    proc.wait()
    [leftover] = list(out_dir.glob(".control_pool_*_x.npy.tmp-*"))
    assert leftover.name.endswith(f"-{proc.pid}")
    out = lib.run_submit(lib.SubmitConfig(data_root=str(data_root), predictor="cell_mean", score=False))
    assert not [p.name for p in out_dir.iterdir() if ".tmp-" in p.name]
    pool = np.load(next(out_dir.glob("control_pool_*_x.npy")))
    assert (pool.sum(1) > 0).all() and out["vcc"].exists()  # every pool cell is a real (non-empty) cell
