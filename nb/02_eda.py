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
    import numpy as np
    import pandas as pd
    from matplotlib.figure import Figure

    import lib  # the project's one shared module (installed editable by uv)

    cfg = lib.parse_config(lib.EdaConfig, description="02 EDA: summaries, knockdown, effect sizes, overlaps, PCA")
    data_root = lib.get_data_root(cfg.data_root)
    out_dir = lib.get_eda_dir(data_root)
    return Figure, cfg, data_root, lib, np, out_dir, pd


@app.cell
def _(lib, out_dir):
    def save_figure(fig, name):
        """PNG under figures/02_eda/ (also in the editor, so what you see is what is on disk)."""
        lib.write_figure(fig, out_dir / f"{name}.png")
        return fig

    def use_plain_log_ticks(axis):
        """Ticks at 1, 2, 5 × 10^k written as plain numbers (matplotlib's 2×10³ labels collide)."""
        import matplotlib.ticker

        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.6g}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())

    def save_table(table, name):
        """CSV under figures/02_eda/, written atomically like every output."""
        lib.write_csv(out_dir / f"{name}.csv", table)
        return table

    return save_figure, save_table, use_plain_log_ticks


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
    colors = {e.spec.name: f"C{i}" for i, e in enumerate(edas)}  # one colour per dataset in every plot
    return colors, edas


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
def _(Figure, colors, edas, np, save_figure, use_plain_log_ticks):
    def _plot():
        fig = Figure(figsize=(9, 6.5), layout="constrained")
        ax_umi, ax_genes = fig.subplots(2, 1)
        finite = [e for e in edas if np.isfinite(e.umis_c).any()]
        if finite:
            lo = max(1.0, min(np.nanmin(e.umis_c[e.umis_c > 0]) for e in finite))
            bins = np.geomspace(lo, max(np.nanmax(e.umis_c) for e in finite), 60)
            for e in finite:
                ax_umi.hist(
                    e.umis_c,
                    bins=bins,
                    histtype="step",
                    lw=1.5,
                    color=colors[e.spec.name],
                    label=f"{e.spec.name} (median {np.nanmedian(e.umis_c):,.0f})",
                )
            ax_umi.set_xscale("log")
            use_plain_log_ticks(ax_umi.xaxis)
        ax_umi.set(xlabel="UMIs per cell (log scale)", ylabel="cells", title="Total UMIs per cell")
        ax_umi.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
        bins = np.linspace(0, max(e.genes_c.max() for e in edas), 60)
        for e in edas:
            ax_genes.hist(
                e.genes_c,
                bins=bins,
                histtype="step",
                lw=1.5,
                color=colors[e.spec.name],
                label=f"{e.spec.name} (median {np.median(e.genes_c):,.0f} of {e.n_genes:,})",
            )
        ax_genes.set(xlabel="genes detected per cell (count > 0)", ylabel="cells", title="Detected genes per cell")
        ax_genes.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
        return save_figure(fig, "depth_per_cell")

    _plot()
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
def _(Figure, colors, edas, lib, np, save_figure, use_plain_log_ticks):
    def _plot():
        fig = Figure(figsize=(7, 3.8))
        ax = fig.subplots()
        cells_p = {e.spec.name: lib.get_cells_per_perturbation(e) for e in edas}
        top = max(c.max() for c in cells_p.values())
        # Log-spaced edges between integers: counts are integers, so edges on them make spikes.
        bins = np.unique(np.round(np.geomspace(1, top * 1.1, 40))) + 0.5
        for e in edas:
            n_ctrl = e.n_cells_k[e.group_index(lib.CONTROL_GROUP)]
            ax.hist(
                cells_p[e.spec.name],
                bins=bins,
                histtype="step",
                lw=1.5,
                color=colors[e.spec.name],
                label=f"{e.spec.name}: {len(cells_p[e.spec.name])} perts, {n_ctrl:,} controls",
            )
        ax.set_xscale("log")
        use_plain_log_ticks(ax.xaxis)
        ax.set(xlabel="cells per perturbation (log scale)", ylabel="perturbations", title="Cells per perturbation")
        ax.legend(fontsize=8, frameon=False)
        return save_figure(fig, "cells_per_perturbation")

    _plot()
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
def _(Figure, colors, edas, knockdown, np, save_figure):
    def _plot():
        fig = Figure(figsize=(11, 3.8))
        ax_hist, ax_expr = fig.subplots(1, 2)
        finite = knockdown[np.isfinite(knockdown.fraction_remaining)]
        bins = np.linspace(0, max(1.5, min(finite.fraction_remaining.quantile(0.99), 3.0)), 40)
        for e in edas:
            rows = finite[finite.dataset == e.spec.name]
            ax_hist.hist(
                rows.fraction_remaining.clip(upper=bins[-1]),
                bins=bins,
                histtype="step",
                lw=1.5,
                color=colors[e.spec.name],
                label=f"{e.spec.name} ({len(rows)} of {len(e.perturbations)} targets measured)",
            )
            ax_expr.scatter(
                rows.ctrl_log1p, rows.fraction_remaining, s=8, alpha=0.6, color=colors[e.spec.name], label=e.spec.name
            )
        for ax in (ax_hist, ax_expr):
            (ax.axvline if ax is ax_hist else ax.axhline)(1.0, color="black", lw=0.8, ls="--")
        ax_hist.set(
            xlabel=f"fraction of target expression remaining (1 = none; > {bins[-1]:.1f} in last bin)",
            ylabel="perturbations",
            title="Knockdown efficiency of each target",
        )
        ax_hist.legend(fontsize=8, frameon=False)
        ax_expr.set(
            xlabel="target's mean log1p CP10K in control cells",
            ylabel="fraction remaining",
            title="Knockdown vs target expression",
            ylim=(0, bins[-1]),
        )
        ax_expr.legend(fontsize=8, frameon=False, markerscale=2)
        return save_figure(fig, "knockdown_efficiency")

    _plot()
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
def _(Figure, cfg, colors, edas, effect_sizes, np, save_figure, use_plain_log_ticks):
    def _plot():
        fig = Figure(figsize=(11, 4.2))
        axes = fig.subplots(1, 2)
        rng = np.random.default_rng(0)  # jitter only
        columns = [
            ("l2", "L2 norm of effect (log1p units)", "Effect size per perturbation"),
            ("n_genes_above", f"genes with |effect| > {cfg.effect_threshold}", "Genes moved per perturbation"),
        ]
        for ax, (column, label, title) in zip(axes, columns):
            for i, e in enumerate(edas):
                rows = effect_sizes[effect_sizes.dataset == e.spec.name]
                perts, nulls = rows[~rows.is_null], rows[rows.is_null]
                ax.scatter(
                    i + rng.uniform(-0.3, 0.1, len(perts)), perts[column], s=7, alpha=0.5, color=colors[e.spec.name]
                )
                ax.scatter(
                    i + rng.uniform(0.15, 0.35, len(nulls)),
                    nulls[column],
                    s=14,
                    marker="x",
                    color="0.45",
                    label="null groups (control cells)" if i == 0 else None,
                )
                if len(nulls):
                    ax.hlines(
                        nulls[column].quantile(0.95),
                        i - 0.35,
                        i + 0.4,
                        color="black",
                        ls="--",
                        lw=1,
                        label="null 95th percentile" if i == 0 else None,
                    )
            ax.set_xticks(range(len(edas)), [e.spec.name for e in edas], rotation=20, ha="right")
            if column == "l2":
                ax.set_yscale("log")
                use_plain_log_ticks(ax.yaxis)
            else:  # counts can be 0: linear near zero, log above 10
                ax.set_yscale("symlog", linthresh=10)
                ax.set_ylim(bottom=0)
            ax.set(ylabel=label, title=title)
            ax.legend(fontsize=8, frameon=False, loc="upper left")
        return save_figure(fig, "effect_sizes")

    _plot()
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
def _(Figure, gene_matched_on, gene_overlap, np, pert_overlap, save_figure):
    def _plot():
        n = len(pert_overlap)
        fig = Figure(figsize=(5.2 * 2 + 1, 0.9 * n + 2.4))
        axes = fig.subplots(1, 2)
        panels = [
            (pert_overlap, None, "Perturbations shared (by symbol)", "Blues"),
            (gene_overlap, gene_matched_on, "Genes shared (by Ensembl id; sym = by symbol)", "Greens"),
        ]
        for ax, (table, matched_on, title, cmap) in zip(axes, panels):
            values = table.to_numpy()
            image = ax.imshow(values, cmap=cmap, vmin=0, vmax=values.max())
            for i in range(n):
                for j in range(n):
                    text = f"{values[i, j]:,}"
                    if matched_on is not None and matched_on.iloc[i, j] == "symbol":
                        text += "\nsym"
                    dark = values[i, j] > 0.6 * values.max()
                    ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
            labels = [name.removeprefix("synthetic_") for name in table.index]
            ax.set_xticks(np.arange(n), labels, rotation=30, ha="right")
            ax.set_yticks(np.arange(n), labels)
            ax.set_title(title, fontsize=10)
            fig.colorbar(image, ax=ax, shrink=0.8)
        return save_figure(fig, "overlap")

    _plot()
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
def _(Figure, colors, edas, n_shared_genes, pca_explained, pca_rows, save_figure):
    def _plot():
        fig = Figure(figsize=(13, 6), layout="constrained")
        ax_all, ax_zoom = fig.subplots(1, 2)
        for ax in (ax_all, ax_zoom):
            # Lines only in the full view: in the zoom, noise-level effects make them a tangle.
            for _, rows in pca_rows.groupby("perturbation") if ax is ax_all else []:
                if len(rows) > 1:  # a star from the first dataset's point (the target's, when present)
                    x0, y0 = rows.pc1.iloc[0], rows.pc2.iloc[0]
                    for x, y in zip(rows.pc1.iloc[1:], rows.pc2.iloc[1:]):
                        ax.plot([x0, x], [y0, y], color="0.55", lw=0.6, alpha=0.7, zorder=1)
            for e in edas:
                rows = pca_rows[pca_rows.dataset == e.spec.name]
                ax.scatter(
                    rows.pc1,
                    rows.pc2,
                    s=14,
                    alpha=0.8,
                    color=colors[e.spec.name],
                    label=f"{e.spec.name} ({len(rows)} perts)",
                    zorder=2,
                    edgecolor="none",
                )
            ax.set(xlabel=f"PC1 ({pca_explained[0]:.1%} of variance)", ylabel=f"PC2 ({pca_explained[1]:.1%})")
        # Most effects are weak and crowd the origin: the right panel zooms to the central 90%.
        lo, hi = pca_rows[["pc1", "pc2"]].quantile(0.05), pca_rows[["pc1", "pc2"]].quantile(0.95)
        pad = 0.15 * (hi - lo)
        ax_zoom.set(
            xlim=(lo.pc1 - pad.pc1, hi.pc1 + pad.pc1),
            ylim=(lo.pc2 - pad.pc2, hi.pc2 + pad.pc2),
            title="Zoom on the central 90%: weak effects and noise of every dataset",
        )
        ax_all.set_title(f"All effects ({n_shared_genes:,} shared genes); grey lines join the same perturbation")
        ax_all.legend(fontsize=8, frameon=False, markerscale=1.5)
        return save_figure(fig, "effect_pca")

    _plot()
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
    app.run()
