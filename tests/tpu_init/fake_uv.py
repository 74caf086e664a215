"""Stand-in for `uv` in tests/test_tpu_init.py (set as VCELL_UV): installs nothing.

`sync ...`  records its arguments in $FAKE_UV_LOG and marks .venv/ as synced.
`run [--flags] python SCRIPT ARGS...`  execs SCRIPT with this Python, keeping the pid, so a
signal sent to "uv" reaches the script directly (real uv forwards SIGTERM to its child).
"""

import json
import os
import pathlib
import sys

command, *rest = sys.argv[1:]
if command == "sync":
    with open(os.environ["FAKE_UV_LOG"], "a") as f:
        f.write(json.dumps({"cwd": os.getcwd(), "argv": rest}) + "\n")
    pathlib.Path(".venv").mkdir(exist_ok=True)
    pathlib.Path(".venv/synced").write_text("fake uv sync\n")
elif command == "run":
    flags = []
    while rest and rest[0].startswith("--"):
        flags.append(rest.pop(0))
    if not rest or rest[0] != "python":
        sys.exit(f"fake uv: expected `uv run [--flags] python SCRIPT ...`, got {sys.argv[1:]}")
    os.environ["FAKE_UV_RUN_FLAGS"] = " ".join(flags)
    os.execv(sys.executable, [sys.executable, *rest[1:]])
else:
    sys.exit(f"fake uv: unsupported command {command!r}")
