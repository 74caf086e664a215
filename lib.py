"""vcell: everything the notebooks share, in pipeline order.

Sections: paths & io · manifest · download · synthetic world · gene ids · HVG ·
normalise & store · (loader · model · losses · metrics · train · infer: later issues).

Shape suffixes on array names: c cell, g gene, p perturbation, b batch, s set,
h hidden, k group. `x_cg` is a cells × genes matrix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import tomllib
from collections.abc import Iterable, Iterator
import typing
from typing import Any

import numpy as np
import datetime
import fcntl
import http.client
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
import functools
import math
from collections.abc import Sequence
import beartype
import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

REPO_DIR = pathlib.Path(__file__).resolve().parent
MANIFEST_PATH = REPO_DIR / "data_manifest.toml"
DATA_ROOT_ENV = "VCELL_DATA_ROOT"


# ----------------------------------------------------------------------------
# paths & io
# ----------------------------------------------------------------------------


def get_data_root(data_root: str | os.PathLike | None = None) -> pathlib.Path:
    """The one data root: an explicit flag wins, then $VCELL_DATA_ROOT, then ./data.

    Relative paths are taken from the repository, so notebooks behave the same
    from any working directory.
    """
    root = data_root or os.environ.get(DATA_ROOT_ENV) or "data"
    path = pathlib.Path(root).expanduser()
    return path if path.is_absolute() else REPO_DIR / path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only on success.

    Readers never see a half-written file, and a failure leaves the previous
    version of `path` untouched.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp_path:
        tmp_path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_h5ad(path: str | os.PathLike, adata) -> None:
    with atomic_path(path) as tmp_path:
        adata.write_h5ad(tmp_path)


def write_h5ad_chunked(path: str | os.PathLike, obs, var, make_chunk, n_cells: int, chunk_cells: int, desc: str) -> None:
    """Write an h5ad whose CSR X comes from `make_chunk(start, stop)` chunk by chunk.

    Memory stays at one chunk (anndata appends to the on-disk CSR), and the file
    appears atomically.
    """
    import scipy.sparse
    import anndata
    import h5py

    starts = list(range(0, n_cells, chunk_cells))
    with atomic_path(path) as tmp_path:
        for i, start in enumerate(progress(starts, desc=desc)):
            x_chunk = scipy.sparse.csr_matrix(make_chunk(start, min(start + chunk_cells, n_cells)), dtype=np.float32)
            if i == 0:
                anndata.AnnData(X=x_chunk, obs=obs.iloc[: x_chunk.shape[0]], var=var).write_h5ad(tmp_path)
                continue
            with h5py.File(tmp_path, "a") as f:
                anndata.io.sparse_dataset(f["X"]).append(x_chunk)
        if len(starts) > 1:  # obs was written for the first chunk only
            with h5py.File(tmp_path, "a") as f:
                del f["obs"]
                anndata.io.write_elem(f, "obs", obs)


def in_marimo_notebook() -> bool:
    """True inside `marimo edit`/`run` (not in script mode, pytest or nbmake)."""
    if "marimo" not in sys.modules:
        return False
    import marimo as mo

    return mo.running_in_notebook()


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "") -> Iterable:
    """Progress for long loops: a marimo progress bar in the editor, tqdm elsewhere."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if in_marimo_notebook():
        import marimo as mo

        return mo.status.progress_bar(iterable, total=total, title=desc)
    import tqdm

    return tqdm.tqdm(iterable, total=total, desc=desc, mininterval=1.0, file=sys.stderr)


def notebook_argv() -> list[str]:
    """Command-line flags for a notebook: real ones in script mode, none elsewhere.

    Under nbmake/Jupyter `sys.argv` holds the kernel's own flags, under pytest the
    test runner's: there flags come from $VCELL_NB_ARGS. In `marimo edit nb.py -- ...`
    marimo puts the flags after `--` into sys.argv, as script mode does.
    """
    if "ipykernel" in sys.modules or "pytest" in sys.modules:
        # The one way to pass flags where there is no command line (tests, nbmake).
        import shlex

        return shlex.split(os.environ.get("VCELL_NB_ARGS", ""))
    return sys.argv[1:]


def parse_config(config_cls, argv: list[str] | None = None, description: str = ""):
    """Parse a frozen dataclass config from flags (tyro: `--help` shows each field's docstring)."""
    import tyro

    return tyro.cli(config_cls, args=notebook_argv() if argv is None else argv, description=description)


# ----------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One h5ad file of one cell type, and the keys that matter downstream."""

    name: str
    """Unique name, e.g. `vcc2025_h1` or `synthetic_k562`."""
    source: str
    """The manifest source it belongs to."""
    path: str
    """File path relative to the source's directory under `<data_root>/raw/<source>/`."""
    cell_type: str
    """Cell type of every cell in the file (H1, K562, ...)."""
    perturbation_key: str
    """obs column naming the perturbed gene (symbol)."""
    control_label: str
    """Value of `perturbation_key` for control (non-targeting) cells."""
    batch_key: str
    """obs column with the batch (gem group, Flex lane), or "" if none."""
    gene_index: str
    """What `var.index` holds: `symbol` or `ensembl` (version suffixes allowed)."""
    gene_id_column: str
    """var column with Ensembl ids when the index holds symbols, else ""."""
    gene_symbol_column: str
    """var column with symbols when the index holds Ensembl ids, else ""."""
    counts: str
    """`raw` for integer UMI counts, `log1p` for already normalised data."""
    role: str
    """`target` for the cell type we predict, `context` for the others."""


def read_manifest(path: str | os.PathLike = MANIFEST_PATH) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def get_datasets(world: str, manifest: dict[str, Any] | None = None) -> list[DatasetSpec]:
    """The datasets that make up a world: `synthetic`, or `real` (every real source
    that lists datasets). The target dataset comes first."""
    manifest = read_manifest() if manifest is None else manifest
    sources = manifest["sources"]
    if world == "synthetic":
        names = ["synthetic"]
    elif world == "real":
        names = [n for n, s in sources.items() if n != "synthetic" and s.get("datasets")]
    else:
        raise ValueError(f"unknown world {world!r}: use 'synthetic' or 'real'")
    fields = {f.name for f in dataclasses.fields(DatasetSpec)}
    specs = []
    for source in names:
        for entry in sources[source].get("datasets", []):
            unknown = set(entry) - fields
            if unknown:
                raise ValueError(f"manifest source {source!r}: unknown dataset keys {sorted(unknown)}")
            defaults = dict(batch_key="", gene_id_column="", gene_symbol_column="", counts="raw", role="context")
            specs.append(DatasetSpec(source=source, **{**defaults, **entry}))
    specs.sort(key=lambda s: s.role != "target")
    if sum(s.role == "target" for s in specs) != 1:
        raise ValueError(f"world {world!r} must have exactly one dataset with role = 'target'")
    return specs


def get_dataset_path(spec: DatasetSpec, data_root: str | os.PathLike | None = None) -> pathlib.Path:
    return get_data_root(data_root) / "raw" / spec.source / spec.path


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# configs shared by the data notebooks
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Flags every data notebook takes."""

    data_root: str = ""
    """Data root; empty means $VCELL_DATA_ROOT, else ./data (git-ignored)."""
    world: typing.Literal["synthetic", "real"] = "synthetic"
    """`synthetic`: the locally generated world (default); `real`: the downloaded sources."""


# ----------------------------------------------------------------------------
# synthetic world
# ----------------------------------------------------------------------------
# A seeded stand-in for the real sources, written in their on-disk layouts so the
# same code reads both. The biology is simple but has the structure that makes the
# problem real (and that a model can exploit or fail to):
#   log mu_cg = base_g[cell type] + batch_bg + loading_g * z_c[module(g)]
#               + kd_c * effect_pg[cell type] (+ log(1 - kd_c) on the target gene)
#   counts_cg ~ NegBinomial(mean = L_c * softmax(log mu_c)_g, dispersion_g)
# Genes belong to co-expression modules (z_c: per-cell program activity, one of them
# a strong cell-cycle-like program); knocking a gene down moves its own module
# (so co-expression tells you what a gene does) plus a few random edges and, for
# strong perturbations, a generic stress response. Effects are shared across cell
# types up to a cell-type-specific modulation, so other cell types carry signal
# about H1's unseen perturbations.


@dataclasses.dataclass(frozen=True)
class SyntheticSize:
    """How big a synthetic world is."""

    n_genes_universe: int
    """Genes in the shared universe; each dataset measures a subset."""
    n_genes_target: int
    """Genes measured in the target (H1) dataset: the submission's gene list."""
    n_perts_target: tuple[int, int, int]
    """Target perturbations in (train, validation, test), shaped like VCC's 150/50/100."""
    cells_per_pert_target: int
    """Median cells per target perturbation (drawn per perturbation around it)."""
    n_control_target: int
    """Control cells in the target training file (each truth file gets a third)."""
    n_perts_context: int
    """Perturbations per context dataset (K562, RPE1, HepG2, Jurkat)."""
    cells_per_pert_context: int
    """Median cells per context perturbation."""
    n_control_context: int
    """Control cells per context dataset."""
    median_umi: int
    """Median UMIs per cell in the target; context datasets scale it."""
    n_modules: int
    """Co-expression modules (programs) in the gene network."""
    chunk_cells: int = 20_000
    """Cells generated at once: bounds memory for the vcc-scale world."""


