#!/bin/sh
# HAProxy for Ray Serve's ingress on a loopback cluster (deploy/cluster/local.sh sets
# RAY_SERVE_HAPROXY_BINARY_PATH to this file). Ray runs `<binary> -db -f <cfg> [-dR] [-sf pids] [-x sock]`
# after writing <cfg> from its template, whose stats and Prometheus frontends always bind every
# interface (`bind *:<stats port>`, `bind :<exporter port>`). This wrapper rewrites those binds to
# 127.0.0.1, then runs the real binary (STEADY_HAPROXY_REAL, resolved once by local.sh: calling
# Python here made HAProxy miss its readiness check) so that it dies with its HAProxyManager
# (`setpriv --pdeathsig KILL`): a lost manager never leaves an HAProxy holding the ports.
cfg=""; prev=""
for a in "$@"; do [ "$prev" = "-f" ] && cfg="$a"; prev="$a"; done
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
  sed -i -e 's/^\([[:space:]]*bind\) \*:/\1 127.0.0.1:/' -e 's/^\([[:space:]]*bind\) :/\1 127.0.0.1:/' "$cfg"
fi
exec setpriv --pdeathsig KILL -- "$STEADY_HAPROXY_REAL" "$@"
