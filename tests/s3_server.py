"""A real S3-compatible server on 127.0.0.1 for tests of ``s3://`` inputs: moto's server,
reached by pyarrow through ``AWS_ENDPOINT_URL`` as a user would point batcher at MinIO."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

KEY_ID, SECRET = "test-key-id", "test-secret"


@dataclass
class Bucket:
    """A fresh bucket on a loopback object-store server (this module's S3, or the GCS
    emulator of test_input_gcs.py): its URL scheme, endpoint and Arrow filesystem."""

    scheme: str
    endpoint: str
    bucket: str
    fs: pafs.FileSystem

    def put(self, key: str, local: Path) -> str:
        """Upload ``local`` as ``key`` of this bucket; its ``scheme://`` URL."""
        with self.fs.open_output_stream(f"{self.bucket}/{key}") as stream:
            stream.write(local.read_bytes())
        return f"{self.scheme}://{self.bucket}/{key}"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A fresh bucket; the environment points pyarrow (and subprocesses) at the server."""
    for name, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": KEY_ID,
                        "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    fs = pafs.S3FileSystem(access_key=KEY_ID, secret_key=SECRET, region="us-east-1",
                           endpoint_override=s3_endpoint, allow_bucket_creation=True)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    fs.create_dir(bucket)
    return Bucket("s3", s3_endpoint, bucket, fs)
