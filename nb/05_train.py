import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium")


@app.cell
def _():
    import marimo as mo

    mo.md(
        r"""
        # 05 · Train the ST set transformer

        **What ST is.** STATE's "ST" model: a *set* of S control cells of the target
        cell type (log1p, the shared HVGs) and one perturbation go in; S predicted perturbed cells
        come out. A basal MLP encodes each cell, a perturbation MLP encodes the perturbation's
        feature vector and is added to every cell, a bidirectional transformer (no positions, so
        the set's order does not matter) mixes the cells, and a decoder maps back to genes.

        **What the loader yields.** Batches of `sets_per_batch` sets: `ctrl_bsg` (S control cells
        of a dataset/cell type/batch), `pert_bsg` (S cells of one perturbation there) and
        `pert_id_b` (the vocabulary id; 0 = control, 1 = out of vocabulary). Every dataset in the
        store trains, except the target's fake-val `val` and `test` perturbations
        (`lib.make_fake_val_split`), which are held out and used to validate.

        **Perturbation features.** `--features gene` (default): the target gene's co-expression
        loadings in the target's control cells, plus its mean effect in the *other* cell types
        (leave-the-example's-dataset-out), so an unseen knockdown is not blind. `onehot` is a
        learned id embedding (blind to unseen ones: they get the OOV row); `random` is the control
        experiment. No feature ever reads a target perturbation's cells.

        **Start at the strongest baseline.** With gene features the model also reads the other
        cell types' mean effect in gene space through a per-gene gain that starts at 1
        (`--effect-gain-init`) and the knocked-down gene's indicator, and its exact-mean head
        (`--exact-mean`) makes each set's mean exactly its predicted pseudobulk: a fresh model is
        the pert_mean_transfer baseline, and training corrects it. The checkpoint 06/07 load
        (`best`) is the one with the best validation score (`--best-by`), step 0 included.

        **Losses.** Energy distance between the predicted and the real set (STATE's distributional
        loss) + `pseudobulk_mse_weight` × MSE of the set means (the MAE metric's quantity).

        **Reads** `<data_root>/store/<world>/` (nb/04). **Writes** `<data_root>/checkpoints/<run>/`
        (checkpoints `step_*/`, pointers `latest` and `best`, `history.jsonl`, `config.toml`,
        `status.json`), `<data_root>/checkpoints/latest` (the newest run's name; nb/06 loads
        it), one line in `<data_root>/runs/runs.jsonl`, and `<data_root>/figures/05_train_<run>.png`.

        ```
        python nb/05_train.py --help                                  # every flag, with its default
        python nb/05_train.py                                         # ~3-5 min on 2 CPU cores (small world)
        python nb/05_train.py --steps 100 --features onehot           # flags
        python nb/05_train.py --config my.toml --learning-rate 3e-4   # TOML sets defaults, flags win
        python nb/05_train.py --resume                                # continue the latest run
        python nb/05_train.py --config <data_root>/checkpoints/<run>/config.toml --resume
        marimo edit nb/05_train.py -- --steps 100
        ```

        **Several hosts.** Every host runs the same command. On a multi-host Cloud TPU slice
        `jax.distributed.initialize()` is called with no arguments (the slice is detected); on
        other clusters pass `--coordinator-address HOST:PORT --num-processes N --process-id I`
        (or `$JAX_COORDINATOR_ADDRESS`, `$JAX_NUM_PROCESSES`, `$JAX_PROCESS_ID`); one process
        needs nothing. Each process loads only its contiguous slice of every global batch; the
        slices form one array over a mesh of all devices (data parallel, model replicated, the
        gradient mean taken in device order so 1 or N hosts give the same numbers). Only process
        0 logs (wandb, stdout), checkpoints and writes records; every process reads the same
        checkpoint at `--resume`. `--checkpoint-dir` may be a bucket (`gs://B/run`, via fsspec +
        gcsfs from the `tpu` extra). Two CPU processes on one machine (what tests/test_multihost.py runs):
        ```
        XLA_FLAGS=--xla_force_host_platform_device_count=2 python nb/05_train.py --coordinator-address 127.0.0.1:12355 --num-processes 2 --process-id 0 &
        XLA_FLAGS=--xla_force_host_platform_device_count=2 python nb/05_train.py --coordinator-address 127.0.0.1:12355 --num-processes 2 --process-id 1
        ```

        **TPU / spot VMs.** On SIGTERM (preemption; the hosts agree on the step) it finishes the step,
        checkpoints, writes `status.json` = `preempted` and exits 0; restart with the same
        `--run-name ... --resume`. `--resume` of a run with no checkpoint is an error naming the runs
        that have one; `--resume-or-start` starts it fresh instead (what a startup script passes).
        `status.json` says `failed` (with the error) after any exception, and a run killed outright
        (kill -9) is marked `failed` at the next start on its host; `<data_root>/checkpoints/latest`
        moves only when a run has written a checkpoint. wandb: offline unless `WANDB_API_KEY` is set.
        """
    )
    return (mo,)


