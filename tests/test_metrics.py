"""Metrics: DE overlap, PDS, MAE, normalised score, cell-mean baseline, input checks.

The last tests score the same files with the real cell-eval (0.6.6 + pdex 0.1.26 for
`vcc2025`, 0.8.2 + pdex 0.3.0 for `current`) in throwaway uv environments and compare.
"""

import json
import pathlib
import subprocess
import sys

import anndata as ad
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import scipy.stats
from conftest import get_uv

import lib

REPO_DIR = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_SCRIPT = REPO_DIR / "tests" / "cell_eval_reference.py"
SCORE_COMMAND = [sys.executable, str(REPO_DIR / "nb" / "06_eval.py")]
REFERENCE_ENVS = {
    "vcc2025": ["--with", "cell-eval==0.6.6", "--with", "pdex==0.1.26", "--with", "scipy<1.16"],
    "current": ["--with", "cell-eval==0.8.2", "--with", "pdex==0.3.0"],
}
CONTROL = "non-targeting"


def make_realistic_pair(seed=0, n_genes=200, n_perts=8, n_cells=40, n_control=150):
    """NB counts -> normalise -> log1p, with real knockdowns and downstream effects.

    pred is a fresh draw with half-size effects, so every metric lands strictly between
    its best and worst. The last perturbation has 6 cells, and gene 0 is highly expressed
    (no ties), so scipy's exact U test is exercised too.
    """
    rng = np.random.default_rng(seed)
    genes = np.array([f"G{i:04d}" for i in range(n_genes)])
    base_mu = rng.lognormal(0.0, 1.5, n_genes)
    perts = genes[rng.choice(np.arange(1, n_genes), n_perts, replace=False)]
    effect_pg = np.zeros((n_perts, n_genes))
    for i in range(n_perts):
        effect_pg[i, rng.choice(n_genes, 25, replace=False)] = rng.normal(0, 1.2, 25)
        effect_pg[i, np.flatnonzero(genes == perts[i])] = -3.0  # the knockdown itself

    def draw(effect_scale):
        sizes = [n_cells] * (n_perts - 1) + [6]
        labels = np.concatenate([[CONTROL] * n_control] + [[p] * s for p, s in zip(perts, sizes)])
        mu = np.tile(base_mu, (labels.size, 1))
        for i, p in enumerate(perts):
            mu[labels == p] *= np.exp(effect_scale * effect_pg[i])
        mu *= rng.lognormal(0, 0.3, (labels.size, 1))  # library size
        counts = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(np.float64)
        counts[:, 0] = rng.integers(200, 400, labels.size)
        x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
        order = rng.permutation(labels.size)
        obs = pd.DataFrame({"target_gene": labels[order]}, index=[f"c{i}" for i in range(labels.size)])
        return ad.AnnData(X=x[order], obs=obs, var=pd.DataFrame(index=genes))

    return draw(1.0), draw(0.5)


@pytest.fixture(scope="module")
def realistic():
    return make_realistic_pair()


def scipy_mwu_p(a, b, method):
    p = scipy.stats.mannwhitneyu(np.float64(a), np.float64(b), method=method).pvalue
    return 1.0 if np.isnan(p) else p  # scipy >= 1.16 can return NaN for a constant gene


# ---------------------------------------------------------------- U test, BH, fold changes


def test_u_test_matches_scipy_per_gene_in_both_modes():
    rng = np.random.default_rng(3)
    sizes = {CONTROL: 30, "A": 12, "B": 5, "C": 25, "D": 1}
    labels = np.concatenate([[k] * n for k, n in sizes.items()])
    rng.shuffle(labels)
    x = np.log1p(rng.poisson(rng.gamma(1, 2, 30), (labels.size, 30)) * rng.uniform(0.5, 2, (labels.size, 1)))
    x = x.astype(np.float32)
    x[:, 0] = 1.5  # constant gene
    x[:, 1] = rng.random(labels.size) + 0.1  # no ties: exact path for B and D in vcc2025
    x[:, 2] = 0
    for mode, method in (("vcc2025", "auto"), ("current", "asymptotic")):
        de = lib.differential_expression(x, labels, mode=mode)
        assert list(de.perts) == ["A", "B", "C", "D"]
        for i, pert in enumerate(de.perts):
            for g in range(x.shape[1]):
                a, b = x[labels == pert, g], x[labels == CONTROL, g]
                expected = scipy.stats.mannwhitneyu(np.float64(a), np.float64(b)).statistic
                assert de.u1_pg[i, g] == expected
                np.testing.assert_allclose(de.p_value_pg[i, g], scipy_mwu_p(a, b, method), rtol=1e-12, atol=0)
        assert (de.p_value_pg[:, [0, 2]] == 1).all(), "a constant gene must get p = 1, never NaN"


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    values=hnp.arrays(np.float32, st.integers(4, 40), elements=st.sampled_from([0.0, 0.5, 1.0, 1.25, 2.0, 3.5])),
    n_control=st.integers(1, 20),
    data=st.data(),
)
def test_u_test_with_heavy_ties_matches_scipy(values, n_control, data):
    n_control = min(n_control, values.size - 1)
    labels = np.array([CONTROL] * n_control + ["P"] * (values.size - n_control))
    labels = labels[data.draw(st.permutations(range(values.size)))]
    de = lib.differential_expression(values[:, None], labels, mode="vcc2025")
    a, b = values[labels == "P"], values[labels == CONTROL]
    np.testing.assert_allclose(de.p_value_pg[0, 0], scipy_mwu_p(a, b, "auto"), rtol=1e-12)


