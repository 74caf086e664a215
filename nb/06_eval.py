import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium")


@app.cell
def _():
    import marimo as mo

    mo.md(
        r"""
        # 06 · Evaluate: the fake-val harness, and the scoring command

        Scores predictors on perturbations of the target they never saw, with the challenge's
        own metrics (`lib.score`: DES, PDS, MAE; mode `vcc2025` unless `--mode current`), each
        normalised against the cell-mean baseline scored the same way.

        - **Held-out perturbations**: `lib.make_fake_val_split` of the target's training
          perturbations (seeded); its `val` and `test` parts are scored as `fake_val` and
          `fake_test`. Baselines are fitted on the `train` part only; the model is trained
          without `val`/`test` by nb/05.
        - **Real side**: the held-out cells of `adata_Training.h5ad` (at most
          `--max-cells-per-pert` each, a seeded subsample), normalised with
          `lib.normalise_log1p`, plus the `real` control pool.
        - **Predictions**: one predicted cell per real cell, each from a control cell of the
          `pred` pool (disjoint from the `real` pool), all genes of `gene_names.csv`; the `pred`
          pool cells are the predicted controls. Both pools are drawn once with the seed and
          saved (`eval/<world>/control_pool_*.csv`), so every run and every predictor sees the
          same cells.
        - **Predictors**: the baselines `control`, `cell_mean` (what `cell-eval baseline`
          builds: the reference), `pert_mean_transfer` (the perturbation's mean effect in the
          other cell types, HVGs only), `linear` (Ahlmann-Eltze et al. 2025), `linear_transfer`
          (the linear model plus the other cell types' effect of the same perturbation, its
          hyper-parameters chosen by cross-validation on the training perturbations); each
          predicts a pseudobulk turned into cells whose mean is exactly that pseudobulk, with
          the target gene's learned knockdown (`--no-exact-mean`, `--no-knockdown` undo
          these). And a trained
          model: `--checkpoint DIR`, else the newest run with a checkpoint under `<data_root>/checkpoints/`
          (`--checkpoint none` skips it).
        - **Synthetic world**: also `truth_validation`/`truth_test`, the true answers, with
          baselines fitted on all training perturbations.
        - **Zero-shot** (`--zero-shot`): the target as a cell type none of whose perturbations
          were measured. The same held-out sets, as `zero_shot_*` scenarios, but no predictor sees
          a perturbed target cell: `cell_mean` is the target's control mean (the reference),
          `pert_mean_transfer` and the knockdown fraction come from the context cell types,
          `linear`/`linear_transfer` are skipped, and the model must be a `05 --zero-shot` run.
          Writes `results_zero_shot.csv`, `per_perturbation_zero_shot.csv`.

        **Reads** the target's files under `<data_root>/raw/…` and the store (nb/04).
        **Writes** `<data_root>/eval/<world>/results.csv`, `per_perturbation.csv`, the pools,
        and `06_*.png`.

        ```
        python nb/06_eval.py --help                       # flags and defaults
        python nb/06_eval.py                              # baselines (+ newest checkpoint), synthetic world
        python nb/06_eval.py --checkpoint data/checkpoints/RUN --fill control
        python nb/06_eval.py --fill-study                 # measure fill=control vs fill=mean
        python nb/06_eval.py --zero-shot --checkpoint data/checkpoints/ZERO_SHOT_RUN
        marimo edit nb/06_eval.py -- --fixed-pseudobulk
        ```

        **Scoring command** (`--pred`): instead of the harness, score any prediction `.h5ad`
        against any real `.h5ad` like `cell-eval run --profile vcc` (same numbers, both modes),
        plus the normalised score against the cell-mean baseline built from `--train` (as
        `cell-eval baseline` builds it) or given as `--baseline`. Writes `--out`/`results.csv`
        (one row per perturbation: `perturbation, overlap_at_N, mae, discrimination_score_l1`),
        `agg_results.csv`, the baseline's `baseline_results.csv` / `baseline_agg_results.csv` and
        `score.csv`. X stays on disk and is read one perturbation at a time. Files of raw counts
        (e.g. parts of `adata_Training.h5ad`) are named in `--raw-counts` and normalised as they are
        read (log1p CP10K, `lib.normalise_log1p`); integer X is refused otherwise (cell-eval would
        scale such a file to its own median depth, another scale than the predictions'). As a
        script, the command runs straight from `__main__` (no marimo runner: a fast start).

        ```
        python nb/06_eval.py --pred P.h5ad --real R.h5ad --train T.h5ad --mode current --out DIR --threads 2
        python nb/06_eval.py --pred P.h5ad --real heldout.h5ad --train adata_Training.h5ad --raw-counts real train --out DIR
        marimo edit nb/06_eval.py -- --pred P.h5ad --real R.h5ad --baseline B.h5ad --out DIR
        ```
        """
    )
    return (mo,)


