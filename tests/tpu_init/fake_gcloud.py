"""Stand-in for `gcloud` in tests/test_tpu_init.py: the calls `tpu_init.sh --recreate` makes.

One queued resource, its life scripted by $FAKE_GCLOUD_TIMELINES: a JSON list with one entry
per creation, each a list of what successive `describe` calls see, e.g. ["PROVISIONING",
"ACTIVE", "SUSPENDED"] (the last one repeats). "ACTIVE+finished" answers ACTIVE and first writes
a status file for worker 0 with that reason, as tpu_init.sh on the slice would. A fake clock
moves one minute per call, so createTime and status times are ordered as they would be on GCP.
State lives in $FAKE_GCLOUD_STATE; each call's argv is appended to $FAKE_GCLOUD_LOG.

`compute tpus queued-resources describe|create|delete NAME ...`, `storage cat gs://B/P/*.json`
(gs://B/P is $FAKE_GCS_ROOT/B/P).
"""

import datetime
import json
import os
import pathlib
import sys

argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\n")
state_path = pathlib.Path(os.environ["FAKE_GCLOUD_STATE"])
state = json.loads(state_path.read_text()) if state_path.exists() else {"clock": 0, "creations": 0, "exists": False}
timelines = json.loads(os.environ["FAKE_GCLOUD_TIMELINES"])
state["clock"] += 1
now = datetime.datetime(2026, 11, 30, 8, 0, tzinfo=datetime.UTC) + datetime.timedelta(minutes=state["clock"])


def save():
    state_path.write_text(json.dumps(state))


def local(url: str) -> pathlib.Path:
    return pathlib.Path(os.environ["FAKE_GCS_ROOT"]) / url.removeprefix("gs://")


if argv[:3] == ["compute", "tpus", "queued-resources"]:
    verb, name = argv[3], argv[4]
    if verb == "describe":
        if not state["exists"]:
            save()
            sys.exit(
                f"ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: "
                f"Resource 'projects/p/locations/z/queuedResources/{name}' was not found"
            )
        if state["deleting"]:  # one DELETING answer, then gone
            state["exists"] = False
            save()
            print("DELETING\t" + state["create_time"])
            sys.exit(0)
        timeline = timelines[state["creations"] - 1]
        step = timeline[min(state["step"], len(timeline) - 1)]
        state["step"] += 1
        answer, _, reason = step.partition("+")
        if reason:
            status = local(os.environ["FAKE_STATUS_URL"]) / "worker0.json"
            status.parent.mkdir(parents=True, exist_ok=True)
            status.write_text(
                json.dumps(
                    {
                        "run": "run1",
                        "host": "worker0",
                        "worker": "0",
                        "reason": reason,
                        "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                )
                + "\n"
            )
        save()
        print(f"{answer}\t{state['create_time']}")
    elif verb == "create":
        if state["exists"]:
            sys.exit(f"ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: {name}")
        if state["creations"] >= len(timelines):
            sys.exit("fake gcloud: more creations than FAKE_GCLOUD_TIMELINES scripts")
        state.update(
            exists=True,
            deleting=False,
            step=0,
            creations=state["creations"] + 1,
            create_time=now.strftime("%Y-%m-%dT%H:%M:%S.123456789Z"),
        )
        save()
    elif verb == "delete":
        if not state["exists"]:
            sys.exit(f"ERROR: (gcloud.compute.tpus.queued-resources.delete) NOT_FOUND: {name}")
        state["deleting"] = True
        save()
    else:
        sys.exit(f"fake gcloud: unsupported queued-resources verb {verb!r}")
elif argv[:2] == ["storage", "cat"]:
    save()
    url = argv[2]
    files = sorted(local(url).parent.glob(local(url).name))
    if not files:
        sys.exit(f"ERROR: (gcloud.storage.cat) The following URLs matched no objects or files:\n{url}")
    for path in files:
        sys.stdout.write(path.read_text())
else:
    sys.exit(f"fake gcloud: unsupported call {argv}")
