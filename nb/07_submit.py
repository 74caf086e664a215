import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium")


@app.cell
def _():
    import marimo as mo

    mo.md(
        r"""
        # 07 · Submit: a predictor's answer as a `.vcc` file

        Turns a predictor (default: the trained model, the newest nb/05 run with a checkpoint) into a challenge submission: for every perturbation of
        `pert_counts_Validation.csv` (`--split test`: `pert_counts_Test.csv`) exactly
        `n_cells` predicted cells, then control cells; all genes of `gene_names.csv` in that
        order (a model's non-HVG genes filled per `--fill`); log1p float32 CSR. Cells are
        predicted and written a chunk at a time through `lib.write_submission` (validated:
        gene order, perturbations, cell cap, NaN/range, and the log transforms people get
        wrong: log1p applied twice, log2/log10, log1p of counts not normalised to 10^4), then
        packed like `cell-eval prep` with `lib.pack_vcc`, which refuses what that check refuses. `--fixed-pseudobulk` makes every cell of a perturbation its
        mean predicted cell.

        The inputs are a canonical control pool of the target's training controls (seeded,
        saved as `submissions/<world>/control_pool_*.csv`); those cells are also the
        submission's controls. On the synthetic world the submission is then scored against
        the true answer, normalised against the cell-mean baseline (`lib.score`, mode
        `vcc2025`).

        **Reads** the target's files (and the store for `pert_mean_transfer`/`model`).
        **Writes** `<data_root>/submissions/<world>/<predictor>_<split>.h5ad` and `.prep.vcc`.

        ```
        python nb/07_submit.py --help                                  # flags and defaults
        python nb/07_submit.py                                         # the model (newest checkpoint), validation split
        python nb/07_submit.py --predictor linear_transfer             # a baseline
        python nb/07_submit.py --predictor model --fixed-pseudobulk    # newest checkpoint
        python nb/07_submit.py --predictor model --checkpoint DIR --split test
        marimo edit nb/07_submit.py -- --predictor cell_mean
        ```
        """
    )
    return (mo,)


@app.cell
def _():
    import lib  # the project's one shared module (installed editable by uv)

    cfg = lib.parse_config(
        lib.SubmitConfig, description="07 submit: a predictor's submission, validated and packed as .vcc"
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
    mo.stop(lib.in_marimo_notebook() and not run_button.value, mo.md("Press **Run** to start."))
    out = lib.run_submit(cfg)
    print(f"wrote {out['h5ad']} ({out['n_control']:,} control cells)")
    print(f"packed {out['vcc']} ({out['vcc'].stat().st_size / 1e6:.1f} MB)")
    return (out,)


@app.cell
def _(mo):
    mo.md(r"""
    ## Score against the synthetic truth

    Only the synthetic world has the answers. The cell-mean baseline is built from the
    same training data and control cells, and scored the same way. Scoring streams like
    `nb/06_eval.py --pred`: X is read from disk one perturbation's cells at a time (the
    truth's raw counts normalised as they are read), so no whole file is held in memory.
    """)
    return


@app.cell
def _(cfg, out):
    import pandas as pd

    if out["score"] is None:
        _why = "--no-score" if not cfg.score else f"no truth for split {cfg.split!r} on world {cfg.world!r}"
        print(f"{_why}: not scored")
    else:
        _s = out["score"]
        _table = pd.DataFrame(
            [
                {"what": "submission", **{k: _s["result"][k] for k in ("des", "pds", "mae")}},
                {"what": "cell_mean baseline", **{k: _s["baseline"][k] for k in ("des", "pds", "mae")}},
            ]
        )
        print(f"mode {_s['normalised']['mode']}")
        print(_table.round(4).to_string(index=False))
        print("normalised:", {k: round(v, 4) for k, v in _s["normalised"].items() if k != "mode"})
    return


if __name__ == "__main__":
    import lib  # a user error ends the script with one line (lib.run_notebook)

    lib.run_notebook(app)
