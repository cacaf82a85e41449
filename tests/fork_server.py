"""Real `pagedbatch` processes without paying the imports each time.

`python tests/fork_server.py` imports the command once, then reads requests, one JSON line
each, on stdin and answers each with one line on stdout:

- `{"run": [args], "cwd": DIR, "out": FILE, "err": FILE, "fsize": N}`: fork a child that
  is the command `pagedbatch ARGS` (its own session, stdin /dev/null, stdout and stderr to
  the files; `"err": null` gives it a stderr pipe whose reader is already gone; `fsize`,
  if given, limits the size of the files it writes to N bytes, as `ulimit -f` does: a
  full disk); answers its pid.
- `{"wait": PID}`: wait for that child; answers its exit code (-N: killed by signal N).

A child is a process of its own: it exits, is signalled and killed like the installed
command; only the imports were done before it started (the model is loaded in the child).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys

import torch  # noqa: F401  (what `run` imports, paid once here)
import transformers  # noqa: F401

import pagedbatch.cli.app  # noqa: F401
from pagedbatch.cli.main import main


def child(request: dict) -> None:
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    if request["err"] is None:
        read, write = os.pipe()
        os.close(read)
        os.dup2(write, 2)
    else:
        os.dup2(os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    if request.get("fsize") is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
    sys.argv = ["pagedbatch", *request["run"]]
    try:
        main()
    finally:
        os._exit(99)  # main() never returns


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if "wait" in request:
            _, status = os.waitpid(request["wait"], 0)
            answer = os.waitstatus_to_exitcode(status)
        else:
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                child(request)
            answer = pid
        print(answer, flush=True)


if __name__ == "__main__":
    serve()
