"""Why the raw transfer baseline is hard to beat on every metric at once: shrink its effects and watch.

Not a test: the logbook's study of how DES, PDS and MAE respond when pert_mean_transfer's
predicted effect T_p (the other cell types' mean effect of the same perturbation) is denoised or
rescaled before it becomes cells (EffectPredictor: exact-mean cells, the learned knockdown). Each
variant is scored by the 06 harness (lib.score_predictors) on the fake-val and truth scenarios of
an existing world (run compare_predictors.py first: it generates `<data-root>/<size>_seed<S>` with
its store), normalised against cell-mean:

    pmt                 T_p as it is (the pert_mean_transfer baseline)
    gate_z<k>           T_p where |T_p| > k standard errors of the context means, else 0
    stein_<c>           T_p * z^2 / (z^2 + c): small-z entries shrunk, large ones kept
    gain_<a>            a * T_p
    ls_gain             the least-squares gain of the training effects on T_p (an honest, MSE-fitted scale)

The standard error of T_p per gene comes from each context dataset's control variance and the
perturbation's cell count there (var/n_pert + var/n_control, averaged like T_p over datasets).

`--study structure` instead tries honest ways to make T_p more accurate WITHOUT shrinking it
(each fitted on the scenario's training perturbations or the target's controls only):

    ivw                 context datasets averaged with inverse-variance weights (per gene) instead of equally
    fold_change         each context's fold change of normalised expression (mean expm1) applied to the
                        target's own control cells (log1p(expm1(x) * fc), averaged over cells): effects
                        move with the target's expression level instead of the context's
    gene_gain_rel       per context and gene, the gain of the training effects on T_p over entries > 3 se
                        (pooled towards the context's overall gain), divided by that overall gain: the
                        shape of the cell-type difference, not its scale
    coexp_fill          T_p, and for perturbations no context measured, the knocked-down gene's correlation
                        with every gene in the target's controls times its least-squares gain

    uv run python benchmarks/transfer_shrinkage.py --root /tmp/cmp/small_seed0 --out shrink_seed0.csv
    uv run python benchmarks/transfer_shrinkage.py --summarise shrink_seed0.csv shrink_seed1.csv shrink_seed2.csv
    uv run python benchmarks/transfer_shrinkage.py --study structure --root /tmp/cmp/small_seed0 --out structure_seed0.csv
"""

import argparse

import numpy as np
import pandas as pd

import lib


def make_standard_errors(store, transfer: lib.TransferEffects, n_genes: int, hvg_cols_v):
    """perturbation -> standard error of TransferEffects.effect per target gene (inf outside the HVGs)."""
    control_var = {}
    for d in transfer.others:
        index = store.index[(store.index["dataset"] == d) & store.index["is_control"].to_numpy(bool)]
        rows = np.concatenate([np.arange(a, b) for a, b in zip(index["start"], index["stop"])])
        x_cv = np.asarray(store.x_cg[np.sort(rows)], dtype=np.float64)
        control_var[d] = (x_cv.var(axis=0), len(rows))
    cache = {}

    def standard_error(perturbation: str) -> np.ndarray:
        if perturbation not in cache:
            key = lib._perturbation_key(perturbation, transfer.target_id_of_symbol)
            var_sum_v, n_datasets_v = np.zeros(store.x_cg.shape[1]), np.zeros(store.x_cg.shape[1])
            for d in transfer.others:
                index = store.index[store.index["dataset"] == d]
                ids = transfer.id_of_symbol.get(d, {})
                keys = np.array([lib._perturbation_key(q, ids) for q in index["perturbation"]])
                n_pert = index[(keys == key) & ~index["is_control"].to_numpy(bool)]["n_cells"].sum()
                if n_pert == 0:
                    continue
                var_v, n_control = control_var[d]
                measured_v = store.measured_dg[store.datasets.index(d)]
                var_sum_v += np.where(measured_v, var_v / n_pert + var_v / n_control, 0.0)
                n_datasets_v += measured_v
            se_v = np.sqrt(
                np.divide(var_sum_v, n_datasets_v**2, out=np.full_like(var_sum_v, np.inf), where=n_datasets_v > 0)
            )
            se_g = np.full(n_genes, np.inf)
            se_g[hvg_cols_v] = se_v
            cache[perturbation] = se_g
        return cache[perturbation]

    return standard_error


