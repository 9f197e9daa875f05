"""A non-C++ client against the real cds-server: Debian's python3-grpcio calls the
standard grpc.health.v1 service and the server reflection list over a real channel, and
sends Evaluate bytes that do not parse (a client C++ stubs cannot be).

Usage: python_client_test.py CDS_SERVER_BINARY RULES_DIR. Exits 77 (skipped) without grpc.
The messages are tiny, so they are encoded by hand rather than generated.
"""
import re
import signal
import subprocess
import sys
import time

try:
    import grpc
except ImportError:
    print("python3 grpc module not installed: skipping")
    sys.exit(77)


def start_server(binary, rules_dir):
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--insecure_dev", "--rules_dir", rules_dir,
         "--drain", "0s"],
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    log = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        match = re.search(r"listening on [^\s]+:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    sys.exit("server did not start:\n" + "".join(log))


def main():
    binary, rules_dir = sys.argv[1], sys.argv[2]
    proc, port = start_server(binary, rules_dir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            # HealthCheckRequest{service=""} is the empty message; the response
            # HealthCheckResponse{status=SERVING} is field 1 varint 1: b"\x08\x01".
            reply = check(b"", timeout=10)
            assert reply == b"\x08\x01", f"expected SERVING, got {reply!r}"
            service = b"cds.v1.DecisionSupport"
            reply = check(b"\x0a" + bytes([len(service)]) + service, timeout=10)
            assert reply == b"\x08\x01", f"expected SERVING, got {reply!r}"

            # Reflection lists the service (ServerReflectionRequest.list_services = 7).
            reflect = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
            replies = list(reflect(iter([b"\x3a\x00"]), timeout=10))
            assert any(b"cds.v1.DecisionSupport" in r for r in replies), replies

            # Bytes that are no EvaluateRequest (field 2, a length running past the end):
            # a clear INVALID_ARGUMENT, echoing nothing of them.
            evaluate = channel.unary_unary("/cds.v1.DecisionSupport/Evaluate")
            try:
                evaluate(b"\x12\x7fPATIENT-SECRET", timeout=10)
                raise AssertionError("an unparseable request was answered")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
                assert "cds.v1.EvaluateRequest" in error.details(), error.details()
                assert "PATIENT" not in error.details(), error.details()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, f"server exit code {code}"
    print("python client: health SERVING, reflection lists cds.v1.DecisionSupport, "
          "unparseable Evaluate bytes refused INVALID_ARGUMENT, clean exit")


if __name__ == "__main__":
    main()