@app.cell
def _():
    import lib

    cfg = lib.parse_config(lib.TrainConfig, description="05 train: the ST set transformer on cell sets")
    print(cfg)
    return cfg, lib


@app.cell
def _(mo):
    # Heavy work waits for a click in the editor; script and nbmake runs go straight on.
    run_button = mo.ui.run_button(label="Train")
    run_button
    return (run_button,)


@app.cell
def _(mo):
    mo.md(r"""
    ## Train

    One flat loop (`lib.train`): next batch → feature rows → one jitted step (loss, gradients,
    clipped Adam(W) update). Every `log_every` steps the metrics come to the host and a NaN stops
    the run; every `eval_every` steps the model predicts the held-out perturbations from the
    canonical control pool and is scored with `lib.score`; every `ckpt_every` steps (and at the
    end, and at the best validation score, step 0 included) it checkpoints.
    """)
    return


@app.cell
def _(cfg, lib, mo, run_button):
    mo.stop(lib.in_marimo_notebook() and not run_button.value, mo.md("Press **Train** to start."))
    result = lib.run_train(cfg)
    print(f"run {result['run_id']} {result['status']} at step {result['step']}: {result['run_dir']}")
    print(f"parameters: {result['n_params']:,}")
    return (result,)


@app.cell
def _(mo):
    mo.md(r"""
    ## Reading the curves

    * **loss / energy / pseudobulk_mse** fall fast, then slowly; a flat line from step 0 means
      the learning rate is too small, spikes mean too large.
    * **grad_norm** (before clipping at `grad_clip`) and **update_norm**: ≈0 means frozen; a
      growing grad norm with a flat loss means instability. **param_norm** should drift slowly.
    * **effect_l1** = mean |predicted − control input|: how far the model moves cells. ≈0: it
      ignores the perturbation and copies the control.
    * **validation** (held-out target perturbations): `val/mae` should go below
      `val/control_mae` (predicting "no effect") — that is the bar; `val/pds` ≈ 0.5 means the
      model does not tell perturbations apart; `val/score` is normalised against the cell-mean
      baseline (0 = no better).
    """)
    return


@app.cell
def _(cfg, lib, mo, result):
    # Multi-host: only process 0 reads the history and writes the figure.
    mo.stop(result["process_index"] != 0)
    history = lib.read_history(result["run_dir"])
    fig = lib.plot_history(history)
    _path = lib.write_figure(
        fig, lib.get_figures_dir(cfg.data_root) / f"05_train_{lib.url_name(result['run_dir'])}.png"
    )
    print(f"wrote {_path}")
    fig
    return (history,)


@app.cell
def _(history, mo):
    _val = history.filter(regex="^(step|val/)").dropna(subset=["val/mae"]) if "val/mae" in history else history.iloc[:0]
    mo.md(
        "## Validation at each evaluation\n\n"
        + ("```\n" + _val.round(4).to_string(index=False) + "\n```" if len(_val) else "(validation off)")
    )
    return


if __name__ == "__main__":
    import lib  # a user error ends the script with one line (lib.run_notebook)

    lib.run_notebook(app)
