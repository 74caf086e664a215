"""Training: features, config, loop, checkpoints, resume, SIGTERM, wandb, inference (tiny world, CPU).

The one-batch overfit check lives in test_model.py (test_one_batch_overfits_to_zero_pseudobulk_mse).
"""

import dataclasses
import json
import pathlib
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lib

# Tiny shapes shared by every run here, so the jitted step compiles once per optimizer setting.
TINY = dict(
    wandb_mode="disabled",
    hidden=32,
    n_layers=1,
    n_heads=2,
    mlp_ratio=2,
    set_size=8,
    sets_per_batch=4,
    log_every=5,
    eval_every=0,
    ckpt_every=0,
    val_perturbations=4,
    val_cells=16,
    val_control_cells=32,
    n_coexpr_components=4,
    n_effect_components=4,
    warmup_steps=5,
    schedule="constant",
    learning_rate=3e-3,
)


def tiny_cfg(data_root, ckpt_dir, **kw) -> "lib.TrainConfig":
    return lib.make_config(lib.TrainConfig, data_root=str(data_root), checkpoint_dir=str(ckpt_dir), **{**TINY, **kw})


@pytest.fixture(scope="module")
def store(tiny_store):
    return lib.load_store(tiny_store, "synthetic")


@pytest.fixture(scope="module")
def trained(tiny_store, tmp_path_factory):
    """One validated, checkpointed run with wandb offline, shared by the tests that read a run."""
    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_cfg(
        tiny_store,
        ckpt_dir,
        steps=300,
        eval_every=100,
        ckpt_every=100,
        keep_last_n=1,
        wandb_mode="offline",
        val_cells=64,
        val_control_cells=64,
    )
    return cfg, lib.run_train(cfg)


# ---------------------------------------------------------------- features


def _target_perturbations(store):
    index = store.index
    return index.loc[(index["dataset"] == store.datasets[0]) & ~index["is_control"], "perturbation"].unique()


def test_gene_features_never_read_target_perturbation_cells(store):
    vocab = lib.make_vocab(store.index)
    features = lib.make_pert_features(store, vocab, "gene", n_coexpr_components=4, n_effect_components=4)
    # Remove every perturbed group of the target from the index: nothing may change.
    index = store.index
    keep = ~((index["dataset"] == store.datasets[0]) & ~index["is_control"])
    blind = lib.make_pert_features(
        dataclasses.replace(store, index=index[keep]), vocab, "gene", n_coexpr_components=4, n_effect_components=4
    )
    np.testing.assert_array_equal(features.table_dpf, blind.table_dpf)
    # ... while it would change if the target's controls changed (the check is not vacuous).
    shuffled = dataclasses.replace(
        store, x_cg=np.asarray(store.x_cg)[:, np.random.default_rng(0).permutation(store.x_cg.shape[1])]
    )
    assert not np.array_equal(
        lib.make_pert_features(shuffled, vocab, "gene", n_coexpr_components=4, n_effect_components=4).table_dpf,
        features.table_dpf,
    )


def test_gene_features_leave_the_examples_own_dataset_out(store):
    vocab = lib.make_vocab(store.index)
    features = lib.make_pert_features(store, vocab, "gene", n_coexpr_components=4, n_effect_components=4)
    index = store.index[~store.index["is_control"]]
    datasets_of = index.groupby("perturbation")["dataset"].agg(set)
    only_k562 = [p for p, ds in datasets_of.items() if ds == {"synthetic_k562"}]
    assert only_k562, "tiny world has no K562-only perturbation"
    p = int(vocab.ids(only_k562[:1])[0])
    k562, target = store.datasets.index("synthetic_k562"), 0
    has_effect = lib.FEATURE_FLAGS.index("has_effect")
    assert features.table_dpf[k562, p, has_effect] == 0 and not features.table_dpf[k562, p, -4:].any()
    assert features.table_dpf[target, p, has_effect] == 1 and features.table_dpf[target, p, -4:].any()


