"""ZEDA models for SGLang (``SGLANG_EXTERNAL_MODEL_PACKAGE=zeda_server.sglang_models``).

Importing the package registers the ZEDA config types; the registry then finds ``EntryClass``
in :mod:`zeda_server.sglang_models.models`. Importing SGLang is deferred to that module, so the
pure helpers in :mod:`zero_slots` work without SGLang installed.
"""

from zeda_server.sglang_models.plugin import register_configs

register_configs()