def test_sparse_de_with_many_zeros_and_ties_matches_scipy_and_numpy_means():
    """Groups larger than numpy's 128-value pairwise block, mostly zeros, values from a small set
    (ties inside a group and across groups), CSR input: U and p as scipy's mannwhitneyu, means
    and pseudobulks bit-for-bit numpy's (the dense arithmetic cell-eval uses)."""
    rng = np.random.default_rng(7)
    sizes = {CONTROL: 300, "A": 200, "B": 7, "C": 131, "D": 1}
    labels = np.concatenate([[k] * n for k, n in sizes.items()])
    rng.shuffle(labels)
    levels = np.float32([0.25, 0.5, 1.0, 1.75, 2.5])
    x = np.where(rng.random((labels.size, 40)) < 0.8, 0, rng.choice(levels, (labels.size, 40))).astype(np.float32)
    x[:, 1] = rng.random(labels.size).astype(np.float32) * (rng.random(labels.size) < 0.3)  # zeros, no other ties
    x[:, 2] = 0  # constant gene
    x_csr = scipy.sparse.csr_matrix(x)
    for mode, method in (("vcc2025", "auto"), ("current", "asymptotic")):
        de = lib.differential_expression(x_csr, labels, mode=mode, threads=2)
        for i, pert in enumerate(de.perts):
            rows = labels == pert
            for g in range(x.shape[1]):
                a, b = x[rows, g], x[labels == CONTROL, g]
                assert de.u1_pg[i, g] == scipy.stats.mannwhitneyu(np.float64(a), np.float64(b)).statistic
                np.testing.assert_allclose(de.p_value_pg[i, g], scipy_mwu_p(a, b, method), rtol=1e-12, atol=0)
            if mode == "vcc2025":  # numpy's pairwise mean of each column
                means = np.array([np.ascontiguousarray(x[rows, g]).mean() for g in range(x.shape[1])])
            else:  # numpy's mean over axis 0 of the (cell, gene) block
                means = x[rows].mean(axis=0)
            np.testing.assert_array_equal(de.target_mean_pg[i], np.expm1(means.astype(np.float32)))
            pseudobulk = np.add.reduceat(x[rows], [0], axis=0, dtype=np.float64)[0] / rows.sum()
            np.testing.assert_array_equal(de.pseudobulk_pg[i], pseudobulk.astype(np.float32))


def test_u_test_for_skewed_and_out_of_range_values_matches_scipy():
    """Each value is placed among the control's through a per-gene bucket table: values below,
    above and exactly at the control's extremes, a control squeezed into a tiny range, a control
    of one distinct value, and heavily skewed values must all count as scipy counts them."""
    rng = np.random.default_rng(3)
    n_control, n_group = 60, 45
    control = np.stack(
        [
            np.minimum(rng.lognormal(0, 1.5, n_control), 12),  # skewed: most buckets empty, a few crowded
            1 + rng.random(n_control) * 1e-6,  # a tiny range
            np.full(n_control, 2.0),  # one distinct value
            np.where(rng.random(n_control) < 0.95, 0, rng.random(n_control) + 1),  # a few nonzeros
        ],
        axis=1,
    ).astype(np.float32)
    picks = [control[:, g][rng.integers(0, n_control, 10)] for g in range(control.shape[1])]  # exact ties
    group = np.stack(
        [
            np.concatenate([picks[g], control[:, g].min(keepdims=True) * 0.5, [control[:, g].max() + 2, 1e-30]])
            for g in range(control.shape[1])
        ],
        axis=1,
    )
    group = np.concatenate([group, rng.lognormal(0, 1.5, (n_group - group.shape[0], control.shape[1]))]).astype(
        np.float32
    )
    x = np.concatenate([control, group])
    labels = np.array([CONTROL] * n_control + ["P"] * n_group)
    de = lib.differential_expression(scipy.sparse.csr_matrix(x), labels, mode="current")
    for g in range(x.shape[1]):
        expected = scipy.stats.mannwhitneyu(np.float64(group[:, g]), np.float64(control[:, g]))
        assert de.u1_pg[0, g] == expected.statistic, g
        np.testing.assert_allclose(
            de.p_value_pg[0, g], scipy_mwu_p(group[:, g], control[:, g], "asymptotic"), rtol=1e-12
        )


def test_non_canonical_csr_scores_like_its_dense_matrix():
    """A non-canonical CSR (a row names a column twice, or lists its columns out of order) means
    what toarray() reads: the DE equals the dense matrix's."""
    x = np.array([[1.0, 0.0], [0.5, 2.0], [0.0, 1.0], [3.0, 0.25], [1.5, 0.0]], dtype=np.float32)
    labels = np.array([CONTROL, CONTROL, CONTROL, "P", "P"])
    # row 1 stores column 0 as 0.25 + 0.25, row 3 stores column 1 as 0.125 + 0.125
    data = np.float32([1.0, 0.25, 0.25, 2.0, 1.0, 3.0, 0.125, 0.125, 1.5])
    indices = np.array([0, 0, 0, 1, 1, 0, 1, 1, 0])
    indptr = np.array([0, 1, 4, 5, 8, 9])
    x_dup = scipy.sparse.csr_matrix((data, indices, indptr), shape=x.shape)
    # rows 1 and 3 list column 1 before column 0
    data = np.float32([1.0, 2.0, 0.5, 1.0, 0.25, 3.0, 1.5])
    indices = np.array([0, 1, 0, 1, 1, 0, 0])
    x_unsorted = scipy.sparse.csr_matrix((data, indices, np.array([0, 1, 3, 4, 6, 7])), shape=x.shape)
    for m in (x_dup, x_unsorted):
        assert not m.has_canonical_format
        np.testing.assert_array_equal(m.toarray(), x)
    for mode in ("vcc2025", "current"):
        dense, dup, unsorted = (lib.differential_expression(m, labels, mode=mode) for m in (x, x_dup, x_unsorted))
        for field in ("u1_pg", "p_value_pg", "target_mean_pg", "pseudobulk_pg"):
            np.testing.assert_array_equal(getattr(dense, field), getattr(dup, field), err_msg=field)
            np.testing.assert_array_equal(getattr(dense, field), getattr(unsorted, field), err_msg=field)