def test_direct_effect_tail_is_the_other_cell_types_mean_effect_and_the_target(store):
    """The gene-space tail for the target's row of a K562-only perturbation is K562's pseudobulk
    effect (mean perturbed - mean control, computed here from the store directly); the K562
    row itself (its own dataset left out) has none. Then the perturbed gene's indicator."""
    vocab = lib.make_vocab(store.index)
    features = lib.make_pert_features(
        store, vocab, "gene", n_coexpr_components=4, n_effect_components=4, direct_effect=True
    )
    n_genes = store.x_cg.shape[1]
    assert features.n_direct == 2 * n_genes and features.width == len(lib.FEATURE_FLAGS) + 8 + 2 * n_genes
    index = store.index[store.index["dataset"] == "synthetic_k562"]
    only_k562 = [
        p
        for p, ds in store.index[~store.index["is_control"]].groupby("perturbation")["dataset"].agg(set).items()
        if ds == {"synthetic_k562"}
    ]
    p = int(vocab.ids(only_k562[:1])[0])

    def mean_of(groups):
        return np.concatenate([np.asarray(store.x_cg[a:b]) for a, b in groups[["start", "stop"]].to_numpy()]).mean(0)

    want_g = mean_of(index[index["perturbation"] == only_k562[0]]) - mean_of(index[index["is_control"]])
    k562 = store.datasets.index("synthetic_k562")
    np.testing.assert_allclose(features.table_dpf[0, p, -2 * n_genes : -n_genes], want_g, atol=1e-5)
    assert not features.table_dpf[k562, p, -2 * n_genes : -n_genes].any()
    # ... and the last n_genes columns flag the perturbed gene itself, in every dataset's row.
    symbols = store.genes["symbol"].astype(str).tolist()
    measured = [label for label in vocab.labels[2:] if label in symbols]
    assert measured, "no perturbed gene among the tiny store's genes"
    for label in measured[:5]:
        want_target_g = np.eye(n_genes)[symbols.index(label)]
        got_dg = features.table_dpf[:, int(vocab.ids([label])[0]), -n_genes:]
        np.testing.assert_array_equal(got_dg, np.broadcast_to(want_target_g, got_dg.shape))


def test_unseen_target_perturbations_are_not_blind_with_gene_features(store):
    vocab = lib.make_vocab(store.index)
    features = lib.make_pert_features(store, vocab, "gene", n_coexpr_components=4, n_effect_components=4)
    held_out = lib.make_fake_val_split(_target_perturbations(store))["test"]
    rows_pf = features.get_target(vocab.ids(held_out))
    informative = rows_pf[:, 2:4].max(1) > 0  # has co-expression or another cell type's effect
    assert informative.mean() > 0.5, rows_pf[:, 2:4]
    # Different perturbations get different rows (identity is not lost either).
    assert len(np.unique(rows_pf[informative], axis=0)) == informative.sum()
    # Control (id 0) and OOV (id 1) are flagged, out-of-range ids raise.
    np.testing.assert_array_equal(features.get_target(np.array([0, 1]))[:, :2], np.eye(2))
    with pytest.raises(IndexError):
        features.get_target(np.array([len(vocab)]))


# ---------------------------------------------------------------- config


