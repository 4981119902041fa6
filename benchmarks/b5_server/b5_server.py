"""B5 (docs/benchmarks.md#b5): the fleet server under load on loopback.

N concurrent clients push valid deltas (and some invalid ones) to a real `edgecl serve` process
(uvicorn, SQLite + folder by default, or --db postgresql://...). Reports deltas/s, p50/p99
latency, that every accepted delta is listed and byte-identical (zero lost), that every invalid
one was rejected with its reason, and the time to merge 100 deltas. Bounded in count and time.

Deltas are shaped like EfficientNet-Lite0's at the default 5% mask (K = 232 000 entries, 1280-dim
prototypes of 10 classes), made before the clock starts: only the server's work is timed.

    .venv/bin/python benchmarks/b5_server/b5_server.py [--clients 32] [--per-client 20] [--db URL | --start-postgres]
        [--replicas 2]     # N `edgecl server` processes, each with its own folder, blobs in PostgreSQL

Then (``--kill9-clients``) a kill -9 of the server while 8 clients push, a restart on the same
store, and a check that every acknowledged delta is still there, byte-identical.

Writes benchmarks/out/b5_server.json and .png (b5_server_postgresql.* with --db). No torch anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parents[1]  # benchmarks/ (results go to benchmarks/out/)
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from edgecl.formats import delta as D  # noqa: E402
from edgecl.formats.mask import Mask  # noqa: E402
from edgecl.formats.merge import merge_deltas  # noqa: E402
from edgecl.formats.prototypes import Prototypes  # noqa: E402
from edgecl.server.service import register_bundle_json  # noqa: E402
from edgecl.server.store import Store  # noqa: E402

OUT = BENCH_DIR / "out"
EMBED_DIM = 1280                 # EfficientNet-Lite0 pooled features
CLASSES = [f"class-{i}" for i in range(10)]


def make_bundle(k: int, n_tensors: int, seed: int) -> tuple[Mask, bytes, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    per = k // n_tensors
    order = [f"blocks.{i}.conv.weight" for i in range(n_tensors)]
    sizes = {n: per * 20 for n in order}
    indices = {n: np.sort(rng.choice(sizes[n], per, replace=False)).astype(np.int32) for n in order}
    mask = Mask(order=order, shapes={n: (sizes[n],) for n in order}, indices=indices,
                total_params=sum(sizes.values()))
    mask_bytes = mask.to_bytes()
    manifest = {"bundle_id": f"b5-{seed}", "version": 1, "model_name": "b5", "input_size": [224, 224],
                "mean": [0.5] * 3, "std": [0.5] * 3, "embedding_dim": EMBED_DIM, "proj_dim": 128,
                "total_params": mask.total_params, "selected": mask.total_selected, "select_rate": 0.05,
                "drop_rate": 0.9, "base_sha256": hashlib.sha256(b"b5 base").hexdigest(),
                "mask_sha256": hashlib.sha256(mask_bytes).hexdigest()}
    return mask, mask_bytes, manifest


def make_delta_bytes(manifest: dict, device: str, key: bytes, seed: int, changed: float, values: str) -> bytes:
    rng = np.random.default_rng(seed)
    k = manifest["selected"]
    vector = np.where(rng.random(k) < changed, rng.normal(0, 1e-3, k), 0).astype(np.float32)
    counts = rng.integers(20, 300, len(CLASSES))
    protos = Prototypes(list(CLASSES), rng.normal(size=(len(CLASSES), EMBED_DIM)).astype(np.float32), counts)
    # the device saw every image its classes count (the server refuses a class counting more: count_over_seen)
    delta = D.Delta.from_dense(vector, bundle_id=manifest["bundle_id"], bundle_version=1,
                               base_sha256=manifest["base_sha256"], mask_sha256=manifest["mask_sha256"],
                               device_id=device, steps=100, samples_seen=int(counts.sum()),
                               metrics={"acc": 0.9}, created_utc="2025-06-01T00:00:00Z", prototypes=protos)
    return D.save(delta, key, values=values)


def invalid_variant(data: bytes, kind: str, key: bytes) -> tuple[bytes, str, str]:
    """(bytes, token override or "", expected error code) for one kind of bad push."""
    if kind == "tampered":
        return data[:-1] + bytes([data[-1] ^ 1]), "", "body_hash_mismatch"
    if kind == "truncated":
        return data[: len(data) // 2], "", "truncated"
    if kind == "wrong_token":
        return data, "ecl_wrong", "auth_invalid"
    # NaN in the first stored value, re-hashed and re-signed so the NaN is what the server meets.
    header = D.read_header(data)
    body = bytearray(data[8 + header.header_bytes:])
    info = header.tensors["delta.values"]
    if info.dtype != "F32":
        return data[:-1] + bytes([data[-1] ^ 1]), "", "body_hash_mismatch"
    body[info.begin:info.begin + 4] = np.array([np.nan], "<f4").tobytes()
    import struct

    n = header.header_bytes
    obj = json.loads(data[8:8 + n])
    obj["__metadata__"]["body_sha256"] = hashlib.sha256(bytes(body)).hexdigest()
    obj["__metadata__"]["hmac_sha256"] = ""
    obj["__metadata__"]["hmac_sha256"] = D.compute_hmac(key, D.canonical_json(obj).encode())
    raw = D.canonical_json(obj).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(body), "", "values_not_finite"


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of a process and its live children (uvicorn workers)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:   # fields[1]: parent pid
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store_dir: Path, db: str | None, port: int, workers: int, blobs: str | None = None,
                 key_file: str | None = None, per_client_cap: int = 64) -> subprocess.Popen:
    # Every client of this benchmark has the address 127.0.0.1: past 64 clients the per-address
    # cap is off, as behind a reverse proxy (docs/server.md).
    code = (f"from edgecl.server.app import serve; serve(port={port}, store_dir={str(store_dir)!r}, db={db!r}, "
            f"log_level='error', workers={workers}, blobs={blobs!r}, release_key_file={key_file!r}, "
            f"max_connections_per_client={per_client_cap})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the server did not start")


def request_bytes(data: bytes, token: str) -> bytes:
    """The whole HTTP request of one push, encoded once before the clock starts: the same bytes an
    ``edgecl push`` sends (POST /v1/deltas, the device's bearer token, the delta file as the body)."""
    head = (f"POST /v1/deltas HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


async def _exchange(port: int, conn: list[Any], request: bytes) -> tuple[int, dict[str, Any]]:
    """One request on the client's keep-alive connection (opened again when the server closed it)."""
    if not conn:
        conn.extend(await asyncio.open_connection("127.0.0.1", port))
    reader, writer = conn
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    body = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))) or b"{}")
    if headers.get("connection", "").lower() == "close":
        writer.close()
        conn.clear()
    return status, body


