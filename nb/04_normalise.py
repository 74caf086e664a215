import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium")


@app.cell
def _():
    import marimo as mo

    mo.md(
        r"""
        # 04 · Normalise and store

        Every cell of every dataset, normalised the one way the scorer does (counts per 10k,
        then log1p), restricted to the shared genes from `03`, written to one on-disk matrix
        whose rows the loader can read in contiguous blocks.

        **Reads** `<data_root>/raw/…` (in row chunks, X left on disk) and
        `<data_root>/hvg/<world>/`. **Writes** `<data_root>/store/<world>/` (layout below)
        and `<data_root>/figures/04_normalise_<world>.png`. Skips the work when the store is
        up to date with its inputs (`--force` rewrites). Uses the datasets `03` chose (the same
        `--datasets`, if any; it refuses gene lists made from other datasets) and records them in
        `meta.json`, so `05`–`07` can refuse a store or checkpoint built from others.

        ```
        python nb/04_normalise.py --help                  # flags and defaults
        python nb/04_normalise.py --world synthetic       # headless
        python nb/04_normalise.py --chunk-cells 5000      # less memory per step
        marimo edit nb/04_normalise.py -- --world synthetic
        ```
        """
    )
    return (mo,)


@app.cell
def _():
    import lib

    cfg = lib.parse_config(lib.NormaliseConfig, description="04 normalise: log1p CP10K store of the shared genes")
    return cfg, lib


@app.cell
def _(mo):
    # Heavy work waits for a click in the editor; script and nbmake runs go straight on.
    run_button = mo.ui.run_button(label="Run")
    run_button
    return (run_button,)


@app.cell
def _(mo):
    mo.md(r"""
    ## Why counts per 10k, then log1p

    cell-eval scores log1p expression and normalises integer inputs with
    `normalize_total` then `log1p`; training in the space we are scored in avoids a
    mismatch the original researcher lost weeks to. Dividing by each cell's total removes
    sequencing depth (which differs ~2× between cell types here); log1p tames the heavy
    tail. `lib.normalise_log1p` is the only place this happens — training, evaluation and
    inference all call it — and it checks both ends: the input must be raw counts
    (non-negative integers; otherwise it says to set `counts = 'log1p'` in the manifest),
    the output must be log1p (0 ≤ x < 15, expm1 row sums = 10⁴).

    ## Store layout (`<data_root>/store/<world>/`)

    | file | what |
    |---|---|
    | `x_cg.npy` | float32 cells × shared genes (hvg.csv order); open with `np.load(..., mmap_mode="r")` |
    | `index.csv` | one row per (dataset, cell_type, batch, perturbation) group: `start`, `stop`, `n_cells`, `is_control`; each group's rows are contiguous (controls first within a batch) |
    | `obs.csv` | per row: `group`, `cell_id`, `source_row`, `n_counts` (library size before) |
    | `measured_dg.npy` | bool datasets × genes: genes a dataset does not measure are **0** in `x_cg`, so mask them |
    | `means.csv` | per (dataset, cell type) mean log1p of *every* gene of the dataset, all cells and controls, keyed by Ensembl id and symbol: fills non-shared genes later |
    | `genes.csv`, `meta.json` | the columns; datasets, shape, inputs |

    The store is built in a temporary directory and swapped in whole, so a crash never
    leaves a half-written store.
    """)
    return


@app.cell
def _(cfg, lib, mo, run_button):
    mo.stop(lib.in_marimo_notebook() and not run_button.value, mo.md("Press **Run** to start."))
    store_dir = lib.run_normalise(cfg)
    store = lib.load_store(cfg.data_root, cfg.world)
    print(f"{store_dir}: {store.x_cg.shape[0]:,} cells x {store.x_cg.shape[1]:,} genes, {len(store.index):,} groups")
    lib.summarise_store(store)
    return (store,)


@app.cell
def _(mo):
    mo.md(r"""
    ## Before and after, and the groups the loader will draw from

    Left: library sizes differ between cell types and batches. Middle: after normalising,
    the non-zero values of the shared genes line up across datasets. Right: cells per
    (dataset, batch, perturbation) group — the loader samples sets of cells from one group,
    so groups much smaller than the set size will be sampled with replacement.
    """)
    return


@app.cell
def _(cfg, lib, store):
    overview_fig = lib.plot_store_overview(store)
    _path = lib.write_figure(overview_fig, lib.get_figures_dir(cfg.data_root) / f"04_normalise_{cfg.world}.png")
    print(f"wrote {_path}")
    overview_fig
    return


if __name__ == "__main__":
    app.run()
