#!/usr/bin/env bash
# Checks the deployment files without a cluster or a Docker engine:
#   1. promtool check rules deploy/monitoring/alerts.yaml, and its unit tests (alerts_test.yaml);
#   2. every YAML file under deploy/ and docker-compose.yml parses;
#   3. the Kubernetes manifests and the compose file keep the properties docs/DEPLOYMENT.md promises
#      (probes, grace periods, security context, secrets as files, private internal port, ...);
#   4. the Grafana dashboard is valid JSON whose queries, like the alert rules', use only metric names
#      that tokenvault exports.
# It installs what is missing (promtool from the Debian package `prometheus` when run as root; PyYAML
# into .tmp/pylib with pip) and changes nothing else, so it can run any number of times.
#
# In CI (.ci/run):
#   echo "== deploy checks"; bash scripts/check-deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "check-deploy: $*" >&2
  exit 1
}

# --- promtool ---------------------------------------------------------------------------------------
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing promtool (Debian package prometheus)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  command -v promtool >/dev/null 2>&1 \
    || fail "promtool is missing: install the Debian package 'prometheus' (apt-get install prometheus, as root) or put promtool from a Prometheus release on PATH"
fi

echo "== promtool check rules deploy/monitoring/alerts.yaml"
promtool check rules deploy/monitoring/alerts.yaml
echo "== promtool test rules deploy/monitoring/alerts_test.yaml"
promtool test rules deploy/monitoring/alerts_test.yaml

# --- Python with PyYAML -----------------------------------------------------------------------------
command -v python3 >/dev/null 2>&1 || fail "python3 is missing (apt-get install python3)"
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
  if [ ! -f .tmp/pylib/yaml/__init__.py ]; then
    echo "== installing PyYAML into .tmp/pylib"
    mkdir -p .tmp
    python3 -m pip install --quiet --disable-pip-version-check --target .tmp/pylib pyyaml \
      || fail "PyYAML is missing and pip could not install it (apt-get install python3-yaml, or pip install pyyaml)"
  fi
  export PYTHONPATH="$PWD/.tmp/pylib${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c 'import yaml' >/dev/null 2>&1 || fail "PyYAML in .tmp/pylib does not import"
fi

echo "== YAML, manifests, compose file and dashboard"
python3 - <<'PY'
import glob
import json
import os
import re
import sys

import yaml

errors = []


def error(where, message):
    errors.append(f"{where}: {message}")


# Every metric tokenvault exports (README.md "GET /metrics", issue 12). Histograms are queried through
# their _bucket, _sum and _count series.
COUNTERS_AND_GAUGES = {
    "tokenvault_callbacks_total", "tokenvault_token_requests_total", "tokenvault_token_cache_total",
    "tokenvault_token_refresh_ahead_total", "tokenvault_token_waits_total",
    "tokenvault_token_served_degraded_total", "tokenvault_invalidation_listener_lost_total",
    "tokenvault_upstream_requests_total", "tokenvault_jwks_refresh_total",
    "tokenvault_rejection_probes_total", "tokenvault_installations_reactivated_total",
    "tokenvault_token_scope_exceeded_total", "tokenvault_log_lines_suppressed_total",
    "tokenvault_build_info", "tokenvault_tokens_in_memory", "tokenvault_installations",
    "tokenvault_database_connections",
}
HISTOGRAMS = {"tokenvault_upstream_duration_seconds", "tokenvault_http_request_duration_seconds"}
KNOWN_METRICS = COUNTERS_AND_GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor",
    "histogram_quantile", "holt_winters", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate", "resets",
    "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
    "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan"}


