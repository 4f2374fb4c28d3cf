#!/usr/bin/env python3
"""The VM's test: ansible/ and vagrant/ checked, and the playbook applied for real.

    e2e/vm/test-vm.py [--binary PATH] [--keep]

1. ansible-lint (default profile) and ansible-playbook --syntax-check on ansible/ (both from
   PyPI, in the venv target/tools/ansible-venv); `vagrant validate` on vagrant/Vagrantfile
   (Debian's vagrant and vagrant-libvirt, installed with apt-get when missing).
2. A Debian bookworm image with systemd as PID 1, built here from Debian packages (debootstrap,
   no registry; cached by tag).
3. ansible/site.yml applied to a container of it (e2e/vm/inventory.yml, pk-vm-node), the default
   path: Debian's docker.io installed and its daemon started inside, the pools' image loaded from
   a tarball, the firewall role on. The first run converges, the second changes nothing; the
   service is active under systemd, /healthz answers, a claim through the API binds and serves
   the file it was given; changing one pool's variable changes that pool's file alone, the
   service is not restarted, and the pool's warm count follows; the watchdog is fed;
   `systemd-analyze verify` passes and `systemd-analyze security` scores under 3.0; the unit is
   the one `poolkeeper install --print-unit` prints; the firewall table is loaded.
4. The same playbook on a second container (pk-vm-external) whose poolkeeper drives this
   machine's Docker Engine through the bind-mounted socket (poolkeeper_docker_external): it
   converges, changes nothing the second time, and its pool is warm on this machine's daemon.

Everything it made is removed at the end (the containers; on this machine's daemon the pools'
containers found by their controller label), unless --keep. A failure prints the failing Ansible
output and the service's journal. The last line reads "vm: N passed, N failed".
"""

import argparse
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.path.join(ROOT, "target", "tools", "ansible-venv")
# Pinned, as the other PyPI tools of the suite are: `ansible` brings ansible-core and the
# community.docker collection (its docker connection reaches the container).
PYPI = ["ansible==12.3.0", "ansible-lint==26.10.1"]
SUITE = "bookworm"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# The tag names the package set: a new set gets a new tag, so that it is rebuilt.
PACKAGES = "systemd,systemd-sysv,dbus,python3,sudo,curl,ca-certificates,procps,nftables"
IMAGE = f"poolkeeper/vm-test:{SUITE}-1"
WORKLOAD = "poolkeeper-workload:test"
# The API of each container (the node has a network of its own; the external one shares this
# machine's, so it takes a port of its own).
API = {"node": "127.0.0.1:7080", "external": "127.0.0.1:39180"}
SECURITY_LIMIT = 3.0

passed = 0
failed = 0


def log(msg):
    print(msg, flush=True)