@app.cell
def _():
    import lib  # the project's one shared module (installed editable by uv)

    cfg = lib.parse_config(
        lib.EvalConfig, description="06 eval: score predictors on held-out perturbations of the target"
    )
    return cfg, lib


@app.cell
def _(mo):
    # Heavy work waits for a click in the editor; script and nbmake runs go straight on.
    run_button = mo.ui.run_button(label="Run")
    run_button
    return (run_button,)


@app.cell
def _(cfg, lib, mo, run_button):
    # The scoring command (--pred): score one prediction file, skip the harness below. No mo.stop
    # when there is no --pred: outside marimo (nbmake's kernel) a stop is an uncaught error.
    mo.stop(bool(cfg.pred) and lib.in_marimo_notebook() and not run_button.value, mo.md("Press **Run** to score."))
    scored = lib.run_score_command(cfg) if cfg.pred else None
    scored["normalised"] if scored else mo.md("No `--pred` file: the harness below scores the predictors.")
    return


@app.cell
def _(mo):
    mo.md(r"""
    ## Scores

    One row per (scenario, predictor). `des`, `pds`, `mae` are the raw metrics (averaged
    over perturbations); `s_*` and `score` are normalised against `cell_mean` in the same
    scenario (0 = as good as the baseline, 1 = perfect; floored at 0). `fit_on` says which
    perturbations a predictor learnt from; `mean_n_de_pred` is how many genes the scorer
    calls DE in the prediction (constant predictions make almost every gene DE).
    """)
    return


@app.cell
def _(cfg, lib, mo, run_button):
    mo.stop(bool(cfg.pred), mo.md("Scored the `--pred` file (above); the harness did not run."))
    mo.stop(lib.in_marimo_notebook() and not run_button.value, mo.md("Press **Run** to start."))
    out = lib.run_eval(cfg)
    results = out["results"]
    print(f"mode {cfg.mode}; checkpoint: {out['checkpoint'] or 'none'}; wrote {out['paths']['results']}")
    print(results.drop(columns=["fixed_pseudobulk"]).round(4).to_string(index=False))
    results
    return out, results


@app.cell
def _(mo):
    mo.md(r"""
    ## Per-perturbation metrics, effects, and the baseline

    Boxes: each perturbation's DES, PDS and MAE. Scatter: predicted against true
    pseudobulk effect (mean minus control mean) on each perturbation's 20 most-moved
    genes; points on the diagonal are right. Bars: the normalised score parts.
    """)
    return


@app.cell
def _(cfg, lib, out, results):
    _eval_dir = lib.get_eval_dir(cfg.data_root, cfg.world)
    _suffix = "_zero_shot" if cfg.zero_shot else ""
    _paths = [lib.write_figure(lib.plot_scores(results), _eval_dir / f"06_scores{_suffix}.png")]
    for _scenario in out["effects"]:
        _paths.append(
            lib.write_figure(
                lib.plot_metric_distributions(out["per_perturbation"], _scenario),
                _eval_dir / f"06_metrics_{_scenario}.png",
            )
        )
        _paths.append(
            lib.write_figure(
                lib.plot_effects(out["effects"][_scenario], _scenario), _eval_dir / f"06_effects_{_scenario}.png"
            )
        )
    print("wrote", *map(str, _paths), sep="\n  ")
    _first = next(iter(out["effects"]))
    lib.plot_effects(out["effects"][_first], _first)
    return


@app.cell
def _(mo):
    mo.md(r"""
    ## Filling the genes outside the HVGs (`--fill-study`)

    A model predicts the HVGs only. Filling the other genes with a constant (their control
    mean, `fill="mean"`) makes the Wilcoxon test call many of them DE against the varied
    control cells; copying each input control cell's own values (`fill="control"`) keeps
    them at "no effect". The table counts the genes outside the HVGs called DE per
    perturbation for the HVG-only linear baseline under both fills.
    """)
    return


@app.cell
def _(out):
    _pp = out["per_perturbation"]
    if "n_de_pred_non_hvg" in _pp:
        print(
            _pp.groupby(["scenario", "predictor"])[["n_de_real", "n_de_pred", "n_de_pred_non_hvg"]]
            .mean()
            .round(1)
            .to_string()
        )
    return


if __name__ == "__main__":
    import lib  # a user error ends the script with one line (lib.run_notebook)

    # The scoring command (--pred) runs straight from here, not through marimo's runner (which
    # imports matplotlib and runs the cell graph): a fast start. The cell above offers the same job in `marimo edit`.
    _description = "06 eval: score predictors on held-out perturbations of the target"  # as the flags cell's
    lib.run_notebook(app, script=lambda: lib.run_score_script(_description))
