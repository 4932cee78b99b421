"""Local clusters, fault injection, load and measurement: redge used as its users use it."""