SYNTHETIC_SIZES = {
    "tiny": SyntheticSize(800, 600, (24, 8, 16), 30, 240, 60, 20, 160, 6_000, 16),
    "small": SyntheticSize(5_000, 4_000, (150, 50, 100), 30, 1_500, 200, 16, 600, 12_000, 100),
    "vcc": SyntheticSize(20_000, 18_080, (150, 50, 100), 1_220, 38_176, 2_000, 40, 8_000, 50_000, 400),
}

# (dataset name, cell type, relative library size, number of batches); the layout of
# each file (keys, gene id convention, control label) comes from the manifest.
_SYNTHETIC_CELL_TYPES = [
    ("synthetic_h1", "H1", 1.0, 4),
    ("synthetic_k562", "K562", 0.8, 3),
    ("synthetic_rpe1", "RPE1", 0.7, 3),
    ("synthetic_hepg2", "HepG2", 0.6, 2),
    ("synthetic_jurkat", "Jurkat", 0.6, 2),
]


def synthetic_symbol(gene_u: np.ndarray) -> np.ndarray:
    """Symbols of universe genes: `SYN00042`."""
    return np.char.add("SYN", np.char.zfill(np.asarray(gene_u).astype(str), 5))


def synthetic_ensembl_id(gene_u: np.ndarray) -> np.ndarray:
    """Ensembl-like ids (`ENSG9` + 10 digits): cannot clash with real ids."""
    return np.char.add("ENSG9", np.char.zfill(np.asarray(gene_u).astype(str), 10))


