"""Validates Kubernetes manifests: every object against the pinned Kubernetes version's schemas
(kubernetes-validate --strict, offline), then thaw's lint rules. tests/deploy.rs runs it on
deploy/kubernetes (the base and each overlay) and on `thaw k8s render` outputs.

usage: python k8s-check.py [--kubernetes-version V] PATH...
  PATH: a YAML file, or a directory with a kustomization.yaml (built as below).

There is no kustomize binary to be had here, so a directory is built by the subset of kustomize
that thaw's kustomizations use, and nothing else (anything more is refused, by name):
`resources` (files and directories, recursively), `images` (newName/newTag by image name),
`patches` with a `target` (kind, name, group, version) and an inline JSON 6902 `patch`, and
`labels` (pairs, added to metadata.labels). On a real machine `kubectl kustomize DIR` builds the
same objects.

Lint rules (the common mistakes):
  - every image has a pinned tag (not `latest`, not untagged);
  - every container sets resource requests and limits for cpu and memory;
  - every long-running container (Deployment, StatefulSet) has liveness and readiness probes;
  - every pod runs as non-root (pod or container securityContext.runAsNonRoot) and no container
    allows privilege escalation;
  - a Job has restartPolicy Never, a podFailurePolicy, backoffLimit, activeDeadlineSeconds and
    ttlSecondsAfterFinished; a pod that mounts /dev/shm does so from a memory emptyDir with a
    sizeLimit.
Exits 1 and names the object and the rule on any failure.
"""
import copy
import json
import os
import subprocess
import sys
import tempfile

import yaml

KNOWN_KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "images", "patches", "labels"}


def load_yaml(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def pointer(path):
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def json_patch(doc, ops, where):
    for op in ops:
        parts = pointer(op["path"])
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        kind = op["op"]
        if kind in ("add", "replace"):
            if isinstance(parent, list):
                i = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(i, op["value"])
                else:
                    parent[i] = op["value"]
            else:
                if kind == "replace" and last not in parent:
                    raise SystemExit(f"{where}: replace of missing {op['path']}")
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        else:
            raise SystemExit(f"{where}: JSON patch op {kind!r} is not supported here")


def matches(obj, target):
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    return (
        target.get("kind", obj["kind"]) == obj["kind"]
        and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def build(directory):
    kfile = os.path.join(directory, "kustomization.yaml")
    with open(kfile) as f:
        k = yaml.safe_load(f)
    unknown = set(k) - KNOWN_KUSTOMIZE_KEYS
    if unknown:
        raise SystemExit(f"{kfile}: {sorted(unknown)} not supported by this checker's kustomize subset")
    objects = []
    for r in k.get("resources", []):
        p = os.path.join(directory, r)
        objects += build(p) if os.path.isdir(p) else load_yaml(p)
    for label in k.get("labels", []):
        for o in objects:
            o["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in k.get("images", []):
        for o in objects:
            for c in containers(o):
                name, _, _ = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    for patch in k.get("patches", []):
        ops = yaml.safe_load(patch["patch"])
        hit = [o for o in objects if matches(o, patch["target"])]
        if not hit:
            raise SystemExit(f"{kfile}: patch target {patch['target']} matches nothing")
        for o in hit:
            json_patch(o, ops, kfile)
    return objects


def pod_spec(o):
    kind = o.get("kind")
    spec = o.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        return spec.get("template", {}).get("spec")
    if kind == "Pod":
        return spec
    return None


def containers(o):
    ps = pod_spec(o)
    if not ps:
        return []
    return ps.get("containers", []) + ps.get("initContainers", [])


def lint(o):
    name = f"{o['kind']}/{o['metadata']['name']}"
    errors = []
    ps = pod_spec(o)
    if ps is None:
        return errors
    pod_nonroot = ps.get("securityContext", {}).get("runAsNonRoot") is True
    for c in containers(o):
        cn = f"{name} container {c['name']}"
        image = c.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if not tag or tag == "latest":
            errors.append(f"{cn}: image {image!r} has no pinned tag")
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(part, {}):
                    errors.append(f"{cn}: no resources.{part}.{r}")
        if o["kind"] in ("Deployment", "StatefulSet"):
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    errors.append(f"{cn}: no {probe}")
        sc = c.get("securityContext", {})
        if not (pod_nonroot or sc.get("runAsNonRoot") is True):
            errors.append(f"{cn}: may run as root (set runAsNonRoot)")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{cn}: allowPrivilegeEscalation is not false")
        for m in c.get("volumeMounts", []):
            if m["mountPath"] == "/dev/shm":
                vol = next((v for v in ps.get("volumes", []) if v["name"] == m["name"]), {})
                ed = vol.get("emptyDir", {})
                if ed.get("medium") != "Memory" or "sizeLimit" not in ed:
                    errors.append(f"{cn}: /dev/shm is not a memory emptyDir with a sizeLimit")
    if o["kind"] == "Job":
        spec = o["spec"]
        if ps.get("restartPolicy") != "Never":
            errors.append(f"{name}: restartPolicy is not Never (podFailurePolicy needs it)")
        for field in ("podFailurePolicy", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
            if field not in spec:
                errors.append(f"{name}: no spec.{field}")
    return errors


def main():
    args = sys.argv[1:]
    version = "1.37.0"
    if args[:1] == ["--kubernetes-version"]:
        version, args = args[1], args[2:]
    if not args:
        raise SystemExit(__doc__)
    failed = False
    here = os.path.dirname(os.path.abspath(sys.executable))
    validator = os.path.join(here, "kubernetes-validate")
    for path in args:
        before = failed
        failed = False
        objects = build(path) if os.path.isdir(path) else load_yaml(path)
        if not objects:
            print(f"FAIL {path}: no objects")
            failed = True
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump_all(objects, f)
            built = f.name
        r = subprocess.run(
            [validator, "--strict", "--kubernetes-version", version, "--no-warn", built],
            capture_output=True,
            text=True,
        )
        os.unlink(built)
        out = (r.stdout + r.stderr).replace(built, path)
        for line in out.strip().splitlines():
            print(line)
        if r.returncode != 0:
            failed = True
        for o in objects:
            for e in lint(o):
                print(f"LINT {path}: {e}")
                failed = True
        kinds = sorted({f"{o['kind']}/{o['metadata']['name']}" for o in objects})
        print(f"{'FAIL' if failed else 'OK'} {path}: {len(objects)} objects ({', '.join(kinds)})")
        failed = failed or before
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