async def push_all(plans: dict[str, list[tuple[bytes, str, str]]], port_of: dict[str, int], rate: float,
                   max_seconds: float) -> tuple[list[dict[str, Any]], float]:
    """Every client's pushes on its own keep-alive connection, all clients in this one event loop
    (asyncio streams, requests encoded beforehand: the load generator shares the machine's cores
    with the server and must cost it as little CPU as possible).

    ``rate`` 0: each client pushes back to back (closed loop: the server's throughput; with many
    clients the latency is mostly waiting in line). ``rate`` R: pushes (valid and invalid) are
    scheduled at R per second overall, round-robin over the clients (every client's first, then
    every client's second, ...), and a latency counts from the scheduled time, so a push that had
    to wait for its client's previous one counts its wait too.
    Each client's first push is a warm-up, before the clock starts (``warmup`` in its record).
    Returns the records and the wall seconds from the first timed push to the last answer."""
    try:
        import uvloop  # the server extra's event loop, when installed: a lighter client

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    devices = list(plans)
    encoded = {d: [(request_bytes(data, token), data, expected) for data, token, expected in plans[d]] for d in devices}
    # Timed pushes in the order (round j, client i), the n-th of them scheduled at n / rate.
    order = sorted((j, i) for i, d in enumerate(devices) for j in range(len(encoded[d]) - 1))
    seq = {key: n for n, key in enumerate(order)}
    warm = asyncio.Event()
    warming = [len(devices)]
    t0 = deadline = 0.0

    async def client(i: int, device: str) -> list[dict[str, Any]]:
        nonlocal t0, deadline
        out: list[dict[str, Any]] = []
        conn: list[Any] = []
        # Warm-up, untimed: every client's first push, all at once, so each API process has started
        # its threads and opened their database connections (a running server has) before the clock.
        request, data, expected = encoded[device][0]
        status, body = await _exchange(port_of[device], conn, request)
        out.append({"latency_s": 0.0, "status": status, "expected": expected, "warmup": True,
                    "error": body.get("error", ""), "sha256": body.get("sha256", ""), "data": data})
        warming[0] -= 1
        if not warming[0]:
            t0 = time.perf_counter()
            deadline = t0 + max_seconds
            warm.set()
        await warm.wait()
        for j, (request, data, expected) in enumerate(encoded[device][1:]):
            now = time.perf_counter()
            if now > deadline:
                break
            scheduled = t0 + seq[(j, i)] / rate if rate else now
            if scheduled > now:
                await asyncio.sleep(scheduled - now)
            status, body = await _exchange(port_of[device], conn, request)
            out.append({"latency_s": time.perf_counter() - scheduled, "status": status, "expected": expected,
                        "warmup": False, "error": body.get("error", ""), "sha256": body.get("sha256", ""),
                        "data": data})
        if conn:
            conn[1].close()
        return out

    parts = await asyncio.gather(*(client(i, d) for i, d in enumerate(devices)))
    return [r for part in parts for r in part], time.perf_counter() - t0


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else ""
    import fastapi
    import uvicorn

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=20, help="valid deltas per client")
    parser.add_argument("--invalid-every", type=int, default=10, help="one invalid push per this many valid")
    parser.add_argument("--k", type=int, default=232_000, help="delta vector length (5%% of EfficientNet-Lite0)")
    parser.add_argument("--changed", type=float, default=0.3, help="share of the K entries a device changed")
    parser.add_argument("--values", default="int8", choices=D.VALUE_DTYPES)
    parser.add_argument("--merge-deltas", type=int, default=100)
    parser.add_argument("--db", default=None, help="postgresql://... (default: SQLite in the store folder)")
    parser.add_argument("--workers", type=int, default=1, help="server processes (edgecl serve --workers)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bound on the load phase")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="offered pushes/s over all clients, invalid ones included (0: every client "
                             "pushes back to back)")
    parser.add_argument("--kill9-clients", type=int, default=8, help="clients of the kill -9 phase (0: skip it)")
    parser.add_argument("--start-postgres", action="store_true", help="start a throwaway PostgreSQL for --db")
    parser.add_argument("--blobs", choices=("folder", "database"), default=None,
                        help="where the server keeps bytes (default: folder; database with --replicas)")
    parser.add_argument("--replicas", type=int, default=1, help="API servers, each with its own folder, blobs in "
                                                                "PostgreSQL (needs --db or --start-postgres)")
    parser.add_argument("--out", default="", help="results file stem (default b5_server[_postgresql])")
    args = parser.parse_args()

    work = OUT / "b5"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if args.start_postgres:
            from benchmarks.shared.postgres import throwaway_postgres

            # max_connections: one per client-serving thread of every API process, and spare
            args.db = stack.enter_context(throwaway_postgres(max_connections=600))
        run(args, work)


