"""redge: failure-resilient ML serving for the edge.

Every node runs `redge peer`: it hosts models, serves inference over HTTP, watches its
neighbours and votes in a Raft group that holds the cluster state. The parts are
`redge.consensus` (the replicated state machine), `redge.placement` (failover decisions),
`redge.runtime` (models and artifacts), `redge.agent` (the peer process) and `redge.chaos`
(local clusters, fault injection and measurement).
"""

__version__ = "0.1.0"
