import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium")


@app.cell
def _():
    import marimo as mo

    mo.md(
        r"""
        # 01 · Download (or generate) the raw data

        Everything later in the pipeline reads files under `<data_root>/raw/<source>/`
        (`<data_root>` = `--data-root`, else `$VCELL_DATA_ROOT`, else `./data`). This notebook
        puts them there, in one of two worlds:

        - **synthetic** (default): `lib.write_synthetic_world` generates a seeded Perturb-seq
          world with a known answer, written in the *same layouts* as the real files (an H1
          target laid out like VCC 2025; K562/RPE1 like Replogle 2022 with versioned Ensembl
          ids; HepG2 with symbols only; Jurkat with another control label). Every later stage
          runs on it in seconds, with no network.
        - **real**: downloads the public sources listed in `data_manifest.toml`.

        ```
        python nb/01_download.py --help                      # flags and defaults
        python nb/01_download.py                             # synthetic world, size small
        python nb/01_download.py --size tiny --seed 1        # another synthetic world
        python nb/01_download.py --world real                # the default real sources
        python nb/01_download.py --world real --sources vcc2025 replogle2022
        marimo edit nb/01_download.py -- --world synthetic   # interactively
        ```
        """
    )
    return (mo,)


@app.cell
def _():
    import lib  # the project's one shared module (installed editable by uv)

    cfg = lib.parse_config(
        lib.DownloadConfig, description="01 download: write the synthetic world or fetch the real sources"
    )
    data_root = lib.get_data_root(cfg.data_root)
    return cfg, data_root, lib


@app.cell
def _(mo):
    mo.md(r"""
    ## The real sources

    Each `[sources.<name>]` table of `data_manifest.toml` lists its files (url, size in
    bytes, sha256 where known) and, per h5ad file, the keys that matter downstream
    (`[[sources.<name>.datasets]]`: perturbation column, control label, batch column,
    what the gene index holds, raw counts or not). The sources do not agree on any of
    these, which is why they are written down rather than guessed:

    | source | cells | perturbation column / control | genes (var index) |
    |---|---|---|---|
    | `vcc2025` (H1, the target) | 221k, 150 perts | `target_gene` / `non-targeting` | symbols (+ `gene_id`) |
    | `replogle2022` (K562, RPE1) | ~310k, ~248k | `gene` / `non-targeting` | Ensembl (+ `gene_name`) |
    | `nadig2025` (HepG2, Jurkat) | ~145k, ~263k | `gene` / `non-targeting` | Ensembl (+ `gene_name`) |

    Optional sources (fetched only when named with `--sources`): `vcc2025_heldout` (the
    public VCC answers, for local scoring only), `replogle_nadig_hf` (Arc's preprocessed
    copy), `kolf2026` (KOLF2.1J iPSC atlas, 47 GB), `scperturb` (smaller harmonised copies).
    The manifest's comments say which sizes and hashes were checked and which were not.
    """)
    return


@app.cell
def _(lib):
    lib.get_source_table()
    return


@app.cell
def _(mo):
    mo.md(r"""
    ## How a file is fetched

    `lib.download_source` streams each file into `<file>.part`, so an interrupted download
    resumes (HTTP Range) on the next run; a server that ignores Range makes it start over
    cleanly. The finished file is checked against the manifest's size and sha256, then
    renamed into place, so a reader never sees half a file. A file whose sha256 is not in
    the manifest gets its hash recorded on first download in
    `<data_root>/raw/<source>/.vcell_hashes.json` (with a loud warning), and every later
    run verifies against it. Verified files are remembered by size and mtime, so a 15 GB
    file is not re-hashed each run.

    If a host cannot be reached (as on machines without internet), the run ends with one
    error listing every missing file, its URL, and the exact path to put it at by hand
    (`<data_root>/raw/<source>/<file>`). A hand-placed file is verified the same way.
    A source shipped as h5mu (MuData; `h5mu_file` and `h5mu_modality` in its manifest entry)
    is then converted: that modality becomes the dataset's h5ad (`lib.convert_h5mu`: streamed,
    temporary file then rename, skipped when up to date).
    """)
    return


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
    summary, written_dir = lib.run_download(cfg)
    return summary, written_dir


@app.cell
def _(mo):
    mo.md(r"""
    ## What is on disk now

    Every file under the directory written above, with its size (and cell / gene counts
    for the synthetic world). Later notebooks find them through `lib.get_datasets(world)`
    and `lib.get_dataset_path(spec, data_root)`.
    """)
    return


@app.cell
def _(lib, summary, written_dir):
    file_rows = lib.get_file_table(written_dir)
    for _row in file_rows:
        _row.update(summary["files"].get(_row["file"], {}))
    print(f"{written_dir}:")
    for _row in file_rows:
        print("  " + "  ".join(f"{k}={v}" for k, v in _row.items()))
    file_rows
    return


if __name__ == "__main__":
    app.run()
