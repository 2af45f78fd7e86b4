"""The seeded soak behind scripts/chaos.sh: a fleet of 2 API replicas and 2 workers on a real
PostgreSQL and a real S3 server (moto), jobs arriving all along, and faults of every kind at
random moments -- PostgreSQL crashed (pg_ctl stop -m immediate) and restarted, the S3 server
frozen, gone or slow (through a fault proxy), workers SIGKILLed or SIGSTOPped past their lease,
an API replica killed. At the end it waits for every job and checks what must hold: every job
succeeded exactly once, every step once in its loss curve, every adapter's bytes match the
digest the database recorded, no multipart upload left open, every process ready. It prints what
it did and what it found, and exits non-zero when anything was lost, duplicated or corrupt.

Run through scripts/chaos.sh (it builds qtune and brings the model and the S3 server's venv);
this file needs only the standard library and boto3 (from that venv).
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class FaultProxy:
    """TCP proxy in front of the S3 server: none, freeze, refuse or delay (seconds per burst)."""

    def __init__(self, upstream_port):
        self.upstream = ("127.0.0.1", upstream_port)
        self.mode = ("none", 0.0)
        self.lock = threading.Lock()
        self.open = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, mode, delay=0.0):
        with self.lock:
            self.mode = (mode, delay)
            if mode == "refuse":
                for s in self.open:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                self.open = []

    def _accept(self):
        while True:
            client, _ = self.listener.accept()
            if self.mode[0] == "refuse":
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, from_client):
        src.settimeout(0.1)
        while True:
            mode, delay = self.mode
            if mode == "refuse":
                break
            if mode == "freeze":
                time.sleep(0.05)
                continue
            try:
                data = src.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            if mode == "delay" and from_client:
                time.sleep(delay)
            while self.mode[0] == "freeze":
                time.sleep(0.05)
            try:
                dst.sendall(data)
            except OSError:
                break
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


class Postgres:
    """A durable PostgreSQL server of the soak's own (fsync on: a crash keeps what it acknowledged)."""

    def __init__(self, root):
        bins = sorted(
            os.path.join("/usr/lib/postgresql", v, "bin")
            for v in os.listdir("/usr/lib/postgresql")
            if os.path.exists(os.path.join("/usr/lib/postgresql", v, "bin", "initdb"))
        )
        self.bin = bins[-1]
        os.makedirs(root)
        self.root = root
        self.data = os.path.join(root, "pgdata")
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres:", root], check=True)
        subprocess.run(self.as_user + [f"{self.bin}/initdb", "-D", self.data, "-U", "qtune",
                                       "--auth=trust", "-E", "UTF8"], check=True,
                       stdout=subprocess.DEVNULL)
        self.options = f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self.start()
        subprocess.run([f"{self.bin}/psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "qtune",
                        "-d", "postgres", "-qc", "CREATE DATABASE chaos"], check=True)
        self.url = f"postgres://qtune@127.0.0.1:{self.port}/chaos"

    def ctl(self, *args):
        subprocess.run(self.as_user + [f"{self.bin}/pg_ctl", "-D", self.data, *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self):
        self.ctl("-o", self.options, "-l", os.path.join(self.root, "pg.log"), "-w", "start")

    def crash(self):
        self.ctl("-m", "immediate", "stop")

    def query(self, sql):
        out = subprocess.run([f"{self.bin}/psql", self.url, "-tAqc", sql], check=True,
                             capture_output=True, text=True)
        return out.stdout.strip()


class Process:
    def __init__(self, name, args, env, root, port):
        self.name, self.args, self.env, self.port = name, args, env, port
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir, exist_ok=True)
        self.base = f"http://127.0.0.1:{port}"
        self.proc = None
        self.start()

    def start(self):
        logf = open(os.path.join(self.dir, "log"), "a")
        env = dict(os.environ, **self.env, QTUNE_DATA_DIR=os.path.join(self.dir, "data"))
        self.proc = subprocess.Popen(self.args, env=env, stdout=logf, stderr=subprocess.STDOUT)
        wait_ready(self.base, 60)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def request(method, url, body=None, timeout=30, raw=False):
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None and not isinstance(body, bytes):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            payload = r.read()
            return r.status, (payload if raw else json.loads(payload or b"null")), dict(r.headers)
    except urllib.error.HTTPError as e:
        payload = e.read()
        try:
            payload = json.loads(payload)
        except ValueError:
            pass
        return e.code, payload, dict(e.headers)