def test_exact_null_distribution_by_hand():
    # n1 = n2 = 2: U takes 0, 1, 2, 2, 3, 4 over the 6 equally likely splits.
    np.testing.assert_allclose(lib.mwu_exact_cdf(2, 2, 4), np.array([1, 2, 4, 5, 6]) / 6)
    # n1 = 1: U is uniform on 0..n2.
    np.testing.assert_allclose(lib.mwu_exact_cdf(1, 9, 9), np.arange(1, 11) / 10)


def test_bh_by_hand_and_global_versus_per_perturbation():
    np.testing.assert_allclose(
        lib.benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.2])), [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2]
    )
    real, _ = make_realistic_pair()
    labels = np.asarray(real.obs["target_gene"], dtype=str)
    old = lib.differential_expression(real.X, labels, mode="vcc2025")
    new = lib.differential_expression(real.X, labels, mode="current")
    fdc = scipy.stats.false_discovery_control
    np.testing.assert_array_equal(old.fdr_pg, fdc(old.p_value_pg.ravel()).reshape(old.p_value_pg.shape))
    np.testing.assert_array_equal(new.fdr_pg, np.stack([fdc(row) for row in new.p_value_pg]))


def test_fold_change_zero_rules_by_hand():
    target = np.array([0.0, 2.0, 0.0, 3.0], dtype=np.float32)
    control = np.array([0.0, 0.0, 1.0, 1.5], dtype=np.float32)
    np.testing.assert_allclose(
        lib.log2_fold_change(target, control, mode="vcc2025"), [0.0, np.log2(20), np.log2(1 / 20), 1.0]
    )
    np.testing.assert_array_equal(lib.log2_fold_change(target, control, mode="current"), [0.0, np.inf, -np.inf, 1.0])


def test_overlap_at_n_by_hand():
    assert lib.overlap_at_n(np.array([1, 2, 3, 4]), np.array([4, 9, 1, 2, 3])) == 0.75  # P[:4] = 4 9 1 2
    assert lib.overlap_at_n(np.array([], dtype=int), np.array([1, 2])) == 0.0
    assert lib.overlap_at_n(np.array([5, 6]), np.array([], dtype=int)) == 0.0
    assert lib.overlap_at_n(np.array([5, 6]), np.array([6, 5, 7])) == 1.0


def test_discrimination_score_by_hand():
    genes = np.array(["a", "b", "c"])
    real = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [5.0, 5.0, 0.0]])
    # pred for "a" sits on real "b" except at gene a (excluded for a): rank 1 of 3 -> 1 - 1/3.
    pred = np.array([[9.0, 1.0, 0.0], [1.0, 1.0, 0.0], [5.0, 5.0, 0.0]])
    np.testing.assert_allclose(lib.discrimination_score_l1(real, pred, genes, genes), [2 / 3, 1.0, 1.0])


# ---------------------------------------------------------------- properties of the score


@pytest.mark.parametrize("mode", lib.SCORE_MODES)
def test_identity_prediction_scores_perfectly(realistic, mode):
    real, _ = realistic
    result = lib.score(real, real.copy(), mode=mode)
    table = result["per_perturbation"]
    assert result["mode"] == mode
    assert (table["n_de_real"] > 0).sum() >= 6, "the test data must have real DE genes"
    assert (table.loc[table["n_de_real"] > 0, "des"] == 1).all()
    assert (table["pds"] == 1).all() and (table["mae"] == 0).all()


def test_normalised_score_by_hand():
    def scores(des, pds, mae):
        return {"mode": "vcc2025", "des": des, "pds": pds, "mae": mae}

    baseline = scores(0.2, 0.6, 0.4)
    s_des, s_pds, s_mae = (0.5 - 0.2) / (1 - 0.2), (0.8 - 0.6) / (1 - 0.6), 1 - 0.1 / 0.4
    got = lib.normalised_score(scores(0.5, 0.8, 0.1), baseline)
    assert got.pop("mode") == "vcc2025"
    want = {"s_des": s_des, "s_pds": s_pds, "s_mae": s_mae, "score": (s_des + s_pds + s_mae) / 3}
    assert got == pytest.approx(want, rel=1e-12)
    assert lib.normalised_score(scores(0.1, 0.5, 0.8), baseline)["score"] == 0  # worse than the baseline floors at 0
    with pytest.raises(ValueError, match="score both in one mode"):
        lib.normalised_score(scores(0.5, 0.8, 0.1), {**baseline, "mode": "current"})


