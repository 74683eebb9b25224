# How long a node takes to mark a region down after a cut, and up after the heal, with the
# default [health] settings: five cuts of eu-west from us-east in a release demo on ports
# 7400-7508, each timed by polling eu-west's /v1/cluster every 50 ms.
# Run: cargo build --release -p meridian && python3 tools/health-detection/measure.py
import json, subprocess, time, urllib.request, sys
B=7400
M=sys.argv[1] if len(sys.argv) > 1 else "target/release/meridian"
demo=subprocess.Popen([M,"demo","--base-port",str(B)],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
eu=f"http://127.0.0.1:{B+4}"
def state():
    try:
        r=json.load(urllib.request.urlopen(eu+"/v1/cluster",timeout=5))
        for reg in r["regions"]:
            if reg["name"]=="us-east": return (reg.get("health") or {}).get("reachability")
    except Exception as e: return None
def chaos(*a): subprocess.run([M,"chaos",*a,"--endpoint",eu],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL,check=True)
def wait(want):
    t=time.monotonic()
    while state()!=want:
        time.sleep(0.05)
        if time.monotonic()-t>60: raise SystemExit("timeout "+want)
    return time.monotonic()-t
try:
    wait("up")
    downs=[];ups=[]
    for i in range(5):
        time.sleep(1.3)
        chaos("partition","eu-west","us-east"); downs.append(wait("down"))
        time.sleep(1.3)
        chaos("heal"); ups.append(wait("up"))
    print("cut -> down s:", " ".join(f"{x:.2f}" for x in downs))
    print("heal -> up s:", " ".join(f"{x:.2f}" for x in ups))
finally:
    demo.terminate(); demo.wait()
