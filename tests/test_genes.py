"""Gene ids, the shared-HVG rule and the one normalisation function."""

import dataclasses
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse

import lib


def make_counts_cg(n_cells=40, n_genes=30, seed=0, max_count=None):
    rng = np.random.default_rng(seed)
    lam = rng.gamma(0.5, 4.0, n_genes)[None] * rng.uniform(0.5, 2.0, n_cells)[:, None]
    counts = rng.poisson(lam).astype(np.float32)
    if max_count is not None:
        counts = np.minimum(counts, max_count)
    return scipy.sparse.csr_matrix(counts)


# ---------------------------------------------------------------- gene ids


def test_strip_ensembl_version_removes_only_the_version():
    assert lib.strip_ensembl_version("ENSG00000141510.16") == "ENSG00000141510"
    assert lib.strip_ensembl_version("ENSG00000141510") == "ENSG00000141510"
    assert lib.strip_ensembl_version("ENSG90000000042.3") == "ENSG90000000042"
    # The PAR_Y tag keeps the Y copy distinct from the X gene.
    assert lib.strip_ensembl_version("ENSG00000182378.14_PAR_Y") == "ENSG00000182378_PAR_Y"


def test_cached_symbols_map_and_uncached_are_reported_unmapped_offline(tmp_path, monkeypatch):
    cache_path = tmp_path / "cache.json"
    cache_path.write_text(json.dumps({"TP53": "ENSG00000141510", "NOTAGENE": None}))
    monkeypatch.setattr(lib, "query_mygene", lambda symbols: pytest.fail("offline must not query mygene"))
    table = lib.map_symbols(["TP53", "NOTAGENE", "BRCA1"], cache_paths=[cache_path], offline=True)
    assert table["symbol"].tolist() == ["TP53", "NOTAGENE", "BRCA1"]  # nothing dropped
    assert table["ensembl_id"].tolist() == ["ENSG00000141510", "", ""]
    assert table["id_source"].tolist() == ["cache", "notfound", "unmapped"]


def test_mygene_failure_leaves_symbols_unmapped_and_uncached(tmp_path, monkeypatch):
    import httpx

    def unreachable(symbols):
        raise httpx.ConnectError("no network")

    monkeypatch.setattr(lib, "query_mygene", unreachable)
    cache_path = tmp_path / "writable.json"
    with pytest.warns(UserWarning, match="mygene lookup of 1 symbols failed"):
        table = lib.map_symbols(["BRCA1"], writable_cache_path=cache_path)
    assert table["id_source"].tolist() == ["unmapped"]
    assert not cache_path.exists()  # a network failure is not a "not found": retry next time


def test_mygene_hits_and_misses_are_cached_and_not_requeried(tmp_path, monkeypatch):
    cache_path = tmp_path / "writable.json"
    monkeypatch.setattr(lib, "query_mygene", lambda symbols: {"BRCA1": "ENSG00000012048", "XYZ1": None})
    first = lib.map_symbols(["BRCA1", "XYZ1"], writable_cache_path=cache_path)
    assert first["id_source"].tolist() == ["mygene", "notfound"]
    assert json.loads(cache_path.read_text()) == {"BRCA1": "ENSG00000012048", "XYZ1": None}
    monkeypatch.setattr(lib, "query_mygene", lambda symbols: pytest.fail(f"re-queried {symbols}"))
    second = lib.map_symbols(["BRCA1", "XYZ1"], writable_cache_path=cache_path)
    assert second["ensembl_id"].tolist() == ["ENSG00000012048", ""]


