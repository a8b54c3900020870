"""Start the given JupyterLab command, wait until it answers over HTTP, then stop it.

Usage: python .ci/lab_smoke.py jupyter lab --port=N ...   (the same flags as `make lab`)
"""
import re
import secrets
import subprocess
import sys
import time
import urllib.request

cmd = sys.argv[1:]
port = next(int(m.group(1)) for a in cmd if (m := re.fullmatch(r"--port=(\d+)", a)))
token = secrets.token_hex(16)
proc = subprocess.Popen([*cmd, f"--IdentityProvider.token={token}"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
ok = False
try:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            for path in ("/api/status", "/lab"):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}?token={token}", timeout=5) as r:
                    assert r.status == 200, (path, r.status)
            ok = True
            break
        except OSError:
            time.sleep(1)
finally:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
if not ok:
    print(out[-4000:])
    sys.exit(f"JupyterLab did not answer on 127.0.0.1:{port}")
print(f"JupyterLab answered on http://127.0.0.1:{port}/lab and stopped cleanly")
