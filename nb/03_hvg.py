import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium")


@app.cell
def _():
    import marimo as mo

    mo.md(
        r"""
        # 03 · Highly variable genes: the shared gene space

        The model predicts expression of one fixed list of genes (default 2,000) in every
        cell type. This notebook maps every dataset's genes to Ensembl ids, finds each
        dataset's highly variable genes (HVGs), and combines them into that shared list.

        **Reads** `<data_root>/raw/<source>/…` (from `nb/01_download.py`), the manifest's
        keys, and the symbol → Ensembl caches. **Writes** under `<data_root>/hvg/<world>/`:
        `hvg.csv` (the shared genes, in model column order), `datasets/<name>.csv` (each
        dataset's gene table and HVG statistics), `unmapped_genes.csv` (every gene left out
        and why), `hvg.json` (how it was made, from which datasets); and
        `<data_root>/figures/03_hvg_overlap_<world>.png`. Datasets whose files are missing or
        fail verification are left out, one `skipping <dataset>: <why>` line each (only a
        missing target stops the run); `--datasets` names them instead.

        ```
        python nb/03_hvg.py --help                        # flags and defaults
        python nb/03_hvg.py --world synthetic             # headless
        python nb/03_hvg.py --world real --n-hvg 2000     # real data (mygene fills its cache once)
        python nb/03_hvg.py --world real --datasets vcc2025_h1 replogle2022_k562   # only these
        marimo edit nb/03_hvg.py -- --world synthetic
        ```
        """
    )
    return (mo,)


@app.cell
def _():
    import lib

    cfg = lib.parse_config(lib.HvgConfig, description="03 HVG: per-dataset HVGs and the shared gene space")
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
    ## Gene ids

    Datasets name genes differently: the VCC file by symbol (with an Ensembl `gene_id`
    column), Replogle by versioned Ensembl id (`ENSG00000141510.16`), some only by
    symbol. We key every gene by its Ensembl id without the version. Symbols without an
    id are looked up with mygene through an on-disk cache: the committed
    `gene_cache/mygene_synthetic.json` for the synthetic world, and
    `<data_root>/gene_cache/mygene_human.json` for real data (filled on first use;
    misses are recorded too, so they are not asked again). Offline with no cache entry,
    a gene is *reported* as unmapped in `unmapped_genes.csv`, never dropped silently.

    ## The rule for the shared list

    1. Per dataset, scanpy's `seurat_v3` HVGs (`n_hvg_per_dataset`) on raw counts, with
       the dataset's batch key (each batch fitted separately, genes ranked by median rank
       across batches), on at most `max_cells` cells (a fixed random subsample).
    2. Candidates are genes **measured in the target** (H1): we must predict every
       shared gene there.
    3. Sort candidates by the number of datasets in which they are HVG, most first: the
       intersection of all lists comes first, then genes HVG in the most datasets.
    4. Ties: best mean rank over the datasets where the gene is HVG, then Ensembl id.
    5. Too few candidates (tiny worlds only): the target's most variable remaining genes.
    """)
    return


@app.cell
def _(cfg, lib, mo, run_button):
    mo.stop(lib.in_marimo_notebook() and not run_button.value, mo.md("Press **Run** to start."))
    hvgs = lib.run_hvg(cfg)
    hvg_dir = lib.get_hvg_dir(cfg.data_root, cfg.world)
    print(f"wrote {hvg_dir / 'hvg.csv'}: {len(hvgs)} genes, {int(hvgs['in_all'].sum())} HVG in every dataset")
    print(hvgs["n_datasets"].value_counts().sort_index(ascending=False).rename("genes by n_datasets").to_string())
    hvgs.head(10)
    return hvg_dir, hvgs


@app.cell
def _(mo):
    mo.md(r"""
    ## Overlap of the per-dataset lists

    Each bar counts genes that are HVG in exactly the datasets marked below it; the dark
    part made the shared list. A large all-datasets bar means the cell types agree on
    which genes vary; bars without the target are genes the target does not measure or
    does not find variable.
    """)
    return


@app.cell
def _(cfg, hvg_dir, hvgs, lib):
    import json

    _datasets = json.loads((hvg_dir / "hvg.json").read_text())["datasets"]
    _hvg_sets = {}
    for _name in _datasets:
        _table = lib.read_dataset_genes(cfg.data_root, cfg.world, _name)
        _hvg_sets[_name] = set(_table.loc[_table["highly_variable"] & _table["in_gene_space"], "ensembl_id"])
    overlap_fig = lib.plot_hvg_overlap(_hvg_sets, shared=set(hvgs["ensembl_id"]))
    _path = lib.write_figure(overlap_fig, lib.get_figures_dir(cfg.data_root) / f"03_hvg_overlap_{cfg.world}.png")
    print(f"wrote {_path}")
    overlap_fig
    return


@app.cell
def _(hvg_dir, mo):
    import pandas as pd

    _unmapped = (
        pd.read_csv(hvg_dir / "unmapped_genes.csv")
        if (hvg_dir / "unmapped_genes.csv").stat().st_size > 1
        else pd.DataFrame()
    )
    mo.md(
        f"**Genes outside the shared gene space:** {len(_unmapped)} "
        f"(listed with reasons in `{hvg_dir / 'unmapped_genes.csv'}`)."
    )
    return


if __name__ == "__main__":
    app.run()
