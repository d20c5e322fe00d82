#!/usr/bin/env python3
"""HTTP measurements for bench/ha/run.sh (stdlib only).

  ha_load.py setup API NS                      -> prints the service id
  ha_load.py throughput API SVC SECONDS CLIENTS -> RegisterInstance/s (keep-alive connections)
  ha_load.py visible WRITE_API READ_API NS SVC N -> register on WRITE_API, a watch held on READ_API:
                                                    p50/p99 of ack -> watcher answered (ms)
"""
import http.client
import json
import sys
import threading
import time

TARGET = "Route53AutoNaming_v20170314."


def call(conn, action, body):
    conn.request("POST", "/", json.dumps(body),
                 {"x-amz-target": TARGET + action, "content-type": "application/x-amz-json-1.1"})
    r = conn.getresponse()
    data = r.read()
    return r.status, json.loads(data or b"null")


def connect(api):
    host, port = api.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=30)


def setup(api, ns):
    c = connect(api)
    s, op = call(c, "CreateHttpNamespace", {"Name": ns})
    assert s == 200, op
    s, got = call(c, "GetOperation", {"OperationId": op["OperationId"]})
    ns_id = got["Operation"]["Targets"]["NAMESPACE"]
    s, svc = call(c, "CreateService", {"Name": "api", "NamespaceId": ns_id})
    assert s == 200, svc
    print(svc["Service"]["Id"])


def register_body(svc, iid):
    return {"ServiceId": svc, "InstanceId": iid,
            "Attributes": {"AWS_INSTANCE_IPV4": "10.0.0.1", "AWS_INSTANCE_PORT": "80"}}


def throughput(api, svc, seconds, clients):
    done = [0] * clients
    failed = [0] * clients
    deadline = time.monotonic() + seconds

    def worker(n):
        c = connect(api)
        i = 0
        while time.monotonic() < deadline:
            s, _ = call(c, "RegisterInstance", register_body(svc, f"t{n}-{i}"))
            if s == 200:
                done[n] += 1
            else:
                failed[n] += 1
            i += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{sum(done) / seconds:.0f} {sum(failed)}")


def watch_once(api, ns, rev):
    c = connect(api)
    path = f"/v1/watch/{ns}/api?health=all&wait=20s" + (f"&revision={rev}" if rev is not None else "")
    c.request("GET", path)
    r = c.getresponse()
    return json.loads(r.read())


def visible(write_api, read_api, ns, svc, n):
    w = connect(write_api)
    lat = []
    for i in range(n):
        rev = watch_once(read_api, ns, None)["revision"]
        result = {}

        def waiter():
            result["set"] = watch_once(read_api, ns, rev)
            result["at"] = time.monotonic()

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.005)  # the watch is held before the write
        s, _ = call(w, "RegisterInstance", register_body(svc, f"v{i}"))
        acked = time.monotonic()
        assert s == 200
        t.join()
        lat.append(max(0.0, result["at"] - acked) * 1000)
    lat.sort()
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    print(f"{p(0.5):.2f} {p(0.99):.2f}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "setup":
        setup(*args)
    elif cmd == "throughput":
        throughput(args[0], args[1], int(args[2]), int(args[3]))
    elif cmd == "visible":
        visible(args[0], args[1], args[2], args[3], int(args[4]))
