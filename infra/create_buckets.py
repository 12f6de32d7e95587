#!/usr/bin/env python3
"""Create the SEAP S3 buckets (MLflow artifacts, DVC remote) with boto3; idempotent.

Usage::

    python infra/create_buckets.py [--wait SECONDS] [bucket ...]

Without bucket names it creates ``$SEAP_MLFLOW_BUCKET`` (default ``seap-mlflow``) and
``$SEAP_DVC_BUCKET`` (default ``seap-dvc``). A bucket that already exists and is owned by
these credentials counts as success.

Environment:

* ``MLFLOW_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``: the S3 endpoint (MinIO, moto, ...);
  unset or empty means AWS S3.
* ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (secrets, required), ``AWS_SESSION_TOKEN``
  (optional secret), ``AWS_DEFAULT_REGION`` (default ``us-east-1``).

Credentials are read from the environment only and are never printed: the output names only
the endpoint (with any ``user:password@`` part masked) and the buckets.

Exit status: 0 all buckets exist, 1 an S3 error (e.g. a name taken by another account, or the
endpoint never came up within ``--wait`` seconds), 2 a configuration error (missing credentials).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_REGION = "us-east-1"
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class ConfigError(Exception):
    """A problem with the environment that the user must fix (exit status 2)."""


def default_buckets() -> list[str]:
    """The buckets the SEAP stack needs: MLflow artifacts and the DVC remote."""
    return [os.environ.get("SEAP_MLFLOW_BUCKET") or "seap-mlflow", os.environ.get("SEAP_DVC_BUCKET") or "seap-dvc"]


def endpoint_from_env() -> str | None:
    """The S3 endpoint URL, or None for AWS S3 (an empty variable counts as unset)."""
    return os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` part replaced by ``***@``."""
    return re.sub(r"(://)[^@]*@", r"\1***@", url)


def check_credentials() -> None:
    """Raise ConfigError naming the credential variables that are not set (never their values)."""
    missing = [name for name in CREDENTIAL_VARIABLES if not os.environ.get(name)]
    if missing:
        raise ConfigError(
            f"no S3 credentials: {', '.join(missing)} not set. Export AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (the MinIO root user/password or an AWS IAM key) in the environment, "
            "e.g. `set -a; . infra/team/.env; set +a`; never pass them on the command line."
        )


def make_client(endpoint: str | None, region: str) -> Any:
    """A botocore S3 client for ``endpoint`` with credentials from the environment only."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        region_name=region,
    )
    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"},
                    s3={"addressing_style": "path"} if endpoint else None)
    return session.client("s3", endpoint_url=endpoint, config=config)


def ensure_bucket(client: Any, bucket: str, region: str) -> str:
    """Create ``bucket`` unless it exists; returns "created" or "exists".

    Raises botocore's ClientError for anything but "already owned by you" (e.g. a name taken by
    another account) and its connection errors while the endpoint is not reachable.
    """
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
        return "exists"
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code not in {"404", "NoSuchBucket", "NotFound"}:
            raise
    kwargs: dict[str, object] = {"Bucket": bucket}
    if region != DEFAULT_REGION:
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "BucketAlreadyOwnedByYou":
            return "exists"
        raise
    return "created"


def create_buckets(buckets: Sequence[str], wait: float) -> int:
    """Create every bucket, retrying connection errors for up to ``wait`` seconds; exit status."""
    from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as EndpointUnreachable

    check_credentials()
    endpoint = endpoint_from_env()
    region = os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    where = redact_url(endpoint) if endpoint else f"AWS S3 ({region})"
    print(f"S3 endpoint: {where}", flush=True)
    client = make_client(endpoint, region)
    deadline = time.monotonic() + max(wait, 0.0)
    for bucket in buckets:
        while True:
            try:
                status = ensure_bucket(client, bucket, region)
                break
            except (EndpointUnreachable, HTTPClientError, ClientError) as err:
                if isinstance(err, ClientError) and not is_starting_up(err):
                    return report_client_error(bucket, err)
                if time.monotonic() >= deadline:
                    print(f"error: S3 endpoint {where} not reachable after {wait:g} s ({type(err).__name__}). "
                          "Start MinIO (or fix MLFLOW_S3_ENDPOINT_URL / AWS_ENDPOINT_URL), or raise --wait.",
                          file=sys.stderr)
                    return 1
                time.sleep(1.0)
            except BotoCoreError as err:
                print(f"error: bucket {bucket}: {type(err).__name__} talking to {where}", file=sys.stderr)
                return 1
        print(f"bucket {bucket}: {status}", flush=True)
    return 0


def is_starting_up(err: Any) -> bool:
    """True for the 5xx answers of an S3 server that is still starting (MinIO: 503)."""
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    code = err.response.get("Error", {}).get("Code", "")
    return int(status) >= 500 or code in {"ServiceUnavailable", "XMinioServerNotInitialized", "SlowDown", "503"}


def report_client_error(bucket: str, err: Any) -> int:
    """Print an S3 error for ``bucket`` with a hint at the fix; returns exit status 1."""
    error = err.response.get("Error", {})
    code, message = error.get("Code", "?"), error.get("Message", "")
    if code in {"403", "Forbidden"}:
        hint = ("access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the bucket belongs to "
                "another account (set SEAP_MLFLOW_BUCKET / SEAP_DVC_BUCKET)")
    elif code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}:
        hint = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the key's S3 permissions"
    elif code == "BucketAlreadyExists":
        hint = "the name is taken by another account; set SEAP_MLFLOW_BUCKET / SEAP_DVC_BUCKET"
    else:
        hint = "the S3 server refused the request"
    print(f"error: bucket {bucket}: {code} {message} ({hint})", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("buckets", nargs="*", help="bucket names (default: $SEAP_MLFLOW_BUCKET and $SEAP_DVC_BUCKET)")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to keep retrying while the endpoint is starting (default 60)")
    args = parser.parse_args(argv)
    buckets = list(args.buckets) or default_buckets()
    for bucket in buckets:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            print(f"error: invalid bucket name {bucket!r} (3-63 characters: lower-case letters, digits, '.', '-')",
                  file=sys.stderr)
            return 2
    try:
        return create_buckets(buckets, args.wait)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
