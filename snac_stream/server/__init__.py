"""Websocket serving: the protocol (:mod:`.protocol`), the server (:mod:`.server`), the browser client it serves
(:mod:`.web`, files in ``static/``) and the latency benchmark (:mod:`.latency`). The client is :mod:`snac_stream.client`."""

from ..protocol import PROTOCOL_VERSION, ProtocolError
from .server import ServerOptions, SNACServer, algorithmic_latency

__all__ = ["PROTOCOL_VERSION", "ProtocolError", "ServerOptions", "SNACServer", "algorithmic_latency"]