def test_baseline_at_the_bound_scores_zero_instead_of_dividing_by_zero():
    """One perturbation makes every PDS 1, so the baseline's is too: 0/0 is NaN, which scores 0."""
    at_bound = lib.normalised_score(
        {"mode": "vcc2025", "des": 1.0, "pds": 1.0, "mae": 0.0}, {"mode": "vcc2025", "des": 1.0, "pds": 1.0, "mae": 0.0}
    )
    assert at_bound == {"mode": "vcc2025", "s_des": 0.0, "s_pds": 0.0, "s_mae": 0.0, "score": 0.0}
    worse = lib.normalised_score(
        {"mode": "vcc2025", "des": 0.5, "pds": 0.5, "mae": 0.2}, {"mode": "vcc2025", "des": 1.0, "pds": 1.0, "mae": 0.0}
    )
    assert worse["score"] == 0.0


@pytest.mark.parametrize("mode", lib.SCORE_MODES)
def test_identity_prediction_normalises_to_one(realistic, mode):
    real, _ = realistic
    baseline = lib.score(real, lib.make_cell_mean_baseline(real), mode=mode)
    perfect = lib.normalised_score(lib.score(real, real.copy(), mode=mode, real_de=baseline["real_de"]), baseline)
    assert perfect["s_pds"] == 1 and perfect["s_mae"] == 1 and perfect["s_des"] > 0.5


def test_deranged_perturbation_labels_score_badly(realistic):
    real, _ = realistic
    labels = np.asarray(real.obs["target_gene"], dtype=str)
    perts = np.unique(labels[labels != CONTROL])
    deranged = dict(zip(perts, np.roll(perts, 1)))  # every perturbation gets another's real cells
    shuffled = real.copy()
    shuffled.obs["target_gene"] = [deranged.get(label, label) for label in labels]
    perfect = lib.score(real, real.copy())
    wrong = lib.score(real, shuffled, real_de=perfect["real_de"])
    baseline = lib.score(real, lib.make_cell_mean_baseline(real), real_de=perfect["real_de"])
    table = wrong["per_perturbation"]
    # Each pred sits exactly on another perturbation's real effect, so no p can rank first.
    assert (table["pds"] <= 1 - 1 / perts.size).all() and wrong["pds"] < 0.75
    assert wrong["des"] < 0.5 * perfect["des"] and wrong["mae"] > 0.05
    assert lib.normalised_score(wrong, baseline)["score"] < 0.5 * lib.normalised_score(perfect, baseline)["score"]


def test_sparse_input_and_threads_do_not_change_de(realistic):
    real, _ = realistic
    labels = np.asarray(real.obs["target_gene"], dtype=str)
    whole = lib.differential_expression(real.X, labels)
    for kwargs in ({}, {"threads": 2}, {"threads": 3}):
        for x in (real.X, scipy.sparse.csr_matrix(real.X), scipy.sparse.csc_matrix(real.X)):
            other = lib.differential_expression(x, labels, **kwargs)
            for field in ("u1_pg", "p_value_pg", "fdr_pg", "target_mean_pg", "pseudobulk_pg", "significant_pg"):
                np.testing.assert_array_equal(getattr(whole, field), getattr(other, field), err_msg=field)


@pytest.mark.parametrize("mode", lib.SCORE_MODES)
def test_groups_read_in_blocks_give_the_same_de(realistic, monkeypatch, mode):
    real, _ = realistic
    labels = np.asarray(real.obs["target_gene"], dtype=str)
    whole = lib.differential_expression(real.X, labels, mode=mode)
    monkeypatch.setattr(lib, "_DE_READ_ROWS", 7)  # every group, the control too, in blocks of 7 rows
    for x in (real.X, scipy.sparse.csr_matrix(real.X)):
        blocks = lib.differential_expression(x, labels, mode=mode, threads=2)
        for field in ("u1_pg", "p_value_pg", "target_mean_pg", "pseudobulk_pg", "significant_pg"):
            np.testing.assert_array_equal(getattr(whole, field), getattr(blocks, field), err_msg=field)


def test_cell_mean_baseline_from_a_file_read_in_blocks_is_the_whole_read(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    labels = np.repeat([CONTROL, "A", "B"], [40, 9, 13])
    x = scipy.sparse.random(labels.size, 30, density=0.5, random_state=rng, format="csr") * 7.3  # float64
    obs = pd.DataFrame({"target_gene": labels}, index=[f"c{i}" for i in range(labels.size)])
    ad.AnnData(X=x, obs=obs).write_h5ad(tmp_path / "train.h5ad")
    args = (np.array(["A", "B"]), np.array([3, 4]))
    with lib.open_score_file(tmp_path / "train.h5ad", which="train") as train:
        _, whole = lib.make_cell_mean_baseline_file(train, *args, control_label=CONTROL)
        monkeypatch.setattr(lib, "_DE_READ_ROWS", 4)  # the control in 10 blocks
        _, blocks = lib.make_cell_mean_baseline_file(train, *args, control_label=CONTROL)
    np.testing.assert_array_equal(blocks.cell_mean_g, whole.cell_mean_g)
    group_means = [x[labels == g].mean(axis=0).A1 for g in (CONTROL, "A", "B")]
    np.testing.assert_allclose(whole.cell_mean_g, np.mean(group_means, axis=0), rtol=1e-12)


def test_cell_mean_baseline_by_hand():
    x = np.array([[1.0, 2.0], [3.0, 2.0], [0.5, 0.5], [1.5, 1.5], [0.25, 0.75]], dtype=np.float32)
    obs = pd.DataFrame({"target_gene": [CONTROL, CONTROL, "A", "A", "B"]}, index=list("vwxyz"))
    real = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=["g1", "g2"]))
    baseline = lib.make_cell_mean_baseline(real)
    m = (np.array([2.0, 2.0]) + np.array([1.0, 1.0]) + np.array([0.25, 0.75])) / 3  # mean of group means
    labels = np.asarray(baseline.obs["target_gene"], dtype=str)
    assert sorted(labels[labels != CONTROL]) == ["A", "A", "B"]
    np.testing.assert_allclose(baseline.X[labels != CONTROL], np.tile(m, (3, 1)), rtol=1e-7)
    np.testing.assert_array_equal(baseline[labels == CONTROL].X, x[:2])
    assert list(baseline.var_names) == ["g1", "g2"]


