#!/usr/bin/env python3
"""console-receiver.py SOCKET OUT: what containerd/conmon do with
--console-socket: accept one connection, receive the terminal master
(SCM_RIGHTS), set its size to 30x100, type "hello", and copy everything
the container writes to OUT until the terminal closes."""
import fcntl
import os
import socket
import struct
import sys
import termios

path, out_path = sys.argv[1], sys.argv[2]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(1)
srv.settimeout(60)
conn, _ = srv.accept()
_, fds, _, _ = socket.recv_fds(conn, 1024, 1)
master = fds[0]
fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
os.write(master, b"hello\n")
with open(out_path, "wb") as out:
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        out.write(data)
        out.flush()
