"""Stand-in for `gcloud storage` in tests/test_tpu_init.py (set as VCELL_STORAGE_CMD).

gs://BUCKET/PATH is the local path $FAKE_GCS_ROOT/BUCKET/PATH. Each call is appended to
$FAKE_STORAGE_LOG with the names (never values) of the environment variables it saw.

`rsync SRC DST`  copy files whose size or mtime differ, like `gcloud storage rsync -r`; never deletes.
`cp SRC DST`     copy one file.
"""

import json
import os
import pathlib
import shutil
import sys

root = pathlib.Path(os.environ["FAKE_GCS_ROOT"])


def local(url: str) -> pathlib.Path:
    return root / url.removeprefix("gs://") if url.startswith("gs://") else pathlib.Path(url)


op, src, dst = sys.argv[1:]
copied = []
if op == "rsync":
    if not local(src).is_dir():
        sys.exit(f"fake storage: {src} does not exist")
    for path in sorted(local(src).rglob("*")):
        target = local(dst) / path.relative_to(local(src))
        if path.is_dir():
            continue
        if (
            target.exists()
            and target.stat().st_size == path.stat().st_size
            and target.stat().st_mtime == path.stat().st_mtime
        ):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(str(path.relative_to(local(src))))
elif op == "cp":
    local(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(local(src), local(dst))
    copied.append(src)
else:
    sys.exit(f"fake storage: unsupported operation {op!r}")

with open(os.environ["FAKE_STORAGE_LOG"], "a") as f:
    f.write(json.dumps({"op": op, "src": src, "dst": dst, "copied": copied, "env_names": sorted(os.environ)}) + "\n")