# ---------------------------------------------------------------- input checks


def _broken(kind, real, pred):
    pred = pred.copy()
    if kind == "gene order":
        return real, pred[:, np.random.default_rng(0).permutation(pred.n_vars)].copy()
    if kind == "gene set":
        return real, pred[:, 1:].copy()
    if kind == "no control in pred":
        return real, pred[pred.obs["target_gene"] != CONTROL].copy()
    if kind == "perturbation sets":
        dropped = sorted(set(pred.obs["target_gene"]) - {CONTROL})[0]
        return real, pred[pred.obs["target_gene"] != dropped].copy()
    if kind == "no pert column":
        del pred.obs["target_gene"]
        return real, pred
    x = np.array(pred.X)
    if kind == "NaN":
        x[3, 4] = np.nan
    elif kind == "inf":
        x[3, 4] = np.inf
    elif kind == "negative":
        x[3, 4] = -0.5
    elif kind == "raw counts":
        x = np.round(np.expm1(x))
    elif kind == "beyond log1p":
        x[3, 4] = 15.0
    pred.X = x
    return real, pred


@pytest.mark.parametrize(
    "kind, message",
    [
        ("gene order", "gene-order trap.*pred\\[:, real.var_names\\]"),
        ("gene set", "gene mismatch.*in real's order"),
        ("no control in pred", "pred: no control cells.*include control cells"),
        ("perturbation sets", "perturbation sets differ.*predict every real perturbation"),
        ("no pert column", "no column 'target_gene'.*pert_col="),
        ("NaN", "NaN/inf.*before scoring"),
        ("inf", "NaN/inf.*before scoring"),
        ("negative", "negative values.*clip"),
        ("raw counts", "integer-valued.*raw counts.*log1p"),
        ("beyond log1p", "beyond the log1p range.*normalise"),
    ],
)
def test_bad_inputs_raise_one_clear_error(realistic, kind, message):
    real, pred = _broken(kind, *realistic)
    with pytest.raises(ValueError, match=message):
        lib.score(real, pred)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("gene order", "gene-order trap"),
        ("no control in pred", "pred: no control cells"),
        ("perturbation sets", "perturbation sets differ"),
        ("raw counts", "integer-valued.*raw counts"),
        ("beyond log1p", "beyond the log1p range"),
        ("negative", "negative values.*clip"),
    ],
)
def test_score_files_bad_input_raises_one_user_error_and_writes_nothing(realistic, tmp_path, kind, message):
    real, pred = _broken(kind, *realistic)
    real.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    out = tmp_path / "scores"
    with pytest.raises(lib.UserError, match=message):
        lib.score_files(tmp_path / "pred.h5ad", tmp_path / "real.h5ad", train_path=tmp_path / "real.h5ad", out_dir=out)
    assert not out.exists()


def test_score_files_refuses_missing_file_and_missing_column(realistic, tmp_path):
    real, pred = realistic
    real.write_h5ad(tmp_path / "real.h5ad")
    with pytest.raises(lib.UserError, match="does not exist"):
        lib.score_files(tmp_path / "nope.h5ad", tmp_path / "real.h5ad")
    with pytest.raises(lib.UserError, match="no column 'guide'.*--pert-col"):
        lib.score_files(tmp_path / "real.h5ad", tmp_path / "real.h5ad", pert_col="guide")


@pytest.mark.parametrize("mode", lib.SCORE_MODES)
def test_score_files_equal_lib_score_for_sparse_dense_and_shuffled_files(realistic, tmp_path, mode):
    """Files on disk (X read a group at a time: CSR with cells in any order, dense X) score
    exactly like lib.score on the same AnnData; the baseline from --train is make_cell_mean_baseline's."""
    real, pred = realistic
    real_csr = real.copy()
    real_csr.X = scipy.sparse.csr_matrix(real.X)
    real_csr.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred_dense.h5ad")  # dense X
    expected = lib.score(real, pred, mode=mode)
    baseline = lib.score(real, lib.make_cell_mean_baseline(real), mode=mode, real_de=expected["real_de"])
    out = lib.score_files(
        tmp_path / "pred_dense.h5ad", tmp_path / "real.h5ad", train_path=tmp_path / "real.h5ad", mode=mode
    )
    for ours, theirs in ((out["result"], expected), (out["baseline"], baseline)):
        pd.testing.assert_frame_equal(ours["per_perturbation"], theirs["per_perturbation"])
    assert out["normalised"] == lib.normalised_score(expected, baseline)


