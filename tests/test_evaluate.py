import dataclasses
import shutil

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

import lib


def _eval_cfg(data_root, **kw):
    return lib.EvalConfig(data_root=str(data_root), n_control=100, max_cells_per_pert=40, **kw)


@pytest.fixture(scope="module")
def baseline_run(tiny_store):
    return lib.run_eval(_eval_cfg(tiny_store, truth=False, predictors=("control", "cell_mean", "pert_mean_transfer")))


def test_harness_normalises_against_cell_mean_and_control_scores_about_zero(baseline_run):
    results = baseline_run["results"].set_index(["scenario", "predictor"])
    assert set(results["mode"]) == {"vcc2025"}
    predictors = [p for p in results.index.get_level_values("predictor").unique() if p != "cell_mean"]
    for scenario in ("fake_val", "fake_test"):
        base = results.loc[(scenario, "cell_mean")]
        assert base["des"] < 1 and base["pds"] < 1 and base["mae"] > 0  # no division by zero below
        for name in predictors:  # cell-eval's normalisation, by hand, against the same scenario's cell_mean row
            row = results.loc[(scenario, name)]
            s_des = max((row["des"] - base["des"]) / (1 - base["des"]), 0)
            s_pds = max((row["pds"] - base["pds"]) / (1 - base["pds"]), 0)
            s_mae = max(1 - row["mae"] / base["mae"], 0)
            np.testing.assert_allclose(
                row[["s_des", "s_pds", "s_mae", "score"]].to_numpy(float),
                [s_des, s_pds, s_mae, (s_des + s_pds + s_mae) / 3],
                rtol=1e-12,
            )
        control = results.loc[(scenario, "control")]
        assert control["score"] < 0.1
        assert control["des"] < 0.05  # no effect predicted: (almost) no DE genes found
    assert (results.loc[(slice(None), predictors), ["s_des", "s_pds", "s_mae"]].to_numpy() > 0).any(), (
        "all zero: the by-hand check above would not tell the baselines apart"
    )


def test_fake_val_split_excludes_held_out_perturbations_everywhere(tiny_store, monkeypatch):
    fits, scored = [], {}
    make_fit_data, score_predictors = lib.make_fit_data, lib.score_predictors

    def spy_fit(*args, **kwargs):
        fits.append(args[4])
        return make_fit_data(*args, **kwargs)

    def spy_score(real, predictors, pool, **kwargs):
        scored[len(scored)] = set(np.asarray(real.obs["target_gene"], str))
        return score_predictors(real, predictors, pool, **kwargs)

    monkeypatch.setattr(lib, "make_fit_data", spy_fit)
    monkeypatch.setattr(lib, "score_predictors", spy_score)
    out = lib.run_eval(_eval_cfg(tiny_store, truth=False, predictors=("cell_mean", "linear")))
    split = out["split"]
    held_out = set(split["val"]) | set(split["test"])
    assert held_out and len(fits) == 2
    for fit_perts in fits:  # the baselines never see a held-out perturbation
        assert set(fit_perts) == set(split["train"]) and not set(fit_perts) & held_out
    assert scored[0] - {"non-targeting"} == set(split["val"]) and scored[1] - {"non-targeting"} == set(split["test"])
    pools = pd.read_csv(next(lib.get_eval_dir(str(tiny_store), "synthetic").glob("control_pool_seed0_n*.csv")))
    real_ids, pred_ids = (set(pools.loc[pools["pool"] == p, "cell_id"]) for p in ("real", "pred"))
    assert real_ids and pred_ids and not real_ids & pred_ids  # predictions never see a real control


def test_harness_is_deterministic(tiny_store, baseline_run):
    shutil.rmtree(lib.get_eval_dir(str(tiny_store), "synthetic"))  # the pools are drawn again, from the seed
    again = lib.run_eval(_eval_cfg(tiny_store, truth=False, predictors=("control", "cell_mean", "pert_mean_transfer")))
    pd.testing.assert_frame_equal(again["results"], baseline_run["results"])
    pd.testing.assert_frame_equal(again["per_perturbation"], baseline_run["per_perturbation"])


