#!/usr/bin/env bash
# Prints a TCP port on 127.0.0.1 that the kernel just handed out as free.
# Another process can take it before you bind it: callers retry on "address in use".
set -euo pipefail
exec python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
'
