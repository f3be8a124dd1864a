"""A real S3 endpoint on loopback for tests and benchmarks: moto's server, reached with pyarrow's S3 client.

``S3Endpoint`` starts ``moto.server.ThreadedMotoServer`` on 127.0.0.1 (an HTTP S3 API, no mocks of the
filesystem layer), sets the standard variables pyarrow reads (``AWS_ENDPOINT_URL``, ...) and uploads
directories with ``pyarrow.fs.copy_files``.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# pyarrow's AWS SDK sends upload bodies aws-chunked with a trailing checksum by default; moto's threaded
# server now and then stored the framing with the bytes (b"A2D8\r\n\x89HDF...": "file signature not found"
# later, in other tests). Checksums only when an API requires them: plain bodies with a Content-Length.
# Ray's workers read it too (tests/conftest.py passes it to the session's runtime env).
SDK_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"}


class S3Endpoint:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer  # lazy: the test extra's server, only where S3 is tested

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.env = {**CREDENTIALS, **SDK_ENV, "AWS_ENDPOINT_URL": self.url}
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        self.admin = pafs.S3FileSystem(endpoint_override=self.url, scheme="http", allow_bucket_creation=True, **keys())

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=self.url, scheme="http", **keys())

    def bucket(self) -> str:
        name = f"jasper-{uuid.uuid4().hex[:12]}"
        self.admin.create_dir(name)
        return name

    def upload(self, local_dir: Path, bucket: str, prefix: str) -> str:
        """Copy ``local_dir`` (recursively) to ``s3://bucket/prefix``; return that URI."""
        pafs.copy_files(str(local_dir), f"{bucket}/{prefix}", destination_filesystem=self.admin)
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        self.server.stop()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def keys() -> dict[str, str]:
    return {"access_key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
