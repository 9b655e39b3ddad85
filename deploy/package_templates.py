"""Package a CloudFormation template tree for `aws cloudformation deploy`, without calling AWS.

What `aws cloudformation package` does, offline and reproducibly: every local path a template names
(a nested stack's TemplateURL, a Lambda function's Code, a state machine's DefinitionS3Location) is
resolved against that template's directory, turned into a content-addressed artifact
(`<prefix>/<sha256>.template|zip|json`) under the artifacts directory, which mirrors the bucket, and
replaced by its S3 location. Nested templates are packaged the same way, depth first. Lambda code is
zipped with fixed timestamps and modes, so the same sources always give the same keys.

    python deploy/package_templates.py --template deploy/cloudformation/main.yaml --s3-bucket BUCKET \
        --s3-prefix releases/0.1.0/cloudformation --artifacts build/package/s3 \
        --output build/package/cloudformation/main.yaml --manifest templates.json

Upload the artifacts (`aws s3 sync ARTIFACTS/ s3://BUCKET/`), then deploy the output template.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import yaml

# Short-form intrinsic functions as CloudFormation reads them.
_SCALAR_ONLY = {"Ref", "Condition"}


class _Loader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags, read as their long forms."""


def _construct(loader: _Loader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix in _SCALAR_ONLY:
        return {suffix: value}
    if suffix == "GetAtt" and isinstance(value, str):
        resource, _, attribute = value.partition(".")
        value = [resource, attribute]
    return {f"Fn::{suffix}": value}


_Loader.add_multi_constructor("!", _construct)


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # noqa: ARG002 - every node is written out in full
        return True


def load_template(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if text.lstrip().startswith("{"):
        return json.loads(text)
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader plus the intrinsic tags only


def dump_template(template: dict[str, Any]) -> str:
    return yaml.dump(template, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def _is_local(value: Any) -> bool:
    """A path on disk rather than an S3 location (these properties take nothing else as a string)."""
    return isinstance(value, str) and not value.startswith(("s3://", "https://", "http://"))


def zip_directory(directory: Path) -> bytes:
    """A zip of a directory that depends only on the files' names and contents."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            info = zipfile.ZipInfo(path.relative_to(directory).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


class Packager:
    def __init__(self, bucket: str, prefix: str, artifacts: Path, root: Path) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.artifacts = artifacts
        self.root = root
        self.entries: dict[str, dict[str, Any]] = {}

    def _store(self, data: bytes, extension: str, source: Path, kind: str) -> str:
        digest = hashlib.sha256(data).hexdigest()
        key = f"{self.prefix}/{digest}.{extension}"
        target = self.artifacts / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self.entries[key] = {"key": key, "kind": kind, "source": self._name(source), "sha256": digest, "bytes": len(data)}
        return key

    def _name(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def _local(self, base: Path, value: str, what: str) -> Path:
        path = (base / value).resolve()
        if not path.exists():
            raise SystemExit(f"{what}: {value} does not exist (relative to {self._name(base)})")
        return path

    def template_url(self, key: str) -> dict[str, str]:
        # Partition- and Region-neutral: the bucket must be in the Region the stack is deployed to.
        return {"Fn::Sub": f"https://{self.bucket}.s3.${{AWS::Region}}.${{AWS::URLSuffix}}/{key}"}

    def package(self, path: Path) -> dict[str, Any]:
        template = load_template(path)
        base = path.parent
        for name, resource in (template.get("Resources") or {}).items():
            kind = resource.get("Type")
            props = resource.get("Properties") or {}
            where = f"{self._name(path)}: {name}"
            if kind == "AWS::CloudFormation::Stack" and _is_local(props.get("TemplateURL")):
                child = self._local(base, props["TemplateURL"], where)
                data = dump_template(self.package(child)).encode()
                props["TemplateURL"] = self.template_url(self._store(data, "template", child, "template"))
            elif kind == "AWS::Lambda::Function" and _is_local(props.get("Code")):
                code = self._local(base, props["Code"], where)
                data = zip_directory(code) if code.is_dir() else zip_single(code)
                props["Code"] = {"S3Bucket": self.bucket, "S3Key": self._store(data, "zip", code, "lambda")}
            elif kind == "AWS::Lambda::LayerVersion" and _is_local(props.get("Content")):
                code = self._local(base, props["Content"], where)
                props["Content"] = {"S3Bucket": self.bucket, "S3Key": self._store(zip_directory(code), "zip", code, "layer")}
            elif kind == "AWS::StepFunctions::StateMachine" and _is_local(props.get("DefinitionS3Location")):
                definition = self._local(base, props["DefinitionS3Location"], where)
                data = definition.read_bytes()
                json.loads(data)  # a broken definition fails here, not in CloudFormation
                key = self._store(data, "json", definition, "state-machine")
                props["DefinitionS3Location"] = {"Bucket": self.bucket, "Key": key}
        leftovers = [v for v in _strings(template) if isinstance(v, str) and v.startswith(("./", "../"))]
        if leftovers:
            raise SystemExit(f"{self._name(path)}: local paths this packager does not know how to upload: {leftovers}")
        return template


def zip_single(path: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        info = zipfile.ZipInfo(path.name, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def _strings(node: Any):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    else:
        yield node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", type=Path, required=True)
    parser.add_argument("--s3-bucket", required=True)
    parser.add_argument("--s3-prefix", required=True)
    parser.add_argument("--artifacts", type=Path, required=True, help="directory mirroring the bucket")
    parser.add_argument("--output", type=Path, required=True, help="the packaged root template")
    parser.add_argument("--manifest", type=Path, help="JSON list of what was packaged")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="paths in the manifest are relative to it")
    args = parser.parse_args(argv)

    packager = Packager(args.s3_bucket, args.s3_prefix, args.artifacts, args.root.resolve())
    packaged = packager.package(args.template.resolve())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(dump_template(packaged))
    if args.manifest:
        args.manifest.write_text(json.dumps({
            "template": packager._name(args.template),
            "output": args.output.as_posix(),
            "bucket": args.s3_bucket,
            "artifacts": sorted(packager.entries.values(), key=lambda e: (e["kind"], e["source"])),
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
