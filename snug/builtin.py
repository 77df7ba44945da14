"""snug's own methods, stages and preference losses, as a plug-in: the module snug's package
declares under the entry-point group `snug.plugins` (pyproject.toml), which the registry's door
(snug/core/registry.py: load_plugins) imports first, before any other package's plug-ins and
$SNUG_PLUGINS. Each module imported here registers what it defines, so the order of these
imports is the order of the method.name, train.stage and pref.loss choices and of a search's
methods."""

# isort: off
from snug.methods import full, freeze, lora, ia3, virtual_tokens, llama_adapter, adapter  # noqa: F401
from snug.stages import pref_losses  # noqa: F401  (the preference losses: pref.loss's choices)
from snug.stages import sft, pt, cls, dpo, orpo, simpo, kto  # noqa: F401
# isort: on
