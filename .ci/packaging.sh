#!/usr/bin/env bash
# Packaging checks, run after the test suite: what a user copies out of this repository must
# work as shipped.
#   1. the static release binaries for x86_64 and aarch64 (musl): static, and within size;
#   2. Dockerfile.example passes hadolint;
#   3. every manifest in examples/ validates against the Kubernetes schemas, and every
#      preStop command in it passes `prestop drain --dry-run`;
#   4. the integration tests, run against the aarch64 binary under qemu-user.
# Needs root (the dry runs stand in for the container in private namespaces) and what
# .ci/install.sh installs.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD
# The end-to-end suite (tests/e2e_runc.rs) builds the x86_64 binary here too, with the same
# command line, so cargo builds it once per CI run. Only the release builds go there: the
# tests under qemu reuse the debug build of the main test run.
release_dir=$repo/target/e2e
# The spec's budget for the stripped static binary.
max_bytes=$((1024 * 1024))

section() { printf '\n=== %s\n' "$*"; }
fail() {
    printf 'packaging: %s\n' "$*" >&2
    exit 1
}

section "static release binaries"
declare -A bin
for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    extra=()
    [[ $target == x86_64-* ]] && extra=(--example sample_app)
    CARGO_TARGET_DIR=$release_dir cargo build --release --locked --target "$target" \
        --bin prestop "${extra[@]}"
    bin[$target]=$release_dir/$target/release/prestop
done
for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    path=${bin[$target]}
    kind=$(file --brief "$path")
    size=$(stat -c %s "$path")
    printf '%-28s %8d bytes (%s MiB)  %s\n' "$target" "$size" \
        "$(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }')" "$kind"
    # `file` says "statically linked" or "static-pie linked"; a dynamic binary names its
    # interpreter, which a scratch or distroless image does not have.
    [[ $kind == *"static"*"linked"* && $kind != *interpreter* ]] || fail "$path is not static: $kind"
    ((size <= max_bytes)) || fail "$path is $size bytes, over the 1 MiB budget"
done
x86=${bin[x86_64-unknown-linux-musl]}
arm=${bin[aarch64-unknown-linux-musl]}

section "hadolint Dockerfile.example"
hadolint --version
# Every finding fails, down to style: the file is meant to be copied as it is.
hadolint --failure-threshold style Dockerfile.example
echo "Dockerfile.example: clean"

