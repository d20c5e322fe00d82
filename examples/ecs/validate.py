"""Validate the ECS task and service definitions against botocore's ECS model.

Uses botocore's own parameter validator, the one boto3 and the aws CLI run before sending a request,
on the RegisterTaskDefinition and CreateService input shapes, and checks the sidecar contract
(essential, healthCheck on /ready with interval 30 / timeout 5 / retries 3, app dependsOn HEALTHY).
Exit 0 when valid; otherwise print every problem and exit 1.
"""
import json
import pathlib
import sys

import botocore.session
from botocore.validate import ParamValidator

HERE = pathlib.Path(__file__).parent


def main() -> int:
    model = botocore.session.get_session().get_service_model("ecs")
    problems = []
    for file, op in [("task-definition.json", "RegisterTaskDefinition"),
                     ("service-definition.json", "CreateService")]:
        params = json.loads((HERE / file).read_text())
        report = ParamValidator().validate(params, model.operation_model(op).input_shape)
        if report.has_errors():
            problems.append(f"{file} ({op}):\n{report.generate_report()}")

    task = json.loads((HERE / "task-definition.json").read_text())
    containers = {c["name"]: c for c in task["containerDefinitions"]}
    proxy = containers.get("trellis-proxy")
    if proxy is None:
        problems.append("no trellis-proxy container")
    else:
        hc = proxy.get("healthCheck", {})
        if not proxy.get("essential"):
            problems.append("trellis-proxy must be essential")
        if (hc.get("interval"), hc.get("timeout"), hc.get("retries")) != (30, 5, 3):
            problems.append(f"sidecar healthCheck must be interval 30, timeout 5, retries 3: {hc}")
        if not any("/ready" in part for part in hc.get("command", [])):
            problems.append("sidecar healthCheck must probe /ready")
        if not any(e["name"] == "TRELLIS_IDENTITY__SERVICE" for e in proxy.get("environment", [])):
            problems.append("sidecar must be configured from TRELLIS_* environment variables")
    app = containers.get("app", {})
    if {"containerName": "trellis-proxy", "condition": "HEALTHY"} not in app.get("dependsOn", []):
        problems.append("app must dependsOn trellis-proxy HEALTHY")

    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print("ecs definitions valid against botocore", model.metadata.get("apiVersion"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