@pytest.mark.parametrize("layout", ["csr", "dense"])
def test_raw_count_score_file_reads_log1p_cp10k_rows_in_blocks(tmp_path, layout):
    """open_score_file(counts="raw") gives each row as log1p(counts / total * 1e4), computed here
    by hand in float64, whatever blocks the rows are read in (blocks of 3 rows, rows skipped)."""
    rng = np.random.default_rng(0)
    counts_cg = rng.poisson(rng.gamma(0.5, 4.0, (20, 30))).astype(np.float32)
    counts_cg[:, 0] += 1  # no empty cell
    x = scipy.sparse.csr_matrix(counts_cg) if layout == "csr" else counts_cg
    labels = np.where(np.arange(20) < 8, "non-targeting", "G1")
    lib.make_anndata(x, labels).write_h5ad(tmp_path / "counts.h5ad")
    expected_cg = np.log1p(counts_cg / counts_cg.sum(1, keepdims=True, dtype=np.float64) * 1e4)
    rows = np.array([0, 1, 2, 5, 6, 7, 11, 19])
    with lib.open_score_file(tmp_path / "counts.h5ad", counts="raw", chunk_cells=3) as score_file:
        got_cg = score_file.x.rows(rows)
    assert got_cg.dtype == np.float32
    np.testing.assert_allclose(got_cg.toarray(), expected_cg[rows], rtol=1e-6, atol=1e-6)
    with lib.open_score_file(tmp_path / "counts.h5ad", counts="log1p") as score_file:
        with pytest.raises(lib.UserError, match="integer-valued"):  # as stored, counts are refused
            lib.check_score_file_values(score_file, which="real")


@pytest.mark.parametrize("mode", lib.SCORE_MODES)
def test_raw_count_files_score_like_the_same_files_normalised_first(tmp_path, mode):
    """--raw-counts real train: scores equal those of the same files normalised by
    lib.normalise_log1p and stored as log1p; without it, integer X is refused naming the flag."""
    rng = np.random.default_rng(1)
    labels = np.repeat([CONTROL, "G0003", "G0007", "G0011"], [60, 20, 20, 20])
    counts_cg = rng.negative_binomial(2.0, 2.0 / (2.0 + rng.lognormal(0.0, 1.5, (labels.size, 50)))).astype(np.float32)
    counts_cg[labels == "G0003", 3] = 0  # a knockdown
    counts_cg[:, 0] += 5  # no empty cell
    genes = np.array([f"G{i:04d}" for i in range(50)])
    raw = lib.make_anndata(scipy.sparse.csr_matrix(counts_cg), labels, gene_names=genes)
    raw.write_h5ad(tmp_path / "raw.h5ad")
    log1p = raw.copy()
    log1p.X = lib.normalise_log1p(raw.X, "raw")
    log1p.write_h5ad(tmp_path / "log1p.h5ad")
    pred = log1p.copy()
    pred.X = scipy.sparse.csr_matrix(np.log1p(np.expm1(log1p.X.toarray()) * rng.uniform(0.8, 1.2, log1p.shape)))
    pred.write_h5ad(tmp_path / "pred.h5ad")
    kwargs = dict(mode=mode, out_dir=None)
    expected = lib.score_files(
        tmp_path / "pred.h5ad", tmp_path / "log1p.h5ad", train_path=tmp_path / "log1p.h5ad", **kwargs
    )
    got = lib.score_files(
        tmp_path / "pred.h5ad",
        tmp_path / "raw.h5ad",
        train_path=tmp_path / "raw.h5ad",
        raw_counts=("real", "train"),
        **kwargs,
    )
    for part in ("result", "baseline"):
        pd.testing.assert_frame_equal(got[part]["per_perturbation"], expected[part]["per_perturbation"])
    assert got["normalised"] == expected["normalised"]
    with pytest.raises(lib.UserError, match="real: X is integer-valued throughout.*--raw-counts real"):
        lib.score_files(tmp_path / "pred.h5ad", tmp_path / "raw.h5ad", **kwargs)
    with pytest.raises(lib.UserError, match="train: X is integer-valued throughout.*--raw-counts train"):
        lib.score_files(tmp_path / "pred.h5ad", tmp_path / "log1p.h5ad", train_path=tmp_path / "raw.h5ad", **kwargs)


def test_bad_real_values_are_refused_by_the_de_pass_before_anything_is_written(realistic, tmp_path):
    """The value checks ride on the DE pass's one read of each file; a bad value in real still
    ends the command with check_expression_matrix's error and no output."""
    real, pred = realistic
    real = real.copy()
    real.X = np.array(real.X)
    real.X[np.flatnonzero(real.obs["target_gene"] == CONTROL)[3], 4] = 15.0  # in the control group
    real.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    with pytest.raises(lib.UserError, match="^real: X reaches 15, beyond the log1p range"):
        lib.score_files(tmp_path / "pred.h5ad", tmp_path / "real.h5ad", out_dir=tmp_path / "scores")
    assert not (tmp_path / "scores").exists()


def test_score_script_runs_the_command_without_marimo_and_leaves_the_notebook_otherwise(
    realistic, tmp_path, monkeypatch
):
    """06's script entry: with --pred, run_score_script does the job (the same tables as
    score_files) and returns True; without it, it returns False and app.run() follows."""
    real, pred = realistic
    real.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    args = f"--pred {tmp_path / 'pred.h5ad'} --real {tmp_path / 'real.h5ad'} --mode current --out {tmp_path / 'out'}"
    monkeypatch.setenv("VCELL_NB_ARGS", args)
    assert lib.run_score_script("06") is True
    expected = lib.score_files(tmp_path / "pred.h5ad", tmp_path / "real.h5ad", mode="current")
    per_pert, _ = lib.results_tables(expected["result"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / "results.csv"), per_pert)
    monkeypatch.setenv("VCELL_NB_ARGS", "--mode current")
    assert lib.run_score_script("06") is False


