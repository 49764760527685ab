"""Test helper: a real S3 API server (moto's server mode) on 127.0.0.1 and a free port, and the environment that
points the platform at it the standard way: ``AWS_ENDPOINT_URL`` (read by pyarrow's S3 filesystem, and so by Ray
Train, Tune and Data, and by boto3), dummy keys and a region. Every process started with that environment (a
``dynmm`` command, a Ray node) reaches it; nothing here patches the platform."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from server_process import free_port, stop_session, wait_for_http

SECRET_ACCESS_KEY = "dynmm-test-secret-" + uuid.uuid4().hex  # must never show in output, logs or MLflow
ACCESS_KEY_ID = "dynmm-test-key-id"


class S3Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def environment(self) -> dict[str, str]:
        """What a process needs to reach this server as its S3 (no other AWS setting of the machine leaks in)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> None:
        log = open(self.root / "moto.log", "a")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_http(f"{self.endpoint}/moto-api/", self.process)
        except BaseException:
            self.stop()
            raise

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY_ID,
                            aws_secret_access_key=SECRET_ACCESS_KEY, region_name="us-east-1")

    def new_bucket(self) -> str:
        """A bucket of the caller's own (tests share the server, never a bucket)."""
        name = f"dynmm-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [entry["Key"] for page in pages for entry in page.get("Contents", [])]

    def stop(self) -> None:
        if self.process is not None:
            stop_session(self.process)
        self.process = None
