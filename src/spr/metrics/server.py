"""The ``/metrics`` HTTP endpoint, loopback by default."""

from __future__ import annotations

from types import TracebackType

from prometheus_client import CollectorRegistry, start_http_server

from spr.errors import ConfigError

# ------------------------------------------------------------------------- endpoint


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint (a daemon thread). Close it to stop listening."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str) -> None:
        try:
            self._httpd, self._thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}"
            ) from exc
        self.addr = addr
        self.port: int = self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port; blocks until the server thread has ended."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def serve(port: int, addr: str = "127.0.0.1", *, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread.

    Returns at once. ``port=0`` picks a free port (see :attr:`MetricsServer.port`). The
    default address is loopback only; exposing metrics beyond the host is a deliberate
    choice. Raises :class:`spr.errors.ConfigError` when the address cannot be bound.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"metrics port must be 0..65535, got {port}")
    return MetricsServer(registry, port, addr)
