"""Dia2 on NVIDIA Triton Inference Server: a model repository whose Python-backend model streams
speech as decoupled responses, and a launcher for the tritonserver of the ``[triton]`` extra.

Importing this package is cheap and torch-free; Triton's own modules (``triton_python_backend_utils``
inside the server, ``tritonclient`` for callers) are imported only where they are used.

Modules: ``command`` (the ``triton-repo`` / ``triton-serve`` CLI), ``repo`` (writes the repository),
``settings`` (config.pbtxt's parameters, both ways), ``model`` (what Triton runs), ``request``
(a request's checks, Triton-free), ``server`` (the tritonserver launcher). See docs/triton.md.
"""