def test_score_command_skips_marimos_runner_and_plotting_imports(tmp_path):
    """The --pred job starts fast: python -X importtime lists every module the process imported."""
    real, pred = make_realistic_pair(n_genes=30, n_perts=2, n_cells=8, n_control=20)
    real.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    args = ["--pred", str(tmp_path / "pred.h5ad"), "--real", str(tmp_path / "real.h5ad"), "--out", str(tmp_path / "o")]
    run = subprocess.run(
        [sys.executable, "-X", "importtime", *SCORE_COMMAND[1:], *args], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "lib" in imported and "numba" in imported  # what scoring needs
    assert not {"matplotlib", "scanpy", "anndata"} & imported  # marimo's runner imports matplotlib


@pytest.mark.slow  # two processes that import the whole stack
@pytest.mark.parametrize("mode", lib.SCORE_MODES)
def test_score_command_writes_cell_eval_tables_equal_to_lib_score(realistic, tmp_path, mode):
    real, pred = realistic
    real.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    out = tmp_path / "scores"
    args = ["--pred", tmp_path / "pred.h5ad", "--real", tmp_path / "real.h5ad", "--train", tmp_path / "real.h5ad"]
    run = subprocess.run(
        [*SCORE_COMMAND, *map(str, args), "--mode", mode, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = lib.score(real, pred, mode=mode)
    baseline = lib.score(real, lib.make_cell_mean_baseline(real), mode=mode, real_de=expected["real_de"])
    normalised = lib.normalised_score(expected, baseline)
    assert f"normalised score vs cell-mean baseline: {normalised['score']:.4f}" in run.stdout
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == ["perturbation", "overlap_at_N", "mae", "discrimination_score_l1"]
    table = expected["per_perturbation"]
    results = results.set_index("perturbation").loc[table.index]
    for ours, theirs in (("des", "overlap_at_N"), ("pds", "discrimination_score_l1"), ("mae", "mae")):
        np.testing.assert_allclose(results[theirs], table[ours], rtol=1e-15, atol=0)
    agg = pd.read_csv(out / "agg_results.csv").set_index("statistic")
    assert list(agg.index) == ["count", "null_count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    np.testing.assert_allclose(agg.loc["mean", "overlap_at_N"], expected["des"], rtol=1e-15)
    np.testing.assert_allclose(agg.loc["std", "mae"], table["mae"].std(ddof=1), rtol=1e-12)
    scores = pd.read_csv(out / "score.csv").set_index("metric")["from_baseline"]
    assert scores["avg_score"] == pytest.approx(normalised["score"], rel=1e-15)


# ---------------------------------------------------------------- the real cell-eval


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Run both cell-eval generations once, side by side, on a random and a realistic pair."""
    uv = get_uv()
    work = tmp_path_factory.mktemp("cell_eval")
    real, pred = make_realistic_pair()
    real.write_h5ad(work / "real.h5ad")
    pred.write_h5ad(work / "pred.h5ad")
    procs = {}
    for mode, env in REFERENCE_ENVS.items():
        d = work / mode
        d.mkdir()
        jobs = [
            ["random", str(d / "random_real.h5ad"), str(d / "random_pred.h5ad")],
            [str(d / "random_real.h5ad"), str(d / "random_pred.h5ad"), str(d / "random.json")],
            [str(work / "real.h5ad"), str(work / "pred.h5ad"), str(d / "realistic.json")],
        ]
        (d / "jobs.json").write_text(json.dumps(jobs))
        cmd = [
            uv,
            "run",
            "--no-project",
            "--python",
            "3.11",
            *env,
            "python",
            str(REFERENCE_SCRIPT),
            "jobs",
            str(d / "jobs.json"),
        ]
        procs[mode] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = {}
    for mode, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"cell-eval ({mode}) failed:\n{output[-4000:]}"
        d = work / mode
        runs[mode] = {
            "random": (d / "random_real.h5ad", d / "random_pred.h5ad", json.loads((d / "random.json").read_text())),
            "realistic": (work / "real.h5ad", work / "pred.h5ad", json.loads((d / "realistic.json").read_text())),
        }
    return runs


def _assert_de_matches(ours: lib.DifferentialExpression, theirs: dict):
    frame = ours.to_frame().set_index(["target", "feature"])
    index = pd.MultiIndex.from_arrays([theirs["target"], [str(f) for f in theirs["feature"]]])
    assert len(index) == len(frame), "the reference tested a different set of (perturbation, gene) pairs"
    np.testing.assert_allclose(frame.loc[index, "p_value"], theirs["p_value"], rtol=1e-9, atol=0)
    np.testing.assert_allclose(frame.loc[index, "fdr"], theirs["fdr"], rtol=1e-9, atol=0)
    np.testing.assert_array_equal(
        frame.loc[index, "significant"], np.float32(theirs["fdr"]) < np.float32(lib.DE_FDR_THRESHOLD)
    )


def _assert_metrics_match(table: pd.DataFrame, theirs: dict):
    for ours_name, their_name in (("des", "overlap_at_N"), ("pds", "discrimination_score_l1"), ("mae", "mae")):
        expected = pd.Series(theirs[their_name])
        assert sorted(expected.index) == sorted(table.index)
        diff = np.abs(table[ours_name].to_numpy() - expected[table.index].to_numpy()).max()
        assert diff <= 1e-6, f"{ours_name}: max abs diff {diff}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", lib.SCORE_MODES)
@pytest.mark.parametrize("dataset", ["random", "realistic"])
def test_scores_match_cell_eval(reference_runs, mode, dataset):
    real_path, pred_path, theirs = reference_runs[mode][dataset]
    expected_version = {"vcc2025": "0.6.6", "current": "0.8.2"}[mode]
    assert theirs["versions"]["cell-eval"] == expected_version
    real, pred = ad.read_h5ad(real_path), ad.read_h5ad(pred_path)
    result = lib.score(real, pred, mode=mode)
    baseline_ad = lib.make_cell_mean_baseline(real)
    their_baseline = ad.read_h5ad(theirs["baseline_h5ad"])
    is_pert = np.asarray(their_baseline.obs["target_gene"], dtype=str) != CONTROL
    # cell-eval averages group means in polars' (unordered) group order, so float32 ulps differ.
    np.testing.assert_allclose(baseline_ad.X[0], np.asarray(their_baseline.X)[is_pert][0], rtol=1e-6)
    baseline = lib.score(real, baseline_ad, mode=mode, real_de=result["real_de"])

    _assert_de_matches(result["real_de"], theirs["pred_de_real"])
    _assert_de_matches(result["pred_de"], theirs["pred_de_pred"])
    _assert_de_matches(baseline["pred_de"], theirs["baseline_de_pred"])
    _assert_metrics_match(result["per_perturbation"], theirs["pred"])
    _assert_metrics_match(baseline["per_perturbation"], theirs["baseline"])
    normalised = lib.normalised_score(result, baseline)
    for ours_name, their_name in (
        ("s_des", "overlap_at_N"),
        ("s_pds", "discrimination_score_l1"),
        ("s_mae", "mae"),
        ("score", "avg_score"),
    ):
        assert abs(normalised[ours_name] - theirs["normalised"][their_name]) <= 1e-6, ours_name
    if dataset == "realistic":  # the realistic pair must exercise the DE overlap for real
        assert 0 < result["des"] < 1 and result["real_de"].significant_pg.sum() > 50


@pytest.mark.slow
@pytest.mark.parametrize("mode", lib.SCORE_MODES)
@pytest.mark.parametrize("dataset", ["random", "realistic"])
def test_score_command_matches_cell_eval_run_and_score(reference_runs, tmp_path, mode, dataset):
    """The scoring command on the files cell-eval scored: results.csv per perturbation,
    agg_results.csv (cell-eval's `describe` table) and the normalised score against the
    cell-mean baseline (--train = the real file, as the reference builds it)."""
    real_path, pred_path, theirs = reference_runs[mode][dataset]
    out = tmp_path / "scores"
    args = ["--pred", pred_path, "--real", real_path, "--train", real_path, "--mode", mode, "--out", out]
    run = subprocess.run([*SCORE_COMMAND, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for prefix, name in (("", "pred"), ("baseline_", "baseline")):
        results = pd.read_csv(out / f"{prefix}results.csv", dtype={"perturbation": str})
        assert list(results.columns) == theirs[f"{name}_columns"]
        table = results.set_index("perturbation").rename(
            columns={"overlap_at_N": "des", "discrimination_score_l1": "pds"}
        )
        _assert_metrics_match(table, theirs[name])
        agg = pd.read_csv(out / f"{prefix}agg_results.csv")
        their_agg = pd.DataFrame(theirs[f"{name}_agg"])
        assert list(agg.columns) == list(their_agg.columns)
        assert list(agg["statistic"]) == list(their_agg["statistic"])
        np.testing.assert_allclose(agg.iloc[:, 1:].to_numpy(), their_agg.iloc[:, 1:].to_numpy(float), atol=1e-6)
    scores = pd.read_csv(out / "score.csv").set_index("metric")["from_baseline"]
    for metric, value in theirs["normalised"].items():
        assert abs(scores[metric] - value) <= 1e-6, metric


@pytest.mark.slow
@pytest.mark.parametrize("mode", lib.SCORE_MODES)
@pytest.mark.parametrize("dataset", ["random", "realistic"])
def test_cell_mean_predictor_is_what_cell_eval_baseline_builds(reference_runs, mode, dataset):
    """The harness's cell_mean predictor (from per-group sums, as 06/07 fit it) against the
    perturbed rows of cell-eval's own `build_base_mean_adata` on the same cells."""
    real_path, _, theirs = reference_runs[mode][dataset]
    real = ad.read_h5ad(real_path)
    x_cg, labels = np.asarray(real.X, dtype=np.float64), np.asarray(real.obs["target_gene"], dtype=str)
    groups = sorted(set(labels))
    sum_kg = np.stack([x_cg[labels == g].sum(0) for g in groups])
    n_k = np.array([(labels == g).sum() for g in groups])
    perts = [g for g in groups if g != CONTROL]
    fit = lib.make_fit_data(list(real.var_names), groups, sum_kg, n_k, perts, [CONTROL])
    their_baseline = ad.read_h5ad(theirs["baseline_h5ad"])
    their_pert_cg = np.asarray(their_baseline.X)[np.asarray(their_baseline.obs["target_gene"], dtype=str) != CONTROL]
    # cell-eval averages group means in polars' (unordered) group order, so float32 ulps differ.
    np.testing.assert_allclose(
        np.broadcast_to(lib.make_cell_mean_vector(fit), their_pert_cg.shape), their_pert_cg, rtol=1e-6
    )