section "kubernetes-validate examples/*.yaml"
shopt -s nullglob
manifests=(examples/*.yaml)
((${#manifests[@]})) || fail "no manifests in examples/"
# --strict rejects unknown fields, so a misspelt key cannot pass as an ignored extra.
kubernetes-validate --strict "${manifests[@]}"

section "preStop commands, dry run against $x86"
# Each hook runs `prestop drain ... --dry-run` where it would run in the pod: as a child of
# a PID 1 in a fresh PID namespace (named `pause` when the pod shares its process
# namespace), with the container's PRESTOP_* environment. --dry-run checks everything a
# real run relies on, so what the image would hold is stood in for, honestly and no more:
#   - an --exec program that is a bare name (nginx) resolves to a stand-in executable in a
#     scratch directory first on PATH: it must exist to pass, and a dry run never runs it;
#   - a pidfile:PATH is written, holding 1, on a tmpfs mounted over its directory in a
#     private mount namespace (nginx's master is PID 1 in its container), so the host's
#     /run is never touched.
# It also checks that --grace-period (or PRESTOP_GRACE_PERIOD) repeats the pod's
# terminationGracePeriodSeconds, which the container cannot see for itself.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 - "$x86" "$scratch" "${manifests[@]}" <<'PY'
import json, os, shlex, subprocess, sys
import yaml

binary, scratch, files = sys.argv[1], sys.argv[2], sys.argv[3:]

# Runs inside the namespaces, as their PID 1: set up the stand-ins, run the dry run as a
# child (so PID 1 stays the app's or /pause's stand-in), and pass on its exit code.
INSIDE = r'''
import json, os, subprocess, sys
spec = json.loads(sys.argv[1])
for d in sorted({os.path.dirname(os.path.realpath(p)) for p in spec["pidfiles"]}):
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "dry-run", d], check=True)
for p in spec["pidfiles"]:
    with open(p, "w") as f:
        f.write("1\n")
r = subprocess.run(spec["argv"], env=spec["env"], stdin=subprocess.DEVNULL)
sys.exit(r.returncode)
'''

def option_values(argv, env, flag, var):
    """Every value of a repeatable option, from the flags or else from its variable."""
    values = []
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif a.startswith(flag + "="):
            values.append(a[len(flag) + 1:])
    if not values and var in env:
        values = env[var].split("\n")
    return values

failures = 0
hooks = 0
for path in files:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        if doc["kind"] not in ("Pod", "Deployment", "StatefulSet", "DaemonSet", "Job"):
            continue  # a ConfigMap or Service beside the workload
        pod = doc["spec"]["template"]["spec"] if doc["kind"] != "Pod" else doc["spec"]
        name = f'{path}: {doc["kind"].lower()}/{doc["metadata"]["name"]}'
        grace = pod.get("terminationGracePeriodSeconds", 30)
        shared = pod.get("shareProcessNamespace", False)
        for c in pod["containers"]:
            command = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
            if not command:
                continue
            hooks += 1
            where = f'{name} container {c["name"]}'
            problems = []
            if command[:2] != ["/prestop", "drain"]:
                problems.append(f"hook {command!r} is not `/prestop drain ...`")
            env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
            argv = command[2:]
            hook_grace = (option_values(argv, env, "--grace-period", "PRESTOP_GRACE_PERIOD") or ["30"])[-1]
            if hook_grace != str(grace):
                problems.append(
                    f"--grace-period {hook_grace} does not repeat terminationGracePeriodSeconds {grace}")
            stubs = os.path.join(scratch, f"bin{hooks}")
            os.makedirs(stubs)
            for cmd in option_values(argv, env, "--exec", "PRESTOP_EXEC"):
                words = shlex.split(cmd)
                if words and "/" not in words[0]:
                    stub = os.path.join(stubs, words[0])
                    with open(stub, "w") as f:
                        f.write("#!/bin/sh\necho 'stand-in: a dry run never runs --exec' >&2\nexit 1\n")
                    os.chmod(stub, 0o755)
            targets = (option_values(argv, env, "--wait-pid", "PRESTOP_WAIT_PID")
                       + option_values(argv, env, "--signal-target", "PRESTOP_SIGNAL_TARGET"))
            pidfiles = [t[len("pidfile:"):] for t in targets if t.startswith("pidfile:")]
            for p in pidfiles:
                if not os.path.isdir(os.path.dirname(os.path.realpath(p))):
                    problems.append(f"pidfile {p}: its directory does not exist here to stand in for")
            print(f"--- {where}: grace {grace}s, PID 1 {'/pause' if shared else 'the app'}", flush=True)
            if problems:
                for p in problems:
                    print(f"FAIL: {p}")
                failures += 1
                continue
            spec = {
                "argv": [binary, "drain", *argv, "--dry-run"],
                "env": {"PATH": f"{stubs}:/usr/local/bin:/usr/bin:/bin", **env},
                "pidfiles": pidfiles,
            }
            pid1 = "pause" if shared else os.path.basename((c.get("command") or ["app"])[0])
            r = subprocess.run([
                "unshare", "--pid", "--fork", "--mount-proc", "--",
                "bash", "-c", 'exec -a "$0" "$@"', pid1,
                sys.executable, "-c", INSIDE, json.dumps(spec),
            ])
            if r.returncode != 0:
                print(f"FAIL: {where}: dry run exited {r.returncode}")
                failures += 1

print(f"\n{hooks} preStop hooks checked, {failures} failed")
if hooks == 0 or failures:
    sys.exit(1)
PY

section "integration tests against the aarch64 binary under qemu-user"
qemu=$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)
[[ -n $qemu ]] || fail "qemu-aarch64-static not found (Debian package qemu-user-static)"
"$qemu" "$arm" --version
# Every test file but those where the binary is started by something other than the tests'
# runner (PRESTOP_TEST_RUNNER), which qemu-user cannot follow without binfmt_misc:
#   e2e_runc       runs containers of the host's architecture, from its own musl build;
#   *namespace*    (pid_namespace.rs) needs root: the binary is PID 1 of a new namespace;
#   rehearse       `prestop rehearse` starts the hook by re-executing its own binary;
#   hostile        runs the binary as another user and as PID 1 of namespaces, and times a
#                  deadline to the tenth of a second, which emulation would blur;
#   nginx          runs the binary inside nginx's PID namespace (nsenter);
#   conns          qemu-user does not pass NETLINK_SOCK_DIAG through (EPROTONOSUPPORT), so
#                  the binary would take its /proc/net/tcp fallback, which conns.rs tests
#                  natively under a seccomp filter.
test_args=()
for f in tests/*.rs; do
    name=$(basename "$f" .rs)
    case $name in
        e2e_runc | *namespace* | rehearse | hostile | nginx | conns)
            echo "not under qemu: tests/$name.rs" ;;
        *) test_args+=(--test "$name") ;;
    esac
done
((${#test_args[@]})) || fail "no integration tests to run against the aarch64 binary"
log=$scratch/qemu-tests.log
# Into a file, not through a pipe: a pipe would stay open as long as any process a test
# left behind, and hold this script up until the last of them exits.
status=0
PRESTOP_TEST_BIN=$arm PRESTOP_TEST_RUNNER=$qemu \
    cargo test --locked "${test_args[@]}" >"$log" 2>&1 || status=$?
cat "$log"
((status == 0)) || fail "tests against the aarch64 binary failed (exit $status)"
passed=$(awk '/^test result:/ { n += $4 } END { print n + 0 }' "$log")
((passed > 0)) || fail "no test ran against the aarch64 binary"
echo "aarch64 under $(basename "$qemu"): $passed tests passed"
