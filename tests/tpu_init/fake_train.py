"""Fake nb/05_train.py, committed into the test's git remote by tests/test_tpu_init.py.

Appends one JSON line per launch to $FAKE_TRAIN_RECORD: argv, cwd, the names of the
environment variables it sees, a sha256 of WANDB_API_KEY (never the key), a few values.
$FAKE_TRAIN_MODE: `exit0` (default) returns at once; `fail` exits 3; `wait` writes its
record, then sleeps until SIGTERM, writes $FAKE_TRAIN_CHECKPOINT (the "checkpoint") and exits 0;
`ignore-sigterm-handler` sleeps with no handler, so SIGTERM kills it (exit 143, no checkpoint);
`join` runs the real lib.init_distributed (the multi-process settings come from $JAX_* and
$VCELL_DISTRIBUTED_TIMEOUT), then exits 0.
"""

import hashlib
import json
import os
import signal
import sys
import time

mode = os.environ.get("FAKE_TRAIN_MODE", "exit0")
key = os.environ.get("WANDB_API_KEY")
record = {
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "env_names": sorted(os.environ),
    "wandb_key_sha256": hashlib.sha256(key.encode()).hexdigest() if key is not None else None,
    "env": {
        name: os.environ.get(name)
        for name in [
            "VCELL_DATA_ROOT",
            "VCELL_RUN_NAME",
            "WANDB_PROJECT",
            "WANDB_ENTITY",
            "WANDB_MODE",
            "WANDB_RUN_ID",
            "WANDB_RESUME",
            "FAKE_UV_RUN_FLAGS",
        ]
    },
}


def on_sigterm(signum, frame):
    with open(os.environ["FAKE_TRAIN_CHECKPOINT"], "w") as f:
        f.write(f"checkpoint written after signal {signum}\n")
    print("fake training: checkpointed after SIGTERM, exiting 0", flush=True)
    sys.exit(0)


if mode != "ignore-sigterm-handler":
    signal.signal(signal.SIGTERM, on_sigterm)
with open(os.environ["FAKE_TRAIN_RECORD"], "a") as f:
    f.write(json.dumps(record) + "\n")
print(f"fake training: started in mode {mode}", flush=True)
if mode == "join":
    import lib  # this checkout's lib.py (installed editable), not a copy

    lib.init_distributed(lib.TrainConfig())
    sys.exit(0)
if mode == "fail":
    sys.exit(3)
if mode in ("wait", "ignore-sigterm-handler"):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit("fake training: no SIGTERM within 60 s")
