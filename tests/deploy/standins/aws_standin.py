"""STAND-IN for the AWS side of one EC2 instance, for the boot test (no AWS account here).

Runs in the booted root's network namespace and serves there:

- instance metadata on 169.254.169.254:80, IMDSv2 only (a token from PUT /latest/api/token is
  required on every read): instance id, zone, region, the instance tags the launch template's user
  data reads, the Auto Scaling lifecycle state the drain hook polls, and instance-role credentials
  (the gateway's standard credential chain finds them there, as on EC2); every request is recorded;
- the AWS services the gateway calls at run time (Secrets Manager, S3, Glue, EventBridge), as moto's
  server on 127.0.0.1:PORT, seeded with the device registry secret, the lake bucket and key, the
  catalog database and the event bus the stack would have created.

When both answer it writes --ready (JSON: the secret's and the key's ARNs), then serves until killed.
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

ROLE = "edge-gateway-standin-instance-role"


def imds_server(args: argparse.Namespace, log: Path) -> ThreadingHTTPServer:
    token = secrets.token_hex(16)
    lock = threading.Lock()
    meta = {
        "instance-id": args.instance_id,
        "placement/availability-zone": args.zone,
        "placement/region": args.region,
        "autoscaling/target-lifecycle-state": "InService",
        "iam/security-credentials/": ROLE,
        f"iam/security-credentials/{ROLE}": json.dumps({
            "Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "ASIASTANDIN", "SecretAccessKey": "standin",
            "Token": "standin", "LastUpdated": "2030-01-01T00:00:00Z", "Expiration": "2099-01-01T00:00:00Z",
        }),
    } | {f"tags/instance/{key}": value for key, value in args.tag}

    class Handler(BaseHTTPRequestHandler):
        def record(self, status: int) -> None:
            with lock, log.open("a") as handle:
                handle.write(f"{self.command} {self.path} {status}\n")

        def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                self.reply(200, token)
            else:
                self.reply(400, "")

        def do_GET(self) -> None:  # noqa: N802
            if self.headers.get("X-aws-ec2-metadata-token") != token:
                self.reply(401, "")  # IMDSv1 is off on the launch template
                return
            path = self.path.removeprefix("/latest/meta-data/")
            if self.path == "/latest/dynamic/instance-identity/document":
                self.reply(200, json.dumps({"region": args.region, "availabilityZone": args.zone, "instanceId": args.instance_id}))
            elif path in meta and self.path.startswith("/latest/meta-data/"):
                self.reply(200, meta[path])
            else:
                self.reply(404, "")

        def reply(self, status: int, body: str) -> None:
            self.record(status)
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: object) -> None:
            pass

    return ThreadingHTTPServer(("169.254.169.254", 80), Handler)


def seed(args: argparse.Namespace) -> dict[str, str]:
    def client(service: str):
        return boto3.client(service, region_name=args.region, endpoint_url=f"http://127.0.0.1:{args.moto_port}",
                            aws_access_key_id="standin", aws_secret_access_key="standin")

    key = client("kms").create_key(Description="lake data (stand-in)")["KeyMetadata"]["Arn"]
    client("s3").create_bucket(Bucket=args.bucket, CreateBucketConfiguration={"LocationConstraint": args.region})
    registry = {"devices": {args.device_id: {"key": args.device_key, "enabled": True}}}
    secret = client("secretsmanager").create_secret(Name=args.secret_name, SecretString=json.dumps(registry))["ARN"]
    client("glue").create_database(DatabaseInput={"Name": args.database})
    client("events").create_event_bus(Name=args.bus)
    return {"secret_arn": secret, "data_key_arn": key}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--moto-port", type=int, default=4566)
    parser.add_argument("--region", required=True)
    parser.add_argument("--zone", required=True)
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--tag", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--secret-name", required=True)
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--device-key", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--bus", required=True)
    args = parser.parse_args()

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=args.moto_port, verbose=False)
    moto.start()
    imds = imds_server(args, args.state / "imds.log")
    threading.Thread(target=imds.serve_forever, daemon=True).start()
    args.ready.write_text(json.dumps(seed(args)))
    threading.Event().wait()


if __name__ == "__main__":
    main()
