"""amqtt 0.12.1 hardened for device identity: every override of amqtt and asyncio internals.

This package is the one place that reaches into amqtt (pinned by `check_amqtt_version`) and
asyncio internals: tls.py (listener), lean.py (per-connection objects), connection.py (ending
a session), broker.py (the connection path and message handling).

amqtt is embeddable but was not written for a broker whose clients are identified by their
certificates. Each fact below was found by running stock amqtt 0.12.1 and has a test in
tests/integration/test_broker_hardening.py that fails on stock amqtt:

1. Its TLS listener hard-codes CERT_OPTIONAL -> `tls.server_tls_context` requires a client
   certificate chaining to our CA only, TLS >= 1.2.
2. There is no API to disconnect a client -> `Connection.sever` aborts the transport the broker
   handed to amqtt (optionally suppressing the will first); amqtt's own connection-lost path
   then cleans up. This is the one place a session is ended from outside.
3. Session hijack: stock amqtt deletes or takes over the session of a client id before
   authenticating, and resumes a clean_session=False session without looking at the new
   certificate -> `broker.HardenedBroker._serve` admits first, on the certificate of *this*
   connection, and touches sessions only after admission.
4. Keepalive is not enforced -> a per-connection watchdog (`Connection.arm_watchdog`) drops
   a client silent for 1.5 x keepalive (MQTT 3.1.1 section 3.1.2.10) and publishes its will.
5. A refused connection whose peer resets leaks a max_connections slot -> the slot is taken and
   released in one try/finally around the whole connection, and a full listener refuses at
   once instead of parking the connection.
6. ~330 KB per idle TLS connection, 256 KiB of it asyncio's SSL read buffer ->
   `tls.LeanSSLProtocol` reads through one buffer shared by all connections, no TLS session
   tickets are issued, and lean.py replaces the `transitions.Machine` (~16 KB) and the four
   asyncio.Queues (~13 KB) amqtt builds per connection: ~61 KB per idle session at 10,000.
   LeanSSLProtocol subclasses asyncio's private SSLProtocol, so `tls.lean_tls_unavailable`
   probes it at start-up; if the probe fails the listener serves through the public
   `loop.create_server(ssl=...)` path (a warning, `fleetpki_broker_tls_fast_path 0`).
7. MQTT 5 is not supported -> the first packet is read as one bounded frame and a v5 CONNECT is
   answered with a v5 CONNACK 0x84 (Unsupported Protocol Version) and closed, instead of being
   mis-parsed as 3.1.1.

Found while doing so, and fixed here too: stock amqtt sends a connecting client the retained
messages of *every* subscription in the broker (not just its own), lets a will message bypass
topic filtering, waits forever for a CONNECT, leaves a session "connected" when it closes a
client for an invalid publish topic, and does O(all subscriptions) work per message, per
connect and per session cleanup (fanout.py; `HardenedBroker._run_session`; the per-session
filter index), which at 10,000 devices costs milliseconds each.
"""

from enroll_server.broker.hardening.broker import (
    AMQTT_VERSION,
    HardenedBroker,
    check_amqtt_version,
)
from enroll_server.broker.hardening.connection import (
    DROP_CERT_EXPIRED,
    DROP_KEEPALIVE,
    DROP_OPERATOR,
    DROP_PROTOCOL_ERROR,
    DROP_REVOKED,
    DROP_SUSPENDED,
    DROP_TAKEN_OVER,
    Connection,
)
from enroll_server.broker.hardening.lean import LeanQueue, LeanSession
from enroll_server.broker.hardening.tls import (
    LeanSSLProtocol,
    lean_tls_unavailable,
    server_tls_context,
)

__all__ = [
    "AMQTT_VERSION",
    "DROP_CERT_EXPIRED",
    "DROP_KEEPALIVE",
    "DROP_OPERATOR",
    "DROP_PROTOCOL_ERROR",
    "DROP_REVOKED",
    "DROP_SUSPENDED",
    "DROP_TAKEN_OVER",
    "Connection",
    "HardenedBroker",
    "LeanQueue",
    "LeanSSLProtocol",
    "LeanSession",
    "check_amqtt_version",
    "lean_tls_unavailable",
    "server_tls_context",
]
