import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium")


@app.cell
def _(lib):
    import marimo as mo

    mo.md(
        r"""
        # 02 · Exploratory data analysis

        Before modelling: what each dataset of a world holds, whether the CRISPRi knockdowns
        worked, how big perturbation effects are compared with noise, what the datasets share
        (perturbations, genes), and whether a perturbation does similar things in different
        cell types (the premise of using K562/RPE1/HepG2/Jurkat to predict H1).

        Reads the raw h5ad files of `lib.get_datasets(world)` under `<data_root>/raw/`, one pass
        per dataset in row chunks (memory stays bounded; `--max-cells-per-dataset` subsamples
        big files deterministically). Writes PNGs and CSVs to `<data_root>/figures/02_eda/`.

        ```
        python nb/02_eda.py --help                              # flags and defaults
        python nb/02_eda.py                                     # synthetic world
        python nb/02_eda.py --world real --max-cells-per-dataset 50000
        python nb/02_eda.py --datasets synthetic_h1 synthetic_k562
        marimo edit nb/02_eda.py -- --world synthetic
        ```
        """
    )
    return (mo,)


@app.cell
def _():
    import pandas as pd

    import lib  # the project's one shared module (installed editable by uv)

    cfg = lib.parse_config(lib.EdaConfig, description="02 EDA: summaries, knockdown, effect sizes, overlaps, PCA")
    data_root = lib.get_data_root(cfg.data_root)
    out_dir = lib.get_eda_dir(data_root)
    return cfg, data_root, lib, out_dir, pd


@app.cell
def _(lib, out_dir):
    def save_figure(fig, name):
        """PNG under figures/02_eda/ (also in the editor, so what you see is what is on disk)."""
        lib.write_figure(fig, out_dir / f"{name}.png")
        return fig

    def save_table(table, name):
        """CSV under figures/02_eda/, written atomically like every output."""
        lib.write_csv(out_dir / f"{name}.csv", table)
        return table

    return save_figure, save_table


@app.cell
def _(mo):
    # Heavy work waits for a click in the editor; script and nbmake runs go straight on.
    run_button = mo.ui.run_button(label="Run")
    run_button
    return (run_button,)


@app.cell
def _(cfg, lib, mo, run_button):
    mo.stop(lib.in_marimo_notebook() and not run_button.value, mo.md("Press **Run** to start."))
    print(cfg)
    edas = lib.run_eda(cfg)
    return (edas,)


@app.cell
def _(mo):
    mo.md(r"""
    ## What each dataset holds

    Cells, genes, perturbations, control cells, cells per perturbation and sequencing
    depth. `n_cells_read` is the subsample the depth and expression statistics use; the
    cell counts are from all cells. `gene_ids` says how genes can be matched to other
    files (symbol-only files need nb/03's lookup to get Ensembl ids).
    """)
    return


@app.cell
def _(edas, lib, save_table):
    summary = save_table(lib.get_summary_table(edas), "summary")
    print(summary.to_string(index=False))
    summary
    return


@app.cell
def _(mo):
    mo.md(r"""
    ## Depth per cell

    Total UMIs and detected genes per cell. Datasets sequenced at different depths have
    different noise levels, and a model trained on one must not learn depth as biology.
    """)
    return


@app.cell
def _(edas, lib, save_figure):
    save_figure(lib.plot_depth_per_cell(edas), "depth_per_cell")
    return


@app.cell
def _(mo):
    mo.md(r"""
    ## Cells per perturbation

    Pseudobulks of perturbations with few cells are noisy; the DE test has little power
    there. The legend gives each dataset's number of control cells.
    """)
    return


@app.cell
def _(edas, lib, save_figure):
    save_figure(lib.plot_cells_per_perturbation(edas), "cells_per_perturbation")
    return


@app.cell
def _(mo):
    mo.md(r"""
    ## Did the knockdown work?

    For each perturbation, its own target gene in perturbed vs control cells (mean
    log1p CP10K). **Fraction remaining** = expm1(mean log1p pert) / expm1(mean log1p ctrl),
    pdex's fold change: 0.2 means 80% knocked down, 1 means no change. Targets a dataset
    does not measure get NaN and a `reason`. Right: lowly expressed targets give noisy
    ratios; a CRISPRi screen whose targets sit near 1 would be a red flag.
    """)
    return


@app.cell
def _(edas, lib, pd, save_table):
    knockdown = save_table(pd.concat([lib.get_knockdown_table(e) for e in edas], ignore_index=True), "knockdown")
    knockdown_summary = knockdown.groupby("dataset", sort=False).agg(
        perturbations=("perturbation", "size"),
        target_measured=("fraction_remaining", lambda f: int(f.notna().sum())),
        median_fraction_remaining=("fraction_remaining", "median"),
        frac_below_half=("fraction_remaining", lambda f: float((f < 0.5).sum() / max(f.notna().sum(), 1))),
        median_log1p_delta=("log1p_delta", "median"),
    )
    print(knockdown_summary.round(3).to_string())
    reasons = knockdown[knockdown.reason != ""].groupby(["dataset", "reason"]).size()
    if len(reasons):
        print("NaN reasons:\n" + reasons.to_string())
    knockdown_summary
    return (knockdown,)


