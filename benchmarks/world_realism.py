"""The synthetic world's realism numbers (issue 10 §1), from its files, for given sizes and seeds.

Not a test (tests/test_synthetic.py checks the `check` world): generates each (size, seed)
world under `<data-root>/<size>_seed<seed>` (kept; reused with --reuse) and prints one row of
lib.measure_synthetic_world per world, with the generation time.

    uv run python benchmarks/world_realism.py --size medium --seeds 0 1 2 --data-root /tmp/worlds
"""

import argparse
import json
import pathlib
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="/tmp/vcell_worlds")
    parser.add_argument("--size", nargs="+", default=["medium"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--mode", default="vcc2025", choices=["vcc2025", "current"])
    parser.add_argument("--reuse", action="store_true", help="measure an existing world instead of generating it")
    args = parser.parse_args(argv)

    import pandas as pd

    import lib

    rows = []
    for size in args.size:
        for seed in args.seeds:
            root = pathlib.Path(args.data_root) / f"{size}_seed{seed}"
            t0 = time.perf_counter()
            if not (args.reuse and (root / "raw" / "synthetic" / "world.json").exists()):
                lib.write_synthetic_world(root, size=size, seed=seed)
            generate_s = time.perf_counter() - t0
            row = {
                "size": size,
                "seed": seed,
                "generate_s": round(generate_s, 1),
                **lib.measure_synthetic_world(root, mode=args.mode),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.float_format", "{:.3g}".format):
        print(pd.DataFrame(rows).set_index(["size", "seed"]).T)


if __name__ == "__main__":
    main()
