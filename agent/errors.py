"""Operational errors of the peer process: each carries a message meant for an operator."""


class AgentError(Exception):
    """Base of the errors the peer reports to its operator or its HTTP clients."""


class ConfigError(AgentError):
    """The configuration cannot start a peer; the message lists every problem found."""


class JoinFailed(AgentError):
    """Joining a running cluster failed: the member is unreachable or refused us."""


class HttpError(Exception):
    """An HTTP answer other than success, raised by a handler of the data plane or the control
    API: `status`, the message a client can act on, and any headers it should carry."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
