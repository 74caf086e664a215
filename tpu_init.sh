#!/usr/bin/env bash
# TPU VM startup script (issue 6: multi-host training). Not written yet: it would read VM
# metadata, install from uv.lock with the `tpu` extra, sync data and launch nb/05_train.py
# on every host. Until then it refuses to run rather than half-configure a VM.
echo "tpu_init.sh: not implemented yet (see the multi-host TPU issue); nothing was changed on this VM." >&2
exit 1