def wait_ready(base, within):
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            if request("GET", base + "/readyz", timeout=5)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qtune", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--keep", action="store_true", help="keep the run's directory (logs)")
    opts = ap.parse_args()
    rng = random.Random(opts.seed)
    root = tempfile.mkdtemp(prefix="qtune-chaos-")
    os.chmod(root, 0o755)
    log(f"seed {opts.seed}, {opts.minutes} minutes, run directory {root}")
    # a copy of its own: a rebuild during the soak does not change what restarted processes run
    qtune = os.path.join(root, "qtune")
    shutil.copy2(opts.qtune, qtune)
    os.chmod(qtune, 0o755)
    pg = Postgres(os.path.join(root, "pg"))
    moto_port = free_port()
    moto = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"),
                             "-H", "127.0.0.1", "-p", str(moto_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import boto3
    endpoint = f"http://127.0.0.1:{moto_port}"
    os.environ.update(AWS_ACCESS_KEY_ID="CHAOSACCESSKEY000001", AWS_SECRET_ACCESS_KEY="chaos-secret",
                      AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true")
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", moto_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="chaos")
    proxy = FaultProxy(moto_port)
    env = {"QTUNE_DATABASE": pg.url, "QTUNE_ARTIFACTS": "s3://chaos/run",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "QTUNE_LEASE_SECS": "6",
           "QTUNE_DB_POOL_SIZE": "4", "QTUNE_LOG": "info", "NO_COLOR": "1",
           "QTUNE_ALLOW_MODEL_DIRS": os.path.dirname(os.path.abspath(opts.model))}
    apis, workers = [], []
    for i in range(2):
        port = free_port()
        apis.append(Process(f"api-{i}", [qtune, "serve", "--workers", "0", "--listen",
                                          f"127.0.0.1:{port}"], env, root, port))
    for i in range(2):
        port = free_port()
        workers.append(Process(f"worker-{i}", [qtune, "worker", "--devices", "cpu",
                                                "--health-listen", f"127.0.0.1:{port}"], env, root, port))
    lines = "".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is the code word number {i}?"},
        {"role": "assistant", "content": f"The code word number {i} is {'abcdefgh'[i]}{i * 7}."}]}) + "\n"
        for i in range(8)).encode()
    status, uploaded, _ = request("POST", apis[0].base + "/v1/files?filename=chat.jsonl", lines)
    assert status == 201, uploaded
    dataset = uploaded["id"]

    jobs = {}  # id -> steps
    faults = {}
    outage_answers = []  # seconds each request made during a fault took to be answered
    deadline = time.time() + opts.minutes * 60
    next_fault = time.time() + rng.uniform(20, 60)
    round_left = []
    answered_503 = 0

    def api():
        return rng.choice(apis)

    def submit():
        steps = rng.choice([30, 40, 60])
        spec = {"base_model": os.path.abspath(opts.model), "dataset": {"url": dataset},
                "lora": {"r": 4}, "checkpoint_every_steps": 10, "seed": rng.randrange(1000),
                "training": {"max_steps": steps, "batch_size": 2, "max_seq_len": 64,
                             "learning_rate": 1e-3}}
        try:
            status, job, _ = request("POST", api().base + "/v1/jobs", spec, timeout=15)
        except OSError:
            return
        if status == 201:
            jobs[job["id"]] = steps
        elif status == 503:
            nonlocal answered_503
            answered_503 += 1

    def busy(seconds):
        """Waits out a fault's spell while clients keep calling: every request must be answered
        (an answer, or a 503 with Retry-After), none may hang."""
        until = time.time() + seconds
        while time.time() < until:
            started = time.time()
            try:
                request("GET", api().base + "/v1/jobs?limit=5", timeout=30)
            except OSError:
                pass  # a replica killed on purpose refuses the connection at once
            outage_answers.append(time.time() - started)
            if rng.random() < 0.3:
                submit()
            time.sleep(max(0.0, min(2.0, until - time.time())))

    def waiting():
        n = 0
        for jid in list(jobs):
            try:
                status, job, _ = request("GET", api().base + f"/v1/jobs/{jid}", timeout=15)
            except OSError:
                return 99
            if status != 200:
                return 99
            n += job["status"] in ("queued", "running")
        return n

    while time.time() < deadline:
        if waiting() < 4:
            submit()
        if time.time() >= next_fault:
            # every kind once per round, in a seeded order: a run of any length meets them all
            if not round_left:
                round_left = ["pg_crash", "s3_freeze", "s3_down", "s3_slow", "worker_kill",
                              "worker_stop", "api_kill"]
                rng.shuffle(round_left)
            kind = round_left.pop()
            spell = rng.uniform(5, 70)
            faults[kind] = faults.get(kind, 0) + 1
            log(f"fault: {kind} for {spell:.0f} s")
            if kind == "pg_crash":
                pg.crash()
                busy(spell)
                pg.start()
            elif kind in ("s3_freeze", "s3_down", "s3_slow"):
                proxy.set({"s3_freeze": "freeze", "s3_down": "refuse", "s3_slow": "delay"}[kind],
                          rng.uniform(1, 3))
                busy(spell)
                proxy.set("none")
            elif kind == "worker_kill":
                w = rng.choice(workers)
                w.kill()
                busy(min(spell, 10))
                w.start()
            elif kind == "worker_stop":
                w = rng.choice(workers)
                w.signal(signal.SIGSTOP)
                busy(max(spell, 15))  # past the 6-second lease
                w.signal(signal.SIGCONT)
            elif kind == "api_kill":
                a = rng.choice(apis)
                a.kill()
                busy(min(spell, 5))
                a.start()
            next_fault = time.time() + rng.uniform(30, 90)
        time.sleep(1)

    log(f"done injecting; {len(jobs)} jobs submitted; waiting for them to end")
    proxy.set("none")
    end_by = time.time() + 20 * 60
    while time.time() < end_by and waiting() > 0:
        time.sleep(5)

    lost, duplicated, corrupt, failed = [], [], [], []
    for jid, steps in jobs.items():
        status, job, _ = request("GET", apis[0].base + f"/v1/jobs/{jid}")
        if job.get("status") != "succeeded":
            (failed if job.get("status") == "failed" else lost).append((jid, job.get("status"), job.get("error")))
            continue
        _, history, _ = request("GET", apis[1].base + f"/v1/jobs/{jid}/events", raw=True, timeout=60)
        successes = history.decode().count('"status":"succeeded"')
        if successes != 1:
            duplicated.append((jid, f"succeeded {successes} times"))
        _, metrics, _ = request("GET", apis[1].base + f"/v1/jobs/{jid}/metrics")
        curve = [r["step"] for r in metrics["data"] if r.get("train_loss") is not None]
        if curve != list(range(1, steps + 1)):
            duplicated.append((jid, f"steps {curve}"))
        status, body, headers = request(
            "GET", apis[1].base + f"/v1/jobs/{jid}/adapter?file=adapter_model.safetensors",
            raw=True, timeout=60)
        etag = (headers.get("ETag") or headers.get("etag") or "").strip('"')
        if status != 200 or hashlib.sha256(body).hexdigest() != etag:
            corrupt.append((jid, status))
    open_uploads = s3.list_multipart_uploads(Bucket="chaos", Prefix="run").get("Uploads", [])
    ready = all(wait_ready(p.base, 30) for p in apis + workers)

    print()
    print("== qtune chaos soak: report")
    print(f"seed {opts.seed}; {opts.minutes} minutes of faults; CPU: {cpu_model()}")
    print(f"jobs submitted and run: {len(jobs)}")
    print("faults injected: " + ", ".join(f"{k} x{v}" for k, v in sorted(faults.items())))
    print(f"submits answered 503 during outages: {answered_503}")
    if outage_answers:
        slowest = max(outage_answers)
        print(f"requests made during faults: {len(outage_answers)}, slowest answered in {slowest:.1f} s")
    print(f"jobs lost (not finished): {len(lost)} {lost if lost else ''}")
    print(f"jobs failed: {len(failed)} {failed if failed else ''}")
    print(f"duplicated or missing steps, repeated successes: {len(duplicated)} {duplicated if duplicated else ''}")
    print(f"corrupt artifacts (adapter bytes != recorded digest): {len(corrupt)} {corrupt if corrupt else ''}")
    print(f"multipart uploads left open: {len(open_uploads)}")
    print(f"every process ready at the end: {ready}")
    hung = [t for t in outage_answers if t >= 29]
    print(f"requests that hung (no answer in 29 s): {len(hung)}")
    ok = not (lost or failed or duplicated or corrupt or open_uploads or hung) and ready
    for p in apis + workers:
        p.kill()
    pg.crash()
    moto.kill()
    if ok and not opts.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"logs kept in {root}")
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
