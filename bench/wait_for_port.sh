# Sourced by the scripts that start cds-server on port 0 (bench/*.sh, tests/*.sh).
# wait_for_port LOG PID [TRIES]: waits (TRIES x 0.1 s, default 600) until the server PID,
# whose stderr goes to LOG, logs "listening on HOST:PORT"; sets PORT. Prints LOG and returns
# 1 when the server exits or never listens.
wait_for_port() {
  local log=$1 pid=$2 tries=${3:-600}
  PORT=""
  for _ in $(seq 1 "$tries"); do
    PORT=$(sed -n 's/.*listening on [^ ]*:\([0-9][0-9]*\).*/\1/p' "$log" | head -1)
    [ -n "$PORT" ] && return 0
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.1
  done
  echo "cds-server did not start:" >&2
  cat "$log" >&2
  return 1
}
