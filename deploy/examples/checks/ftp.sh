#!/bin/bash
# Health check of the ftp-passive farm (kind = "command"), run as
#   ftp.sh <backend address> <port>
# Exit status 0 means healthy. The port given is the farm's first data port,
# which listens only during a transfer, so this probes the control port (21)
# and expects the server's "220" greeting. bash's /dev/tcp: no extra package.
addr=$1
exec 3<>"/dev/tcp/$addr/21" || exit 1
read -r -t 2 greeting <&3 || exit 1
[[ $greeting == 220* ]]