def run(args, check=True, env=None, cwd=None, input_text=None, timeout=900):
    """Runs a command; returns (status, output) with stderr folded into the output."""
    p = subprocess.run(
        args,
        cwd=cwd,
        env=env,
        input=input_text,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and p.returncode != 0:
        raise Failure(f"{' '.join(args)} exited {p.returncode}", p.stdout)
    return p.returncode, p.stdout


class Failure(Exception):
    def __init__(self, what, output=""):
        super().__init__(what)
        self.output = output


def ok(what):
    global passed
    passed += 1
    log(f"ok - {what}")


def check(cond, what, output=""):
    if not cond:
        raise Failure(what, output)
    ok(what)


def ansible_env(extra=None):
    env = dict(os.environ)
    env.update(
        {
            "PATH": os.path.join(VENV, "bin") + os.pathsep + env.get("PATH", ""),
            "ANSIBLE_CONFIG": os.path.join(ROOT, "ansible", "ansible.cfg"),
            "ANSIBLE_ROLES_PATH": os.path.join(ROOT, "ansible", "roles"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_STDOUT_CALLBACK": "default",
            "ANSIBLE_DISPLAY_SKIPPED_HOSTS": "false",
            "PY_COLORS": "0",
            "NO_COLOR": "1",
        }
    )
    env.update(extra or {})
    return env


# --- 1. tools, lint, syntax, vagrant -------------------------------------------------------------


def tools():
    lint = os.path.join(VENV, "bin", "ansible-lint")
    if os.access(lint, os.X_OK):
        _, out = run([os.path.join(VENV, "bin", "pip"), "freeze"], check=False)
        if all(p in out.splitlines() for p in PYPI):
            return
    log(f"installing {' '.join(PYPI)} into {os.path.relpath(VENV, ROOT)}")
    if not os.path.exists(os.path.join(VENV, "bin", "pip")):
        run([sys.executable, "-m", "venv", VENV])
    run([os.path.join(VENV, "bin", "pip"), "install", "--quiet", "--disable-pip-version-check", *PYPI])


def lint():
    env = ansible_env()
    status, out = run([os.path.join(VENV, "bin", "ansible-lint"), "--offline"], check=False, env=env,
                      cwd=os.path.join(ROOT, "ansible"))
    check(status == 0, "ansible-lint is clean at its default profile", out)
    for playbook, inventory in (
        ("ansible/site.yml", "ansible/inventory/example.yml"),
        ("ansible/site.yml", "e2e/vm/inventory.yml"),
    ):
        status, out = run([os.path.join(VENV, "bin", "ansible-playbook"), "--syntax-check",
                           "-i", inventory, playbook], check=False, env=env, cwd=ROOT)
        check(status == 0, f"ansible-playbook --syntax-check {playbook} -i {inventory}", out)


def vagrant():
    if shutil.which("vagrant") is None or not vagrant_libvirt_installed():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise Failure("vagrant and vagrant-libvirt are needed (apt-get install vagrant vagrant-libvirt)")
        log("installing vagrant and vagrant-libvirt (Debian packages)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        status, _ = run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "vagrant",
                         "vagrant-libvirt"], check=False, env=env)
        if status != 0:
            run(["apt-get", "update", "-qq"], env=env)
            run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "vagrant",
                 "vagrant-libvirt"], env=env)
    cwd = os.path.join(ROOT, "vagrant")
    for extra in ({}, {"POOLKEEPER_VM_PROVISIONER": "ansible_local", "POOLKEEPER_VM_CPUS": "4",
                       "POOLKEEPER_VM_MEMORY": "4096", "POOLKEEPER_VM_FORWARD_PORTS": "8000-8004,8100"}):
        env = dict(os.environ, **extra)
        env.setdefault("VAGRANT_DEFAULT_PROVIDER", "libvirt")
        status, out = run(["vagrant", "validate"], check=False, env=env, cwd=cwd)
        what = "vagrant validate" + "".join(f" {k}={v}" for k, v in extra.items())
        check(status == 0 and "validated successfully" in out, what, out)


def vagrant_libvirt_installed():
    status, out = run(["vagrant", "plugin", "list"], check=False)
    return status == 0 and "vagrant-libvirt" in out


# --- 2. images and containers -------------------------------------------------------------------


def image_exists(tag):
    return run(["docker", "image", "inspect", tag], check=False)[0] == 0