def metric_names(expr):
    """The metric names a PromQL expression selects (an unknown function counts as an error)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)          # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)         # range and subquery selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", " ", s)   # Grafana variables
    s = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d+)?([eE][+-]?\d+)?(ms|[smhdwy])?", " ", s)  # numbers, durations
    names, unknown_functions = set(), set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = match.group(0)
        followed_by_paren = s[match.end():].lstrip().startswith("(")
        if word.lower() in KEYWORDS:
            continue
        if followed_by_paren and word in FUNCTIONS:
            continue
        if followed_by_paren and not word.startswith("tokenvault_"):
            unknown_functions.add(word)
            continue
        names.add(word)
    return names, unknown_functions


def check_query(where, expr):
    names, unknown = metric_names(expr)
    for name in sorted(unknown):
        error(where, f"unknown PromQL function {name!r} in {expr!r}")
    for name in sorted(names - KNOWN_METRICS):
        error(where, f"metric {name!r} is not one tokenvault exports (query: {expr.strip()!r})")
    return names


# --- every YAML file parses ------------------------------------------------------------------------
yaml_files = sorted(set(glob.glob("deploy/**/*.yaml", recursive=True) + glob.glob("deploy/**/*.yml", recursive=True)))
yaml_files.append("docker-compose.yml")
parsed = {}
for path in yaml_files:
    try:
        with open(path) as f:
            parsed[path] = [doc for doc in yaml.safe_load_all(f) if doc is not None]
    except yaml.YAMLError as e:
        error(path, f"does not parse: {e}")
print(f"parsed {len(parsed)} YAML files: {', '.join(parsed)}")

# --- Kubernetes manifests --------------------------------------------------------------------------
K8S = "deploy/kubernetes"
objects = {}  # (kind, name) -> object
for path in sorted(p for p in parsed if p.startswith(K8S + "/")):
    if os.path.basename(path) == "kustomization.yaml":
        continue
    for doc in parsed[path]:
        where = f"{path} {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        for key in ("apiVersion", "kind", "metadata"):
            if key not in doc:
                error(path, f"a document without {key}")
        meta = doc.get("metadata") or {}
        if not meta.get("name"):
            error(where, "no metadata.name")
        if "namespace" in meta:
            error(where, "names a namespace; the manifests must stay namespace-agnostic")
        objects[(doc.get("kind"), meta.get("name"))] = (path, doc)

kustomization = (parsed.get(f"{K8S}/kustomization.yaml") or [{}])[0]
resources = kustomization.get("resources") or []
if not resources:
    error(f"{K8S}/kustomization.yaml", "lists no resources")
if "namespace" in kustomization:
    error(f"{K8S}/kustomization.yaml", "sets a namespace; leave it to the user (-n or an overlay)")
for resource in resources:
    if not os.path.isfile(os.path.join(K8S, resource)):
        error(f"{K8S}/kustomization.yaml", f"lists {resource}, which does not exist")
for path in sorted(glob.glob(f"{K8S}/*.yaml")):
    name = os.path.basename(path)
    if name not in resources and name not in ("kustomization.yaml", "secret.example.yaml"):
        error(f"{K8S}/kustomization.yaml", f"does not list {name}")
if "secret.example.yaml" in resources:
    error(f"{K8S}/kustomization.yaml", "lists the Secret template: apply -k would overwrite the real key with placeholders")


def get(kind, name):
    found = objects.get((kind, name))
    if not found:
        error(K8S, f"no {kind} named {name}")
        return None
    return found[1]


def container_checks(where, pod_spec, container):
    sc = container.get("securityContext") or {}
    psc = pod_spec.get("securityContext") or {}
    if sc.get("allowPrivilegeEscalation") is not False:
        error(where, "allowPrivilegeEscalation must be false")
    if sc.get("readOnlyRootFilesystem") is not True:
        error(where, "readOnlyRootFilesystem must be true")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        error(where, "capabilities must drop ALL")
    if (sc.get("runAsUser") or psc.get("runAsUser")) != 10001:
        error(where, "must run as uid 10001 (the image's user)")
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        error(where, "runAsNonRoot must be true")
    resources_ = container.get("resources") or {}
    for part in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if not (resources_.get(part) or {}).get(res):
                error(where, f"no resources.{part}.{res}")
    env = {e.get("name"): e for e in container.get("env") or []}
    for secret in ("DATABASE_URL", "TOKENVAULT_ENCRYPTION_KEYS"):
        if secret in env:
            error(where, f"{secret} given as a value; mount the Secret and use {secret}_FILE")
        if secret + "_FILE" not in env:
            error(where, f"no {secret}_FILE")
    for volume in pod_spec.get("volumes") or []:
        secret = volume.get("secret")
        if secret and secret.get("defaultMode") not in (0o400, 0o440):
            error(where, f"secret volume {volume.get('name')} should be mode 0440 (read-only, group 10001)")
    return env


deployment = get("Deployment", "tokenvault")
if deployment:
    where = "Deployment/tokenvault"
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    if (spec.get("replicas") or 1) < 2:
        error(where, "needs at least 2 replicas")
    containers = pod.get("containers") or []
    container = containers[0] if containers else {}
    env = container_checks(where, pod, container)
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    if ports.get("public") != 8080 or ports.get("internal") != 8081:
        error(where, "ports must be public: 8080 and internal: 8081")

    def probe(name):
        p = container.get(name) or {}
        return (p.get("httpGet") or {}).get("path"), (p.get("httpGet") or {}).get("port")

    if probe("readinessProbe") not in (("/readyz", "internal"), ("/readyz", 8081)):
        error(where, "the readiness probe must be the INTERNAL listener's /readyz (degraded serving)")
    if probe("livenessProbe")[0] != "/healthz":
        error(where, "the liveness probe must be /healthz (never /readyz)")
    grace = int((env.get("TOKENVAULT_SHUTDOWN_GRACE_SECS") or {}).get("value") or 30)
    pre_stop = ((container.get("lifecycle") or {}).get("preStop") or {})
    command = (pre_stop.get("exec") or {}).get("command") or []
    sleep = int(command[-1]) if command[:1] == ["sleep"] else int((pre_stop.get("sleep") or {}).get("seconds") or 0)
    if sleep <= 0:
        error(where, "no preStop sleep")
    termination = pod.get("terminationGracePeriodSeconds") or 30
    if termination <= grace + sleep:
        error(where, f"terminationGracePeriodSeconds ({termination}) must exceed preStop ({sleep}) + TOKENVAULT_SHUTDOWN_GRACE_SECS ({grace})")
    if container.get("args", [])[-1:] != ["serve"]:
        error(where, "the container must run `serve`")
    print(f"Deployment: {spec.get('replicas')} replicas, preStop {sleep} s + drain {grace} s < termination grace {termination} s")

job = get("Job", "tokenvault-migrate")
if job:
    pod = job["spec"]["template"]["spec"]
    container = (pod.get("containers") or [{}])[0]
    container_checks("Job/tokenvault-migrate", pod, container)
    if container.get("args", [])[-1:] != ["migrate"]:
        error("Job/tokenvault-migrate", "must run `migrate`")

for (kind, name), (path, doc) in objects.items():
    if kind == "Service" and (doc.get("spec") or {}).get("type", "ClusterIP") != "ClusterIP":
        error(f"{path} Service/{name}", "must be ClusterIP (only the Ingress may publish anything)")
internal = get("Service", "tokenvault-internal")
if internal and [p.get("port") for p in internal["spec"]["ports"]] != [8081]:
    error("Service/tokenvault-internal", "must expose only 8081")
public = get("Service", "tokenvault-public")
if public and [p.get("port") for p in public["spec"]["ports"]] != [8080]:
    error("Service/tokenvault-public", "must expose only 8080")

for (kind, name), (path, doc) in objects.items():
    if kind != "Ingress":
        continue
    if not (doc.get("spec") or {}).get("tls"):
        error(f"{path} Ingress/{name}", "has no TLS")
    for rule in doc["spec"].get("rules") or []:
        for p in (rule.get("http") or {}).get("paths") or []:
            backend = p["backend"]["service"]
            if backend["name"] != "tokenvault-public":
                error(f"{path} Ingress/{name}", f"routes to {backend['name']}; only tokenvault-public may be published")

policy = get("NetworkPolicy", "tokenvault")
if policy:
    admitted = False
    for rule in policy["spec"].get("ingress") or []:
        ports = [p.get("port") for p in rule.get("ports") or []]
        if 8081 in ports:
            for peer in rule.get("from") or []:
                labels = (peer.get("podSelector") or {}).get("matchLabels") or {}
                if labels.get("tokenvault-client") == "true":
                    admitted = True
            if not rule.get("from"):
                error("NetworkPolicy/tokenvault", "admits everyone to 8081")
    if not admitted:
        error("NetworkPolicy/tokenvault", "does not admit pods labelled tokenvault-client: \"true\" to 8081")
get("PodDisruptionBudget", "tokenvault")
get("ConfigMap", "tokenvault-config")

secret_template = (parsed.get(f"{K8S}/secret.example.yaml") or [None])[0]
if not secret_template or set((secret_template.get("stringData") or {})) != {"database-url", "encryption-keys"}:
    error(f"{K8S}/secret.example.yaml", "must template the keys database-url and encryption-keys")

# --- docker-compose.yml ----------------------------------------------------------------------------
def seconds(text):
    total, found = 0, False
    for amount, unit in re.findall(r"(\d+)(h|m|s)", str(text)):
        total += int(amount) * {"h": 3600, "m": 60, "s": 1}[unit]
        found = True
    return total if found else 10


compose = (parsed.get("docker-compose.yml") or [{}])[0]
services = compose.get("services") or {}
for required in ("postgres", "keygen", "migrate", "tokenvault", "sandbox", "tokenvault-demo"):
    if required not in services:
        error("docker-compose.yml", f"no service {required}")
for name, service in services.items():
    where = f"docker-compose.yml service {name}"
    if "secrets" in service:
        error(where, "uses a file secret: its host owner and mode make it unreadable for uid 10001; use the keygen volume")
    command = service.get("command") or []
    if isinstance(command, str):
        command = command.split()
    if command in (["serve"], ["sandbox"]) or command[:1] in (["serve"], ["sandbox"]):
        test = " ".join((service.get("healthcheck") or {}).get("test") or [])
        if not test:
            error(where, "has no healthcheck")
        if command[:1] == ["serve"]:
            if "tokenvault healthcheck --internal" not in test:
                error(where, "the healthcheck must use `tokenvault healthcheck --internal`")
            env = service.get("environment") or {}
            grace = int(env.get("TOKENVAULT_SHUTDOWN_GRACE_SECS", 30))
            stop = seconds(service.get("stop_grace_period", "10s"))
            if stop <= grace:
                error(where, f"stop_grace_period ({stop} s) must exceed TOKENVAULT_SHUTDOWN_GRACE_SECS ({grace} s)")
            if "TOKENVAULT_ENCRYPTION_KEYS" in env:
                error(where, "the key must come from the key volume (TOKENVAULT_ENCRYPTION_KEYS_FILE)")
            for port in service.get("ports") or []:
                if str(port).endswith(":8081") and not str(port).startswith("127.0.0.1:"):
                    error(where, f"publishes the internal listener beyond the host's loopback: {port}")
        if command[:1] == ["sandbox"] and "demo" not in (service.get("profiles") or []):
            error(where, "the sandbox must run only in the demo profile")
demo = services.get("tokenvault-demo") or {}
demo_env = demo.get("environment") or {}
for key, value in {
    "TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS": "true",
    "TOKENVAULT_TRACKUNIT_JWKS_URL": "http://sandbox:8090/jwks",
    "TOKENVAULT_TRACKUNIT_TOKEN_URL": "http://sandbox:8090/apptoken",
}.items():
    if str(demo_env.get(key)) != value:
        error("docker-compose.yml service tokenvault-demo", f"{key} must be {value}")
for name, service in services.items():
    if (service.get("environment") or {}).get("TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS") and "demo" not in (service.get("profiles") or []):
        error(f"docker-compose.yml service {name}", "TOKENVAULT_INSECURE_ALLOW_HTTP_UPSTREAMS outside the demo profile")
keygen_script = " ".join((services.get("keygen") or {}).get("command") or [])
if "keys generate" not in keygen_script or "chown 10001" not in keygen_script:
    error("docker-compose.yml service keygen", "must generate the key and give it to uid 10001")

# --- alert rules: metric names ---------------------------------------------------------------------
rules = (parsed.get("deploy/monitoring/alerts.yaml") or [{}])[0]
alert_names = []
for group in rules.get("groups") or []:
    for rule in group.get("rules") or []:
        where = f"deploy/monitoring/alerts.yaml {rule.get('alert') or rule.get('record')}"
        check_query(where, rule.get("expr", ""))
        if "alert" in rule:
            alert_names.append(rule["alert"])
            annotations = rule.get("annotations") or {}
            for key in ("summary", "description", "runbook_url"):
                if not annotations.get(key):
                    error(where, f"no {key} annotation")
            runbook = annotations.get("runbook_url", "")
            anchor = runbook.partition("#")[2]
            if not runbook.startswith("docs/DEPLOYMENT.md#") or anchor != rule["alert"].lower():
                error(where, f"runbook_url must be docs/DEPLOYMENT.md#{rule['alert'].lower()}")
try:
    with open("docs/DEPLOYMENT.md") as f:
        headings = {line.strip("# \n").lower() for line in f if line.startswith("#")}
    for name in alert_names:
        if name.lower() not in headings:
            error("docs/DEPLOYMENT.md", f"no runbook section headed {name}")
except FileNotFoundError:
    error("docs/DEPLOYMENT.md", "missing")
print(f"alert rules: {len(alert_names)} alerts, each with a runbook section")

# --- Grafana dashboard -----------------------------------------------------------------------------
DASHBOARD = "deploy/monitoring/grafana-dashboard.json"
try:
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
except (OSError, json.JSONDecodeError) as e:
    error(DASHBOARD, f"is not valid JSON: {e}")
    dashboard = {}
if dashboard:
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 36:
        error(DASHBOARD, "schemaVersion must be 36 or later")
    for key in ("title", "uid", "panels", "templating"):
        if not dashboard.get(key):
            error(DASHBOARD, f"no {key}")
    variables = {v.get("name"): v for v in (dashboard.get("templating") or {}).get("list") or []}
    ds = variables.get("datasource") or {}
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        error(DASHBOARD, "needs a Prometheus data source variable named datasource")
    for name, variable in variables.items():
        if variable.get("type") == "query":
            query = variable.get("query")
            query = query.get("query", "") if isinstance(query, dict) else str(query or "")
            match = re.match(r"\s*label_values\(\s*([^,]+?)\s*,\s*[A-Za-z_]+\s*\)\s*$", query)
            if not match:
                error(DASHBOARD, f"variable {name}: expected label_values(METRIC, LABEL), got {query!r}")
            else:
                check_query(f"{DASHBOARD} variable {name}", match.group(1))

    panels, used, ids = [], set(), set()

    def walk(items):
        for panel in items:
            panels.append(panel)
            walk(panel.get("panels") or [])

    walk(dashboard.get("panels") or [])
    queries = 0
    for panel in panels:
        where = f"{DASHBOARD} panel {panel.get('title')!r}"
        if panel.get("id") in ids:
            error(where, f"duplicate id {panel.get('id')}")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets:
            error(where, "has no query")
        if (panel.get("datasource") or {}).get("uid") != "${datasource}":
            error(where, "must use the ${datasource} variable")
        for target in targets:
            expr = target.get("expr") or ""
            if not expr.strip():
                error(where, "has an empty query")
            used |= check_query(where, expr)
            queries += 1
    wanted = {
        "tokenvault_http_request_duration_seconds_bucket": "p99 per route",
        "tokenvault_http_request_duration_seconds_count": "request rate per route",
        "tokenvault_token_cache_total": "token cache tiers",
        "tokenvault_token_waits_total": "waits",
        "tokenvault_upstream_requests_total": "upstream calls",
        "tokenvault_upstream_duration_seconds_bucket": "upstream latency",
        "tokenvault_callbacks_total": "callbacks by outcome",
        "tokenvault_installations": "installations by status",
        "tokenvault_tokens_in_memory": "tokens in memory",
        "tokenvault_database_connections": "pool connections",
        "tokenvault_jwks_refresh_total": "JWKS refreshes",
        "tokenvault_rejection_probes_total": "rejection probes",
    }
    for metric, what in wanted.items():
        if metric not in used:
            error(DASHBOARD, f"no panel for {what} ({metric})")
    print(f"dashboard: {len(panels)} panels, {queries} queries, every metric name known")

if errors:
    print(f"\n{len(errors)} problem(s):", file=sys.stderr)
    for line in errors:
        print(f"  {line}", file=sys.stderr)
    sys.exit(1)
PY

echo "deploy checks passed"
if [ "${CI:-}" != "true" ]; then
  echo "(for .ci/run:  echo \"== deploy checks\"; bash scripts/check-deploy.sh)"
fi
