#!/usr/bin/python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Sends QMP commands to a QEMU monitor socket and prints each reply's "return" as JSON.

Usage: qmp.py SOCKET 'COMMAND [JSON-ARGS]' ...   e.g. qmp.py s.qmp 'query-migrate'
An error reply prints the error on stderr and exits 1. Every socket operation has a 30 s
deadline, so a hung QEMU cannot hang the caller.
"""
import json
import socket
import sys


def main():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(sys.argv[1])
    f = sock.makefile("rw")

    def read_reply():
        while True:
            line = f.readline()
            if not line:
                raise SystemExit("qmp: connection closed")
            msg = json.loads(line)
            if "event" in msg:
                continue
            return msg

    read_reply()  # greeting
    f.write(json.dumps({"execute": "qmp_capabilities"}) + "\n")
    f.flush()
    read_reply()
    for cmd in sys.argv[2:]:
        name, _, args = cmd.partition(" ")
        req = {"execute": name}
        if args.strip():
            req["arguments"] = json.loads(args)
        f.write(json.dumps(req) + "\n")
        f.flush()
        reply = read_reply()
        if "error" in reply:
            print(f"qmp: {name}: {reply['error'].get('desc')}", file=sys.stderr)
            sys.exit(1)
        print(json.dumps(reply.get("return")))


if __name__ == "__main__":
    main()
