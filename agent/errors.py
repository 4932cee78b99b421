"""Operational errors of the peer process: each carries a message meant for an operator."""


class AgentError(Exception):
    """Base of the errors the peer reports to its operator or its HTTP clients."""


class ConfigError(AgentError):
    """The configuration cannot start a peer; the message lists every problem found."""


class JoinFailed(AgentError):
    """Joining a running cluster failed: the member is unreachable or refused us."""