@app.cell
def _(edas, knockdown, lib, save_figure):
    save_figure(lib.plot_knockdown(edas, knockdown), "knockdown_efficiency")
    return


@app.cell
def _(cfg, mo):
    mo.md(rf"""
    ## How big are the effects?

    Effect of a perturbation = its pseudobulk (mean log1p CP10K) minus the controls', over
    all genes except its own target. Per perturbation: L2 norm, and the number of genes
    moved by more than {cfg.effect_threshold} (`--effect-threshold`). Grey crosses are
    **null groups**: random sets of control cells of the median perturbation's size
    compared with the other controls, i.e. what noise alone gives; the dashed line is
    their 95th percentile. Perturbations with fewer cells than that have larger noise,
    so points below the null are expected too.
    """)
    return


@app.cell
def _(cfg, edas, lib, pd, save_table):
    effect_sizes = save_table(
        pd.concat([lib.get_effect_size_table(e, cfg.effect_threshold) for e in edas], ignore_index=True), "effect_sizes"
    )
    _null_p95 = effect_sizes[effect_sizes.is_null].groupby("dataset").l2.quantile(0.95)
    _perts = effect_sizes[~effect_sizes.is_null]
    beyond_noise = (_perts.l2 > _perts.dataset.map(_null_p95)).groupby(_perts.dataset, sort=False).mean()
    print("share of perturbations whose L2 exceeds the null's 95th percentile:\n" + beyond_noise.round(3).to_string())
    beyond_noise.rename("share_beyond_null_p95").to_frame()
    return (effect_sizes,)


@app.cell
def _(cfg, edas, effect_sizes, lib, save_figure):
    save_figure(lib.plot_effect_sizes(edas, effect_sizes, cfg.effect_threshold), "effect_sizes")
    return


@app.cell
def _(mo):
    mo.md(r"""
    ## What the datasets share

    Left: perturbations (matched by target symbol) in both datasets. Right: genes measured
    in both, matched by Ensembl id when both files have ids and by symbol otherwise
    (marked *sym*; this is an EDA shortcut, nb/03 maps symbol-only files to ids). The
    diagonal is each dataset's own count.
    """)
    return


@app.cell
def _(edas, lib):
    pert_overlap = lib.get_perturbation_overlap(edas)
    gene_overlap, gene_matched_on = lib.get_gene_overlap(edas)
    print("perturbations shared:\n" + pert_overlap.to_string())
    print("genes shared:\n" + gene_overlap.to_string())
    return gene_matched_on, gene_overlap, pert_overlap


@app.cell
def _(gene_matched_on, gene_overlap, lib, pert_overlap, save_figure):
    save_figure(lib.plot_overlap(pert_overlap, gene_overlap, gene_matched_on), "overlap")
    return


@app.cell
def _(cfg, mo):
    mo.md(rf"""
    ## Do perturbations do the same thing in different cell types?

    A PCA of every dataset's pseudobulk effects together, on the genes all datasets measure
    (matched by symbol), for perturbations with at least {cfg.pca_min_cells} cells read.
    Grey lines join the same perturbation in different datasets: short lines mean the
    effect carries over. Most perturbations are weak and sit near the origin with the
    noise; the strong ones are where the lines are informative. A whole dataset's cloud can
    sit off-centre: all its effects subtract the same control mean, so that mean's noise is
    shared by every perturbation of the dataset. The table below puts a
    number on it: the correlation of effects for the same perturbation against different
    perturbations, per pair of datasets.
    """)
    return


@app.cell
def _(cfg, edas, lib):
    pca_rows, pca_explained, n_shared_genes = lib.compute_effect_pca(edas, cfg.pca_min_cells)
    print(
        f"PCA on {n_shared_genes} shared genes, {len(pca_rows)} (dataset, perturbation) effects; "
        f"explained variance {pca_explained.round(3)}"
    )
    return n_shared_genes, pca_explained, pca_rows


@app.cell
def _(edas, lib, n_shared_genes, pca_explained, pca_rows, save_figure):
    save_figure(lib.plot_effect_pca(edas, pca_rows, pca_explained, n_shared_genes), "effect_pca")
    return


@app.cell
def _(cfg, edas, lib, save_table):
    correlation = save_table(
        lib.compute_same_perturbation_correlation(edas, cfg.pca_min_cells), "same_perturbation_correlation"
    )
    print(correlation.round(3).to_string(index=False))
    correlation
    return


if __name__ == "__main__":
    import lib  # a user error ends the script with one line (lib.run_notebook)

    lib.run_notebook(app)