def _toy_store(tmp_path, effect_h, n_hvg=6):
    """Two other cell types sharing one effect of perturbation P on 6 HVGs; the target has 9 genes."""
    rng = np.random.default_rng(0)
    rows, index = [], []
    for dataset in ("t", "a", "b"):
        base_h = rng.uniform(1, 3, n_hvg)
        for pert, n in (("non-targeting", 50), ("P", 20), ("Q", 10)):
            if dataset == "t" and pert != "non-targeting":
                continue
            shift_h = effect_h if pert == "P" else 0.0
            start = sum(len(r) for r in rows)
            rows.append(base_h + shift_h + rng.normal(0, 0.01, (n, n_hvg)))
            index.append(
                dict(
                    dataset=dataset,
                    cell_type=dataset,
                    batch="",
                    perturbation=pert,
                    is_control=pert == "non-targeting",
                    start=start,
                    stop=start + n,
                    n_cells=n,
                )
            )
    x_cg = np.concatenate(rows).astype(np.float32)
    ids = [f"ENSG{i:011d}" for i in range(9)]
    symbols = ["P", "Q", "R", "S", "T", "U", "V", "W", "X"]
    hvg_ids = ids[3:]  # the target's genes 3..8 are the HVGs
    means = pd.concat(
        [
            pd.DataFrame(
                {
                    "dataset": d,
                    "cell_type": d,
                    "ensembl_id": ids,
                    "symbol": symbols,
                    "var_name": symbols,
                    "mean_all": 1.0,
                    "mean_control": 1.0,
                }
            )
            for d in ("t", "a", "b")
        ]
    )
    return lib.CellStore(
        store_dir=tmp_path,
        x_cg=x_cg,
        index=pd.DataFrame(index),
        obs=pd.DataFrame({"group": np.zeros(len(x_cg), int)}),
        genes=pd.DataFrame({"ensembl_id": hvg_ids, "symbol": symbols[3:]}),
        measured_dg=np.ones((3, n_hvg), bool),
        datasets=["t", "a", "b"],
        means=means,
        meta={},
    ), symbols


def test_pert_mean_transfer_recovers_an_effect_shared_across_cell_types(tmp_path):
    effect_h = np.array([1.0, -0.5, 0.0, 0.3, 0.0, -1.2])
    store, symbols = _toy_store(tmp_path, effect_h)
    target_genes = lib.get_target_gene_table(store, "t", symbols)
    transfer = lib.TransferEffects(store, "t", target_genes)
    np.testing.assert_allclose(transfer.effect("P")[3:], effect_h, atol=0.02)
    assert np.all(transfer.effect("P")[:3] == 0)  # genes outside the HVGs: no effect
    np.testing.assert_allclose(transfer.effect("Q"), 0, atol=0.02)
    assert np.all(transfer.effect("R") == 0)  # measured in no other cell type: no effect


def test_linear_baseline_is_exact_on_noise_free_linear_data():
    rng = np.random.default_rng(0)
    n_genes, k = 60, 4
    genes = [f"G{i}" for i in range(n_genes)]
    g0_gk = rng.normal(size=(n_genes, k))
    train, test = list(range(0, 30)), list(range(30, 40))
    g0_gk[train] -= g0_gk[train].mean(0)  # the model's b is the mean training effect: make the true one exactly that
    w0_kk, b0_g = rng.normal(size=(k, k)), rng.normal(size=n_genes)
    effect_pg = (g0_gk @ w0_kk @ g0_gk.T).T + b0_g  # row p: effect of knocking down gene p
    model = lib.fit_linear_model(genes, effect_pg[train], [genes[i] for i in train], n_components=k, ridge=1e-9)
    for i in test:  # unseen perturbations, embedded by their gene's row
        np.testing.assert_allclose(model.effect(genes[i]), effect_pg[i], atol=1e-6)


class _HvgShift:
    def predict(self, perturbation, ctrl_cv):
        return ctrl_cv + 1.0