def make_variants(transfer_of, standard_error, fit: lib.FitData) -> dict:
    def z_of(p):
        t_g, se_g = transfer_of(p), standard_error(p)
        return np.divide(np.abs(t_g), se_g, out=np.zeros_like(t_g), where=np.isfinite(se_g) & (se_g > 0))

    y_pg = fit.pert_mean_pg - fit.control_mean_g
    t_pg = np.stack([transfer_of(p) for p in fit.perturbations])
    ls_gain = float((t_pg * y_pg).sum() / (t_pg * t_pg).sum())
    variants = {"pmt": transfer_of, "ls_gain": lambda p: ls_gain * transfer_of(p)}
    for k in (1.0, 2.0, 3.0):
        variants[f"gate_z{k:g}"] = lambda p, k=k: np.where(z_of(p) > k, transfer_of(p), 0.0)
    for c in (1.0, 4.0):
        variants[f"stein_{c:g}"] = lambda p, c=c: transfer_of(p) * z_of(p) ** 2 / (z_of(p) ** 2 + c)
    for a in (0.75, 1.25):
        variants[f"gain_{a:g}"] = lambda p, a=a: a * transfer_of(p)
    return variants, ls_gain


class ContextEffects:
    """Per context dataset that measured a perturbation: its log1p effect, that effect's squared
    standard error and its log fold change of normalised expression (store HVG columns); plus the
    target's control cells, for the fold-change and co-expression variants."""

    def __init__(self, store, transfer: lib.TransferEffects, target: str, n_target_controls: int = 2_000):
        self.store, self.transfer = store, transfer
        self.contexts = {}
        for d in transfer.others:
            index = store.index[store.index["dataset"] == d]
            x_cv = self._rows(index[index["is_control"].to_numpy(bool)])
            ids = transfer.id_of_symbol.get(d, {})
            self.contexts[d] = dict(
                index=index,
                keys=np.array([lib._perturbation_key(q, ids) for q in index["perturbation"]]),
                mean_v=x_cv.mean(0),
                var_v=x_cv.var(0),
                n=len(x_cv),
                expression_v=np.expm1(x_cv).mean(0),
                measured_v=store.measured_dg[store.datasets.index(d)],
            )
        index = store.index[store.index["dataset"] == target]
        controls = index[index["is_control"].to_numpy(bool)]
        rows = np.concatenate([np.arange(a, b) for a, b in zip(controls["start"], controls["stop"])])
        rows = np.sort(np.random.default_rng(0).permutation(rows)[:n_target_controls])
        self.target_controls_cv = np.asarray(store.x_cg[rows], dtype=np.float64)
        self.cache = {}

    def _rows(self, groups: pd.DataFrame) -> np.ndarray:
        rows = np.concatenate([np.arange(a, b) for a, b in zip(groups["start"], groups["stop"])])
        return np.asarray(self.store.x_cg[np.sort(rows)], dtype=np.float64)

    def of(self, perturbation: str) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """[(dataset, effect_v, se2_v, log_fold_change_v, measured_v)] over the contexts that measured it."""
        if perturbation not in self.cache:
            key = lib._perturbation_key(perturbation, self.transfer.target_id_of_symbol)
            out = []
            for d, c in self.contexts.items():
                groups = c["index"][(c["keys"] == key) & ~c["index"]["is_control"].to_numpy(bool)]
                if groups.empty:
                    continue
                x_cv = self._rows(groups)
                se2_v = c["var_v"] / len(x_cv) + c["var_v"] / c["n"]
                log_fc_v = np.log((np.expm1(x_cv).mean(0) + 1e-3) / (c["expression_v"] + 1e-3))
                out.append((d, x_cv.mean(0) - c["mean_v"], se2_v, log_fc_v, c["measured_v"]))
            self.cache[perturbation] = out
        return self.cache[perturbation]