def run(args: argparse.Namespace, work: Path) -> None:
    blobs, key_file = None, None
    if args.replicas > 1 or args.blobs == "database":
        if not args.db:
            raise SystemExit("--replicas and --blobs database need PostgreSQL: --db URL or --start-postgres")
        from edgecl.formats.signing import generate_private_key, write_secret

        key_file = str(work / "release.key")
        write_secret(Path(key_file), generate_private_key().hex().encode() + b"\n")
        blobs = "database"
    store = Store(work / "store", args.db, blobs, key_file)
    mask, mask_bytes, manifest = make_bundle(args.k, 40, seed=5)
    register_bundle_json(store, manifest, mask_bytes)
    devices = {}
    for i in range(args.clients):
        token, key = store.register_device(f"dev-{i:03d}")
        devices[f"dev-{i:03d}"] = (token, bytes.fromhex(key))
    admin, _ = store.register_device("ops", admin=True)

    print(f"making {args.clients * args.per_client} deltas (K={args.k}, {args.changed:.0%} changed, {args.values}) ...",
          flush=True)
    kinds = ("tampered", "truncated", "wrong_token", "nan")
    plans: dict[str, list[tuple[bytes, str, str]]] = {}
    n_invalid = 0
    for c, (device, (token, key)) in enumerate(devices.items()):
        plan = []
        for j in range(args.per_client):
            data = make_delta_bytes(manifest, device, key, seed=c * 1000 + j, changed=args.changed, values=args.values)
            plan.append((data, token, ""))
            if (c * args.per_client + j) % args.invalid_every == args.invalid_every - 1:
                kind = kinds[n_invalid % len(kinds)]
                if kind == "nan":
                    data = D.save(D.load(data), key, values="fp32")
                bad, token_override, code = invalid_variant(data, kind, key)
                plan.append((bad, token_override or token, code))
                n_invalid += 1
        plans[device] = plan
    sizes = [len(d) for plan in plans.values() for d, _, code in plan if not code]

    ports = [free_port() for _ in range(args.replicas)]
    cap = 0 if args.clients > 64 else 64
    replicas = [start_server(work / ("store" if i == 0 else f"store-r{i}"), args.db, p, args.workers, blobs, key_file,
                             cap) for i, p in enumerate(ports)]
    proc, port = replicas[0], ports[0]
    url = f"http://127.0.0.1:{port}"
    replica_of = {device: ports[i % len(ports)] for i, device in enumerate(plans)}

    try:
        mode = f"at an offered {args.rate:g} pushes/s" if args.rate else "back to back"
        print(f"pushing with {args.clients} concurrent clients ({mode}) ...", flush=True)
        server_cpu0, client_cpu0 = sum(_cpu_s(r.pid) for r in replicas), _own_cpu_s()
        records, wall_s = asyncio.run(push_all(plans, replica_of, args.rate, args.max_seconds))
        server_cpu_s = sum(_cpu_s(r.pid) for r in replicas) - server_cpu0
        client_cpu_s = _own_cpu_s() - client_cpu0

        valid = [r for r in records if not r["expected"]]
        invalid = [r for r in records if r["expected"]]
        accepted = {r["sha256"]: r["data"] for r in valid if r["status"] in (200, 201)}   # warm-ups included
        timed = [r for r in valid if not r["warmup"]]
        timed_accepted = sum(r["status"] in (200, 201) for r in timed)
        failed_valid = [r for r in valid if r["status"] not in (200, 201)]
        wrong_reason = [r for r in invalid if r["error"] != r["expected"]]
        # Zero lost: every acknowledged delta is listed and byte-identical.
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=60) as admin_http:
            listed = {r["sha256"] for r in admin_http.get("/v1/deltas").json()["deltas"]}
            lost = [sha for sha in accepted if sha not in listed]
            different = [sha for sha, data in accepted.items() if admin_http.get(f"/v1/deltas/{sha}").content != data]

            # Merge of 100 deltas: through the endpoint (load from the store + merge + save + store),
            # and the pure numpy merge alone.
            # One delta per device counts in a merge (each device's newest), so 100 devices push one each.
            n_merge = args.merge_deltas
            merge_mask, merge_mask_bytes, merge_manifest = make_bundle(args.k, 40, seed=6)
            register_bundle_json(store, merge_manifest, merge_mask_bytes)
            merge_inputs = []
            for i in range(n_merge):
                device = f"merge-{i:03d}"
                token, key = store.register_device(device)
                data = make_delta_bytes(merge_manifest, device, bytes.fromhex(key), seed=10_000 + i,
                                        changed=args.changed, values=args.values)
                pushed = admin_http.post("/v1/deltas", content=data, headers={"Authorization": f"Bearer {token}"})
                assert pushed.status_code == 201, pushed.text
                merge_inputs.append(D.load(data))
            t0 = time.perf_counter()
            merge_response = admin_http.post(f"/v1/bundles/{merge_manifest['bundle_id']}/1/merge",
                                             params={"wait_s": 600})
            merge_endpoint_s = time.perf_counter() - t0
            assert merge_response.status_code == 200, merge_response.text
            assert merge_response.json()["inputs"] == n_merge, merge_response.text
            t0 = time.perf_counter()
            merge_deltas(merge_inputs, merge_mask)
            merge_pure_s = time.perf_counter() - t0
        kill9 = kill9_phase(args, work, manifest, devices, admin, proc, port, blobs, key_file) \
            if args.kill9_clients else {}
    finally:
        for replica in replicas:
            if replica.poll() is None:
                replica.terminate()
                replica.wait(30)
        store.close()

    latencies = np.array([r["latency_s"] for r in timed])
    result = {
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items()},
        "storage": "postgresql" if args.db else "sqlite",
        "replicas": args.replicas,
        "blobs": blobs or "folder",
        "delta_bytes_median": int(np.median(sizes)),
        "pushes_total": len(records),
        "valid_pushed": len(valid),
        "accepted": len(accepted),
        "valid_refused": len(failed_valid),
        "invalid_pushed": len(invalid),
        "invalid_rejected_with_expected_reason": len(invalid) - len(wrong_reason),
        "invalid_codes": sorted({r["error"] for r in invalid}),
        "wall_s": wall_s,
        "warmup_pushes": len(valid) - len(timed),
        "deltas_per_s": timed_accepted / wall_s,
        "requests_per_s": sum(not r["warmup"] for r in records) / wall_s,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "latency_max_s": float(latencies.max()),
        "server_cpu_s": server_cpu_s,      # both sides share the machine's cores on loopback
        "client_cpu_s": client_cpu_s,
        "lost": len(lost),
        "not_byte_identical": len(different),
        "merge_deltas": n_merge,
        "merge_endpoint_s": merge_endpoint_s,
        "merge_pure_numpy_s": merge_pure_s,
        "kill9": kill9,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    stem = args.out or ("b5_server_postgresql" if args.db else "b5_server")
    (OUT / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("clients", args.clients), ("storage", result["storage"]),
        ("replicas (blobs)", f"{args.replicas} ({result['blobs']})"),
        ("delta size (median bytes)", result["delta_bytes_median"]),
        ("valid pushed / accepted (warm-ups, untimed)", f"{len(valid)} / {len(accepted)} ({result['warmup_pushes']})"),
        ("invalid pushed / rejected with reason", f"{len(invalid)} / {result['invalid_rejected_with_expected_reason']}"),
        ("deltas/s (accepted)", f"{result['deltas_per_s']:.0f}"),
        ("latency p50 / p99 (s)", f"{result['latency_p50_s']:.3f} / {result['latency_p99_s']:.3f}"),
        ("CPU seconds: server / clients", f"{server_cpu_s:.1f} / {client_cpu_s:.1f} (wall {wall_s:.1f})"),
        ("lost / not byte-identical", f"{len(lost)} / {len(different)}"),
        (f"merge {n_merge} deltas: endpoint / pure numpy (s)", f"{merge_endpoint_s:.2f} / {merge_pure_s:.2f}"),
    ]
    if kill9:
        rows.append(("kill -9 mid-run: acknowledged / lost after restart",
                     f"{kill9['acknowledged']} / {kill9['lost']} (+{kill9['not_byte_identical']} altered)"))
    width = max(len(r[0]) for r in rows)
    print("\n| B5 | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    _plot(latencies, result, OUT / f"{stem}.png")
    print(f"\nwrote {OUT / (stem + '.json')} and {OUT / (stem + '.png')}")
    if lost or different or failed_valid or wrong_reason or kill9.get("lost") or kill9.get("not_byte_identical"):
        sys.exit(1)


def kill9_phase(args: argparse.Namespace, work: Path, manifest: dict, devices: dict, admin: str,
                proc: subprocess.Popen, port: int, blobs: str | None = None,
                key_file: str | None = None) -> dict[str, Any]:
    """Clients push continuously; the server is killed with SIGKILL while requests are in flight,
    restarted on the same store, and every delta it acknowledged must be listed and byte-identical."""
    import threading

    names = list(devices)[: args.kill9_clients]
    acked: dict[str, bytes] = {}
    lock, stop = threading.Lock(), threading.Event()

    def pusher(c: int) -> None:
        device = names[c]
        token, key = devices[device]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        seed = 500_000 + c * 10_000
        while not stop.is_set():
            seed += 1
            data = make_delta_bytes(manifest, device, key, seed=seed, changed=args.changed, values=args.values)
            try:
                conn.request("POST", "/v1/deltas", body=data, headers={"Authorization": f"Bearer {token}"})
                response = conn.getresponse()
                body = json.loads(response.read())
            except (OSError, http.client.HTTPException, ValueError):
                return                  # the server died: what was not acknowledged may be lost
            if response.status in (200, 201):
                with lock:
                    acked[body["sha256"]] = data

    threads = [threading.Thread(target=pusher, args=(c,)) for c in range(len(names))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    restarted = start_server(work / "store", args.db, port, args.workers, blobs, key_file,
                             0 if args.clients > 64 else 64)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {admin}"},
                          timeout=60) as client:
            listed = {r["sha256"] for r in client.get("/v1/deltas").json()["deltas"]}
            lost = [sha for sha in acked if sha not in listed]
            different = [sha for sha, data in acked.items() if sha in listed
                         and client.get(f"/v1/deltas/{sha}").content != data]
    finally:
        restarted.terminate()
        restarted.wait(30)
    return {"clients": len(names), "acknowledged": len(acked), "lost": len(lost), "not_byte_identical": len(different)}


def _plot(latencies: np.ndarray, result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ordered = np.sort(latencies) * 1000
    ax.plot(ordered, np.arange(1, ordered.size + 1) / ordered.size)
    for q, style in ((50, "--"), (99, ":")):
        ax.axvline(np.percentile(ordered, q), linestyle=style, color="grey", label=f"p{q}")
    ax.set_xlabel("push latency (ms)")
    ax.set_ylabel("share of pushes")
    ax.set_title(f"B5: {result['config']['clients']} clients, {result['deltas_per_s']:.0f} deltas/s "
                 f"({result['storage']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
