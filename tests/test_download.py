"""The downloader against a real HTTP server on 127.0.0.1 (no mocks of our code).

The server (below) serves in-memory files under a mode prefix: /normal/<f> (Range -> 206),
/drop/<f> (first request: announces the full length, sends half, hangs up), /norange/<f>
(ignores Range, always 200), /corrupt/<f> (one byte flipped), /slow/<f> (stalls), /redirect/<f>
(302 to /normal/<f>); anything else is 404. Every request is logged with its Range header.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading
import time

import pytest

import lib

PAYLOAD = os.urandom(300_000) + b"end"  # a few chunks at the small chunk size used below
CHUNK = 16_384


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        mode, _, name = self.path.lstrip("/").partition("/")
        body = server.files.get(name)
        if body is None or mode not in {"normal", "drop", "norange", "corrupt", "slow", "redirect"}:
            self.send_error(404)
            return
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", f"/normal/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "corrupt":
            body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
        if mode == "slow":
            time.sleep(2.0)
        start = 0
        range_header = self.headers.get("Range")
        if range_header and mode != "norange":
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if mode == "drop" and not server.dropped.get(name):
            server.dropped[name] = True
            self.wfile.write(chunk[: len(chunk) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(chunk)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients hang up on purpose here (timeouts, drops): no tracebacks in the output


@pytest.fixture
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files = {"data.bin": PAYLOAD}
    httpd.requests = []
    httpd.dropped = {}
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/normal/data.bin"  # nothing listens: connection refused


FAST = dict(retries=3, retry_wait=0.0, timeout=5.0, chunk_bytes=CHUNK)


def test_full_download_is_verified_and_registered(server, tmp_path):
    dest = tmp_path / "raw" / "src" / "data.bin"
    path = lib.download_file(f"{server.url}/normal/data.bin", dest, sha256=_sha(PAYLOAD), size=len(PAYLOAD), **FAST)
    assert path == dest and dest.read_bytes() == PAYLOAD
    assert not dest.with_name("data.bin.part").exists()
    entry = json.loads((dest.parent / lib.HASH_REGISTRY_NAME).read_text())["data.bin"]
    assert entry["sha256"] == _sha(PAYLOAD) and entry["size"] == len(PAYLOAD) and entry["origin"] == "manifest"
    assert server.requests == [("/normal/data.bin", None)]


def test_redirect_is_followed(server, tmp_path):
    dest = tmp_path / "data.bin"
    lib.download_file(f"{server.url}/redirect/data.bin", dest, sha256=_sha(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/redirect/data.bin", "/normal/data.bin"]


def test_dropped_connection_resumes_with_range(server, tmp_path):
    dest = tmp_path / "data.bin"
    lib.download_file(f"{server.url}/drop/data.bin", dest, sha256=_sha(PAYLOAD), size=len(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 2
    assert server.requests[0][1] is None
    assert server.requests[1][1] == f"bytes={len(PAYLOAD) // 2}-"  # resumed where the drop happened


def test_interrupted_run_is_resumed_by_the_next_run(server, tmp_path):
    dest = tmp_path / "data.bin"
    url = f"{server.url}/drop/data.bin"
    with pytest.raises(lib.DownloadError, match="running again resumes"):
        lib.download_file(url, dest, sha256=_sha(PAYLOAD), size=len(PAYLOAD), **{**FAST, "retries": 0})
    part = dest.with_name("data.bin.part")
    assert not dest.exists() and part.stat().st_size == len(PAYLOAD) // 2
    lib.download_file(url, dest, sha256=_sha(PAYLOAD), size=len(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert server.requests[-1][1] == f"bytes={len(PAYLOAD) // 2}-"


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(b"garbage that must not be kept" * 100)
    lib.download_file(f"{server.url}/norange/data.bin", dest, sha256=_sha(PAYLOAD), size=len(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD  # not garbage + payload
    assert server.requests == [("/norange/data.bin", "bytes=2900-")]


def test_corrupted_download_is_detected_and_deleted(server, tmp_path):
    dest = tmp_path / "data.bin"
    with pytest.raises(lib.DownloadError, match="sha256 mismatch") as err:
        lib.download_file(f"{server.url}/corrupt/data.bin", dest, sha256=_sha(PAYLOAD), size=len(PAYLOAD), **FAST)
    assert f"{server.url}/corrupt/data.bin" in str(err.value)
    assert not dest.exists() and not dest.with_name("data.bin.part").exists()


def test_size_announced_by_server_must_match_manifest(server, tmp_path):
    with pytest.raises(lib.DownloadError, match="the manifest says 123"):
        lib.download_file(f"{server.url}/normal/data.bin", tmp_path / "data.bin", size=123, **FAST)


def test_stalled_server_times_out_with_a_clear_error(server, tmp_path):
    with pytest.raises(lib.DownloadError, match="timed out"):
        lib.download_file(
            f"{server.url}/slow/data.bin", tmp_path / "data.bin", **{**FAST, "timeout": 0.3, "retries": 0}
        )


def _manifest(files):
    return {"sources": {"src": {"files": files}}}


def test_unreachable_source_raises_one_error_naming_url_and_hand_placement_path(server, tmp_path):
    dead, missing = _closed_port_url(), f"{server.url}/nowhere/data.bin"
    manifest = _manifest(
        [
            {"name": "a.bin", "url": dead, "size": "", "sha256": ""},
            {"name": "b.bin", "url": dead.replace("data.bin", "other.bin"), "size": "", "sha256": ""},
            {"name": "c.bin", "url": missing, "size": "", "sha256": ""},
        ]
    )
    with pytest.raises(lib.DownloadError) as err:
        lib.download_source("src", data_root=tmp_path, manifest=manifest, **FAST)
    message = str(err.value)
    assert "could not fetch 3 of 3" in message
    for name, url in [("a.bin", dead), ("c.bin", missing)]:
        assert url in message
        assert str(tmp_path / "raw" / "src" / name) in message  # where to put it by hand
    assert "not tried" in message  # b.bin: same dead host, not retried
    assert "HTTP 404" in message and "verified the same way" in message


def test_hand_placed_file_is_verified_like_a_download(tmp_path):
    manifest = _manifest([{"name": "a.bin", "url": _closed_port_url(), "size": len(PAYLOAD), "sha256": _sha(PAYLOAD)}])
    dest = tmp_path / "raw" / "src" / "a.bin"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD[:-1] + b"X")
    with pytest.raises(lib.DownloadError, match="does not match"):
        lib.download_source("src", data_root=tmp_path, manifest=manifest, **FAST)
    dest.write_bytes(PAYLOAD)
    assert lib.download_source("src", data_root=tmp_path, manifest=manifest, **FAST) == [dest]


def test_verified_file_is_skipped_without_a_request(server, tmp_path):
    manifest = _manifest(
        [{"name": "a.bin", "url": f"{server.url}/normal/data.bin", "size": len(PAYLOAD), "sha256": _sha(PAYLOAD)}]
    )
    lib.download_source("src", data_root=tmp_path, manifest=manifest, **FAST)
    assert len(server.requests) == 1
    lib.download_source("src", data_root=tmp_path, manifest=manifest, **FAST)
    assert len(server.requests) == 1  # no second request
    # Not even re-hashed: a same-size edit that keeps the recorded mtime goes unnoticed (the
    # documented price of not reading 15 GB on every run).
    dest = tmp_path / "raw" / "src" / "a.bin"
    stat = dest.stat()
    dest.write_bytes(PAYLOAD[:-1] + b"Y")
    os.utime(dest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    lib.download_source("src", data_root=tmp_path, manifest=manifest, **FAST)
    # Same size, new content and mtime: the size+mtime shortcut must not hide it.
    dest.write_bytes(PAYLOAD[:-1] + b"X")
    with pytest.raises(lib.DownloadError, match="does not match"):
        lib.download_source("src", data_root=tmp_path, manifest=manifest, **FAST)
    assert len(server.requests) == 1


def test_unverified_hash_is_recorded_then_enforced(server, tmp_path, capsys):
    manifest = _manifest([{"name": "a.bin", "url": f"{server.url}/normal/data.bin", "size": "", "sha256": ""}])
    dest = tmp_path / "raw" / "src" / "a.bin"
    lib.download_source("src", data_root=tmp_path, manifest=manifest, **FAST)
    assert "UNVERIFIED" in capsys.readouterr().err
    registry = json.loads((dest.parent / lib.HASH_REGISTRY_NAME).read_text())
    assert registry["a.bin"]["sha256"] == _sha(PAYLOAD) and registry["a.bin"]["origin"] == "recorded"
    # The upstream file changes: a fresh download must now fail against the recorded hash.
    dest.unlink()
    server.files["data.bin"] = PAYLOAD[::-1]
    with pytest.raises(lib.DownloadError, match="hash recorded in"):
        lib.download_source("src", data_root=tmp_path, manifest=manifest, **FAST)
    assert not dest.exists()
    server.files["data.bin"] = PAYLOAD
    lib.download_source("src", data_root=tmp_path, manifest=manifest, **FAST)
    assert dest.read_bytes() == PAYLOAD and "UNVERIFIED" not in capsys.readouterr().err


def test_real_manifest_parses_and_only_vcc_is_the_target():

    manifest = lib.read_manifest()
    specs = lib.get_datasets("real", manifest)
    assert [s.name for s in specs if s.role == "target"] == ["vcc2025_h1"]
    for name in lib.get_default_sources(manifest):
        for entry in lib._get_files(name, manifest):  # raises on malformed entries
            assert entry["url"].startswith("https://")
    assert {"vcc2025", "replogle2022", "nadig2025"} <= set(lib.get_default_sources(manifest))