def make_structure_variants(transfer_of, context: ContextEffects, fit: lib.FitData) -> tuple[dict, float]:
    hvg_cols_v = context.transfer.hvg_cols_v
    n_genes, n_hvg = len(fit.gene_names), len(hvg_cols_v)

    def on_genes(effect_v):
        effect_g = np.zeros(n_genes)
        effect_g[hvg_cols_v] = effect_v
        return effect_g

    def average(perturbation, value_of, weight_of=lambda se2_v: 1.0):
        total_v, weight_v = np.zeros(n_hvg), np.zeros(n_hvg)
        for d, effect_v, se2_v, log_fc_v, measured_v in context.of(perturbation):
            w_v = np.where(measured_v, weight_of(se2_v), 0.0)
            total_v += w_v * np.where(measured_v, value_of(d, effect_v, log_fc_v), 0.0)
            weight_v += w_v
        return np.divide(total_v, weight_v, out=np.zeros(n_hvg), where=weight_v > 0)

    x_cv = context.target_controls_cv
    expression_cv, mean_v = np.expm1(x_cv), x_cv.mean(0)

    def fold_change(p):
        log_fc_v = average(p, lambda d, e, fc: fc)
        return on_genes(np.log1p(expression_cv * np.exp(log_fc_v)[None]).mean(0) - mean_v)

    # Per-gene gains over strong entries of the training perturbations (never held-out ones).
    y_pv = fit.pert_mean_pg[:, hvg_cols_v] - fit.control_mean_g[hvg_cols_v]
    num = {d: np.zeros(n_hvg) for d in context.contexts}
    den = {d: np.zeros(n_hvg) for d in context.contexts}
    for p, y_v in zip(fit.perturbations, y_pv):
        for d, effect_v, se2_v, _, measured_v in context.of(p):
            strong_v = measured_v & (np.abs(effect_v) > 3.0 * np.sqrt(se2_v))
            num[d] += np.where(strong_v, y_v * effect_v, 0.0)
            den[d] += np.where(strong_v, effect_v**2, 0.0)
    relative_gain = {}
    for d in context.contexts:
        overall = num[d].sum() / max(den[d].sum(), 1e-12)
        prior = 5.0 * den[d].sum() / n_hvg  # five average genes' worth of evidence for the overall gain
        relative_gain[d] = (num[d] + prior * overall) / (den[d] + prior) / overall

    # Co-expression in the target's controls; its gain fitted on training perturbations no context measured.
    z_cv = (x_cv - mean_v) / np.maximum(x_cv.std(0), 1e-6)
    corr_vv = z_cv.T @ z_cv / len(z_cv)
    np.fill_diagonal(corr_vv, 0.0)
    col_of_id = {e: i for i, e in enumerate(context.store.genes["ensembl_id"].to_numpy(str))}

    def coexpression(p):
        col = col_of_id.get(context.transfer.target_id_of_symbol.get(p, ""))
        return np.zeros(n_hvg) if col is None else corr_vv[col]

    unmeasured = [i for i, p in enumerate(fit.perturbations) if not context.of(p)]
    c_pv = np.stack([coexpression(fit.perturbations[i]) for i in unmeasured]) if unmeasured else np.zeros((0, n_hvg))
    coexp_gain = float((c_pv * y_pv[unmeasured]).sum() / max((c_pv**2).sum(), 1e-12))

    variants = {
        "pmt": transfer_of,
        "ivw": lambda p: on_genes(average(p, lambda d, e, fc: e, lambda se2_v: 1.0 / np.maximum(se2_v, 1e-8))),
        "fold_change": fold_change,
        "gene_gain_rel": lambda p: on_genes(average(p, lambda d, e, fc: e * relative_gain[d])),
        "coexp_fill": lambda p: transfer_of(p) if context.of(p) else on_genes(coexp_gain * coexpression(p)),
    }
    return variants, coexp_gain


