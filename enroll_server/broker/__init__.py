"""The embedded mTLS MQTT broker (amqtt, hardened): certificate identity, ACLs, live revocation."""

from enroll_server.broker.errors import BrokerError, BrokerStartError, TlsSetupError
from enroll_server.broker.policy import Admission, KeepalivePolicy, Refusal, RefusalReason
from enroll_server.broker.server import BrokerConfig, RunningBroker, start_broker

__all__ = [
    "Admission",
    "BrokerConfig",
    "BrokerError",
    "BrokerStartError",
    "KeepalivePolicy",
    "Refusal",
    "RefusalReason",
    "RunningBroker",
    "TlsSetupError",
    "start_broker",
]