def test_hvg_adapter_fills_the_other_genes():
    ctrl_cg = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    cols = np.array([2, 0])
    kept = lib.HvgAdapter(_HvgShift(), ["a", "b", "c", "d"], cols, "control").predict("p", ctrl_cg)
    np.testing.assert_allclose(kept[:, [1, 3]], ctrl_cg[:, [1, 3]])
    np.testing.assert_allclose(kept[:, cols], ctrl_cg[:, cols] + 1)
    mean_g = np.array([5, 6, 7, 8], np.float32)
    filled = lib.HvgAdapter(_HvgShift(), ["a", "b", "c", "d"], cols, "mean", mean_g).predict("p", ctrl_cg)
    assert np.all(filled[:, [1, 3]] == mean_g[[1, 3]])


@pytest.fixture(scope="module")
def submission(tiny_store):
    cfg = lib.SubmitConfig(data_root=str(tiny_store), predictor="linear", fixed_pseudobulk=True, chunk_cells=64)
    return cfg, lib.run_submit(cfg)


def test_submission_matches_pert_counts_gene_names_and_is_scored(tiny_store, submission):
    cfg, out = submission
    files = lib.get_target_files(str(tiny_store), "synthetic")
    adata = anndata.read_h5ad(out["h5ad"])
    assert list(adata.var_names) == lib.read_gene_names(files.gene_names_path)
    pert_counts = lib.read_pert_counts(files.pert_counts_paths["validation"])
    counts = adata.obs["target_gene"].value_counts()
    assert counts.drop("non-targeting").sort_index().to_dict() == dict(
        sorted(zip(pert_counts["target_gene"], pert_counts["n_cells"]))
    )
    assert counts["non-targeting"] == out["n_control"] > 0
    assert out["vcc"].exists() and out["score"]["normalised"]["mode"] == "vcc2025"
    # The score is this file's against the truth file: its MAE, recomputed here from the two files.
    assert files.spec.counts == "raw"
    truth = anndata.read_h5ad(files.truth_paths["validation"])
    truth_cg = truth.X.toarray() if hasattr(truth.X, "toarray") else np.asarray(truth.X)
    truth_cg = np.log1p(truth_cg / truth_cg.sum(1, keepdims=True) * 1e4)
    pred_cg, pred_labels = adata.X.toarray(), np.asarray(adata.obs["target_gene"], str)
    truth_labels = np.asarray(truth.obs[files.spec.perturbation_key], str)
    perts = sorted(set(truth_labels) - {files.spec.control_label})
    mae_p = [np.abs(pred_cg[pred_labels == p].mean(0) - truth_cg[truth_labels == p].mean(0)).mean() for p in perts]
    np.testing.assert_allclose(out["score"]["result"]["mae"], np.mean(mae_p), rtol=1e-5)


def _in_memory_submission_scores(data_root, h5ad_path, n_control: int, mode: str):
    """What 07 scored before it streamed, rebuilt here from whole files in memory: the truth
    normalised at once, the submission read whole, and the cell-mean baseline as one AnnData
    (every predicted cell m = mean over the training groups of each group's mean, perturbations
    sorted then the control as 07's fit orders them; as controls the submission's own, which are
    the pool's first n_control cells). Also returns 07's fit inputs for a direct call."""
    files = lib.get_target_files(str(data_root), "synthetic")
    spec, gene_names = files.spec, lib.read_gene_names(files.gene_names_path)

    def log1p_of(path):
        adata = anndata.read_h5ad(path)
        x_cg = lib.normalise_log1p(scipy.sparse.csr_matrix(adata.X, dtype=np.float32), spec.counts)
        return scipy.sparse.csr_matrix(x_cg), np.asarray(adata.obs[spec.perturbation_key], str)

    truth_cg, truth_labels = log1p_of(files.truth_paths["validation"])
    real = lib.make_anndata(truth_cg, truth_labels, gene_names)
    pred = anndata.read_h5ad(h5ad_path)
    train_cg, train_labels = log1p_of(files.training_path)
    is_ctrl = train_labels == spec.control_label
    group_labels = [*sorted(set(train_labels[~is_ctrl])), "control"]
    group_c = np.where(is_ctrl, "control", train_labels)
    # float64 sums (scipy's sum(dtype=float64) of a float32 matrix accumulates in float32)
    sum_kg = np.stack([np.asarray(train_cg[group_c == g].astype(np.float64).sum(0)).ravel() for g in group_labels])
    n_k = np.array([(group_c == g).sum() for g in group_labels])
    cell_mean_g = lib.mean_of_group_means((sum_kg / n_k[:, None]).astype(np.float32))
    pred_labels = np.asarray(pred.obs["target_gene"], str)
    perts, counts = np.unique(pred_labels[pred_labels != spec.control_label], return_counts=True)
    assert (pred_labels == spec.control_label).sum() == n_control
    controls_cg = pred.X[pred_labels == spec.control_label].toarray()
    baseline_x = np.concatenate([np.tile(cell_mean_g, (counts.sum(), 1)), controls_cg])
    baseline = lib.make_anndata(
        scipy.sparse.csr_matrix(baseline_x),
        np.concatenate([np.repeat(perts, counts), np.full(n_control, spec.control_label)]),
        gene_names,
    )
    result = lib.score(real, pred, mode=mode, control_label=spec.control_label)
    baseline_result = lib.score(real, baseline, mode=mode, control_label=spec.control_label)
    fit_inputs = (gene_names, group_labels, sum_kg, n_k, group_labels[:-1], ["control"])
    return {
        "result": result,
        "baseline": baseline_result,
        "normalised": lib.normalised_score(result, baseline_result),
    }, fit_inputs


