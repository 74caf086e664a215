"""Every baseline on held-out perturbations, over synthetic world seeds and both scorer modes.

Not a test: the logbook's baseline comparison (issue 10 §2) as one command. For each seed it
generates the world (`--size`, under `<data-root>/<size>_seed<seed>`, reused with --reuse),
runs 03 (HVGs) and 04 (store) with their defaults, then lib.run_eval (06) with every baseline
(fake_val, fake_test: fitted on the fake-val train split; truth_validation, truth_test: fitted on
all training perturbations) in both modes, plus two vcc2025 ablations of the effect baselines:
no exact-mean cells (the effect added to each control cell) and no knockdown. Prints
DES / PDS / MAE / Pearson of the change / normalised score, mean ± sd over seeds.

With --with-model it also trains the ST model per seed (lib.run_train: nb/05_train.py's defaults,
plus --train-args, e.g. "--features onehot" for an ablation; the training time is printed) and
scores its best checkpoint (as 06 does: lib.as_effect_predictor, knockdown included) under the name
--model-name. --only-model scores cell_mean and the model only (ablation rows).

    uv run python benchmarks/compare_predictors.py --size small --seeds 0 1 2 --data-root /tmp/cmp
    uv run python benchmarks/compare_predictors.py --size small --seeds 0 1 2 --data-root /tmp/cmp \
        --reuse --with-model --no-ablations --out model.csv
    uv run python benchmarks/compare_predictors.py --size small --seeds 0 1 2 --data-root /tmp/cmp \
        --reuse --with-model --only-model --modes vcc2025 --model-name model_onehot \
        --train-args="--features onehot" --out onehot.csv
"""

import argparse
import pathlib
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="/tmp/vcell_compare")
    parser.add_argument("--size", default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["vcc2025", "current"])
    parser.add_argument("--no-ablations", action="store_true", help="skip the exact-mean and knockdown ablations")
    parser.add_argument("--reuse", action="store_true", help="reuse a generated world and store")
    parser.add_argument("--out", default="", help="also write the long table here (csv, rewritten after every run)")
    parser.add_argument("--with-model", action="store_true", help="train the ST model per seed and score it")
    parser.add_argument("--train-args", default="", help="extra nb/05_train.py flags (one string)")
    parser.add_argument("--model-name", default="model", help="the model's row name")
    parser.add_argument("--only-model", action="store_true", help="score only cell_mean and the model")
    parser.add_argument("--summarise", nargs="+", default=[], help="only print the table of these --out csv files")
    args = parser.parse_args(argv)

    import shlex

    import pandas as pd

    import lib

    if args.summarise:
        print_table(pd.concat([pd.read_csv(p) for p in args.summarise], ignore_index=True), args.size)
        return
    effect_baselines = ("pert_mean_transfer", "linear", "linear_transfer")
    runs = [(mode, "", {}) for mode in args.modes]
    if not args.no_ablations and not args.only_model:
        runs += [("vcc2025", "_noexact", {"exact_mean": False}), ("vcc2025", "_nokd", {"knockdown": False})]
    tables = []
    for seed in args.seeds:
        root = pathlib.Path(args.data_root) / f"{args.size}_seed{seed}"
        t0 = time.perf_counter()
        if not (args.reuse and (root / "store").exists()):
            lib.write_synthetic_world(root, size=args.size, seed=seed)
            lib.run_hvg(lib.HvgConfig(data_root=str(root), offline=True))
            lib.run_normalise(lib.NormaliseConfig(data_root=str(root)))
        print(f"seed {seed}: world + HVGs + store in {time.perf_counter() - t0:.0f} s", flush=True)
        checkpoint = "none"
        if args.with_model:
            t0 = time.perf_counter()
            run_name = f"{args.model_name}_seed{seed}"
            train_cfg = lib.parse_config(
                lib.TrainConfig,
                [
                    "--data-root", str(root),
                    "--checkpoint-dir", str(root / "checkpoints"),
                    "--run-name", run_name,
                    "--wandb-mode", "disabled",
                    *shlex.split(args.train_args),
                ],
            )  # fmt: skip
            result = lib.run_train(train_cfg)
            checkpoint = result["run_dir"]
            print(f"seed {seed}: trained {run_name} in {time.perf_counter() - t0:.0f} s (2 cores, shared)", flush=True)
        for mode, suffix, flags in runs:
            t0 = time.perf_counter()
            predictors = lib.BASELINES if not suffix else ("cell_mean", *effect_baselines)
            if args.only_model:
                predictors = ("cell_mean",)
            out = lib.run_eval(
                lib.EvalConfig(
                    data_root=str(root),
                    checkpoint=checkpoint if not suffix else "none",
                    mode=mode,
                    predictors=predictors,
                    **flags,
                )
            )
            table = out["results"]
            table["predictor"] = [
                args.model_name if p == "model" else p if p in ("cell_mean", "control") else p + suffix
                for p in table["predictor"]
            ]
            if suffix:
                table = table[table["predictor"] != "cell_mean"]
            table.insert(0, "seed", seed)
            tables.append(table)
            if args.out:  # after every run, so a long comparison can be read while it goes on
                pd.concat(tables, ignore_index=True).to_csv(args.out, index=False)
            print(f"seed {seed} {mode}{suffix}: {time.perf_counter() - t0:.0f} s", flush=True)
    results = pd.concat(tables, ignore_index=True)
    print_table(results, args.size)


def print_table(results, size: str) -> None:
    import pandas as pd

    metrics = ["des", "pds", "mae", "pearson_delta", "s_des", "s_pds", "s_mae", "score"]
    grouped = results.groupby(["mode", "scenario", "predictor"], sort=False)[metrics]
    mean, sd = grouped.mean(), grouped.std()
    text = mean.map("{:.4f}".format) + " ± " + sd.fillna(0).map("{:.4f}".format)
    text.insert(0, "n_seeds", grouped.size())
    with pd.option_context(
        "display.width", 300, "display.max_columns", 20, "display.max_rows", 500, "display.max_colwidth", 20
    ):
        print(f"\n{size} world, seeds {sorted(results['seed'].unique().tolist())}: mean ± sd over seeds")
        print(text.to_string())


if __name__ == "__main__":
    main()
