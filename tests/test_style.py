"""The tree passes ruff (lint with import order, and the formatter), configured in pyproject.toml:
part of the test command, so CI checks it on every change."""

import subprocess
import sys

import lib


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=lib.REPO_DIR, capture_output=True, text=True)


def test_ruff_lint_passes():
    result = _ruff("check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied():
    result = _ruff("format", "--check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr
