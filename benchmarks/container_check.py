"""Build the service image with `bentoml containerize` and prove it answers, without Docker.

Without a Docker daemon, Debian's buildah builds and podman runs. The recipe: a local Debian bookworm base image made with
debootstrap (no registry to pull python:3.11-slim from), runc instead of crun, lower rlimits.
Steps: base image (once) -> Bento with that base -> `bentoml containerize --backend buildah`
-> `podman run` -> GET /readyz and POST /classify a real photo, compared with ONNX Runtime on the
host. On a machine with Docker none of this is needed: `bentoml containerize` + `docker run`.

    python -m benchmarks.container_check --model runs/bench-serve/export/model.onnx
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, CliApp

from loadtests.servers import ServerNotReady, wait_until_ready
from service.contract import load_and_preprocess, softmax
from service.model_store import read_contract
from service.runtime import create_session

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/bookworm-py311:latest"
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


class ContainerCheck(BaseSettings):
    """Containerize the service with buildah, run it with podman, check /readyz and /classify."""

    model: Path = Field(REPO / "runs/bench-serve/export/model.onnx",
                        description="exported .onnx put into a fresh model store and the image")
    photo: Path = Field(next((REPO / "demo_data/catalog/shoes").iterdir(), REPO),
                        description="photo posted to /classify")
    mirror: str = Field("http://deb.debian.org/debian", description="Debian mirror for the base")
    port: int = Field(3999, description="host port (127.0.0.1) for the container")
    work: Path = Field(Path(tempfile.gettempdir()) / "container-check",
                       description="scratch folder (BentoML home, base rootfs, logs)")

    def cli_cmd(self) -> None:
        check(self)


def sh(*command: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, env={**os.environ, **(env or {})}, **kwargs)


def build_base_image(config: ContainerCheck) -> None:
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], check=False).returncode == 0:
        return
    rootfs = config.work / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    sh("debootstrap", "--variant=minbase",
       "--include=python3,python3-venv,python3-pip,ca-certificates,curl", "bookworm",
       str(rootfs), config.mirror)
    # Outbound TLS may be intercepted here: pip inside the build must trust the host's CAs.
    for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy(cert, rootfs / "usr/local/share/ca-certificates" / cert.name)
    sh("chroot", str(rootfs), "update-ca-certificates")
    tarball = config.work / "base.tar"
    sh("tar", "-C", str(rootfs), "-cf", str(tarball), ".")
    sh("podman", "import", "--change", "ENV PIP_BREAK_SYSTEM_PACKAGES=1",
       "--change", "ENV UV_NATIVE_TLS=1",
       "--change", "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
       str(tarball), BASE_IMAGE)
    tarball.unlink()
    shutil.rmtree(rootfs)


def build_bento(config: ContainerCheck, env: dict) -> str:
    from service.model_store import save_to_store

    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    save_to_store(config.model)
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    bentofile["docker"] = {"base_image": BASE_IMAGE}  # the only change: a local base image
    path = config.work / "bentofile.yaml"
    path.write_text(yaml.safe_dump(bentofile))
    out = sh(sys.executable, "-m", "bentoml", "build", "-f", str(path), "-o", "tag", str(REPO),
             env=env, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1].removeprefix("__tag__:")


def check(config: ContainerCheck) -> None:
    for tool in ("buildah", "podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y buildah podman runc "
                             "debootstrap")
    config.work.mkdir(parents=True, exist_ok=True)
    conf = config.work / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {"CONTAINERS_CONF": str(conf), "BENTOML_HOME": str(config.work / "bentoml")}
    os.environ["CONTAINERS_CONF"] = str(conf)
    started = time.monotonic()
    build_base_image(config)
    tag = build_bento(config, env)
    image = f"product-classifier:{tag.split(':')[1]}"
    sh(sys.executable, "-m", "bentoml", "containerize", tag, "--backend", "buildah",
       "-t", image, env=env)
    print(f"image built in {time.monotonic() - started:.0f} s")
    name = "product-classifier-check"
    subprocess.run(["podman", "rm", "-f", name], capture_output=True, check=False)
    sh("podman", "run", "-d", "--name", name, "-p", f"127.0.0.1:{config.port}:3000",
       f"localhost/{image}", "serve")
    url = f"http://127.0.0.1:{config.port}"
    try:
        try:
            wait_until_ready(f"{url}/readyz", timeout_s=180, interval_s=1)
        except ServerNotReady as exc:
            raise SystemExit(f"container: {exc}\n" + subprocess.run(
                ["podman", "logs", name], capture_output=True, text=True, check=False).stdout[-4000:])
        print(f"GET /readyz -> 200 ({time.monotonic() - started:.0f} s since start)")
        data = config.photo.read_bytes()
        response = httpx.post(f"{url}/classify", files={"image": ("p.jpg", data)}, timeout=60)
        print(f"POST /classify -> {response.status_code} {response.text}")
        response.raise_for_status()
        contract = read_contract(config.model)
        session = create_session(config.model)
        scores = softmax(session.run(["logits"], {"input": load_and_preprocess(
            data, contract)[None]})[0])[0]
        body = response.json()
        assert body["label"] == contract.labels[int(np.argmax(scores))], body
        assert abs(body["score"] - float(scores.max())) < 1e-4, (body, scores.max())
        print(f"container answer = host ONNX Runtime answer: {body['label']} "
              f"{body['score']:.4f} (host {scores.max():.4f})")
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, check=False)


def main() -> None:
    CliApp.run(ContainerCheck)


if __name__ == "__main__":
    main()