def _barcodes(rng: np.random.Generator, n: int, suffixes: np.ndarray) -> np.ndarray:
    """Unique 24-base barcodes with a per-cell suffix, like `AAAC...AGG-Flex_1_01`."""
    codes = np.unique(rng.integers(0, 4**24, size=int(n * 1.01) + 16))
    codes = rng.permutation(codes)[:n]
    digits = (codes[:, None] // (4 ** np.arange(23, -1, -1))) % 4
    bases = np.array(list("ACGT"))[digits]
    return np.char.add(np.char.add(bases.view(f"<U24").ravel(), "-"), suffixes.astype(str))


def _make_gene_network(rng: np.random.Generator, size: SyntheticSize) -> dict[str, np.ndarray]:
    """Universe-level biology shared by every cell type."""
    n_u = size.n_genes_universe
    module_u = rng.integers(0, size.n_modules, n_u)
    loading_u = rng.normal(0.0, 0.6, n_u) * (rng.random(n_u) < 0.6)  # 40% of genes ignore their module
    loading_u[module_u == 0] *= 1.5  # module 0 is the strong cell-cycle-like program
    log_base_u = rng.normal(0.0, 2.0, n_u)
    log_base_u[module_u == 0] += 1.0
    theta_u = np.exp(rng.normal(1.0, 0.7, n_u))  # NB inverse dispersion
    stress_u = rng.normal(0.0, 0.5, n_u) * (rng.random(n_u) < 0.03)  # generic response of strong knockdowns
    return dict(module_u=module_u, loading_u=loading_u, log_base_u=log_base_u, theta_u=theta_u, stress_u=stress_u)


def _make_effects(rng: np.random.Generator, net: dict, targets_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Universe-level downstream effects of knocking down each target: (effect_pu, strength_p).

    Most perturbations are weak, some strong (as in real screens). A target moves its
    own module against its loading (less of a member means less module activity), a
    few random genes, and if strong a shared stress response.
    """
    n_p, n_u = len(targets_p), len(net["module_u"])
    tier_p = rng.choice(3, size=n_p, p=[0.5, 0.35, 0.15])
    strength_p = np.array([0.1, 0.6, 1.5])[tier_p] * np.exp(rng.normal(0, 0.3, n_p))
    effect_pu = np.zeros((n_p, n_u), np.float32)
    for p, target in enumerate(targets_p):
        same_module_u = net["module_u"] == net["module_u"][target]
        sign = np.sign(net["loading_u"][target]) or 1.0
        effect_pu[p] = -1.5 * strength_p[p] * sign * net["loading_u"] * same_module_u
        # Strong knockdowns reach ~3% of all genes beyond their module.
        edges = rng.choice(n_u, size=min(n_u, rng.poisson(2 + 0.02 * n_u * strength_p[p])), replace=False)
        effect_pu[p, edges] += rng.normal(0.0, 0.8 * strength_p[p], len(edges))
        effect_pu[p] += max(strength_p[p] - 0.5, 0.0) * net["stress_u"]
        effect_pu[p, target] = 0.0  # the target's own change is the knockdown itself
    return effect_pu, strength_p


def _cell_type_effects(rng: np.random.Generator, effect_pu: np.ndarray, net: dict) -> np.ndarray:
    """Cell-type-specific modulation of shared effects: per-module gain, per-perturbation
    gain, and 15% of edges that this cell type lacks."""
    module_gain_m = np.exp(rng.normal(0.0, 0.3, net["module_u"].max() + 1))
    pert_gain_p = np.exp(rng.normal(0.0, 0.3, effect_pu.shape[0]))
    kept_pu = rng.random(effect_pu.shape) > 0.15
    return (effect_pu * module_gain_m[net["module_u"]][None] * pert_gain_p[:, None] * kept_pu).astype(np.float32)


def _sample_counts(
    rng: np.random.Generator,
    *,
    log_mu_g: np.ndarray,
    net_g: dict,
    batch_offset_bg: np.ndarray,
    effect_pg: np.ndarray,
    pert_c: np.ndarray,
    target_col_p: np.ndarray,
    kd_p: np.ndarray,
    batch_c: np.ndarray,
    library_c: np.ndarray,
    n_modules: int,
):
    """NB counts for one chunk of cells (pert_c = -1 for control). Returns CSR float32."""
    import scipy.sparse

    n_c = len(pert_c)
    z_cm = rng.normal(0.0, 0.25, (n_c, n_modules))
    z_cm[:, 0] = 1.2 * (rng.random(n_c) < 0.4) + rng.normal(0.0, 0.2, n_c)  # cycling vs not
    logits_cg = log_mu_g[None] + batch_offset_bg[batch_c] + net_g["loading"][None] * z_cm[:, net_g["module"]]
    perturbed_c = pert_c >= 0
    # Knockdown efficiency per cell: the perturbation's efficiency, some cells escape.
    escaped_c = rng.random(n_c) < 0.1
    kd_c = np.where(perturbed_c & ~escaped_c, kd_p[np.maximum(pert_c, 0)] * rng.uniform(0.7, 1.0, n_c), 0.0)
    logits_cg[perturbed_c] += kd_c[perturbed_c, None] * effect_pg[pert_c[perturbed_c]]
    rows = np.flatnonzero(perturbed_c & (target_col_p[np.maximum(pert_c, 0)] >= 0))
    logits_cg[rows, target_col_p[pert_c[rows]]] += np.log1p(-0.98 * kd_c[rows])
    logits_cg -= logits_cg.max(axis=1, keepdims=True)
    prob_cg = np.exp(logits_cg)
    prob_cg /= prob_cg.sum(axis=1, keepdims=True)
    mean_cg = prob_cg * library_c[:, None]
    theta_g = net_g["theta"][None]
    counts_cg = rng.negative_binomial(theta_g, theta_g / (theta_g + mean_cg))
    return scipy.sparse.csr_matrix(counts_cg.astype(np.float32))


def write_synthetic_world(data_root: str | os.PathLike | None = None, size: str = "small", seed: int = 0) -> dict:
    """Generate the synthetic world under `<data_root>/raw/synthetic/` (layouts: wip/README.md).

    Deterministic for (size, seed). Returns a summary: files written and their cell counts.
    """
    import pandas as pd

    if size not in SYNTHETIC_SIZES:
        raise ValueError(f"unknown synthetic size {size!r}: choose one of {sorted(SYNTHETIC_SIZES)}")
    sz = SYNTHETIC_SIZES[size]
    out_dir = get_data_root(data_root) / "raw" / "synthetic"
    specs = {s.name: s for s in get_datasets("synthetic")}
    rng = np.random.default_rng(seed)
    net = _make_gene_network(rng, sz)
    n_u = sz.n_genes_universe
    symbol_u, ensembl_u = synthetic_symbol(np.arange(1, n_u + 1)), synthetic_ensembl_id(np.arange(1, n_u + 1))
    version_u = rng.integers(1, 20, n_u)

    # Which genes each dataset measures; the target's list is the submission's gene list.
    target_genes = np.sort(rng.choice(n_u, sz.n_genes_target, replace=False))
    # Perturbations target reasonably expressed genes, as CRISPRi screens of essential genes do.
    expressed = target_genes[net["log_base_u"][target_genes] > np.quantile(net["log_base_u"], 0.4)]
    n_train, n_val, n_test = sz.n_perts_target
    target_perts = rng.choice(expressed, n_train + n_val + n_test, replace=False)
    split_of = dict(zip(target_perts, ["train"] * n_train + ["val"] * n_val + ["test"] * n_test))
    context_perts = {}
    for name, *_ in _SYNTHETIC_CELL_TYPES[1:]:
        shared = rng.choice(target_perts, int(0.4 * len(target_perts)), replace=False)
        others = rng.choice(np.setdiff1d(expressed, shared), sz.n_perts_context - len(shared), replace=False)
        context_perts[name] = np.concatenate([shared, others])
    all_perts = np.unique(np.concatenate([target_perts, *context_perts.values()]))
    effect_pu, strength_p = _make_effects(rng, net, all_perts)
    kd_eff_p = rng.beta(8, 2, len(all_perts))  # per-perturbation knockdown efficiency
    pert_row = {g: i for i, g in enumerate(all_perts)}

    summary = {"size": size, "seed": seed, "files": {}}
    for name, cell_type, library_scale, n_batches in _SYNTHETIC_CELL_TYPES:
        spec = specs[name]
        ds_rng = np.random.default_rng([seed, len(summary["files"])])
        is_target = spec.role == "target"
        if is_target:
            genes_g = target_genes
        else:
            perts = context_perts[name]
            keep = np.sort(rng.choice(n_u, int(n_u * rng.uniform(0.8, 0.95)), replace=False))
            genes_g = np.union1d(keep, perts)  # a screen measures the genes it perturbs
        col_of = {g: j for j, g in enumerate(genes_g)}
        log_mu_g = net["log_base_u"][genes_g] + ds_rng.normal(0.0, 0.4, len(genes_g))
        net_g = dict(module=net["module_u"][genes_g], loading=net["loading_u"][genes_g], theta=net["theta_u"][genes_g])
        effect_pg = _cell_type_effects(ds_rng, effect_pu, net)[:, genes_g]
        target_col_p = np.array([col_of.get(g, -1) for g in all_perts])
        batch_offset_bg = ds_rng.normal(0.0, 0.1, (n_batches, len(genes_g)))
        batch_scale_b = np.exp(ds_rng.normal(0.0, 0.15, n_batches))

        if spec.gene_index == "symbol":
            var = pd.DataFrame(index=pd.Index(symbol_u[genes_g], name=None))
            if spec.gene_id_column:
                var[spec.gene_id_column] = ensembl_u[genes_g]
        else:
            var = pd.DataFrame(index=np.char.add(np.char.add(ensembl_u[genes_g], "."), version_u[genes_g].astype(str)))
            var[spec.gene_symbol_column] = symbol_u[genes_g]

        def make_file(perts_of_file, cells_per_pert, n_control, file_rng, median_umi):
            """Per-cell perturbation rows (-1 control), batches, library sizes; shuffled."""
            n_cells_p = np.maximum(3, file_rng.poisson(cells_per_pert * np.exp(file_rng.normal(0, 0.3, len(perts_of_file)))))
            pert_c = np.concatenate([np.full(n_control, -1), np.repeat([pert_row[g] for g in perts_of_file], n_cells_p)])
            pert_c = file_rng.permutation(pert_c)
            batch_c = file_rng.integers(0, n_batches, len(pert_c))
            library_c = median_umi * batch_scale_b[batch_c] * np.exp(file_rng.normal(0.0, 0.35, len(pert_c)))
            return pert_c, batch_c, library_c

        def write(path, pert_c, batch_c, library_c, file_rng):
            symbols_c = np.where(pert_c >= 0, symbol_u[all_perts[np.maximum(pert_c, 0)]], spec.control_label)
            if is_target:
                batch_names = np.array([f"Flex_{1 + b // 2}_{1 + b % 2:02d}" for b in range(n_batches)])
                guides = np.where(pert_c >= 0, np.char.add(np.char.add(symbols_c, "_P1P2_A|"), np.char.add(symbols_c, "_P1P2_B")),
                                  np.char.add("non-targeting_", np.char.zfill((file_rng.integers(1, 200, len(pert_c))).astype(str), 4)))
                obs = pd.DataFrame({"target_gene": symbols_c, "guide_id": guides, "batch": batch_names[batch_c]},
                                   index=_barcodes(file_rng, len(pert_c), batch_names[batch_c]))
            else:
                obs = pd.DataFrame({"gene": symbols_c, "gem_group": batch_c + 1},
                                   index=_barcodes(file_rng, len(pert_c), (batch_c + 1).astype(str)))
            obs = obs.astype({c: "category" for c in obs.columns if obs[c].dtype == object})

            def make_chunk(start, stop):
                chunk_rng = np.random.default_rng([seed, len(summary["files"]), start])
                return _sample_counts(chunk_rng, log_mu_g=log_mu_g, net_g=net_g, batch_offset_bg=batch_offset_bg,
                                      effect_pg=effect_pg, pert_c=pert_c[start:stop], target_col_p=target_col_p,
                                      kd_p=kd_eff_p, batch_c=batch_c[start:stop], library_c=library_c[start:stop],
                                      n_modules=sz.n_modules)

            write_h5ad_chunked(path, obs, var, make_chunk, len(pert_c), sz.chunk_cells, desc=f"{name}: {path.name}")
            summary["files"][str(path.relative_to(out_dir))] = {"n_cells": len(pert_c), "n_genes": len(genes_g)}

        median_umi = sz.median_umi * library_scale
        if not is_target:
            pert_c, batch_c, library_c = make_file(perts, sz.cells_per_pert_context, sz.n_control_context, ds_rng, median_umi)
            write(get_dataset_path(spec, data_root), pert_c, batch_c, library_c, ds_rng)
            continue
        vcc_dir = get_dataset_path(spec, data_root).parent
        splits = {"train": "adata_Training.h5ad", "val": "adata_Validation_truth.h5ad", "test": "adata_Test_truth.h5ad"}
        for split, file_name in splits.items():
            perts = np.array([g for g in target_perts if split_of[g] == split])
            n_control = sz.n_control_target if split == "train" else sz.n_control_target // 3
            pert_c, batch_c, library_c = make_file(perts, sz.cells_per_pert_target, n_control, ds_rng, median_umi)
            write(vcc_dir / file_name, pert_c, batch_c, library_c, ds_rng)
            if split != "train":
                # The challenge tells you how many cells to predict and their depth.
                counts = pd.DataFrame({"target_gene": symbol_u[all_perts[pert_c]], "umi": library_c})[pert_c >= 0]
                table = counts.groupby("target_gene", sort=False).agg(n_cells=("umi", "size"), median_umi_per_cell=("umi", "median"))
                table = table.loc[symbol_u[perts]].reset_index()
                table["median_umi_per_cell"] = table["median_umi_per_cell"].round(0)
                csv_name = "pert_counts_Validation.csv" if split == "val" else "pert_counts_Test.csv"
                with atomic_path(vcc_dir / csv_name) as tmp_path:
                    table.to_csv(tmp_path, index=False)
        with atomic_path(vcc_dir / "gene_names.csv") as tmp_path:
            tmp_path.write_text("\n".join(symbol_u[target_genes]) + "\n")

    # Generator internals, for tests and for checking that models find real signal.
    with atomic_path(out_dir / "truth.npz") as tmp_path:
        with open(tmp_path, "wb") as f:
            np.savez_compressed(f, perts_u=all_perts, effect_pu=effect_pu, strength_p=strength_p, kd_efficiency_p=kd_eff_p,
                                module_u=net["module_u"], loading_u=net["loading_u"])
    summary["splits"] = {s: sorted(symbol_u[g] for g in target_perts if split_of[g] == s) for s in ("train", "val", "test")}
    summary["context_perturbations"] = {n: sorted(symbol_u[p]) for n, p in context_perts.items()}
    write_json(out_dir / "world.json", summary)
    return summary


# ----------------------------------------------------------------------------
# submission
# ----------------------------------------------------------------------------
# A submission is an h5ad with obs `target_gene` (control cells included), every gene of
# `gene_names.csv` in that order, log1p values, float32 CSR; `cell-eval prep` packs it as
# a `.vcc` (a plain tar of `pred.h5ad.zst` and a watermark). The writer streams: cells
# are predicted and written a chunk at a time, so memory never holds the full matrix
# (the researcher saw 7 GB spikes materialising it).

MAX_SUBMISSION_CELLS = 100_000
"""Cell cap of the 2025 validation phase (200,000 later)."""


def make_submission_obs(
    pert_counts: "pd.DataFrame", n_control: int, control_label: str = "non-targeting"
) -> "pd.DataFrame":
    """obs of a submission: `n_cells` rows per requested perturbation, then the controls."""
    import pandas as pd

    labels = np.concatenate([np.repeat(pert_counts["target_gene"].to_numpy(str), pert_counts["n_cells"]),
                             np.full(n_control, control_label)])
    return pd.DataFrame({"target_gene": pd.Categorical(labels)}, index=np.arange(len(labels)).astype(str))


def check_log1p_chunk(x_cg: np.ndarray, where: str) -> None:
    """One clear error for values a scorer would reject or silently misread."""
    if not np.all(np.isfinite(x_cg)):
        raise ValueError(f"{where}: NaN or inf in predictions; check the model's output (clip, or fix a diverged run).")
    if x_cg.size and x_cg.min() < 0:
        raise ValueError(f"{where}: negative values (min {x_cg.min():.3g}); predictions must be log1p(CP10K) >= 0: clip at 0.")
    if x_cg.size and x_cg.max() >= 15:
        raise ValueError(f"{where}: values >= 15 (max {x_cg.max():.3g}) look like raw counts or CP10K, not log1p: apply lib.normalise first.")


def write_submission(
    path: str | os.PathLike,
    *,
    gene_names: list[str],
    obs: "pd.DataFrame",
    predict_chunk,
    chunk_cells: int = 4_096,
    max_cells: int = MAX_SUBMISSION_CELLS,
    control_label: str = "non-targeting",
) -> pathlib.Path:
    """Validate and stream a submission h5ad to `path` (atomically).

    `predict_chunk(start, stop)` returns the log1p rows `start:stop` of `obs`, all
    genes in `gene_names` order. Checks: control cells present, no more than
    `max_cells`, gene list unique, every chunk the right shape and in log1p range.
    """
    import pandas as pd

    path = pathlib.Path(path)
    if control_label not in set(obs["target_gene"]):
        raise ValueError(f"no control cells ({control_label!r}) in the submission: the scorer needs them; add them to obs.")
    if len(obs) > max_cells:
        raise ValueError(f"{len(obs):,} cells exceed the limit of {max_cells:,}: request fewer cells per perturbation.")
    if len(set(gene_names)) != len(gene_names):
        raise ValueError("gene_names has duplicates: pass the gene_names.csv list unchanged.")
    var = pd.DataFrame(index=pd.Index(gene_names, dtype=str))

    def checked_chunk(start: int, stop: int) -> np.ndarray:
        x_cg = np.asarray(predict_chunk(start, stop), dtype=np.float32)
        if x_cg.shape != (stop - start, len(gene_names)):
            raise ValueError(f"cells {start}:{stop}: prediction has shape {x_cg.shape}, expected {(stop - start, len(gene_names))} "
                             "(cells × genes in gene_names.csv order)")
        check_log1p_chunk(x_cg, f"cells {start}:{stop}")
        return x_cg

    write_h5ad_chunked(path, obs, var, checked_chunk, len(obs), chunk_cells, desc=f"writing {path.name}")
    return path


def pack_vcc(h5ad_path: str | os.PathLike, vcc_path: str | os.PathLike | None = None) -> pathlib.Path:
    """Pack a submission h5ad as `cell-eval prep` does: tar of `pred.h5ad.zst` + `watermark.txt`.

    Run `write_submission` first: it already writes prep's minimal float32 CSR layout.
    Compresses with the zstandard library (streaming, so memory stays small) rather than
    prep's `zstd` program, which a fresh machine may not have.
    """
    import tarfile
    import tempfile

    import zstandard

    h5ad_path = pathlib.Path(h5ad_path)
    vcc_path = pathlib.Path(vcc_path) if vcc_path else h5ad_path.with_suffix(".prep.vcc")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = pathlib.Path(tmp_dir)
        with open(h5ad_path, "rb") as src, open(tmp / "pred.h5ad.zst", "wb") as dst:
            zstandard.ZstdCompressor(level=3, threads=-1).copy_stream(src, dst)
        (tmp / "watermark.txt").write_text("vcc-prep")
        with atomic_path(vcc_path) as tmp_vcc, tarfile.open(tmp_vcc, "w", format=tarfile.GNU_FORMAT) as tar:
            for name in ["pred.h5ad.zst", "watermark.txt"]:
                tar.add(tmp / name, arcname=name)
    return vcc_path


# ----------------------------------------------------------------------------
# download
# ----------------------------------------------------------------------------
# download: fetch the manifest's real sources, resumable, verified and atomic.
#
# Pasted into lib.py's "download" section (the merge rewrites `lib.x` -> `x`).
#
# Every file of `[sources.<name>]` lands in `<data_root>/raw/<name>/<file>`. A download streams
# into `<file>.part` (kept on failure, resumed with an HTTP Range request next time), is checked
# against the manifest's size and sha256, then renamed onto `<file>`. Files without a known
# sha256 get theirs recorded on first download ("trust on first use") in
# `<data_root>/raw/<name>/.vcell_hashes.json`; later runs verify against it. The same registry
# remembers size + mtime of every verified file so a 15 GB file is not re-hashed on every run.
# A file placed there by hand is verified exactly like a downloaded one.


HASH_REGISTRY_NAME = ".vcell_hashes.json"
# Some hosts (figshare) refuse urllib's default agent; a browser-like one is accepted.
USER_AGENT = "Mozilla/5.0 (compatible; vcell-download/0.1; +https://github.com/)"
# HTTP statuses worth retrying; anything else (404, 403, ...) will not fix itself.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclasses.dataclass(frozen=True)
class DownloadConfig(DataConfig):
    """Flags of nb/01_download.py."""

    size: typing.Literal["tiny", "small", "vcc"] = "small"
    """Synthetic world size: `tiny` for unit tests, `small` for quick runs, `vcc` for VCC-like scale."""
    seed: int = 0
    """Seed of the synthetic world (same seed, same files)."""
    sources: tuple[str, ...] = ()
    """Real sources to fetch (names of `[sources.*]` in data_manifest.toml); empty = every source with fetch_by_default = true."""


class DownloadError(RuntimeError):
    """A file could not be fetched or failed verification; the message says what to do."""


class _HostUnreachable(DownloadError):
    """No connection to the host at all (DNS, refused): other files there will fail too."""


class _Transient(Exception):
    """A failure worth retrying (dropped connection, timeout, 5xx); never escapes this module."""


# ----------------------------------------------------------------------------
# hash registry
# ----------------------------------------------------------------------------


def _read_registry(path: pathlib.Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DownloadError(f"hash registry {path} is not valid JSON ({exc}); fix or delete it "
                            "(deleting it forgets recorded hashes of unverified files)") from exc


def _record(registry_path: pathlib.Path, dest: pathlib.Path, sha256: str, origin: str, url: str) -> None:
    """Remember a verified file: its hash, and size + mtime so later runs can skip re-hashing."""
    registry = _read_registry(registry_path)
    stat = dest.stat()
    registry[dest.name] = {
        "sha256": sha256,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "origin": origin,
        "url": url,
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(registry_path, registry)


def _is_known_good(entry: dict[str, Any] | None, dest: pathlib.Path, expected: str) -> bool:
    if not entry or not expected or entry.get("sha256") != expected:
        return False
    stat = dest.stat()
    return entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns


def _warn_unverified(dest: pathlib.Path, url: str, sha256: str, registry_path: pathlib.Path) -> None:
    bar = "!" * 78
    print(
        f"\n{bar}\n! UNVERIFIED: the manifest has no sha256 for {dest.name}\n!   from {url}\n"
        f"! Recorded sha256 {sha256} ({dest.stat().st_size:,} bytes)\n!   in {registry_path};\n"
        "! later runs verify against it. Check it against the publisher (figshare/Zenodo md5,\n"
        "! Hugging Face LFS sha256) and copy it into data_manifest.toml.\n"
        f"{bar}\n",
        file=sys.stderr,
        flush=True,
    )


# ----------------------------------------------------------------------------
# progress and locking
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _byte_progress(total: int | None, initial: int, desc: str) -> Iterator[Callable[[int], Any]]:
    """Yield `update(n_bytes)`: a marimo progress bar in the editor, tqdm (bytes) elsewhere."""
    if in_marimo_notebook():
        import marimo as mo

        title = f"{desc} ({(total or 0) / 1e9:.2f} GB)" if total else desc
        with mo.status.progress_bar(total=total or 1, title=title, subtitle="bytes") as bar:
            if initial:
                bar.update(initial)
            yield bar.update
        return
    import tqdm

    with tqdm.tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
                   unit_divisor=1024, mininterval=1.0, file=sys.stderr) as bar:
        yield bar.update


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path) -> Iterator[None]:
    """Refuse to run two downloads into the same .part file at once (they would interleave)."""
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(f"another process is downloading into {lock_path.with_suffix('')}; "
                                "wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    lock_path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 1000); `bytes */1000` -> (None, 1000)."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total and total != "*" else None)


def _sha256_prefix(path: pathlib.Path, n_bytes: int) -> hashlib._Hash:
    """A sha256 object fed with the first n_bytes of path (the part kept from an earlier try)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = n_bytes
        while remaining and (chunk := f.read(min(remaining, 1 << 22))):
            digest.update(chunk)
            remaining -= len(chunk)
    return digest


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    """GET url from byte `offset`; redirects are followed by urllib (Range survives them)."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code in RETRY_STATUSES:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        if exc.code == 416:
            raise  # handled by the caller: the .part may already be complete
        raise DownloadError(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            raise _Transient(f"timed out after {timeout:g} s") from exc
        if isinstance(exc.reason, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            raise _Transient(f"connection lost: {exc.reason!r}") from exc
        # DNS failure, refused, no route: retrying now will not help, and other files on the
        # same host will fail the same way.
        raise _HostUnreachable(f"cannot connect: {exc.reason}") from exc
    except (TimeoutError, socket.timeout) as exc:
        raise _Transient(f"timed out after {timeout:g} s") from exc
    except (ConnectionError, http.client.HTTPException) as exc:
        raise _Transient(f"connection failed: {exc!r}") from exc


def _stream(url: str, part: pathlib.Path, *, size: int | None, timeout: float, chunk_bytes: int,
            desc: str) -> str:
    """One HTTP attempt: append to `part` from its current length; return the full file's sha256.

    Raises _Transient for failures worth retrying; the bytes received so far stay in `part`.
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as exc:  # 416: nothing left after `offset`
        _, total = _parse_content_range(exc.headers.get("Content-Range"))
        if total is not None and total == offset:
            return _sha256_prefix(part, offset).hexdigest()
        part.unlink()  # the .part is longer than the file: it is not a prefix of it
        raise _Transient(f"server refused range from byte {offset} (HTTP 416); restarting") from exc
    with response:
        if response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Transient(f"server sent a range from byte {start}, asked for {offset}; restarting")
        else:
            # 200: the server ignored Range and sends the whole file, so start over instead of
            # appending it to the partial bytes (which would corrupt the file).
            if offset:
                print(f"{desc}: server ignored the Range request; restarting from byte 0",
                      file=sys.stderr, flush=True)
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if size is not None and total is not None and total != size:
            raise DownloadError(f"the server says the file has {total:,} bytes, the manifest says {size:,}: "
                                "the file changed upstream or the manifest is wrong (fix its size/sha256)")
        digest = _sha256_prefix(part, offset) if offset else hashlib.sha256()
        with open(part, "r+b" if offset else "wb") as f:
            f.seek(offset)
            f.truncate()
            with _byte_progress(total or size, offset, desc) as update:
                while True:
                    try:
                        chunk = response.read(chunk_bytes)
                    except (http.client.IncompleteRead, ConnectionError, TimeoutError, socket.timeout) as exc:
                        raise _Transient(f"connection dropped at byte {f.tell():,}: {exc!r}") from exc
                    if not chunk:
                        break
                    f.write(chunk)
                    digest.update(chunk)
                    update(len(chunk))
            received = f.tell()
    expected_total = total if total is not None else size
    if expected_total is not None and received < expected_total:
        raise _Transient(f"connection closed at byte {received:,} of {expected_total:,}")
    if expected_total is not None and received > expected_total:
        part.unlink()
        raise DownloadError(f"received {received:,} bytes but {expected_total:,} were announced; "
                            "deleted the download")
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str = "",
    size: int | str | None = None,
    registry_path: str | os.PathLike | None = None,
    timeout: float = 60.0,
    retries: int = 5,
    retry_wait: float = 2.0,
    chunk_bytes: int = 1 << 20,
    desc: str = "",
) -> pathlib.Path:
    """Fetch url to dest unless a verified copy is there; resumable, verified, atomic.

    `sha256`/`size` come from the manifest ("" or None = unknown). Without a sha256 the hash
    recorded in the registry (default `<dest dir>/.vcell_hashes.json`) is enforced; if there is
    none yet it is recorded now, with a loud warning. Raises DownloadError with the fix.
    """
    dest = pathlib.Path(dest)
    registry_path = pathlib.Path(registry_path) if registry_path else dest.parent / HASH_REGISTRY_NAME
    size = int(size) if size not in (None, "") else None
    desc = desc or dest.name
    entry = _read_registry(registry_path).get(dest.name)
    manifest_sha = sha256.strip().lower()
    expected = manifest_sha or (entry or {}).get("sha256", "")

    if dest.exists():
        if _is_known_good(entry, dest, expected):
            return dest  # verified before and unchanged since (same size and mtime): no re-hash
        actual_size = dest.stat().st_size
        actual = "" if size is not None and actual_size != size else sha256_file(dest)
        if actual and (not expected or actual == expected):
            _record(registry_path, dest, actual, "manifest" if manifest_sha else "recorded", url)
            if not expected:
                _warn_unverified(dest, url, actual, registry_path)
            return dest
        want = f"sha256 {expected}" if expected else f"{size:,} bytes"
        got = f"sha256 {actual}" if actual else f"{actual_size:,} bytes"
        raise DownloadError(
            f"{dest} is there but does not match: want {want}, found {got}. If it is a corrupt or "
            "partial copy, delete it and run again; if the upstream file changed, update "
            "data_manifest.toml (and the recorded hash in " f"{registry_path})."
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with _exclusive(dest.with_name(dest.name + ".part.lock")):
        for attempt in range(retries + 1):
            try:
                if size is not None and part.exists() and part.stat().st_size == size:
                    actual = _sha256_prefix(part, size).hexdigest()  # finished before a crash
                else:
                    if size is not None and part.exists() and part.stat().st_size > size:
                        part.unlink()
                    actual = _stream(url, part, size=size, timeout=timeout, chunk_bytes=chunk_bytes, desc=desc)
                break
            except _Transient as exc:
                if attempt == retries:
                    kept = part.stat().st_size if part.exists() else 0
                    raise DownloadError(f"gave up after {retries + 1} tries: {exc} "
                                        f"({kept:,} bytes kept in {part}; running again resumes)") from exc
                wait = retry_wait * 2**attempt
                print(f"{desc}: {exc}; retry {attempt + 1}/{retries} in {wait:g} s",
                      file=sys.stderr, flush=True)
                time.sleep(wait)

        actual_size = part.stat().st_size
        if size is not None and actual_size != size:
            part.unlink()
            raise DownloadError(f"downloaded {actual_size:,} bytes, the manifest says {size:,}; deleted "
                                "the download. Run again; if it repeats, the manifest size is wrong.")
        if expected and actual != expected:
            part.unlink()
            source = "the manifest" if manifest_sha else f"the hash recorded in {registry_path}"
            raise DownloadError(
                f"sha256 mismatch for {url}: got {actual}, {source} says {expected}. Deleted the "
                "corrupt download. Run again; if it repeats, the file changed upstream: check the "
                "source and update data_manifest.toml (or the registry entry)."
            )
        os.replace(part, dest)  # atomic: readers see the old state or the whole verified file
    _record(registry_path, dest, actual, "manifest" if manifest_sha else "recorded", url)
    if not expected:
        _warn_unverified(dest, url, actual, registry_path)
    return dest


def get_source_dir(name: str, data_root: str | os.PathLike | None = None) -> pathlib.Path:
    """Where a source's files live (and where to put a file fetched by hand)."""
    return get_data_root(data_root) / "raw" / name


def get_default_sources(manifest: dict[str, Any] | None = None) -> list[str]:
    """Real sources fetched when none are named: those with fetch_by_default = true."""
    manifest = read_manifest() if manifest is None else manifest
    return [n for n, s in manifest["sources"].items() if s.get("files") and s.get("fetch_by_default", False)]


def _get_files(name: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    sources = manifest["sources"]
    if name not in sources:
        raise ValueError(f"unknown source {name!r}; the manifest has {sorted(sources)}")
    files = sources[name].get("files")
    if not files:
        raise ValueError(f"source {name!r} lists no files to download (the synthetic world is "
                         "written by write_synthetic_world)")
    for entry in files:
        unknown = set(entry) - {"name", "url", "size", "sha256"}
        if unknown or "name" not in entry or "url" not in entry:
            raise ValueError(f"manifest source {name!r}: file entry {entry} needs name and url "
                             f"(optional size, sha256); unknown keys {sorted(unknown)}")
    return files


def _fetch_sources(names: Sequence[str], data_root, manifest, **kwargs) -> tuple[list[pathlib.Path], list[str]]:
    """Download every file of `names`; return (paths fetched, one text block per failure)."""
    paths, failures, dead_hosts = [], [], {}
    for name in names:
        source_dir = get_source_dir(name, data_root)
        for entry in _get_files(name, manifest):
            dest = source_dir / entry["name"]
            host = urllib.parse.urlsplit(entry["url"]).netloc
            try:
                if host in dead_hosts and not dest.exists():
                    raise DownloadError(f"not tried: {host} was unreachable ({dead_hosts[host]})")
                paths.append(download_file(entry["url"], dest, sha256=entry.get("sha256", ""),
                                           size=entry.get("size"), desc=f"{name}/{entry['name']}", **kwargs))
            except DownloadError as exc:
                if isinstance(exc, _HostUnreachable):
                    dead_hosts[host] = str(exc)
                failures.append(f"  - {name}/{entry['name']}\n      url:   {entry['url']}\n"
                                f"      error: {exc}\n      put it by hand at: {dest}")
    return paths, failures


def _raise_failures(failures: list[str], n_files: int) -> None:
    if failures:
        raise DownloadError(
            f"could not fetch {len(failures)} of {n_files} file(s):\n" + "\n".join(failures) + "\n"
            "What to do: check the network (or proxy) and run again: partial downloads resume from "
            "<file>.part. Or fetch each file by hand (browser, `curl -L -C - -o <path> <url>`, gsutil) "
            "and put it at the path shown; a hand-placed file is verified the same way (sha256 from "
            "data_manifest.toml, or its hash is recorded on first sight)."
        )


def download_source(name: str, data_root: str | os.PathLike | None = None,
                    manifest: dict[str, Any] | None = None, **kwargs) -> list[pathlib.Path]:
    """Fetch every file of one manifest source into `<data_root>/raw/<name>/`.

    Tries all files, then raises ONE DownloadError listing each failure (url, error, where to
    put the file by hand). kwargs go to download_file (timeout, retries, ...).
    """
    manifest = read_manifest() if manifest is None else manifest
    paths, failures = _fetch_sources([name], data_root, manifest, **kwargs)
    _raise_failures(failures, len(paths) + len(failures))
    return paths


def download_sources(names: Sequence[str] = (), data_root: str | os.PathLike | None = None,
                     manifest: dict[str, Any] | None = None, **kwargs) -> list[pathlib.Path]:
    """Fetch several sources (default: get_default_sources); one DownloadError for all failures."""
    manifest = read_manifest() if manifest is None else manifest
    names = list(names) or get_default_sources(manifest)
    paths, failures = _fetch_sources(names, data_root, manifest, **kwargs)
    _raise_failures(failures, len(paths) + len(failures))
    return paths


def get_file_table(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every file under directory (hidden ones excluded) with its size, for display."""
    directory = pathlib.Path(directory)
    return [
        {"file": str(p.relative_to(directory)), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]


def get_source_table(manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per real source: files, known total size, how many have a pinned sha256."""
    manifest = read_manifest() if manifest is None else manifest
    rows = []
    for name, source in manifest["sources"].items():
        files = source.get("files", [])
        if not files:
            continue
        sizes = [f.get("size") for f in files]
        rows.append({
            "source": name,
            "files": len(files),
            "GB (known)": round(sum(s for s in sizes if isinstance(s, int)) / 1e9, 2),
            "sizes unknown": sum(not isinstance(s, int) for s in sizes),
            "sha256 pinned": sum(bool(f.get("sha256")) for f in files),
            "default": bool(source.get("fetch_by_default", False)),
            "datasets": ", ".join(d["name"] for d in source.get("datasets", [])),
        })
    return rows


# ----------------------------------------------------------------------------
# model & losses
# ----------------------------------------------------------------------------
# Model and losses (issue 5): the ST set transformer in equinox, its losses, one train step.
#
# Pasted into lib.py's "model" and "losses" sections (plus `make_step`/`predict_sets`,
# which the train and infer sections build on).
#
# Shape suffixes: b batch (sets per step), s set (cells per set), g gene, h hidden,
# f perturbation feature, p perturbation, i SwiGLU inner width, n/m cells of two sets.
#
# The model follows STATE's "ST" (SPEC §4), written from the description, not Arc's code:
# a set of S control cells and one perturbation's feature vector go in; S predicted
# perturbed cells come out. `SetTransformer.__call__` takes ONE set; the loss vmaps over
# the batch (the equinox-examples style).


typechecked = jaxtyping.jaxtyped(typechecker=beartype.beartype)
"""Decorator: beartype + jaxtyping shape checks (under jit they run once, at trace time)."""


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the ST set transformer. Defaults: the researcher's small config (~2.5M params)."""

    n_genes: int = 2000
    """Genes in and out (the shared HVG list); every input set must have exactly this many columns."""
    n_pert_features: int = 301
    """Width of a perturbation's feature vector: n_perts + 1 for one-hot ids (the extra
    column is the out-of-vocabulary slot), or a gene embedding's width (ESM2-650M: 1280).
    301 matches the one-hot width of the arc-state reference benchmark (ENVIRONMENT.md)."""
    hidden: int = 128
    """Width of the residual stream of the transformer (and of the encoder MLPs)."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 8
    """Attention heads per block; must divide `hidden`."""
    mlp_ratio: int = 8
    """SwiGLU inner width = mlp_ratio * hidden. 8 gives 1.84M transformer parameters at
    hidden 128 x 4 layers and ~115K for one layer at hidden 64, the researcher's numbers."""
    n_encoder_layers: int = 2
    """Linear layers in each of the basal encoder, perturbation encoder and output MLP (>= 1)."""
    straight_through_relu: bool = True
    """Output ReLU with an identity gradient: the forward is STATE's ReLU, but a gene whose
    predictions all fell below 0 still gets a gradient. With a plain ReLU such genes stay
    at 0 for good: on a toy batch 5 of 96 (set, gene) pseudobulks died while overfitting."""

    def __post_init__(self):
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by n_heads {self.n_heads}")
        if min(self.n_genes, self.n_pert_features, self.n_layers, self.n_encoder_layers) < 1:
            raise ValueError(f"every size in {self} must be >= 1")


def make_mlp(in_size: int, out_size: int, width: int, n_linear: int, *, key: PRNGKeyArray) -> eqx.nn.MLP:
    """`n_linear` Linear layers (with biases) and GELU between them, none after the last."""
    return eqx.nn.MLP(in_size, out_size, width, depth=n_linear - 1, activation=jax.nn.gelu, key=key)


class SelfAttention(eqx.Module):
    """Bidirectional multi-head attention over the set: no mask, no positions, no biases."""

    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    n_heads: int = eqx.field(static=True)

    def __init__(self, hidden: int, n_heads: int, *, key: PRNGKeyArray):
        qkv_key, out_key = jax.random.split(key)
        # One H -> 3H matmul instead of three H -> H: same parameters, fewer kernel launches.
        self.qkv = eqx.nn.Linear(hidden, 3 * hidden, use_bias=False, key=qkv_key)
        self.out = eqx.nn.Linear(hidden, hidden, use_bias=False, key=out_key)
        self.n_heads = n_heads

    @typechecked
    def __call__(self, x_sh: Float[Array, "set hidden"]) -> Float[Array, "set hidden"]:
        s, h = x_sh.shape
        qkv_s3h = jax.vmap(self.qkv)(x_sh).reshape(s, 3, self.n_heads, h // self.n_heads)
        q_snd, k_snd, v_snd = qkv_s3h[:, 0], qkv_s3h[:, 1], qkv_s3h[:, 2]
        logits_nst = jnp.einsum("snd,tnd->nst", q_snd, k_snd) / math.sqrt(h // self.n_heads)
        weights_nst = jax.nn.softmax(logits_nst, axis=-1)
        y_sh = jnp.einsum("nst,tnd->snd", weights_nst, v_snd).reshape(s, h)
        return jax.vmap(self.out)(y_sh)


class SwiGLU(eqx.Module):
    """LLaMA's feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    gate: eqx.nn.Linear
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, hidden: int, inner: int, *, key: PRNGKeyArray):
        gate_key, up_key, down_key = jax.random.split(key, 3)
        self.gate = eqx.nn.Linear(hidden, inner, use_bias=False, key=gate_key)
        self.up = eqx.nn.Linear(hidden, inner, use_bias=False, key=up_key)
        self.down = eqx.nn.Linear(inner, hidden, use_bias=False, key=down_key)

    @typechecked
    def __call__(self, x_h: Float[Array, "hidden"]) -> Float[Array, "hidden"]:
        return self.down(jax.nn.silu(self.gate(x_h)) * self.up(x_h))


class TransformerBlock(eqx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + swiglu(norm(x)); RMSNorm with a weight, no bias."""

    attn_norm: eqx.nn.RMSNorm
    attn: SelfAttention
    mlp_norm: eqx.nn.RMSNorm
    mlp: SwiGLU

    def __init__(self, hidden: int, n_heads: int, inner: int, *, key: PRNGKeyArray):
        attn_key, mlp_key = jax.random.split(key)
        self.attn_norm = eqx.nn.RMSNorm(hidden, eps=1e-6, use_bias=False)
        self.attn = SelfAttention(hidden, n_heads, key=attn_key)
        self.mlp_norm = eqx.nn.RMSNorm(hidden, eps=1e-6, use_bias=False)
        self.mlp = SwiGLU(hidden, inner, key=mlp_key)

    @typechecked
    def __call__(self, x_sh: Float[Array, "set hidden"]) -> Float[Array, "set hidden"]:
        x_sh = x_sh + self.attn(jax.vmap(self.attn_norm)(x_sh))
        return x_sh + jax.vmap(self.mlp)(jax.vmap(self.mlp_norm)(x_sh))


class PertEncoder(eqx.Module):
    """MLP from a perturbation's float feature vector to the hidden width.

    Ids become features before they get here (`make_onehot_features`: one-hot -> Linear
    is a learned id embedding); gene feature vectors (ESM2, ...) go in as they are. So
    the model never gathers by id, and no out-of-range id can be clamped silently.
    """

    mlp: eqx.nn.MLP
    n_features: int = eqx.field(static=True)

    def __init__(self, n_features: int, hidden: int, n_linear: int, *, key: PRNGKeyArray):
        self.mlp = make_mlp(n_features, hidden, hidden, n_linear, key=key)
        self.n_features = n_features

    @typechecked
    def __call__(self, pert_f: Float[Array, "feat"]) -> Float[Array, "hidden"]:
        assert pert_f.shape == (self.n_features,), f"perturbation features {pert_f.shape} != ({self.n_features},)"
        return self.mlp(pert_f)


class SetTransformer(eqx.Module):
    """STATE's ST model: S control cells + one perturbation -> S predicted perturbed cells.

    basal_sh = basal_encoder(ctrl_sg) per cell; h_sh = basal_sh + pert_encoder(pert_f);
    h_sh = transformer(h_sh) (bidirectional, no positions: permutation-equivariant);
    pred_sg = relu(decoder(norm(h_sh) + basal_sh)). The ReLU keeps log1p expression >= 0
    (see `ModelConfig.straight_through_relu` for its gradient); `predict_sets` also clips
    the top at inference.
    """

    basal_encoder: eqx.nn.MLP
    pert_encoder: PertEncoder
    blocks: list[TransformerBlock]
    final_norm: eqx.nn.RMSNorm
    decoder: eqx.nn.MLP
    n_genes: int = eqx.field(static=True)
    straight_through_relu: bool = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        basal_key, pert_key, decoder_key, *block_keys = jax.random.split(key, 3 + cfg.n_layers)
        h = cfg.hidden
        self.basal_encoder = make_mlp(cfg.n_genes, h, h, cfg.n_encoder_layers, key=basal_key)
        self.pert_encoder = PertEncoder(cfg.n_pert_features, h, cfg.n_encoder_layers, key=pert_key)
        self.blocks = [TransformerBlock(h, cfg.n_heads, cfg.mlp_ratio * h, key=k) for k in block_keys]
        self.final_norm = eqx.nn.RMSNorm(h, eps=1e-6, use_bias=False)
        self.decoder = make_mlp(h, cfg.n_genes, h, cfg.n_encoder_layers, key=decoder_key)
        self.n_genes = cfg.n_genes
        self.straight_through_relu = cfg.straight_through_relu

    @typechecked
    def __call__(self, ctrl_sg: Float[Array, "set gene"], pert_f: Float[Array, "feat"]) -> Float[Array, "set gene"]:
        assert ctrl_sg.shape[1] == self.n_genes, f"control cells have {ctrl_sg.shape[1]} genes, model {self.n_genes}"
        basal_sh = jax.vmap(self.basal_encoder)(ctrl_sg)
        h_sh = basal_sh + self.pert_encoder(pert_f)[None, :]
        for block in self.blocks:
            h_sh = block(h_sh)
        # Skip from the basal encoding around the whole backbone (SPEC §4).
        out_sh = jax.vmap(self.final_norm)(h_sh) + basal_sh
        z_sg = jax.vmap(self.decoder)(out_sh)
        if self.straight_through_relu:
            return z_sg + jax.lax.stop_gradient(jax.nn.relu(z_sg) - z_sg)
        return jax.nn.relu(z_sg)


def make_model(
    cfg: ModelConfig, *, key: PRNGKeyArray, gene_mean_g: Float[np.ndarray, " gene"] | None = None
) -> SetTransformer:
    """A freshly initialised model; with `gene_mean_g` (mean log1p expression of the training
    cells) the decoder's last bias starts there, so step 0 predicts about the mean baseline.

    Why: with the default init the pre-ReLU outputs are centred on 0, so about half the
    predictions start at exactly 0 (61% on a toy batch); with a plain ReLU those get no
    gradient (13 of 96 (set, gene) pseudobulks never recovered there).
    """
    # Jitted: eager init compiles every random op on its own (~7 s on this CPU, vs ~1 s).
    model = eqx.filter_jit(SetTransformer)(cfg, key=key)
    if gene_mean_g is None:
        return model
    if gene_mean_g.shape != (cfg.n_genes,):
        raise ValueError(f"gene_mean_g has shape {gene_mean_g.shape}, expected ({cfg.n_genes},)")
    return eqx.tree_at(lambda m: m.decoder.layers[-1].bias, model, jnp.asarray(gene_mean_g, jnp.float32))


def is_param(leaf) -> bool:
    """Floating-point arrays, concrete or abstract (`eqx.filter_eval_shape` gives ShapeDtypeStructs)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jnp.issubdtype(leaf.dtype, jnp.inexact)
    return eqx.is_inexact_array(leaf)


def count_params(tree: PyTree) -> int:
    """Number of trainable floats in a model or any part of one (`model.blocks`); also works on
    `eqx.filter_eval_shape(make_model, cfg, key=key)`, which allocates nothing."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(eqx.filter(tree, is_param)))


@typechecked
def make_onehot_features(pert_ids_b: Int[np.ndarray, " b"], n_perts: int) -> Float[np.ndarray, "b f"]:
    """One-hot rows of width n_perts (= len(PerturbationVocab): id 0 control, id 1 the
    explicit out-of-vocabulary entry). An id outside [0, n_perts) raises here, in numpy:
    inside jit JAX would clamp it to a valid row without a word."""
    bad = (pert_ids_b < 0) | (pert_ids_b >= n_perts)
    if bad.any():
        raise IndexError(f"perturbation ids {np.unique(pert_ids_b[bad])[:5]} outside [0, {n_perts}): rebuild the vocabulary or map unknowns to OOV (id 1)")
    onehot_bf = np.zeros((len(pert_ids_b), n_perts), dtype=np.float32)
    onehot_bf[np.arange(len(pert_ids_b)), pert_ids_b] = 1.0
    return onehot_bf


@typechecked
def get_pert_features(table_pf: Float[np.ndarray, "p f"], pert_ids_b: Int[np.ndarray, " b"]) -> Float[np.ndarray, "b f"]:
    """Rows of a per-perturbation feature table (e.g. ESM2 of the target gene), range-checked."""
    bad = (pert_ids_b < 0) | (pert_ids_b >= len(table_pf))
    if bad.any():
        raise IndexError(f"perturbation ids {np.unique(pert_ids_b[bad])[:5]} outside the {len(table_pf)}-row feature table")
    return table_pf[pert_ids_b]


# ----------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------
# Set losses follow geomloss's `SamplesLoss` kernel norms, 0.5 * ||alpha - beta||_k^2
# with uniform weights (geomloss/kernel_samples.py):
#   energy   k(x, y) = -||x - y||             (SamplesLoss("energy"))
#   gaussian k(x, y) = exp(-||x - y||^2 / 2s^2) (SamplesLoss("gaussian", blur=s))
# so energy = mean||x-y|| - mean||x-x'||/2 - mean||y-y'||/2, which is HALF the
# Szekely energy distance 2E||X-Y|| - E||X-X'|| - E||Y-Y'||. Diagonals are included
# (V-statistics), as in geomloss; that keeps both losses >= 0.


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which set losses make up the training loss, and their weights."""

    energy_weight: float = 1.0
    """Weight of the energy distance (geomloss "energy"; STATE's default loss)."""
    mmd_weight: float = 0.0
    """Weight of the RBF-kernel MMD (geomloss "gaussian" convention, averaged over bandwidths)."""
    pseudobulk_mse_weight: float = 0.0
    """Weight of the MSE between the set means (pseudobulks); fast to overfit, a sanity check."""
    mmd_bandwidths: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0)
    """RBF bandwidths sigma in log1p units. Cell-to-cell distances over 2,000 log1p HVGs are
    tens of units; these are a guess to revisit on real data (several scales hedge it)."""

    def __post_init__(self):
        if min(self.energy_weight, self.mmd_weight, self.pseudobulk_mse_weight) < 0:
            raise ValueError(f"loss weights must be >= 0: {self}")
        if self.mmd_weight > 0 and (not self.mmd_bandwidths or min(self.mmd_bandwidths) <= 0):
            raise ValueError(f"mmd needs positive bandwidths: {self.mmd_bandwidths}")


@typechecked
def get_sq_distances(x_ng: Float[Array, "n gene"], y_mg: Float[Array, "m gene"]) -> Float[Array, "n m"]:
    """Squared Euclidean distances via |x|^2 + |y|^2 - 2<x, y> (no n*m*g tensor), clamped at 0."""
    # Distances ignore translation; centering shrinks |x|^2 so the expansion cancels less
    # (log1p cells sit far from the origin: |x|^2 ~ 1e3-1e4 while |x - y|^2 can be ~1).
    center_g = (x_ng.mean(0) + y_mg.mean(0)) / 2
    x_ng, y_mg = x_ng - center_g, y_mg - center_g
    # HIGHEST: on TPU the default matmul precision is bfloat16, ruinous for this cancellation.
    xy_nm = jnp.matmul(x_ng, y_mg.T, precision=jax.lax.Precision.HIGHEST)
    sq_nm = (x_ng**2).sum(1)[:, None] + (y_mg**2).sum(1)[None, :] - 2 * xy_nm
    return jnp.maximum(sq_nm, 0.0)


@typechecked
def get_safe_distances(x_ng: Float[Array, "n gene"], y_mg: Float[Array, "m gene"]) -> Float[Array, "n m"]:
    """Euclidean distances whose gradient is 0 (not NaN) where two cells coincide.

    d sqrt(u)/du is infinite at u = 0, and inf * 0 = NaN in the backward pass, so the
    sqrt only ever sees positive inputs (the double-where trick); geomloss's `sqrt_0`
    makes the same choice of 0 gradient there.
    """
    sq_nm = get_sq_distances(x_ng, y_mg)
    positive_nm = sq_nm > 1e-12
    return jnp.where(positive_nm, jnp.sqrt(jnp.where(positive_nm, sq_nm, 1.0)), 0.0)


@typechecked
def get_energy_distance(x_ng: Float[Array, "n gene"], y_mg: Float[Array, "m gene"]) -> Float[Array, ""]:
    """geomloss SamplesLoss("energy")(x, y): mean||x-y|| - (mean||x-x'|| + mean||y-y'||)/2."""
    cross = get_safe_distances(x_ng, y_mg).mean()
    within_x = get_safe_distances(x_ng, x_ng).mean()
    within_y = get_safe_distances(y_mg, y_mg).mean()
    return cross - 0.5 * (within_x + within_y)


@typechecked
def get_rbf_mmd(
    x_ng: Float[Array, "n gene"], y_mg: Float[Array, "m gene"], bandwidths: tuple[float, ...]
) -> Float[Array, ""]:
    """0.5 * squared MMD with k = mean over sigma of exp(-|x-y|^2 / 2 sigma^2) (geomloss "gaussian")."""

    def kernel_mean(a_ng, b_mg):
        sq_nm = get_sq_distances(a_ng, b_mg)
        return jnp.mean(jnp.stack([jnp.exp(-sq_nm / (2 * s**2)).mean() for s in bandwidths]))

    return 0.5 * (kernel_mean(x_ng, x_ng) + kernel_mean(y_mg, y_mg)) - kernel_mean(x_ng, y_mg)


@typechecked
def get_pseudobulk_mse(pred_sg: Float[Array, "set gene"], target_tg: Float[Array, "set2 gene"]) -> Float[Array, ""]:
    """Mean over genes of (mean predicted cell - mean target cell)^2."""
    return jnp.mean((pred_sg.mean(0) - target_tg.mean(0)) ** 2)


@typechecked
def get_set_losses(
    pred_sg: Float[Array, "set gene"], target_tg: Float[Array, "set2 gene"], cfg: LossConfig
) -> dict[str, Float[Array, ""]]:
    """Loss terms of one set. Distribution losses are computed only when weighted (they cost
    O(S^2 G)); pseudobulk MSE is cheap and always reported."""
    terms = {"pseudobulk_mse": get_pseudobulk_mse(pred_sg, target_tg)}
    if cfg.energy_weight > 0:
        terms["energy"] = get_energy_distance(pred_sg, target_tg)
    if cfg.mmd_weight > 0:
        terms["mmd"] = get_rbf_mmd(pred_sg, target_tg, cfg.mmd_bandwidths)
    return terms


@typechecked
def compute_loss(
    model: SetTransformer,
    ctrl_bsg: Float[Array, "batch set gene"],
    pert_bf: Float[Array, "batch feat"],
    target_btg: Float[Array, "batch set2 gene"],
    cfg: LossConfig,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Weighted sum of the set losses, each averaged over the batch of sets; also the terms."""
    pred_bsg = jax.vmap(model)(ctrl_bsg, pert_bf)
    terms_b = jax.vmap(functools.partial(get_set_losses, cfg=cfg))(pred_bsg, target_btg)
    terms = {name: term_b.mean() for name, term_b in terms_b.items()}
    weights = {"energy": cfg.energy_weight, "mmd": cfg.mmd_weight, "pseudobulk_mse": cfg.pseudobulk_mse_weight}
    loss = sum(weights[name] * term for name, term in terms.items())
    return loss, terms


# ----------------------------------------------------------------------------
# train step and inference (the train/infer sections build on these)
# ----------------------------------------------------------------------------


def make_optimizer(learning_rate: float = 1e-4, grad_clip: float = 10.0) -> optax.GradientTransformation:
    """STATE's optimiser: clip the global grad norm, then Adam."""
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(learning_rate))


@eqx.filter_jit
@typechecked
def make_step(
    model: SetTransformer,
    opt_state: PyTree,
    optimizer: optax.GradientTransformation,
    ctrl_bsg: Float[Array, "batch set gene"],
    pert_bf: Float[Array, "batch feat"],
    target_btg: Float[Array, "batch set2 gene"],
    loss_cfg: LossConfig,
) -> tuple[SetTransformer, PyTree, dict[str, Float[Array, ""]]]:
    """One optimiser step in one jitted region. Returns the new model and optimiser state and
    metrics: loss, each loss term, grad_norm (before clipping) and update_norm.

    Metrics stay on device; pull them to the host only at log steps.
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_of_params(params):
        return compute_loss(eqx.combine(params, static), ctrl_bsg, pert_bf, target_btg, loss_cfg)

    (loss, terms), grads = jax.value_and_grad(loss_of_params, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates)}
    return eqx.combine(params, static), opt_state, metrics


def init_opt_state(model: SetTransformer, optimizer: optax.GradientTransformation) -> PyTree:
    return optimizer.init(eqx.filter(model, eqx.is_inexact_array))


MAX_LOG1P_EXPRESSION = 14.0
"""Inference clips predictions to [0, this] (STATE does; cell-eval rejects log1p values >= 15)."""


@eqx.filter_jit
@typechecked
def predict_sets(
    model: SetTransformer,
    ctrl_bsg: Float[Array, "batch set gene"],
    pert_features_bf: Float[Array, "batch feat"],
    max_expression: float = MAX_LOG1P_EXPRESSION,
) -> Float[Array, "batch set gene"]:
    """Predicted perturbed sets, clipped to [0, max_expression]."""
    return jnp.clip(jax.vmap(model)(ctrl_bsg, pert_features_bf), 0.0, max_expression)
