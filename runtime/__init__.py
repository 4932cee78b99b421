"""Model artifacts, the peer's store and its budget, fetching, loaders and the model host.

The only part of redge that imports torch or onnxruntime; it imports nothing else of
redge. Modules import lazily what is heavy, so `redge.runtime.store` or
`redge.runtime.manifest` can be used without loading torch. See docs/runtime.md.
"""
