"""Print the ``openAPIV3Schema`` of a KubeRay CRD's served ``v1`` version as JSON: how the schemas beside
this file were made (see README.md here). Reads the CRD YAML on stdin:

    git -C kuberay show v1.7.0:ray-operator/config/crd/bases/ray.io_rayclusters.yaml \\
        | python tests/kuberay/extract_crd_schema.py > tests/kuberay/v1.7.0/raycluster.schema.json
"""

from __future__ import annotations

import json
import sys

import yaml


def main() -> None:
    crd = yaml.load(sys.stdin, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    json.dump(served["schema"]["openAPIV3Schema"], sys.stdout, sort_keys=True, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