def _assert_same_scores(streamed, in_memory):
    for side in ("result", "baseline"):
        for metric in ("des", "pds", "mae"):
            assert streamed[side][metric] == in_memory[side][metric], (side, metric)
        pd.testing.assert_frame_equal(streamed[side]["per_perturbation"], in_memory[side]["per_perturbation"])
    assert streamed["normalised"] == in_memory["normalised"]


@pytest.mark.parametrize("mode", ["vcc2025", "current"])
def test_streamed_submission_score_equals_in_memory_score(tiny_store, submission, mode):
    cfg, out = submission
    in_memory, fit_inputs = _in_memory_submission_scores(tiny_store, out["h5ad"], out["n_control"], mode)
    if mode == cfg.mode:  # 07 itself (run_submit), with its own fit and pool
        _assert_same_scores(out["score"], in_memory)
    files = lib.get_target_files(str(tiny_store), "synthetic")
    pool = lib.ControlPool(out["h5ad"].parent / f"control_pool_seed{cfg.seed}_n{out['n_control']}_x.npy")
    # blocks of 16 rows: groups (and the controls) span several normalised / pool blocks
    small_blocks = dataclasses.replace(cfg, mode=mode, chunk_cells=16)
    streamed = lib.score_submission(
        out["h5ad"],
        files.truth_paths["validation"],
        files.spec,
        fit_inputs[0],
        lib.make_fit_data(*fit_inputs),
        pool,
        out["n_control"],
        small_blocks,
    )
    _assert_same_scores(streamed, in_memory)


def test_fixed_pseudobulk_gives_identical_cells_within_a_perturbation(submission):
    adata = anndata.read_h5ad(submission[1]["h5ad"])
    x_cg = adata.X.toarray()
    labels = np.asarray(adata.obs["target_gene"], str)
    for p in np.unique(labels[labels != "non-targeting"]):
        rows = x_cg[labels == p]
        assert np.all(rows == rows[0])
    assert not np.all(x_cg[labels == "non-targeting"] == x_cg[labels == "non-targeting"][0])


class _Constant:
    def __init__(self, genes, value=1.0):
        self.gene_names, self.value = list(genes), value

    def predict(self, perturbation, ctrl_cg):
        return np.full((len(ctrl_cg), len(self.gene_names)), self.value, np.float32)


