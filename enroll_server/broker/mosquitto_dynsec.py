"""A client of mosquitto's dynamic-security control topic: it ends live sessions by name."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from enroll_server.broker.mosquitto_config import (
    DYNSEC_RESPONSE_TOPIC,
    DYNSEC_TOPIC,
    SYNC_USERNAME,
    MosquittoFiles,
    SyncSettings,
)
from enroll_server.broker.mosquitto_errors import (
    DynsecCommandFailed,
    DynsecUnavailable,
    MosquittoError,
)
from fleetpki.packet_size import DEFAULT_MAX_PACKET_SIZE

log = logging.getLogger("fleetpki.mosquitto")

# Commands per dynsec control message (two per device); keeps messages well under 1 MB.
KICK_CHUNK = 500
# Bytes of one kick command in a control message at most (a 64-character id, a 32-character
# password and correlation data): fewer commands per message under a small max_packet_size,
# which mosquitto applies to the control listener too.
KICK_COMMAND_BYTES = 256


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    responses: list[dict[str, Any]] = field(default_factory=list)


class DynsecControl:
    """A client of the dynamic-security control topic on mosquitto's loopback listener."""

    def __init__(
        self,
        password: str,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = 5.0,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    ) -> None:
        self._chunk = max(1, min(KICK_CHUNK, (max_packet_size - 512) // KICK_COMMAND_BYTES))
        self._host = host
        self._port = port
        self._timeout = timeout
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"fleetpki-sync-{os.getpid()}",
            protocol=mqtt.MQTTv311,
        )
        self._client.username_pw_set(SYNC_USERNAME, password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        self._connect_error: str | None = None
        self._started = False

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
            self._connected.set()
            return
        self._connect_error = None
        client.subscribe(DYNSEC_RESPONSE_TOPIC, qos=1)
        self._connected.set()

    def _on_disconnect(self, *_args: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()

    def _on_subscribe(self, *_args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("unparseable dynsec response on %s", message.topic)
            return
        with self._lock:
            for response in responses:
                pending = self._pending.get(str(response.get("correlationData")))
                if pending is not None:
                    pending.responses.append(response)
                    pending.done.set()

    def connect(self) -> None:
        """Connect once (idempotent); later, paho's loop thread reconnects by itself."""
        if not self._started:
            try:
                self._client.connect(self._host, self._port, keepalive=30)
            except OSError as exc:
                raise DynsecUnavailable(self._host, self._port, str(exc)) from exc
            self._client.loop_start()
            self._started = True
        self._wait_ready()

    def _wait_ready(self) -> None:
        if not self._connected.wait(self._timeout):
            raise DynsecUnavailable(self._host, self._port, "no CONNACK")
        if self._connect_error is not None:
            raise DynsecUnavailable(self._host, self._port, f"refused: {self._connect_error}")
        if not self._subscribed.wait(self._timeout):
            raise DynsecUnavailable(self._host, self._port, "no SUBACK for the response topic")

    def close(self) -> None:
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
            self._started = False

    def __enter__(self) -> DynsecControl:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send commands in one control message; their responses, in order."""
        self.connect()
        tags = [uuid.uuid4().hex for _ in commands]
        waits = [_Pending() for _ in commands]
        with self._lock:
            self._pending.update(zip(tags, waits, strict=True))
        try:
            body = [dict(c, correlationData=t) for c, t in zip(commands, tags, strict=True)]
            info = self._client.publish(DYNSEC_TOPIC, json.dumps({"commands": body}), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise DynsecUnavailable(self._host, self._port, f"publish failed ({info.rc})")
            for wait in waits:
                if not wait.done.wait(self._timeout):
                    raise DynsecUnavailable(self._host, self._port, "no response to a command")
            return [w.responses[0] for w in waits]
        finally:
            with self._lock:
                for tag in tags:
                    self._pending.pop(tag, None)

    def kick(self, usernames: Sequence[str]) -> list[str]:
        """End the live sessions of `usernames`; returns those that were dynsec clients before
        (left disabled: revocation outranks a hand-made dynsec account of the same name)."""
        kept_disabled: list[str] = []
        names = [u for u in dict.fromkeys(usernames) if u != SYNC_USERNAME]
        for start in range(0, len(names), self._chunk):
            chunk = names[start : start + self._chunk]
            created = self.run(
                [
                    {
                        "command": "createClient",
                        "username": name,
                        # Never used to log in; random so the throw-away client is never open.
                        "password": secrets.token_urlsafe(24),
                    }
                    for name in chunk
                ]
            )
            second: list[dict[str, Any]] = []
            for name, response in zip(chunk, created, strict=True):
                error = response.get("error")
                if error is None:
                    # deleteClient kicks every session with this username, then forgets it.
                    second.append({"command": "deleteClient", "username": name})
                elif "exist" in str(error).lower():
                    second.append({"command": "disableClient", "username": name})
                    kept_disabled.append(name)
                else:
                    raise DynsecCommandFailed("createClient", name, str(error))
            for command, response in zip(second, self.run(second), strict=True):
                if response.get("error") is not None:
                    raise DynsecCommandFailed(
                        command["command"], command["username"], str(response["error"])
                    )
        return kept_disabled


def open_control(files: MosquittoFiles, timeout: float = 5.0) -> DynsecControl | None:
    """A DynsecControl (connecting on first use) if this configuration has live drop."""
    settings = SyncSettings.load(files)
    if not settings.live_drop:
        return None
    try:
        password = files.sync_secret.read_text().strip()
    except OSError as exc:
        raise MosquittoError(f"{files.sync_secret}: unreadable ({exc})") from exc
    return DynsecControl(
        password, settings.admin_port, timeout=timeout, max_packet_size=settings.max_packet_size
    )


def close_quietly(control: DynsecControl | None) -> None:
    if control is not None:
        with contextlib.suppress(Exception):
            control.close()
