# How long a region outage takes to reroute, with the default [health] and [failover]
# settings, in a release demo on ports 7600-7708. Each of three trials cuts us-east off from
# both other regions and times, from the cut:
#   read:  an eventual read through eu-west of a key eu-west holds no copy of (prices, held in
#          us-east and ap-south) answering from ap-south;
#   write: a write through ap-south to a dataset homed in us-east with failover.order
#          ["eu-west"] being taken (by eu-west, once promoted);
# then heals and times the first write served by us-east again (the hand-back).
# Run: cargo build --release -p meridian && python3 tools/failover-timing/measure.py
import json, subprocess, sys, tempfile, time, urllib.request

B = 7600
M = sys.argv[1] if len(sys.argv) > 1 else "target/release/meridian"
US, EU, AP = (f"http://127.0.0.1:{B + i}" for i in (0, 4, 7))
POLICY = """format = 1

[[dataset]]
name = "prices"
locality = "global"
classification = "internal"
home = ["us-east"]
mirrors = ["ap-south"]

[[dataset]]
name = "orders"
locality = "global"
classification = "internal"
home = ["us-east"]
mirrors = "all-allowed"
failover = { order = ["eu-west"], rpo = "30s" }
"""

def cli(*args, at=US):
    r = subprocess.run([M, *args, "--endpoint", at], capture_output=True, text=True)
    return r.returncode == 0, r.stdout + r.stderr

def until(ok, limit=60, what="?"):
    t = time.monotonic()
    while not ok():
        if time.monotonic() - t > limit:
            raise SystemExit("timed out waiting for " + what)
        time.sleep(0.05)
    return time.monotonic() - t

demo = subprocess.Popen([M, "demo", "--base-port", str(B)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    # The demo applies its own sample policy once its regions have leaders: wait for it.
    until(lambda: "carts" in cli("policy", "status")[1], what="the demo")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(POLICY)
    ok, out = cli("policy", "apply", f.name)
    assert ok, out
    until(lambda: cli("put", "prices", "p1", "1")[0], what="the first write")
    until(lambda: cli("get", "prices", "p1", "--consistency", "local", at=AP)[0], what="the copy in ap-south")
    reads, writes, backs = [], [], []
    for trial in range(3):
        time.sleep(3)
        t0 = time.monotonic()
        cli("chaos", "partition", "us-east", "eu-west", at=EU)
        cli("chaos", "partition", "us-east", "ap-south", at=EU)
        until(lambda: "served by ap-south" in cli("get", "prices", "p1", "--consistency", "eventual", at=EU)[1], what="the rerouted read")
        reads.append(time.monotonic() - t0)
        until(lambda: "served by eu-west" in cli("put", "orders", f"t{trial}", "1", "--timeout-secs", "3", at=AP)[1], what="the promoted write")
        writes.append(time.monotonic() - t0)
        t1 = time.monotonic()
        cli("chaos", "heal", at=EU)
        until(lambda: "served by us-east" in cli("put", "orders", f"b{trial}", "1", at=AP)[1], what="the write home")
        backs.append(time.monotonic() - t1)
    print("cut -> read rerouted s:", " ".join(f"{x:.2f}" for x in reads))
    print("cut -> write taken by the stand-in s:", " ".join(f"{x:.2f}" for x in writes))
    print("heal -> write served by the home again s:", " ".join(f"{x:.2f}" for x in backs))
finally:
    demo.terminate()
    demo.wait()