def build_image():
    if image_exists(IMAGE):
        return
    if shutil.which("debootstrap") is None:
        run(["apt-get", "install", "-y", "-qq", "debootstrap"],
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    root = tempfile.mkdtemp(prefix="poolkeeper-vm-rootfs.", dir="/var/tmp")
    try:
        log(f"debootstrap {SUITE} with systemd into {root} (about a minute)")
        run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, root, MIRROR])
        # A container boots no hardware: no getty, udev, timers or first-boot units; a machine
        # id is made at boot.
        for d in ("getty.target.wants", "timers.target.wants", "sysinit.target.wants"):
            shutil.rmtree(os.path.join(root, "etc/systemd/system", d), ignore_errors=True)
        wants = os.path.join(root, "etc/systemd/system/multi-user.target.wants")
        for f in ("e2scrub_reap.service", "nftables.service"):
            if os.path.lexists(os.path.join(wants, f)):
                os.remove(os.path.join(wants, f))
        for unit in ("systemd-udevd.service", "systemd-udevd-control.socket",
                     "systemd-udevd-kernel.socket", "getty@tty1.service", "console-getty.service",
                     "systemd-firstboot.service", "systemd-networkd-wait-online.service"):
            path = os.path.join(root, "etc/systemd/system", unit)
            if os.path.lexists(path):
                os.remove(path)
            os.symlink("/dev/null", path)
        open(os.path.join(root, "etc/machine-id"), "w").close()
        shutil.rmtree(os.path.join(root, "var/lib/apt/lists"), ignore_errors=True)
        os.makedirs(os.path.join(root, "var/lib/apt/lists/partial"))
        for f in os.listdir(os.path.join(root, "var/cache/apt/archives")):
            if f.endswith(".deb"):
                os.remove(os.path.join(root, "var/cache/apt/archives", f))
        log(f"importing {IMAGE}")
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        p = subprocess.run(["docker", "import", "-c", 'CMD ["/sbin/init"]', "-c",
                            "ENV container=docker", "-", IMAGE], stdin=tar.stdout,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        tar.wait()
        if p.returncode != 0 or tar.returncode != 0:
            raise Failure(f"docker import {IMAGE}", p.stdout)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def workload_image():
    if not image_exists(WORKLOAD):
        run([os.path.join(ROOT, "e2e", "build-workload-image.sh"), WORKLOAD])


def start_container(name, external):
    # systemd as PID 1 under Docker with cgroup v1: CAP_SYS_ADMIN (mounts and namespaces for the
    # units' sandboxing), the cgroup tree, and /run, /run/lock as tmpfs; --privileged is neither
    # needed nor possible everywhere. SIGRTMIN+3 asks systemd to shut down. The node gets a
    # network of its own (CAP_NET_ADMIN for its Docker daemon's and the firewall's rules); the
    # external one this machine's network and Docker socket.
    args = ["docker", "run", "-d", "--name", name, "--hostname", name,
            "--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined",
            "--security-opt", "apparmor=unconfined", "--stop-signal", "SIGRTMIN+3",
            "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
            "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro"]
    if external:
        args += ["--network", "host", "-v", "/var/run/docker.sock:/var/run/docker.sock"]
    else:
        args += ["--cap-add", "NET_ADMIN"]
    run(args + [IMAGE])
    for _ in range(60):
        _, state = run(["docker", "exec", name, "systemctl", "is-system-running"], check=False)
        if state.strip() in ("running", "degraded"):
            break
        time.sleep(0.5)
    else:
        raise Failure(f"systemd in {name} did not come up", state)
    ok(f"systemd runs as PID 1 in {name} ({state.strip()})")


def sh_in(container, script, check_status=True):
    return run(["docker", "exec", container, "sh", "-c", script], check=check_status)


# --- 3. the playbook --------------------------------------------------------------------------


RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def playbook(what, host, env, extra_vars=None):
    args = [os.path.join(VENV, "bin", "ansible-playbook"), "-i", "e2e/vm/inventory.yml",
            "--limit", host, "ansible/site.yml"]
    if extra_vars:
        args += ["--extra-vars", json.dumps(extra_vars)]
    started = time.time()
    status, out = run(args, check=False, env=env, cwd=ROOT)
    recap = RECAP.findall(out)
    if status != 0 or not recap:
        raise Failure(f"{what}: ansible-playbook exited {status}", failing_tasks(out))
    host, ok_, changed, unreachable, failed_ = recap[-1]
    log(f"   {what}: ok={ok_} changed={changed} failed={failed_} ({time.time() - started:.0f} s)")
    return int(changed), out


def failing_tasks(out):
    """The failing task's block of the output (TASK header to the next one), else the tail."""
    blocks = re.split(r"(?m)^(?=TASK \[|RUNNING HANDLER \[|PLAY RECAP)", out)
    bad = [b for b in blocks if re.search(r"(?m)^(fatal|failed):", b)]
    return "\n".join(bad) if bad else "\n".join(out.splitlines()[-80:])


def changed_tasks(out):
    blocks = re.split(r"(?m)^(?=TASK \[|RUNNING HANDLER \[|PLAY RECAP)", out)
    names = []
    for b in blocks:
        m = re.match(r"(TASK|RUNNING HANDLER) \[([^\]]*)\]", b)
        for line in b.splitlines():
            if m and line.startswith("changed:"):
                names.append(f"{m.group(2)}: {line}")
    return names


def api(container, method, path, token, body=None, address=API["node"]):
    args = ["docker", "exec", container, "curl", "-sS", "-X", method, "-H", f"Authorization: Bearer {token}",
            "-w", "\n%{http_code}", f"http://{address}{path}"]
    if body is not None:
        args[4:4] = ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    _, out = run(args)
    text, _, code = out.rpartition("\n")
    try:
        return int(code), json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return int(code), text


def poll(what, fn, timeout=60):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        done, last = fn()
        if done:
            return last
        time.sleep(0.5)
    raise Failure(f"{what} (waited {timeout} s)", json.dumps(last, indent=1) if not isinstance(last, str) else last)


def spec_files(container):
    _, out = sh_in(container, "cd /var/lib/poolkeeper/specs && find pools users -type f -exec sha256sum {} + | sort -k2")
    return dict((line.split()[1], line.split()[0]) for line in out.splitlines() if line.strip())


def service_prop(container, prop):
    _, out = run(["docker", "exec", container, "systemctl", "show", "-p", prop, "--value", "poolkeeper"])
    return out.strip()


def node_test(container, env, unit_type):
    """The default path, on a container with a network and a Docker daemon of its own."""
    changed, _ = playbook("first run", "pk-vm-node", env)
    check(changed > 0, f"the first run converges ({changed} changed)")
    changed, out = playbook("second run", "pk-vm-node", env)
    check(changed == 0, "the second run reports changed=0", "\n".join(changed_tasks(out)) or out)

    _, state = run(["docker", "exec", container, "systemctl", "is-active", "docker", "poolkeeper"], check=False)
    check(state.split() == ["active", "active"], "docker.service and poolkeeper.service are active")
    check(service_prop(container, "Type") == unit_type, f"the unit is Type={unit_type}")
    pid = service_prop(container, "MainPID")
    started = service_prop(container, "ExecMainStartTimestampMonotonic")
    watchdog_at = service_prop(container, "WatchdogTimestampMonotonic")
    watchdog_from = time.time()

    status, out = sh_in(container, f"curl -fsS http://{API['node']}/healthz", check_status=False)
    check(status == 0, f"/healthz answers ({out.strip()[:40]})", out)

    _, token = run(["docker", "exec", container, "cat", "/etc/poolkeeper/admin-token"])
    token = token.strip()
    check(len(token) >= 16, "an admin token was generated")
    _, perms = run(["docker", "exec", container, "stat", "-c", "%a %U %G", "/etc/poolkeeper/admin-token"])
    check(perms.strip() == "600 poolkeeper poolkeeper", f"the admin token file is {perms.strip()}")

    # Warm pools, then a claim through the API that binds, with a file of its own.
    poll("the pool web has 2 warm instances",
         lambda: (lambda st: (st.get("warm") == 2, st))(pool_status(container, token, "web")))
    ok("the pool web is warm (2 instances, its image loaded from the tarball)")
    page = "<h1>vm-test</h1>"
    code, body = api(container, "POST", "/api/v1/claims", token,
                     {"name": "vm-test", "pool": "web", "user": "tester", "ttl": "10m",
                      "files": {"index.html": page}})
    check(code in (200, 201), f"POST /api/v1/claims answers {code}", json.dumps(body))
    claim = poll("the claim vm-test is Bound",
                 lambda: (lambda c: (isinstance(c, dict) and c.get("status", {}).get("phase") == "Bound", c))(
                     api(container, "GET", "/api/v1/claims/vm-test", token)[1]))
    endpoint = claim["status"]["endpoint"]
    port = endpoint["ports"]["http"]
    check(39000 <= port <= 39049, f"the claim is Bound at {endpoint['host']}:{port}")
    status, out = sh_in(container, f"curl -fsS http://{endpoint['host']}:{port}/index.html", check_status=False)
    check(status == 0 and out.strip() == page, "the claimed instance serves the claim's file", out)

    # One pool variable changes: that file alone, no restart, the pool follows.
    before = spec_files(container)
    changed, out = playbook("run with web.warm=3", "pk-vm-node", env,
                            {"poolkeeper_pool_overrides": {"web": {"warm": 3}}})
    after = spec_files(container)
    differ = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
    check(differ == ["pools/web.yaml"], f"only pools/web.yaml changed ({', '.join(differ) or 'none'})")
    check(changed == 1, f"the run reports changed=1 ({changed})", "\n".join(changed_tasks(out)))
    _, text = run(["docker", "exec", container, "cat", "/var/lib/poolkeeper/specs/pools/web.yaml"])
    check(re.search(r"(?m)^  warm: 3$", text) is not None, "pools/web.yaml says warm: 3", text)
    check(service_prop(container, "MainPID") == pid
          and service_prop(container, "ExecMainStartTimestampMonotonic") == started,
          f"the service was not restarted (MainPID {pid})")
    poll("the pool web has 3 warm instances",
         lambda: (lambda st: (st.get("warm") == 3, st))(pool_status(container, token, "web")))
    ok("the running service picked up warm: 3 (3 warm instances, 1 bound)")
    _, out = run(["docker", "exec", container, "runuser", "-u", "poolkeeper", "--", "/usr/local/bin/poolkeeper",
                  "get", "pools", "--dir", "/var/lib/poolkeeper/specs"])
    log("   " + out.strip().replace("\n", "\n   "))

    code, _ = api(container, "DELETE", "/api/v1/claims/vm-test", token)
    check(code in (200, 202, 204), f"DELETE /api/v1/claims/vm-test answers {code}")

    # The unit, as systemd sees it.
    status, out = run(["docker", "exec", container, "systemd-analyze", "verify",
                       "/etc/systemd/system/poolkeeper.service"], check=False)
    check(status == 0 and out.strip() == "", "systemd-analyze verify poolkeeper.service is clean", out)
    _, out = run(["docker", "exec", container, "systemd-analyze", "security", "--no-pager", "poolkeeper.service"])
    m = re.search(r"Overall exposure level for poolkeeper.service: ([0-9.]+) (\S+)", out)
    score = float(m.group(1)) if m else 99.0
    check(score < SECURITY_LIMIT, f"systemd-analyze security: exposure {m.group(1) if m else '?'} "
          f"{m.group(2) if m else ''} (< {SECURITY_LIMIT})", out)

    # The unit the role installs with its defaults is the one the binary prints.
    status, printed = run(["docker", "exec", container, "/usr/local/bin/poolkeeper", "install", "--print-unit"],
                          check=False)
    if status == 0 and unit_type == "notify":
        _, installed = run(["docker", "exec", container, "cat", "/etc/systemd/system/poolkeeper.service"])
        check(printed.rstrip() == installed.rstrip(),
              "poolkeeper install --print-unit prints the unit the role installed", diff(installed, printed))
    else:
        log("   (skipped: the unit against `poolkeeper install --print-unit`, which this binary "
            "or Type= does not give)")

    # The firewall role: its table is loaded next to the Docker daemon's rules.
    status, out = run(["docker", "exec", container, "nft", "list", "table", "inet", "poolkeeper_firewall"],
                      check=False)
    check(status == 0 and "tcp dport 7080 accept" in out and "tcp dport { 39000-39099 }" in out,
          "the firewall table is loaded (API 7080; pools 39000-39099 from the allowed sources)", out)

    if unit_type == "notify":
        # WATCHDOG=1 every WatchdogSec/2 (15 s): the timestamp systemd keeps moves on.
        wait = watchdog_from + 16 - time.time()
        if wait > 0:
            time.sleep(wait)
        now = service_prop(container, "WatchdogTimestampMonotonic")
        check(int(now) > int(watchdog_at) > 0, f"the watchdog is fed (WatchdogTimestamp {watchdog_at} -> {now})")
        check(service_prop(container, "MainPID") == pid, "the service still runs under the watchdog")
    return score


def external_test(container, env, controller_id):
    """The Docker Engine provided from outside: this machine's, through its socket."""
    changed, _ = playbook("external, first run", "pk-vm-external", env)
    check(changed > 0, f"with an external Docker socket, the first run converges ({changed} changed)")
    changed, out = playbook("external, second run", "pk-vm-external", env)
    check(changed == 0, "with an external Docker socket, the second run reports changed=0",
          "\n".join(changed_tasks(out)) or out)
    _, state = run(["docker", "exec", container, "systemctl", "is-active", "poolkeeper"], check=False)
    check(state.strip() == "active", "poolkeeper.service is active, in the socket's group")
    _, token = run(["docker", "exec", container, "cat", "/etc/poolkeeper/admin-token"])
    poll("the pool web has 1 warm instance",
         lambda: (lambda st: (st.get("warm") == 1, st))(
             pool_status(container, token.strip(), "web", address=API["external"])))
    _, out = run(["docker", "ps", "-q", "--filter", f"label=poolkeeper.dev/controller={controller_id}"])
    check(len(out.split()) == 1, f"its warm instance runs on this machine's daemon, labelled {controller_id}")


def diff(a, b):
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), "installed", "printed"))