def test_flag_overrides_toml_even_when_equal_to_the_default(tmp_path):
    default = lib.TrainConfig()
    toml = tmp_path / "run.toml"
    toml.write_text(
        'learning_rate = 0.05\nhidden = 32\nn-heads = 2\ndatasets = ["synthetic_h1"]\nfeatures = "onehot"\n'
    )
    cfg = lib.parse_config(
        lib.TrainConfig, ["--config", str(toml), "--learning-rate", str(default.learning_rate), "--hidden", "48"]
    )
    assert cfg.learning_rate == default.learning_rate  # the flag wins although it equals the default
    assert cfg.model.hidden == 48 and cfg.model.n_heads == 2 and cfg.features == "onehot"
    assert cfg.datasets == ("synthetic_h1",)
    assert lib.parse_config(lib.TrainConfig, ["--config", str(toml)]).learning_rate == 0.05
    toml.write_text("learning_rate = 0.05\nlearnig_rate = 0.1\n")
    with pytest.raises(lib.UserError, match="learnig_rate"):
        lib.parse_config(lib.TrainConfig, ["--config", str(toml)])
    toml.write_text('steps = "many"\n')
    with pytest.raises(lib.UserError, match="steps"):
        lib.parse_config(lib.TrainConfig, ["--config", str(toml)])


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lib.parse_config(lib.TrainConfig, ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in lib.flatten_config(lib.TrainConfig()):
        assert "--" + name.replace("_", "-") in out, name


def test_written_config_round_trips_through_toml(tmp_path):
    cfg = lib.make_config(
        lib.TrainConfig, datasets=("a", "b"), learning_rate=3e-5, resume=True, run_name="x", hidden=32
    )
    lib.write_train_toml(tmp_path / "c.toml", cfg)
    assert lib.read_config_toml(lib.TrainConfig, tmp_path / "c.toml") == dataclasses.replace(
        cfg, config=str(tmp_path / "c.toml")
    )


# ---------------------------------------------------------------- sanity of training


def test_control_only_training_reaches_the_noise_floor(store):
    """Control in, another draw of the same control group out: the best possible pseudobulk MSE is
    the gap between two random draws' means (the floor); training must get near it."""
    cfg = lib.make_config(
        lib.TrainConfig,
        **{
            **TINY,
            "energy_weight": 0.0,
            "pseudobulk_mse_weight": 1.0,
            "oov_dropout": 0.0,
            "steps": 300,
            "set_size": 32,
            "residual_output": False,
        },
    )  # STATE's head learning from scratch (a residual model starts near the floor)
    model_cfg = dataclasses.replace(
        cfg.model, n_genes=store.x_cg.shape[1], n_pert_features=3, direct_effect=False, exact_mean=False
    )
    model = lib.make_model(model_cfg, key=jax.random.key(0))
    optimizer = lib.make_train_optimizer(cfg)
    opt_state = lib.init_opt_state(model, optimizer)
    controls = store.index[store.index["is_control"]][["start", "stop"]].to_numpy()
    rng, x_cg = np.random.default_rng(0), np.asarray(store.x_cg)
    pert_bf, is_pert_b = jnp.zeros((4, 3)), jnp.zeros(4, bool)
    losses, floors = [], []
    for step in range(cfg.steps):
        groups = controls[rng.integers(len(controls), size=4)]
        draw = lambda: np.stack([x_cg[a + rng.choice(b - a, cfg.loader.set_size, replace=False)] for a, b in groups])  # noqa: E731
        ctrl_bsg, target_bsg = draw(), draw()
        model, opt_state, metrics = lib.train_step(
            model,
            opt_state,
            optimizer,
            jnp.asarray(ctrl_bsg),
            pert_bf,
            jnp.asarray(target_bsg),
            is_pert_b,
            jnp.zeros(3),
            jnp.float32(0.0),
            jax.random.key(step),
            cfg.loss,
        )
        losses.append(float(metrics["pseudobulk_mse"]))
        floors.append(float(((ctrl_bsg.mean(1) - target_bsg.mean(1)) ** 2).mean()))
    first, last, floor = np.mean(losses[:10]), np.mean(losses[-50:]), np.mean(floors[-50:])
    assert first > 5 * floor  # training had something to learn
    assert last < 1.5 * floor, (first, last, floor)


@pytest.mark.slow
def test_random_features_give_no_gain_on_held_out_perturbations(tiny_store, tmp_path):
    """A model trained with random per-id features, scored on held-out perturbations with their own
    random rows and with the rows shuffled among them: no real difference (the rows carry nothing)."""
    cfg = tiny_cfg(
        tiny_store, tmp_path, features="random", steps=200, val_perturbations=8, val_cells=64, val_control_cells=64
    )
    result = lib.run_train(cfg)
    ckpt = lib.load_checkpoint(lib.resolve_checkpoint(result["run_dir"], "latest"))
    store = lib.load_store(tiny_store)
    split = lib.make_fake_val_split(_target_perturbations(store), cfg.fake_val_seed)
    held_out = split["val"] + split["test"]
    val = lib.make_validation_set(
        store, held_out, store.datasets[0], dataclasses.replace(cfg, val_perturbations=len(held_out)), ckpt["vocab"]
    )
    loss_cfg = lib.LossConfig(energy_weight=0.0, pseudobulk_mse_weight=1.0)
    own = lib.get_val_losses(
        jnp.asarray(lib.predict_pool(ckpt["model"], ckpt["features"], val.pert_id_p, val.pool_cg, cfg.loader.set_size)),
        jnp.asarray(val.real_psg),
        loss_cfg,
    )
    shuffled_ids = val.pert_id_p[np.random.default_rng(0).permutation(len(val.pert_id_p))]
    other = lib.get_val_losses(
        jnp.asarray(lib.predict_pool(ckpt["model"], ckpt["features"], shuffled_ids, val.pool_cg, cfg.loader.set_size)),
        jnp.asarray(val.real_psg),
        loss_cfg,
    )
    own_mse, other_mse = float(own["pseudobulk_mse"].mean()), float(other["pseudobulk_mse"].mean())
    assert own_mse > 0.9 * other_mse, (own_mse, other_mse)


def test_training_lowers_the_held_out_mae_from_its_start(trained):
    """Training moves the model, on held-out fake-val perturbations, closer to the truth than where it
    started. The model now starts at the transfer baseline (whose MAE on the noisy tiny world is
    worse than predicting no effect), so the quality bar against the baselines is the slow
    check-world test (`test_trained_model_scores_above_cell_mean_on_held_out_perturbations`)."""
    cfg, result = trained
    history = lib.read_history(result["run_dir"]).set_index("step")
    print(history.filter(like="val/").dropna(how="all").to_string())
    final, start = history.loc[cfg.steps], history.loc[0]
    assert final["val/mae"] < start["val/mae"], (start["val/mae"], final["val/mae"])
    assert final["val/pseudobulk_mse"] < start["val/pseudobulk_mse"]


def test_nan_stops_training_with_a_clear_message(tiny_store, tmp_path, monkeypatch):
    # The parser refuses a learning rate of 1e30 (> 10); this test needs the NaN it makes in the step.
    monkeypatch.setattr(lib, "check_flag_ranges", lambda cfg: None)
    cfg = tiny_cfg(tiny_store, tmp_path, steps=10, log_every=2, learning_rate=1e30, grad_clip=0.0, warmup_steps=1)
    with pytest.raises(FloatingPointError, match="learning-rate"):
        lib.run_train(cfg)
    run_dir = next(p for p in pathlib.Path(tmp_path).iterdir() if p.is_dir())
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------- checkpoints and resume


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))]


