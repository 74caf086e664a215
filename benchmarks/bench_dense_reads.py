"""Peak RSS of 03 (HVG) and 04 (store) on the same counts stored dense and sparse (not a test).

    uv run python benchmarks/bench_dense_reads.py --data-root /tmp/dense_bench
    uv run python benchmarks/bench_dense_reads.py --data-root /tmp/dense_bench --repos . /path/to/older/checkout

Writes one dataset (default 24,000 cells x 8,000 genes, ~10% non-zero Poisson counts: X is
768 MB dense) twice, X dense and X CSR, then for each checkout in --repos runs 03 and 04 on each
in a fresh process and prints how much the peak RSS grew in each stage (the peak is reset after
the imports). Replogle's files are reported to hold dense X; the goal is dense ≈ sparse. The
file writer and the probe are tests/test_sources.py's (the test runs the same at this size).
"""

import argparse
import json
import pathlib
import subprocess
import sys

REPO_DIR = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR / "tests"))

import test_sources  # noqa: E402  (the writer and probe the test uses)

import lib  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="where the two datasets are written (kept for reruns)")
    parser.add_argument("--cells", type=int, default=24_000)
    parser.add_argument("--genes", type=int, default=8_000)
    parser.add_argument("--repos", nargs="+", default=[str(REPO_DIR)], help="checkouts whose lib.py is measured")
    args = parser.parse_args()
    spec = test_sources.DENSE_SPEC
    root = pathlib.Path(args.data_root)
    for kind in ("sparse", "dense"):
        path = root / kind / "raw" / spec["source"] / spec["path"]
        if not path.exists():
            test_sources.write_counts_h5ad(path, lib.DatasetSpec(**spec), args.cells, args.genes, kind == "dense")
    for repo in args.repos:
        grown = {}
        for kind in ("sparse", "dense"):
            out = subprocess.run(
                [sys.executable, "-c", test_sources.DENSE_PROBE, json.dumps(spec), str(root / kind)],
                capture_output=True,
                text=True,
                cwd=repo,  # `python -c` imports lib.py from the working directory
            )
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            grown[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        for stage in ("hvg", "store"):
            sparse, dense = grown["sparse"][stage] / 1024, grown["dense"][stage] / 1024
            print(
                f"{repo} {stage}: peak RSS grew {sparse:.0f} MiB sparse, {dense:.0f} MiB dense ({dense / sparse:.2f}x)"
            )


if __name__ == "__main__":
    main()