def test_gene_table_keeps_unmapped_and_duplicate_genes_and_reports_them(tmp_path):
    spec = lib.DatasetSpec(
        name="d", source="fixture", path="d.h5ad", cell_type="X", perturbation_key="gene",
        control_label="non-targeting", batch_key="", gene_index="symbol", gene_id_column="",
        gene_symbol_column="", counts="raw", role="target",
    )  # fmt: skip
    var = pd.DataFrame(index=["SYN00001", "FOO1", "SYN00002"])
    table = lib.make_gene_table(spec, var, data_root=tmp_path, offline=True)
    assert table["var_name"].tolist() == ["SYN00001", "FOO1", "SYN00002"]
    assert table["ensembl_id"].tolist() == ["ENSG90000000001", "", "ENSG90000000002"]
    assert table["in_gene_space"].tolist() == [True, False, True]

    ens_spec = lib.DatasetSpec(**{**spec.__dict__, "gene_index": "ensembl", "name": "e"})
    ens_table = lib.make_gene_table(ens_spec, pd.DataFrame(index=["ENSG1.1", "ENSG1.2", "ENSG2.5"]), data_root=tmp_path)
    assert ens_table["id_source"].tolist() == ["var", "duplicate", "var"]
    assert ens_table["in_gene_space"].tolist() == [True, False, True]

    report_path = tmp_path / "unmapped.csv"
    with pytest.warns(UserWarning, match=r"2 genes are outside the shared gene space .*unmapped\.csv"):
        report = lib.report_unmapped({"d": table, "e": ens_table}, report_path)
    assert set(zip(report["dataset"], report["var_name"])) == {("d", "FOO1"), ("e", "ENSG1.2")}
    assert len(pd.read_csv(report_path)) == 2


def test_gene_table_rejects_symbols_declared_as_ensembl_ids(tmp_path):
    spec = lib.DatasetSpec(
        name="d", source="fixture", path="d.h5ad", cell_type="X", perturbation_key="gene",
        control_label="non-targeting", batch_key="", gene_index="ensembl", gene_id_column="",
        gene_symbol_column="", counts="raw", role="target",
    )  # fmt: skip
    with pytest.raises(lib.UserError, match="not Ensembl gene ids.*gene_index"):
        lib.make_gene_table(spec, pd.DataFrame(index=["TP53", "BRCA1"]), data_root=tmp_path)


def test_committed_synthetic_cache_is_the_generator_mapping_and_small():
    path = lib.SYNTHETIC_GENE_CACHE_PATH
    assert path.stat().st_size < 1_000_000
    cache = json.loads(path.read_text())
    gene_u = np.arange(1, lib.SYNTHETIC_SIZES["vcc"].n_genes_universe + 1)
    assert cache == dict(zip(lib.synthetic_symbol(gene_u).tolist(), lib.synthetic_ensembl_id(gene_u).tolist()))


# ---------------------------------------------------------------- HVG rule


