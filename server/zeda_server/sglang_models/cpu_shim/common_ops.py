"""Stand-in for ``sgl_kernel``'s compiled ``common_ops`` on a machine without ``libcuda.so.1``.

``sgl_kernel`` loads its CUDA library at import, and its loader's last fallback is a plain
``import common_ops``. SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) calls none of those
CUDA ops, so an empty module lets ``sgl_kernel`` import. ``zeda serve --backend sglang`` puts this
directory on ``PYTHONPATH`` only when no CUDA driver is found; on a GPU host it is never used.
"""