def run(root: str, mode: str, seed: int, study: str = "shrink") -> pd.DataFrame:
    cfg = lib.EvalConfig(data_root=root, mode=mode, checkpoint="none", seed=seed)
    files = lib.get_target_files(root, cfg.world)
    spec = files.spec
    gene_names = lib.read_gene_names(files.gene_names_path)
    data = lib.scan_harness_inputs(cfg, files, gene_names, lib.get_eval_dir(root, cfg.world))
    split, scan = data["split"], data["scan"]
    store = lib.load_store(root, cfg.world)
    target_genes = lib.get_target_gene_table(store, spec.name, gene_names)
    hvg_cols_v = lib.get_hvg_columns(store, target_genes)
    transfer = lib.TransferEffects(store, spec.name, target_genes)
    cache = {}

    def transfer_of(p):
        if p not in cache:
            cache[p] = transfer.effect(p)
        return cache[p]

    if study == "structure":
        context = ContextEffects(store, transfer, spec.name)
    else:
        standard_error = make_standard_errors(store, transfer, len(gene_names), hvg_cols_v)
    scenarios = [(f"fake_{s}", split["train"], set(split[s])) for s in ("val", "test")]
    scenarios += [(f"truth_{s}", data["training_perts"], path) for s, path in files.truth_paths.items()]
    tables = []
    for scenario, fit_perts, held_out in scenarios:
        fit = lib.make_fit_data(
            gene_names, data["group_labels"], scan.sum_kg, scan.n_k, fit_perts, ["control:pred", "control:rest"]
        )
        knockdown = lib.fit_knockdown_fraction(fit)
        predictors = {"cell_mean": lib.make_baseline_predictor("cell_mean", fit)}
        if study == "structure":
            variants, ls_gain = make_structure_variants(transfer_of, context, fit)
        else:
            variants, ls_gain = make_variants(transfer_of, standard_error, fit)
        for name, effect_of in variants.items():
            predictors[name] = lib.EffectPredictor(
                gene_names,
                effect_of,
                control_mean_g=fit.control_mean_g.astype(np.float32),
                knockdown_remaining=knockdown,
            )
        if isinstance(held_out, set):
            real = lib._select(scan.collected_cg, data["collected_labels"], held_out, spec.control_label, gene_names)
        else:
            real = lib._scenario_real_from_truth(held_out, spec, gene_names, cfg)
        summary, _, _ = lib.score_predictors(
            real,
            predictors,
            data["pool"],
            seed=seed,
            fixed_pseudobulk=False,
            mode=mode,
            control_label=spec.control_label,
        )
        summary.insert(0, "scenario", scenario)
        summary["ls_gain" if study == "shrink" else "coexp_gain"] = ls_gain
        print(summary[["scenario", "predictor", "des", "pds", "mae", "s_des", "s_pds", "s_mae", "score"]].round(4))
        tables.append(summary)
    return pd.concat(tables, ignore_index=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="a world's data root with its store (e.g. /tmp/cmp/small_seed0)")
    parser.add_argument("--mode", default="vcc2025", choices=["vcc2025", "current"])
    parser.add_argument("--seed", type=int, default=0, help="harness seed (split, pools)")
    parser.add_argument("--study", default="shrink", choices=["shrink", "structure"], help="which variants (see above)")
    parser.add_argument("--out", default="", help="write the long table here (csv)")
    parser.add_argument("--summarise", nargs="+", default=[], help="only print the mean ± sd table of these csvs")
    args = parser.parse_args(argv)
    if args.summarise:
        results = pd.concat([pd.read_csv(p).assign(file=p) for p in args.summarise], ignore_index=True)
    else:
        results = run(args.root, args.mode, args.seed, args.study).assign(file=args.root)
        if args.out:
            lib.write_csv(args.out, results)
    metrics = ["des", "pds", "mae", "s_des", "s_pds", "s_mae", "score"]
    grouped = results.groupby(["scenario", "predictor"], sort=False)[metrics]
    table = grouped.mean().map("{:.3f}".format) + "±" + grouped.std().fillna(0).map("{:.3f}".format)
    table.insert(0, "n", grouped.size())
    with pd.option_context("display.width", 250, "display.max_rows", 200):
        print(table.to_string())


if __name__ == "__main__":
    main()
