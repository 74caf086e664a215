"""EDA (lib.py, nb/02_eda.py) on the tiny synthetic world."""

import dataclasses
import pathlib
import subprocess
import sys

import anndata
import numpy as np
import pytest

import lib

REPO_DIR = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def edas(tiny_world):
    data_root, _ = tiny_world
    # An odd chunk size, so chunk boundaries fall mid-perturbation and the last chunk is short.
    cfg = lib.EdaConfig(data_root=str(data_root), chunk_cells=97)
    return [lib.compute_dataset_eda(spec, data_root, cfg) for spec in lib.get_datasets("synthetic")]


def _read_dense(data_root, spec):
    adata = anndata.read_h5ad(lib.get_dataset_path(spec, data_root))
    return adata, np.asarray(adata.X.toarray(), dtype=np.float64)


def test_summary_counts_match_the_h5ad_files(tiny_world, edas):
    data_root, _ = tiny_world
    summary = lib.get_summary_table(edas).set_index("dataset")
    for spec in lib.get_datasets("synthetic"):
        adata, counts_cg = _read_dense(data_root, spec)
        labels = adata.obs[spec.perturbation_key].astype(str)
        row = summary.loc[spec.name]
        assert row.n_cells == adata.n_obs and row.n_genes == adata.n_vars
        assert row.n_perturbations == labels[labels != spec.control_label].nunique()
        assert row.n_control_cells == (labels == spec.control_label).sum()
        assert row.median_cells_per_perturbation == labels[labels != spec.control_label].value_counts().median()
        assert row.median_umis_per_cell == pytest.approx(np.median(counts_cg.sum(axis=1)))
        assert row.median_genes_per_cell == np.median((counts_cg > 0).sum(axis=1))


def test_knockdown_shows_on_synthetic_targets_and_equals_direct_computation(tiny_world, edas):
    data_root, _ = tiny_world
    h1 = edas[0]
    table = lib.get_knockdown_table(h1).set_index("perturbation")
    measured = table.fraction_remaining.dropna()
    assert len(measured) == len(table)  # every synthetic H1 target is in H1's gene list
    assert (measured < 1).mean() > 0.8

    adata, counts_cg = _read_dense(data_root, h1.spec)
    log1p_cg = np.log1p(counts_cg / counts_cg.sum(axis=1, keepdims=True) * 1e4)
    labels = adata.obs["target_gene"].astype(str).to_numpy()
    pert = measured.index[0]
    col = list(adata.var_names).index(pert)
    ctrl_mean, pert_mean = log1p_cg[labels == "non-targeting", col].mean(), log1p_cg[labels == pert, col].mean()
    assert table.loc[pert, "log1p_delta"] == pytest.approx(pert_mean - ctrl_mean, rel=1e-5)
    assert table.loc[pert, "fraction_remaining"] == pytest.approx(np.expm1(pert_mean) / np.expm1(ctrl_mean), rel=1e-5)


def test_unmeasured_target_gets_nan_and_a_reason(edas):
    h1 = edas[0]
    # Drop the first perturbation's target from the gene list: its knockdown cannot be measured.
    pert = h1.perturbations[0]
    symbols_g = np.where(h1.symbols_g == pert, "SYN_GONE", h1.symbols_g)
    table = lib.get_knockdown_table(dataclasses.replace(h1, symbols_g=symbols_g)).set_index("perturbation")
    assert np.isnan(table.loc[pert, "fraction_remaining"]) and table.loc[pert, "reason"] == "target not measured"


def test_subsample_is_capped_and_deterministic(tiny_world):
    data_root, _ = tiny_world
    spec = lib.get_datasets("synthetic")[1]
    cfg = lib.EdaConfig(data_root=str(data_root), max_cells_per_dataset=300, chunk_cells=64)
    first, second = (lib.compute_dataset_eda(spec, data_root, cfg) for _ in range(2))
    assert len(first.genes_c) == 300
    np.testing.assert_array_equal(first.mean_log1p_kg, second.mean_log1p_kg)
    # Cells per perturbation still come from every cell, not the subsample.
    assert first.n_cells_k[: len(first.perturbations) + 1].sum() == first.n_cells


def test_overlap_tables_are_symmetric_with_own_counts_on_the_diagonal(tiny_world, edas):
    data_root, _ = tiny_world
    perts = lib.get_perturbation_overlap(edas)
    genes, matched_on = lib.get_gene_overlap(edas)
    for table in (perts, genes):
        np.testing.assert_array_equal(table.to_numpy(), table.to_numpy().T)
    for e in edas:
        assert perts.loc[e.spec.name, e.spec.name] == len(e.perturbations)
        assert genes.loc[e.spec.name, e.spec.name] == e.n_genes
    # HepG2 has no Ensembl ids, so its pairs fall back to symbols; H1-K562 match on ids.
    assert (matched_on.loc["synthetic_hepg2"] == "symbol").all()
    assert matched_on.loc["synthetic_h1", "synthetic_k562"] == "ensembl"
    h1 = anndata.read_h5ad(lib.get_dataset_path(edas[0].spec, data_root), backed="r")
    k562 = anndata.read_h5ad(lib.get_dataset_path(edas[1].spec, data_root), backed="r")
    shared_ids = set(h1.var["gene_id"]) & {v.split(".")[0] for v in k562.var_names}
    assert genes.loc["synthetic_h1", "synthetic_k562"] == len(shared_ids)


def test_effect_pca_has_one_row_per_effect_with_enough_cells(edas):
    rows, explained, n_genes = lib.compute_effect_pca(edas, min_cells=5)
    assert rows.n_cells_read.min() >= 5 and not rows.duplicated(["dataset", "perturbation"]).any()
    assert np.isfinite(rows[["pc1", "pc2"]].to_numpy()).all()
    assert explained[0] >= explained[1] > 0
    assert 0 < n_genes <= min(e.n_genes for e in edas)


@pytest.mark.slow
def test_notebook_runs_headless_and_writes_its_figures(tiny_world):
    data_root, _ = tiny_world
    result = subprocess.run(
        [sys.executable, "nb/02_eda.py", "--data-root", str(data_root)], cwd=REPO_DIR, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = data_root / "figures" / "02_eda"
    names = [
        "depth_per_cell",
        "cells_per_perturbation",
        "knockdown_efficiency",
        "effect_sizes",
        "overlap",
        "effect_pca",
    ]
    for name in names:
        assert (out_dir / f"{name}.png").stat().st_size > 10_000, name
    summary_lines = (out_dir / "summary.csv").read_text().strip().splitlines()
    assert len(summary_lines) == 1 + len(lib.get_datasets("synthetic"))