def test_resume_continues_exactly(tiny_store, tmp_path):
    kw = dict(steps=12, log_every=1, features="gene")
    straight = lib.run_train(tiny_cfg(tiny_store, tmp_path / "a", **kw))
    first = lib.run_train(tiny_cfg(tiny_store, tmp_path / "b", **{**kw, "steps": 6}, run_name="r"))
    assert first["step"] == 6
    resumed = lib.run_train(tiny_cfg(tiny_store, tmp_path / "b", **kw, run_name="r", resume=True))
    assert resumed["step"] == 12
    losses_a = lib.read_history(straight["run_dir"])["train/loss"].to_numpy()
    losses_b = lib.read_history(resumed["run_dir"])["train/loss"].to_numpy()
    np.testing.assert_array_equal(losses_a, losses_b)
    model_a = lib.load_checkpoint(lib.resolve_checkpoint(straight["run_dir"], "latest"))["model"]
    model_b = lib.load_checkpoint(lib.resolve_checkpoint(resumed["run_dir"], "latest"))["model"]
    for a, b in zip(_params(model_a), _params(model_b), strict=True):
        np.testing.assert_array_equal(a, b)
    # A resume with a different model config is refused, naming the field.
    with pytest.raises(ValueError, match="hidden"):
        lib.run_train(
            tiny_cfg(tiny_store, tmp_path / "b", **{**kw, "steps": 14}, run_name="r", resume=True, hidden=64, n_heads=2)
        )


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero_then_resume_continues(tiny_store, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    flags = [
        "--data-root",
        str(tiny_store),
        "--checkpoint-dir",
        str(ckpt_dir),
        "--run-name",
        "spot",
        "--steps",
        "100000",
    ]
    for key, value in TINY.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    # The real entry point, as a TPU VM runs it.
    proc = subprocess.Popen(
        [sys.executable, str(lib.REPO_DIR / "nb" / "05_train.py"), *flags, "--log-every", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    history = ckpt_dir / "spot" / "history.jsonl"
    deadline = time.time() + 240
    while (
        time.time() < deadline
        and proc.poll() is None
        and not (history.exists() and history.read_text().count("\n") >= 3)
    ):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    status = json.loads((ckpt_dir / "spot" / "status.json").read_text())
    assert status["status"] == "preempted" and status["step"] >= 3
    step_dir = pathlib.Path(lib.resolve_checkpoint(ckpt_dir / "spot", "latest"))  # paths in, a path string out
    assert step_dir.name == f"step_{status['step']:08d}"
    assert json.loads((step_dir / "state.json").read_text())["loader_state"]
    result = lib.run_train(
        tiny_cfg(tiny_store, ckpt_dir, run_name="spot", resume=True, steps=status["step"] + 3, log_every=1)
    )
    assert result["step"] == status["step"] + 3 and result["status"] == "done"
    steps = lib.read_history(ckpt_dir / "spot")["step"].tolist()
    assert steps == sorted(set(steps)) and steps[-1] == status["step"] + 3  # no duplicated steps after the resume


def test_checkpoints_keep_last_n_plus_best_and_pointers(trained):
    cfg, result = trained
    run_dir = pathlib.Path(result["run_dir"])
    step_dirs = sorted(p.name for p in run_dir.glob("step_*"))
    latest, best = (run_dir / "latest").read_text(), (run_dir / "best").read_text()
    assert latest == f"step_{cfg.steps:08d}" and set(step_dirs) == {latest, best}
    assert not list(run_dir.glob(".step_*"))  # no temporary directories left behind
    for name in [
        "model.eqx",
        "opt_state.eqx",
        "state.json",
        "vocab.json",
        "features.npz",
        "control_pool.npy",
        "config.json",
    ]:
        assert (run_dir / latest / name).exists(), name
    state = json.loads((run_dir / latest / "state.json").read_text())
    assert state["step"] == cfg.steps and state["loader_state"] and len(state["key_data"]) == 2


# ---------------------------------------------------------------- records and logging


def _read_wandb_history(run_file: pathlib.Path) -> list[dict]:
    """History rows of an offline .wandb file: LevelDB-log records (7-byte headers in 32 KiB
    blocks, after a 7-byte W&B header) holding wandb_internal_pb2.Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks, rows = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        chunks = payload if kind in (1, 2) else chunks + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_wandb_offline_run_holds_the_listed_metrics(trained):
    cfg, result = trained
    run_files = list(pathlib.Path(result["run_dir"]).glob("wandb/offline-run-*/run-*.wandb"))
    assert run_files, "no offline wandb run was written"
    keys = {key for f in run_files for row in _read_wandb_history(f) for key in row}
    wanted = {
        "train/loss",
        "train/energy",
        "train/pseudobulk_mse",
        "train/grad_norm",
        "train/update_norm",
        "train/param_norm",
        "train/effect_l1",
        "train/learning_rate",
        "perf/cells_per_s",
        "perf/step_s",
        "val/mae",
        "val/pds",
        "val/des",
    }
    assert wanted <= keys, wanted - keys


def test_every_run_leaves_a_record(trained, tiny_store):
    cfg, result = trained
    records = [json.loads(line) for line in (pathlib.Path(tiny_store) / "runs" / "runs.jsonl").read_text().splitlines()]
    record = next(r for r in records if r["run_id"] == result["run_id"])
    assert {"run_id", "argv", "git_sha", "git_dirty", "host", "started", "config", "final_metrics", "status"} <= set(
        record
    )
    assert (
        record["config"]["steps"] == cfg.steps and record["status"] == "done" and "val/mae" in record["final_metrics"]
    )


# ---------------------------------------------------------------- inference


def test_predictor_streams_sets_and_marks_unknown_perturbations(trained, store):
    cfg, result = trained
    predictor = lib.load_model_predictor(result["run_dir"])
    assert pathlib.Path(predictor.step_dir).name == (pathlib.Path(result["run_dir"]) / "best").read_text()
    ctrl_cg = predictor.control_pool_cg[: cfg.loader.set_size * 2 + 3]  # two full sets and a padded one
    known = _target_perturbations(store)[0]
    pred_cg = predictor.predict(known, ctrl_cg)
    assert pred_cg.shape == ctrl_cg.shape and pred_cg.min() >= 0 and pred_cg.max() <= lib.MAX_LOG1P_EXPRESSION
    np.testing.assert_array_equal(pred_cg, predictor.predict(known, ctrl_cg))  # deterministic
    # The first sets do not depend on how the last one was padded.
    np.testing.assert_allclose(
        pred_cg[: cfg.loader.set_size], predictor.predict(known, ctrl_cg[: cfg.loader.set_size]), atol=1e-5
    )
    with pytest.warns(UserWarning, match="out-of-vocabulary"):
        unknown_cg = predictor.predict("NOT_A_GENE", ctrl_cg)
    oov_f = predictor.features.get_target(np.array([1]))
    want_cg = np.asarray(
        lib.predict_sets(predictor.model, jnp.asarray(ctrl_cg[: cfg.loader.set_size][None]), jnp.asarray(oov_f))
    )[0]
    np.testing.assert_allclose(unknown_cg[: cfg.loader.set_size], want_cg, atol=1e-5)
    with pytest.raises(ValueError, match="gene"):
        predictor.predict(known, ctrl_cg[:, :-1])


def test_predictor_loads_from_the_checkpoint_root_pointer(trained):
    cfg, result = trained
    root = pathlib.Path(lib.get_checkpoint_root(cfg))
    assert (root / "latest").read_text() == pathlib.Path(result["run_dir"]).name
    assert pathlib.Path(lib.load_model_predictor(root).step_dir).parent == pathlib.Path(result["run_dir"])
    assert pathlib.Path(lib.load_model_predictor(root / "latest").step_dir).parent == pathlib.Path(result["run_dir"])


def test_fresh_model_predicts_exactly_the_pert_mean_transfer_pseudobulk(tiny_store, store, tmp_path):
    """05's defaults promise that the untrained model is pert_mean_transfer: scored the way 06
    scores it (effect on the fit's control mean, non-HVGs from the control cells, knockdown), the
    step-0 checkpoint's pseudobulk of every held-out perturbation equals the baseline's, gene by
    gene over all scored genes, and so do its cells, to float32 rounding; the baseline is computed
    from the store's context cells by its own code (make_baseline_predictor), not by the model."""
    result = lib.run_train(tiny_cfg(tiny_store, tmp_path / "ckpt", steps=1, eval_every=1))
    eval_cfg = lib.EvalConfig(data_root=str(tiny_store), n_control=100)
    files = lib.get_target_files(tiny_store, "synthetic")
    gene_names = lib.read_gene_names(files.gene_names_path)
    data = lib.scan_harness_inputs(eval_cfg, files, gene_names, tmp_path)
    scan, held_out = data["scan"], data["split"]["val"] + data["split"]["test"]
    fit = lib.make_fit_data(
        gene_names,
        data["group_labels"],
        scan.sum_kg,
        scan.n_k,
        data["split"]["train"],
        ["control:pred", "control:rest"],
    )
    target_genes = lib.get_target_gene_table(store, files.spec.name, gene_names)
    baseline = lib.make_baseline_predictor(
        "pert_mean_transfer", fit, store=store, target=files.spec.name, target_genes=target_genes
    )
    adapter = lib.make_model_predictor(pathlib.Path(result["run_dir"]) / "step_00000000", store, target_genes)
    model = lib.as_effect_predictor(adapter, fit.control_mean_g, lib.fit_knockdown_fraction(fit))
    ctrl_cg = data["pool"].read(np.arange(37))  # four full sets of 8 and a padded one
    for p in held_out:
        want_cg = baseline.predict(p, ctrl_cg)
        assert np.abs(want_cg.mean(0) - fit.control_mean_g).max() > 1e-3  # the baseline predicts an effect here
        got_cg = model.predict(p, ctrl_cg)
        np.testing.assert_allclose(got_cg.mean(0, dtype=np.float64), want_cg.mean(0, dtype=np.float64), atol=2e-6)
        np.testing.assert_allclose(got_cg, want_cg, atol=2e-5)  # the cells too, not only their mean


# ---------------------------------------------------------------- quality on a world with signal


@pytest.mark.slow
def test_trained_model_scores_above_cell_mean_on_held_out_perturbations(tmp_path_factory):
    """The quality bar: on the `check` world (a world with signal), a briefly trained model
    (05's defaults but tiny and short) scored by 06 on held-out perturbations (fake-val test and
    the true test split, vcc2025) has a normalised score above the cell-mean baseline's 0."""
    root = tmp_path_factory.mktemp("check_world")
    lib.write_synthetic_world(root, size="check", seed=0)
    lib.run_hvg(lib.HvgConfig(data_root=str(root), offline=True, n_hvg=800, n_hvg_per_dataset=800))
    lib.run_normalise(lib.NormaliseConfig(data_root=str(root)))
    cfg = tiny_cfg(
        root,
        root / "checkpoints",
        steps=40,
        eval_every=20,
        val_perturbations=8,
        val_cells=64,
        val_control_cells=64,
        wandb_mode="disabled",
    )
    result = lib.run_train(cfg)
    out = lib.run_eval(
        lib.EvalConfig(data_root=str(root), checkpoint=result["run_dir"], predictors=("cell_mean",), n_control=300)
    )
    table = out["results"].set_index(["scenario", "predictor"])
    print(table[["des", "pds", "mae", "score"]].to_string())
    for scenario in ("fake_test", "truth_test"):
        assert table.loc[(scenario, "model"), "score"] > 0.02, table.loc[scenario]


# ---------------------------------------------------------------- run state that tells the truth


@pytest.fixture(scope="module")
def good_run(tiny_store, tmp_path_factory):
    """A data root whose checkpoints/ holds one run with a checkpoint, "good" (training reads the
    tiny store's data root; checkpoints go to <root>/checkpoints so get_latest_checkpoint sees them)."""
    root = tmp_path_factory.mktemp("state")
    lib.run_train(tiny_cfg(tiny_store, root / "checkpoints", steps=2, run_name="good"))
    return root


def test_failure_inside_wandb_init_marks_failed_and_keeps_latest_on_a_run_with_a_checkpoint(
    good_run, tiny_store, monkeypatch, capsys
):
    import wandb

    def broken_init(**kw):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.raises(RuntimeError, match="wandb is down"):
        lib.run_train(tiny_cfg(tiny_store, good_run / "checkpoints", steps=2, run_name="bad", wandb_mode="offline"))
    status = json.loads((good_run / "checkpoints" / "bad" / "status.json").read_text())
    assert status["status"] == "failed" and "wandb is down" in status["error"]
    assert (good_run / "checkpoints" / "latest").read_text() == "good"
    # 06/07's model: the newest run WITH a checkpoint, not the newest run.
    assert lib.get_latest_checkpoint(good_run) == good_run / "checkpoints" / "good"
    assert "model: run good, the newest of 1 run(s) with a checkpoint" in capsys.readouterr().out
    assert pathlib.Path(lib.load_model_predictor(lib.get_latest_checkpoint(good_run)).step_dir).parent.name == "good"


def test_resume_of_a_run_without_checkpoint_is_an_error_naming_the_runs_that_have_one(good_run, tiny_store):
    cfg = tiny_cfg(tiny_store, good_run / "checkpoints", steps=2, run_name="goood", resume=True)
    with pytest.raises(lib.UserError, match=r"'goood' has no checkpoint.*\['good'\].*--resume-or-start"):
        lib.run_train(cfg)
    assert not (good_run / "checkpoints" / "goood" / "step_00000002").exists()
    started = lib.run_train(dataclasses.replace(cfg, resume=False, resume_or_start=True))
    assert started["step"] == 2 and lib.has_checkpoint(started["run_dir"])


@pytest.mark.slow
def test_a_run_whose_process_died_is_marked_failed_at_the_next_start(good_run, tiny_store):
    """kill -9 leaves status `running`; the next start of 05 on this host finds the pid dead."""
    run_dir = good_run / "checkpoints" / "killed"
    code = f"import lib, time; lib.write_run_status({str(run_dir)!r}, 'running', 5, 'abc'); print('ok', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=lib.REPO_DIR)
    assert proc.stdout.readline().strip() == "ok"
    proc.kill()  # SIGKILL: nothing in the process can record it
    proc.wait()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    lib.run_train(tiny_cfg(tiny_store, good_run / "checkpoints", steps=1, run_name="next"))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and f"process {proc.pid}" in status["error"] and status["step"] == 5