@pytest.mark.parametrize(
    "kind, message", [("order", "gene-order trap"), ("unknown", "unknown perturbations"), ("nan", "NaN")]
)
def test_bad_submission_raises_one_clear_error_before_writing(tmp_path, kind, message):
    genes = [f"G{i}" for i in range(8)]
    pool_path, _ = lib.write_dense_rows_npy(tmp_path / "pool.npy", 10, len(genes))
    pert_counts = pd.DataFrame({"target_gene": ["G1", "G2"], "n_cells": [3, 4]})
    predictor = _Constant(genes)
    if kind == "order":
        predictor = _Constant(genes[::-1])
    elif kind == "unknown":
        pert_counts.loc[1, "target_gene"] = "NOTAGENE"
    else:
        predictor = _Constant(genes, np.nan)
    out = tmp_path / "sub.h5ad"
    with pytest.raises(ValueError, match=message):
        lib.write_predictor_submission(
            out, predictor, gene_names=genes, pert_counts=pert_counts, pool=lib.ControlPool(pool_path), n_control=5
        )
    assert not out.exists() and not list(tmp_path.glob(".sub.h5ad*"))


def test_exact_mean_cells_reproduce_the_predicted_pseudobulk():
    rng = np.random.default_rng(0)
    ctrl_cg = (rng.random((200, 50)) < 0.6) * rng.gamma(2.0, 0.5, (200, 50))  # log1p-like: many zeros
    target_g = ctrl_cg.mean(axis=0) + rng.normal(0.0, 0.6, 50)  # some columns need clipping, some a negative target
    cells = lib.shift_to_mean(ctrl_cg.astype(np.float32), target_g)
    assert cells.dtype == np.float32 and cells.min() >= 0
    np.testing.assert_allclose(cells.mean(axis=0, dtype=np.float64), np.maximum(target_g, 0), rtol=1e-6, atol=1e-6)
    for g in range(50):  # every column is one shift of the control column, clipped at 0
        on = cells[:, g] > 0
        if on.any():
            shift = cells[on, g] - ctrl_cg[on, g]
            np.testing.assert_allclose(shift, shift[0], atol=1e-5)
            assert np.all(ctrl_cg[~on, g] + shift[0] <= 1e-5)


def test_effect_baseline_cells_have_the_pseudobulk_as_mean_in_the_harness(tmp_path):
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(40)]
    pool_x = ((rng.random((300, 40)) < 0.5) * rng.gamma(2.0, 0.5, (300, 40))).astype(np.float32)
    np.save(tmp_path / "pool.npy", pool_x)
    pool = lib.ControlPool(tmp_path / "pool.npy")
    control_mean = pool_x.mean(axis=0) + rng.normal(0, 0.05, 40).astype(
        np.float32
    )  # the training controls, not the pool
    effects = {p: rng.normal(0, 0.4, 40) for p in ("P1", "P2")}
    predictor = lib.EffectPredictor(genes, effects.__getitem__, control_mean_g=control_mean, exact_mean=True)
    plan = lib.make_prediction_plan([("P1", 230), ("P2", 57)], pool.n_cells, np.arange(10), seed=0)
    rows = lib.make_prediction_rows(predictor, plan, pool, block_cells=100)  # P1 spans blocks
    x = rows.rows(np.arange(len(plan.labels_c))).toarray()
    for p in ("P1", "P2"):
        mean_g = x[plan.labels_c == p].mean(axis=0, dtype=np.float64)
        np.testing.assert_allclose(mean_g, np.maximum(control_mean + effects[p], 0), rtol=1e-5, atol=1e-6)


def test_prediction_rows_read_in_any_runs_equal_the_whole_prediction(tmp_path):
    rng = np.random.default_rng(3)
    pool_x = rng.gamma(1.0, 0.5, (50, 12)).astype(np.float32)
    np.save(tmp_path / "pool.npy", pool_x)
    pool = lib.ControlPool(tmp_path / "pool.npy")
    effects = {p: rng.normal(0, 0.3, 12) for p in ("A", "B")}
    predictor = lib.EffectPredictor([f"G{i}" for i in range(12)], effects.__getitem__)
    plan = lib.make_prediction_plan([("A", 23), ("B", 9)], pool.n_cells, np.arange(7), seed=0)
    whole = lib.make_predict_chunk(predictor, plan, pool)(0, len(plan.labels_c))
    rows = lib.make_prediction_rows(predictor, plan, pool, block_cells=4)
    for picked in (np.arange(39), np.array([0, 1, 2, 5, 6, 20, 21, 22, 23, 38]), np.array([17]), np.array([], int)):
        np.testing.assert_array_equal(rows.rows(picked).toarray(), whole[picked])


def _fit_with_knockdown(remaining_p):
    genes = [f"G{i}" for i in range(30)]
    control_mean = np.linspace(0.5, 2.0, 30)
    perts = [f"G{i}" for i in range(len(remaining_p))]
    pert_mean = np.tile(control_mean, (len(perts), 1))
    for i, r in enumerate(remaining_p):
        pert_mean[i, i] = r * control_mean[i]
    return lib.FitData(genes, perts, pert_mean, np.full(len(perts), 100), control_mean, 500)


def test_knockdown_fraction_is_learned_from_training_perturbations():
    remaining = [0.2, 0.5, 0.35, 0.9, 0.1]
    assert lib.fit_knockdown_fraction(_fit_with_knockdown(remaining)) == pytest.approx(np.median(remaining))


def test_knockdown_is_applied_by_every_effect_baseline_and_the_model_wrapper():
    fit = _fit_with_knockdown([0.2, 0.5, 0.35, 0.9, 0.1])
    rng = np.random.default_rng(2)
    ctrl_cg = rng.gamma(3.0, 0.5, (250, 30)).astype(np.float32)
    for name in ("linear",):
        pred = lib.make_baseline_predictor(name, fit).predict("G20", ctrl_cg)  # an unseen perturbation
        assert pred[:, 20].mean() == pytest.approx(0.35 * fit.control_mean_g[20], rel=1e-5)
        unknocked = lib.make_baseline_predictor(name, fit, knockdown=False).predict("G20", ctrl_cg)
        assert unknocked[:, 20].mean() > 0.9 * fit.control_mean_g[20]
    wrapped = lib.KnockdownPredictor(lib.ControlPredictor(fit.gene_names), 0.35, fit.control_mean_g)
    pred = wrapped.predict("G20", ctrl_cg)
    assert pred[:, 20].mean() == pytest.approx(0.35 * fit.control_mean_g[20], rel=1e-5)
    np.testing.assert_array_equal(np.delete(pred, 20, axis=1), np.delete(ctrl_cg, 20, axis=1))


def _transfer_world(seed=0, n_genes=80, n_perts=40):
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    transfer = {g: rng.normal(0, 1, n_genes) * (rng.random() < 0.8) for g in genes}
    # The target's effect: 0.7 × the other cell types' plus a low-rank part of its own.
    own_gk = rng.normal(0, 0.3, (n_genes, 3))
    effect = {g: 0.7 * transfer[g] + own_gk @ rng.normal(0, 1, 3) for g in genes}
    return genes, transfer, effect


def test_linear_transfer_cv_never_reads_held_out_perturbations():
    genes, transfer, effect = _transfer_world()
    train, held_out = genes[:40], genes[40:]
    y = np.stack([effect[p] for p in train])
    asked = []
    model = lib.fit_linear_transfer_model(genes, y, train, lambda p: asked.append(p) or transfer[p])
    assert set(asked) <= set(train)
    # Held-out perturbations' transfer effects changed: the same hyper-parameters and weights.
    changed = {**transfer, **{p: -5 * transfer[p] + 1 for p in held_out}}
    other = lib.fit_linear_transfer_model(genes, y, train, changed.__getitem__)
    assert other.chosen == model.chosen
    np.testing.assert_array_equal(other.w_kf, model.w_kf)


def test_linear_transfer_predicts_unseen_perturbations_from_other_cell_types():
    genes, transfer, effect = _transfer_world()
    train, held_out = genes[:40], genes[40:]
    y = np.stack([effect[p] for p in train])
    model = lib.fit_linear_transfer_model(genes, y, train, transfer.__getitem__)
    plain = lib.fit_linear_model(genes, y, train)

    def err(m):
        return np.mean([np.mean((m.effect(p) - effect[p]) ** 2) for p in held_out])

    assert model.chosen["gain_shrink"] > 0
    assert err(model) < 0.5 * err(plain)