def pool_status(container, token, name, address=API["node"]):
    code, body = api(container, "GET", f"/api/v1/pools/{name}", token, address=address)
    if code != 200 or not isinstance(body, dict):
        return {}
    return body.get("status") or {}


# --- main ------------------------------------------------------------------------------------


def cleanup(names, controller_id):
    for name in names:
        run(["docker", "rm", "-f", "-v", name], check=False)
    _, out = run(["docker", "ps", "-aq", "--filter", f"label=poolkeeper.dev/controller={controller_id}"],
                 check=False)
    ids = out.split()
    if ids:
        run(["docker", "rm", "-f", "-v", *ids], check=False)
    _, out = run(["docker", "volume", "ls", "-q", "--filter", f"label=poolkeeper.dev/controller={controller_id}"],
                 check=False)
    if out.split():
        run(["docker", "volume", "rm", "-f", *out.split()], check=False)
    return len(ids)


def main():
    global failed
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", default=os.environ.get("POOLKEEPER_BIN"),
                        help="the poolkeeper binary to install (default: $POOLKEEPER_BIN, else "
                             "target/release/poolkeeper, else target/debug/poolkeeper)")
    parser.add_argument("--unit-type", default=os.environ.get("PK_VM_UNIT_TYPE", "notify"),
                        choices=["notify", "simple"],
                        help="the unit's Type= (notify; simple only for a binary without sd_notify)")
    parser.add_argument("--keep", action="store_true", help="leave the containers running")
    args = parser.parse_args()
    binary = args.binary
    if not binary:
        for b in ("target/release/poolkeeper", "target/debug/poolkeeper"):
            if os.access(os.path.join(ROOT, b), os.X_OK):
                binary = os.path.join(ROOT, b)
                break
    if not binary or not os.access(binary, os.X_OK):
        log("vm: no poolkeeper binary (cargo build, or --binary PATH)")
        return 1

    t0 = time.time()
    tag = os.getpid()
    controller_id = f"vm-test-{tag}"
    node = f"poolkeeper-vm-node-{tag}"
    external = f"poolkeeper-vm-external-{tag}"
    work = tempfile.mkdtemp(prefix="poolkeeper-vm-test.")
    score = None
    current = None
    try:
        # A copy: the binary may be rebuilt while the test runs, and the runs must see one file.
        shutil.copy2(binary, os.path.join(work, "poolkeeper"))
        tools()
        lint()
        vagrant()
        build_image()
        workload_image()
        run(["docker", "save", "-o", os.path.join(work, "images.tar"), WORKLOAD])
        log(f"   tools and images ready ({time.time() - t0:.0f} s)")
        env = ansible_env({"PK_VM_NODE": node, "PK_VM_EXTERNAL": external,
                           "PK_VM_BINARY": os.path.join(work, "poolkeeper"),
                           "PK_VM_IMAGES": os.path.join(work, "images.tar"),
                           "PK_VM_CONTROLLER_ID": controller_id, "PK_VM_UNIT_TYPE": args.unit_type})
        current = node
        start_container(node, external=False)
        score = node_test(node, env, args.unit_type)
        current = external
        start_container(external, external=True)
        external_test(external, env, controller_id)
    except Failure as e:
        failed += 1
        log(f"not ok - {e}")
        if e.output:
            log("---- output ----\n" + e.output.rstrip()[-20000:])
        if current and run(["docker", "inspect", current], check=False)[0] == 0:
            _, journal = run(["docker", "exec", current, "sh", "-c",
                              "journalctl -u poolkeeper --no-pager | tail -100"], check=False)
            log(f"---- journalctl -u poolkeeper in {current} (last 100 lines) ----\n" + journal.rstrip())
    except Exception as e:  # noqa: BLE001 -- a crash of the harness is a failure too
        failed += 1
        log(f"not ok - the harness crashed: {e!r}")
    finally:
        if args.keep:
            log(f"kept: docker exec -it {node} bash; docker exec -it {external} bash")
        else:
            removed = cleanup([node, external], controller_id)
            log(f"   removed the test containers and {removed} pool container(s) of {controller_id}")
        shutil.rmtree(work, ignore_errors=True)
    if score is not None:
        log(f"   systemd-analyze security exposure: {score}")
    log(f"   wall time {time.time() - t0:.0f} s")
    log(f"vm: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