def test_shared_hvgs_take_intersection_then_most_datasets_then_mean_rank_then_id():
    lists = {
        "a": ["g1", "g2", "g3", "g4", "g9"],
        "b": ["g3", "g2", "g5", "g4", "g7"],
        "c": ["g4", "g3", "g6", "g2", "g7"],
    }
    ranks = {name: pd.Series(np.arange(len(genes)), index=genes) for name, genes in lists.items()}
    # g6 is HVG in c but not measured in the target: never a candidate. g8 is fill.
    target_genes = ["g8", "g1", "g2", "g3", "g4", "g5", "g7", "g9", "g10"]
    with pytest.warns(UserWarning, match="filling 1"):
        shared = lib.select_shared_hvgs(ranks, target_genes, n=8)
    # In all three: g3 (mean rank 1), g2 (5/3), g4 (2); in two: g7; in one, by rank: g1 (0),
    # g5 (2), g9 (4); then the fill, g8 (the target's most variable remaining gene).
    assert shared["ensembl_id"].tolist() == ["g3", "g2", "g4", "g7", "g1", "g5", "g9", "g8"]
    assert shared["n_datasets"].tolist() == [3, 3, 3, 2, 1, 1, 1, 0]
    assert shared["in_all"].tolist() == [True, True, True, False, False, False, False, False]
    assert shared["is_hvg_c"].tolist() == [True, True, True, True, False, False, False, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough candidates: no fill warning
        assert lib.select_shared_hvgs(ranks, target_genes, n=2)["ensembl_id"].tolist() == ["g3", "g2"]


def test_shared_hvgs_break_exact_ties_by_ensembl_id():
    ranks = {"a": pd.Series([0, 1], index=["gB", "gX"]), "b": pd.Series([0, 1], index=["gA", "gY"])}
    shared = lib.select_shared_hvgs(ranks, ["gX", "gY", "gA", "gB"], n=4)
    assert shared["ensembl_id"].tolist() == ["gA", "gB", "gX", "gY"]


def test_shared_hvgs_refuse_more_genes_than_the_target_measures():
    with pytest.raises(lib.UserError, match="measures only 2"):
        lib.select_shared_hvgs({"a": pd.Series([0], index=["g1"])}, ["g1", "g2"], n=3)


# ---------------------------------------------------------------- normalisation


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Some cells have zero counts")
def test_normalised_rows_expm1_sum_to_1e4_and_chunks_match_whole():
    dense_cg = make_counts_cg(n_cells=50).toarray()
    dense_cg[3] = 0  # an empty cell stays all-zero instead of failing the check
    counts_cg = scipy.sparse.csr_matrix(dense_cg)
    x_cg = lib.normalise_log1p(counts_cg)
    assert scipy.sparse.issparse(x_cg) and x_cg.dtype == np.float32
    sums_c = np.expm1(x_cg.toarray().astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(np.delete(sums_c, 3), 1e4, rtol=1e-4)
    assert sums_c[3] == 0
    chunks = scipy.sparse.vstack([lib.normalise_log1p(counts_cg[:17]), lib.normalise_log1p(counts_cg[17:])])
    np.testing.assert_array_equal(chunks.toarray(), x_cg.toarray())
    expected = np.log1p(counts_cg.toarray() / np.maximum(counts_cg.toarray().sum(1, keepdims=True), 1) * 1e4)
    np.testing.assert_allclose(x_cg.toarray(), expected, rtol=1e-5, atol=1e-6)


def test_normalise_rejects_log1p_data_declared_as_raw_counts():
    x_cg = lib.normalise_log1p(make_counts_cg())
    with pytest.raises(ValueError, match="looks already normalised.*counts = 'log1p'"):
        lib.normalise_log1p(x_cg, counts="raw", where="fixture")


def test_normalise_rejects_raw_counts_declared_as_log1p():
    # Small counts (max 5) pass the value-range check; the row sums give them away.
    counts_cg = make_counts_cg(max_count=5)
    with pytest.raises(ValueError, match="expm1 row sums.*looks like raw counts.*counts = 'raw'"):
        lib.normalise_log1p(counts_cg, counts="log1p", where="fixture")
    with pytest.raises(ValueError, match="not log1p.*counts = 'raw'"):
        lib.normalise_log1p(make_counts_cg() * 100, counts="log1p")


def test_log1p_input_passes_through_unchanged():
    x_cg = lib.normalise_log1p(make_counts_cg())
    np.testing.assert_array_equal(lib.normalise_log1p(x_cg, counts="log1p").toarray(), x_cg.toarray())


def test_random_gene_selection_is_seeded_and_not_the_hvgs(tiny_store, tmp_path):
    """--selection random (the "do HVGs matter" control): n_hvg target genes, reproducible,
    not the HVG list, with each gene's HVG membership still recorded."""
    (tmp_path / "raw").symlink_to(tiny_store / "raw")
    hvg = pd.read_csv(tiny_store / "hvg" / "synthetic" / "hvg.csv")
    cfg = lib.HvgConfig(data_root=str(tmp_path), n_hvg=200, n_hvg_per_dataset=200, offline=True, selection="random")
    first = lib.run_hvg(cfg)
    again = lib.run_hvg(cfg)
    other_seed = lib.run_hvg(dataclasses.replace(cfg, seed=1))
    assert len(first) == 200 and first["ensembl_id"].is_unique
    assert first["ensembl_id"].tolist() == again["ensembl_id"].tolist() != other_seed["ensembl_id"].tolist()
    overlap = len(set(first["ensembl_id"]) & set(hvg["ensembl_id"])) / 200
    assert overlap < 0.6, overlap  # HVGs are 200 of the target's 600 genes: chance overlap is ~1/3
    assert first.filter(like="is_hvg_").to_numpy().any()


def test_committed_synthetic_gene_cache_is_what_the_generator_writes(tmp_path):
    """gene_cache/mygene_synthetic.json is generated, never hand-edited: regenerating it from the
    synthetic world's own symbol <-> Ensembl mapping must give the committed file back."""
    regenerated = lib.write_synthetic_gene_cache(tmp_path / "cache.json")
    assert json.loads(regenerated.read_text()) == json.loads(lib.SYNTHETIC_GENE_CACHE_PATH.read_text())
