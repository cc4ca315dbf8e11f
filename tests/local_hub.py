"""A local Hub for tests: `olah` in offline mode serves plain git repos under its mirrors path as Hub repos, so
`from_pretrained(repo_id)` / `load_dataset(repo_id)` run against the exact folder a push would upload."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_hub(tmp_path: Path, repos: dict[tuple[str, str], Path]) -> Iterator[dict[str, str]]:
    """Serve `{(repo_type "models"|"datasets", repo_id): folder}`; yields the env vars that point the Hub client at it."""
    olah = shutil.which("olah-cli") or str(Path(sys.executable).parent / "olah-cli")
    if not Path(olah).exists():
        pytest.skip("olah not installed (pip install olah)")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    first_url = None
    for (repo_type, repo_id), folder in repos.items():
        repo = tmp_path / "mirrors" / repo_type / repo_id
        shutil.copytree(folder, repo)
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
        subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
        subprocess.run(git + ["commit", "-qm", "upload"], cwd=repo, check=True)
        first_url = first_url or f"/api/{repo_type}/{repo_id}"
    port = _free_port()
    (tmp_path / "olah.toml").write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{tmp_path / "repos"}"\n'
        f'mirrors-path = ["{tmp_path / "mirrors"}"]\n[accessibility]\noffline = true\n'
    )
    server = subprocess.Popen([olah, "-c", str(tmp_path / "olah.toml")], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{first_url}", timeout=2)
                break
            except urllib.error.HTTPError:  # any HTTP answer means the server is up
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
               "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf_home")}
    finally:
        server.terminate()
        server.wait(timeout=10)
