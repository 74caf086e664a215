"""Zero-shot mode: the target as a cell type none of whose perturbations were measured (05 and 06 --zero-shot)."""

import dataclasses
import json
import shutil
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest

import lib


@pytest.fixture(scope="module")
def store(tiny_store):
    return lib.load_store(tiny_store, "synthetic")


def _target_raw_labels(data_root) -> tuple[np.ndarray, "lib.TargetFiles"]:
    files = lib.get_target_files(str(data_root), "synthetic")
    obs = anndata.read_h5ad(files.training_path, backed="r").obs
    return obs[files.spec.perturbation_key].astype(str).to_numpy(), files


def test_zero_shot_split_holds_out_every_perturbation_of_the_target_in_the_loader(tiny_store, store):
    target = store.datasets[0]
    examples = lib.make_example_groups(store.index, target_dataset=target, zero_shot=True)
    # From the data, not the index: each store row's source row in the target's raw file, and its label there.
    labels_c, files = _target_raw_labels(tiny_store)
    target_examples = examples[examples["dataset"] == target]
    rows = np.concatenate([np.arange(a, b) for a, b in target_examples[["start", "stop"]].to_numpy()])
    raw_labels = labels_c[store.obs["source_row"].to_numpy()[rows]]
    assert len(rows) and set(raw_labels) == {files.spec.control_label}  # the target's controls only
    assert (~examples["is_control"]).any()  # the context cell types' perturbations are still trained on
    # The batches a zero-shot run draws: every perturbed set comes from another dataset.
    dataset, loader_examples = lib.make_loader(
        store,
        lib.LoaderConfig(set_size=8, sets_per_batch=8),
        vocab=lib.make_vocab(store.index),
        seed=0,
        target_dataset=target,
        zero_shot=True,
    )
    drawn = np.concatenate([dataset[t]["example_b"] for t in range(20)])
    drawn_examples = loader_examples.iloc[drawn]
    assert not (drawn_examples["dataset"].eq(target) & ~drawn_examples["is_control"]).any()


def test_zero_shot_without_context_datasets_is_a_clear_error(store):
    target = store.datasets[0]
    with pytest.raises(lib.UserError, match="context datasets"):
        lib.make_example_groups(store.index, datasets=(target,), target_dataset=target, zero_shot=True)


def test_zero_shot_harness_fits_on_the_target_controls_only(tiny_store):
    out = lib.run_eval(
        lib.EvalConfig(
            data_root=str(tiny_store),
            n_control=100,
            max_cells_per_pert=40,
            truth=False,
            checkpoint="none",
            zero_shot=True,
            predictors=("cell_mean", "linear"),
        )
    )
    results = out["results"]
    assert set(results["scenario"]) == {"zero_shot_fake_val", "zero_shot_fake_test"}
    assert set(results["predictor"]) == {"cell_mean"}  # linear regresses on target effects: skipped
    assert set(results["fit_on"]) == {"target_controls"}
    # Independently, from the raw file: the target's control cells outside the `real` pool, log1p CP10K.
    labels_c, files = _target_raw_labels(tiny_store)
    pools = pd.read_csv(next(lib.get_eval_dir(str(tiny_store), "synthetic").glob("control_pool_seed0_n*.csv")))
    adata = anndata.read_h5ad(files.training_path)
    fit_cells = (labels_c == files.spec.control_label) & ~adata.obs_names.isin(
        pools.loc[pools["pool"] == "real", "cell_id"]
    )
    counts_cg = np.asarray(adata.X[fit_cells].todense(), np.float64)
    control_mean_g = np.log1p(counts_cg / counts_cg.sum(1, keepdims=True) * 1e4).mean(0)
    for fit in out["fits"].values():
        assert fit.perturbations == [] and fit.n_control == fit_cells.sum()
        np.testing.assert_allclose(fit.control_mean_g, control_mean_g, rtol=1e-5, atol=1e-6)
    # Scored on the same held-out perturbations as the standard harness.
    per_pert = out["per_perturbation"]
    for part in ("val", "test"):
        scored = set(per_pert.loc[per_pert["scenario"] == f"zero_shot_fake_{part}", "perturbation"])
        assert scored == set(out["split"][part])


class _RowSpy:
    """A store matrix that records the rows read from it."""

    def __init__(self, x_cg):
        self.x_cg, self.shape, self.rows = x_cg, x_cg.shape, []

    def __getitem__(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        self.rows.append(np.arange(self.shape[0])[rows])
        return self.x_cg[key]


def test_context_knockdown_fraction_never_reads_a_target_cell_and_finds_the_knockdown(store):
    target = store.datasets[0]
    spy = _RowSpy(store.x_cg)
    remaining = lib.fit_context_knockdown_fraction(dataclasses.replace(store, x_cg=spy), target)
    in_target = store.index[store.index["dataset"] == target]
    target_rows = np.concatenate([np.arange(a, b) for a, b in in_target[["start", "stop"]].to_numpy()])
    assert spy.rows and not np.isin(np.concatenate(spy.rows), target_rows).any()
    assert 0.0 < remaining < 0.9  # CRISPRi knocks the target gene down in the context cell types too


@pytest.mark.slow
def test_zero_shot_run_writes_a_checkpoint_that_06_scores_in_the_zero_shot_scenario(tiny_store, tmp_path):
    tiny = dict(hidden=32, n_layers=1, n_heads=2, mlp_ratio=2, set_size=8, sets_per_batch=4, log_every=5)
    tiny |= dict(val_perturbations=4, val_cells=16, val_control_cells=32, n_coexpr_components=4, n_effect_components=4)
    cfg = lib.make_config(
        lib.TrainConfig,
        data_root=str(tiny_store),
        checkpoint_dir=str(tmp_path / "ckpt"),
        wandb_mode="disabled",
        run_name="zs",
        steps=20,
        eval_every=20,
        ckpt_every=0,
        zero_shot=True,
        **tiny,
    )
    zero_shot = lib.run_train(cfg)
    assert lib.load_checkpoint(lib.resolve_checkpoint(zero_shot["run_dir"], "best"))["cfg"].zero_shot
    eval_args = ["--data-root", str(tiny_store), "--n-control", "100", "--max-cells-per-pert", "40", "--no-truth"]
    eval_args += ["--predictors", "cell_mean"]  # and the model: the fewest predictors to score
    run = subprocess.run(
        [sys.executable, "nb/06_eval.py", *eval_args, "--zero-shot", "--checkpoint", zero_shot["run_dir"]],
        cwd=lib.REPO_DIR,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = pd.read_csv(lib.get_eval_dir(str(tiny_store), "synthetic") / "results_zero_shot.csv")
    model = results[results["predictor"] == "model"]
    assert set(model["scenario"]) == {"zero_shot_fake_val", "zero_shot_fake_test"}
    assert set(model["fit_on"]) == {"target_controls"} and np.isfinite(model["score"]).all()
    # A model trained on the target's perturbations is not zero-shot: refused, in one line. (The same
    # run with its config saying so: a second training run would double this test's time.)
    not_zero_shot = tmp_path / "not_zs"
    shutil.copytree(zero_shot["run_dir"], not_zero_shot)
    for config_path in not_zero_shot.glob("step_*/config.json"):
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "zero_shot": False}))
    with pytest.raises(lib.UserError, match="trained on the target's perturbations"):
        lib.run_eval(
            lib.EvalConfig(
                data_root=str(tiny_store),
                n_control=100,
                max_cells_per_pert=40,
                truth=False,
                zero_shot=True,
                checkpoint=str(not_zero_shot),
            )
        )
