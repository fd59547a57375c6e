"""JupyterLab, the workbench's home (`make lab`): it starts from the project's environment, serves the study
notebooks' jupytext sources as notebooks, and the project's kernel registers under its own name."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_jupyterlab_serves_the_notebooks_with_the_projects_kernel(tmp_path):
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", "dcvla",
                    "--display-name", "dcvla (.venv)"], check=True, capture_output=True)
    port = free_port()
    env = {**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    server = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", f"--notebook-dir={NOTEBOOKS}", "--no-browser",
                               f"--port={port}", "--ServerApp.ip=127.0.0.1", "--ServerApp.token=", "--allow-root"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                specs = get(f"{base}/api/kernelspecs")
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "JupyterLab did not start"
                time.sleep(0.5)
        assert specs["kernelspecs"]["dcvla"]["spec"]["display_name"] == "dcvla (.venv)"
        with urllib.request.urlopen(f"{base}/lab", timeout=10) as response:
            assert response.status == 200
        quickstart = get(f"{base}/api/contents/quickstart.py?type=notebook")  # jupytext: the .py is a notebook
        assert quickstart["type"] == "notebook" and quickstart["content"]["cells"][0]["cell_type"] == "markdown"
        assert "parameters" in quickstart["content"]["cells"][1]["metadata"]["tags"]
    finally:
        server.terminate()
        server.wait(timeout=30)
