import anndata
import numpy as np
import pandas as pd
import pytest

import lib


def _read(data_root, name):
    spec = {s.name: s for s in lib.get_datasets("synthetic")}[name]
    return spec, anndata.read_h5ad(lib.get_dataset_path(spec, data_root))


def _log1p_cp10k(x_cg):
    x_cg = np.asarray(x_cg.todense())
    return np.log1p(x_cg / x_cg.sum(axis=1, keepdims=True) * 1e4)


def test_target_is_laid_out_like_the_vcc_files(tiny_world):
    data_root, summary = tiny_world
    _, adata = _read(data_root, "synthetic_h1")
    assert list(adata.obs.columns) == ["target_gene", "guide_id", "batch"]
    assert "non-targeting" in set(adata.obs["target_gene"])
    assert adata.obs["batch"].str.match(r"Flex_\d+_\d\d$").all()
    assert adata.obs.index.str.match(r"[ACGT]{24}-Flex_\d+_\d\d$").all() and adata.obs.index.is_unique
    assert adata.var["gene_id"].str.match(r"ENSG\d{11}$").all()
    x = adata.X.data
    assert adata.X.format == "csr" and np.all(x == np.round(x)) and x.min() >= 0  # raw integer counts
    vcc_dir = lib.get_dataset_path(lib.get_datasets("synthetic")[0], data_root).parent
    gene_names = pd.read_csv(vcc_dir / "gene_names.csv", header=None)[0]
    assert list(gene_names) == list(adata.var.index)
    perturbed = set(adata.obs["target_gene"]) - {"non-targeting"}
    assert perturbed == set(summary["splits"]["train"])


def test_split_is_disjoint_and_truths_match_their_pert_counts(tiny_world):
    data_root, summary = tiny_world
    splits = summary["splits"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == list(lib.SYNTHETIC_SIZES["tiny"].n_perts_target)
    assert not (set(splits["train"]) & set(splits["val"]) or set(splits["val"]) & set(splits["test"]))
    vcc_dir = data_root / "raw" / "synthetic" / "vcc"
    for split, name in [("val", "Validation"), ("test", "Test")]:
        counts = pd.read_csv(vcc_dir / f"pert_counts_{name}.csv")
        assert list(counts.columns) == ["target_gene", "n_cells", "median_umi_per_cell"]
        truth = anndata.read_h5ad(vcc_dir / f"adata_{name}_truth.h5ad")
        observed = truth.obs["target_gene"].value_counts()
        assert set(counts["target_gene"]) == set(splits[split])
        assert (observed.loc[counts["target_gene"]].to_numpy() == counts["n_cells"].to_numpy()).all()
        assert observed["non-targeting"] > 0


def test_context_datasets_use_their_own_conventions(tiny_world):
    data_root, _ = tiny_world
    for name in ["synthetic_k562", "synthetic_rpe1", "synthetic_jurkat"]:
        spec, adata = _read(data_root, name)
        assert adata.var.index.str.match(r"ENSG\d{11}\.\d+$").all(), "Ensembl ids keep their version suffix"
        assert adata.var["gene_name"].str.startswith("SYN").all()
        assert {"gene", "gem_group"} <= set(adata.obs.columns)
        assert spec.control_label in set(adata.obs["gene"])
    _, hepg2 = _read(data_root, "synthetic_hepg2")
    assert hepg2.var.index.str.startswith("SYN").all() and len(hepg2.var.columns) == 0, "symbols only"
    _, jurkat = _read(data_root, "synthetic_jurkat")
    assert "control" in set(jurkat.obs["gene"]) and "non-targeting" not in set(jurkat.obs["gene"])
    genes = [set(_read(data_root, n)[1].var.index.str.split(".").str[0]) for n in ["synthetic_k562", "synthetic_rpe1"]]
    assert genes[0] != genes[1], "each dataset measures a different subset of genes"


def test_knockdown_lowers_the_target_gene(tiny_world):
    data_root, _ = tiny_world
    _, adata = _read(data_root, "synthetic_h1")
    x_cg = _log1p_cp10k(adata.X)
    pert_c = adata.obs["target_gene"].to_numpy()
    control_g = x_cg[pert_c == "non-targeting"].mean(axis=0)
    column = {g: j for j, g in enumerate(adata.var.index)}
    drops = [x_cg[pert_c == g, column[g]].mean() - control_g[column[g]] for g in set(pert_c) - {"non-targeting"}]
    assert np.mean(np.array(drops) < 0) >= 0.9
    assert np.median(drops) < -0.3


def test_effects_are_shared_across_cell_types(tiny_world):
    """The same knockdown moves genes alike in H1 and K562, unlike a different knockdown."""
    data_root, _ = tiny_world
    effects = {}
    for name in ["synthetic_h1", "synthetic_k562"]:
        spec, adata = _read(data_root, name)
        symbols = adata.var.index if spec.gene_index == "symbol" else adata.var[spec.gene_symbol_column]
        x_cg = pd.DataFrame(_log1p_cp10k(adata.X), columns=np.asarray(symbols))
        pert_c = adata.obs[spec.perturbation_key].to_numpy()
        mean_pg = x_cg.groupby(pert_c).mean()
        effects[name] = mean_pg.drop(spec.control_label) - mean_pg.loc[spec.control_label]
    h1, k562 = effects["synthetic_h1"], effects["synthetic_k562"]
    genes = h1.columns.intersection(k562.columns)
    shared = h1.index.intersection(k562.index)
    assert len(shared) >= 8
    same = [np.corrcoef(h1.loc[p, genes], k562.loc[p, genes])[0, 1] for p in shared]
    other = [np.corrcoef(h1.loc[p, genes], k562.loc[q, genes])[0, 1] for p, q in zip(shared, np.roll(shared, 1))]
    assert np.mean(np.array(same) > np.array(other)) >= 0.7


def test_world_is_deterministic_for_a_seed(tmp_path, tiny_world):
    data_root, _ = tiny_world
    lib.write_synthetic_world(tmp_path, size="tiny", seed=0)
    for name in ["synthetic_h1", "synthetic_hepg2"]:
        a, b = _read(data_root, name)[1], _read(tmp_path, name)[1]
        assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs) and a.var.equals(b.var)
    other_seed = lib.write_synthetic_world(tmp_path, size="tiny", seed=1)
    assert other_seed["splits"] != lib.write_synthetic_world(tmp_path, size="tiny", seed=0)["splits"]


def test_chunked_writing_keeps_the_layout(tmp_path, monkeypatch):
    """The vcc-scale world is generated in chunks; chunking must not change the file layout."""
    import dataclasses

    small_chunks = dataclasses.replace(lib.SYNTHETIC_SIZES["tiny"], chunk_cells=100)
    monkeypatch.setitem(lib.SYNTHETIC_SIZES, "tiny_chunked", small_chunks)
    lib.write_synthetic_world(tmp_path, size="tiny_chunked", seed=0)
    _, adata = _read(tmp_path, "synthetic_h1")
    assert adata.n_obs > 100 and adata.X.shape == (adata.n_obs, 600)
    assert adata.obs.index.is_unique and adata.obs["target_gene"].notna().all()
    assert np.all(np.diff(adata.X.indptr) > 0), "every cell has counts"


# Realism: measured from the files of the smallest world whose numbers mean
# something (~15 s); the medium world's numbers are in the logbook
# (`uv run python benchmarks/world_realism.py --size medium`).


@pytest.fixture(scope="module")
def realism(tmp_path_factory):
    data_root = tmp_path_factory.mktemp("check_world")
    lib.write_synthetic_world(data_root, size="check", seed=0)
    return lib.measure_synthetic_world(data_root)


def test_perturbations_have_challenge_sized_cell_counts_and_controls(realism):
    assert min(realism[f"min_cells_{s}"] for s in ("train", "val", "test")) >= 200
    for split in ("train", "val", "test"):
        assert 0.10 <= realism[f"control_share_{split}"] <= 0.20


def test_true_de_genes_are_tens_with_a_heavy_tail(realism):
    assert 10 <= realism["de_median"] <= 100
    assert realism["de_p90"] >= 3 * realism["de_median"]
    assert realism["de_max"] >= 300


def test_responses_concentrate_in_variable_genes(realism):
    assert realism["de_in_hvg_share"] >= 0.6  # half of the genes are HVGs: 0.5 if responses ignored variability


def test_strong_knockdowns_move_a_shared_program(realism):
    assert realism["program_corr_strong"] >= 0.2
    assert realism["program_corr_strong"] >= realism["program_corr_weak"] + 0.15


def test_knockdown_has_variable_efficiency_and_escapers(realism):
    assert 0.3 <= realism["knockdown_median"] <= 0.8
    assert realism["knockdown_p90"] - realism["knockdown_p10"] >= 0.2
    assert realism["escaper_share"] >= 0.1


def test_strong_effects_transfer_across_cell_types_weak_ones_barely(realism):
    assert realism["transfer_corr_strong"] >= 0.4
    assert realism["transfer_corr_weak"] <= realism["transfer_corr_strong"] - 0.2
