#!/usr/bin/env python3
"""subreaper.py OUT CMD...: runs CMD as a child subreaper (as containerd's
shims and conmon are), so processes orphaned under it (the container
monitors that `sandboxvm create` leaves running) are reaped here; writes
"pid exit-code" of each reaped orphan to OUT (-N: killed by signal N)."""
import ctypes
import os
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
child = subprocess.Popen(sys.argv[2:])
code = 125
with open(sys.argv[1], "w") as out:
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            break
        out.write(f"{pid} {os.waitstatus_to_exitcode(status)}\n")
        out.flush()
sys.exit(code)
