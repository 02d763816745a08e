"""The topic policy plugin: per-identity publish/subscribe rules of fleetpki.topics for amqtt."""

from __future__ import annotations

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from enroll_server.broker.policy import Admission
from fleetpki.topics import may_publish, may_subscribe

# Where the admission of a connected session is kept (amqtt asks for namespaced keys).
ADMISSION_KEY = "fleetpki.admission"


def admission_of(session: Session | None) -> Admission | None:
    if session is None:
        return None
    admission = session.attributes.get(ADMISSION_KEY)
    return admission if isinstance(admission, Admission) else None


def allows(session: Session | None, topic: str | None, action: Action | str | None) -> bool:
    """Publish and subscribe follow fleetpki.topics; anything unadmitted is denied.

    RECEIVE (delivery to a subscriber) is allowed: a subscription was granted only if every
    topic it matches is readable, so checking each delivered message again would only cost.
    """
    admission = admission_of(session)
    if admission is None or topic is None:
        return False
    if action == Action.PUBLISH:
        return may_publish(admission.role, admission.identity, topic)
    if action == Action.SUBSCRIBE:
        return may_subscribe(admission.role, admission.identity, topic)
    return action == Action.RECEIVE


class TopicPolicyPlugin(BaseTopicPlugin):
    """amqtt topic plugin: a device only under devices/<id>/#, a service per its role."""

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        return allows(session, topic, action)
