#!/usr/bin/env python3
"""Drives headless Chromium over the DevTools protocol (stdlib only), for scripts/web-test.sh.

Chromium is started with --remote-debugging-pipe: commands go in on its fd 3 and replies come
out on its fd 4, one JSON message each, NUL-terminated; no port, no WebSocket library. For every
URL given, a fresh tab loads it and `window.moeResult` is polled until it is set (or the time
runs out); the results are printed as one JSON line per URL and written to --out.

    cdp.py --chromium /usr/bin/chromium --out results.json [--screenshot shot.png] URL...
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time


class Browser:
    """One headless Chromium and its DevTools pipe."""

    def __init__(self, exe, extra_flags, log):
        self.user_dir = tempfile.mkdtemp(prefix="moe-chromium-")
        # Ours: write to chrome_in_w (its fd 3), read from chrome_out_r (its fd 4).
        chrome_in_r, self.chrome_in_w = os.pipe()
        self.chrome_out_r, chrome_out_w = os.pipe()

        def child_fds():
            # Through high numbers first, in case a pipe end already sits on 3 or 4.
            a = os.dup(chrome_in_r) if chrome_in_r > 4 else os.dup2(chrome_in_r, 100)
            b = os.dup(chrome_out_w) if chrome_out_w > 4 else os.dup2(chrome_out_w, 101)
            os.dup2(a, 3)
            os.dup2(b, 4)

        flags = [
            "--headless",
            "--no-sandbox",
            "--enable-unsafe-webgpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-pipe",
            "--window-size=1200,900",
            f"--user-data-dir={self.user_dir}",
        ] + list(extra_flags)
        self.log = log
        self.proc = subprocess.Popen(
            [exe] + flags + ["about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=child_fds,
            pass_fds=(3, 4),  # kept open in the child after child_fds

        )
        os.close(chrome_in_r)
        os.close(chrome_out_w)
        self.buf = b""
        self.next_id = 0
        self.events = []

    def _read_message(self, deadline):
        while b"\0" not in self.buf:
            if time.time() > deadline:
                raise TimeoutError("no message from chromium")
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            chunk = os.read(self.chrome_out_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method, params=None, session=None, timeout=60):
        """Sends one command and returns its result (raises on a protocol error)."""
        self.next_id += 1
        mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.chrome_in_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == mid:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def drain_console(self, session):
        """Console lines and exceptions the page produced so far."""
        lines, rest = [], []
        for ev in self.events:
            if ev.get("sessionId") != session:
                rest.append(ev)
                continue
            p = ev.get("params", {})
            if ev.get("method") == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                lines.append(f"console.{p.get('type')}: {text}")
            elif ev.get("method") == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                lines.append(f"exception: {d.get('exception', {}).get('description', d.get('text'))}")
        self.events = rest
        return lines

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_page(browser, url, timeout, screenshot=None):
    """Loads `url` in a new tab and waits for window.moeResult; returns it (or an ERROR)."""
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    browser.call("Runtime.enable", session=session)
    browser.call("Page.enable", session=session)
    browser.call("Page.navigate", {"url": url}, session=session)
    start = time.time()
    result = None
    console = []
    while time.time() - start < timeout:
        r = browser.call(
            "Runtime.evaluate",
            {"expression": "window.moeResult ? JSON.stringify(window.moeResult) : ''", "returnByValue": True},
            session=session,
        )
        value = r.get("result", {}).get("value") or ""
        console += browser.drain_console(session)
        if value:
            result = json.loads(value)
            break
        time.sleep(0.25)
    console += browser.drain_console(session)
    if result is None:
        result = {"status": "ERROR", "message": f"window.moeResult not set within {timeout} s"}
    result["seconds"] = round(time.time() - start, 2)
    result["console"] = console
    if screenshot:
        shot = browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
        with open(screenshot, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
    browser.call("Target.closeTarget", {"targetId": target})
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--flag", action="append", default=[], help="an extra Chromium flag")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per page")
    ap.add_argument("--out", help="write every result here (JSON list)")
    ap.add_argument("--screenshot", help="PNG of the first page, once its result is set")
    ap.add_argument("--log", default=os.devnull, help="chromium's own output")
    ap.add_argument("urls", nargs="+")
    args = ap.parse_args()
    with open(args.log, "ab") as log:
        browser = Browser(args.chromium, args.flag, log)
        results = []
        try:
            for i, url in enumerate(args.urls):
                try:
                    r = run_page(browser, url, args.timeout, args.screenshot if i == 0 else None)
                except Exception as e:  # the browser died or stopped answering
                    r = {"status": "ERROR", "message": f"driver: {e}", "console": []}
                r["url"] = url
                results.append(r)
                short = {k: r.get(k) for k in ("url", "status", "backend", "adapter", "message", "seconds")}
                print(json.dumps(short), flush=True)
        finally:
            browser.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
