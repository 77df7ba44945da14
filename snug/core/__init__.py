"""snug's bottom layer: the interfaces everything else is written against, importing nothing of
snug's but snug.errors, and no torch. `Method` (method.py), the `Stage` protocol (stage.py),
the config's sections (sections.py), the settings helpers (settings.py), the events a run emits
(events.py), and the registry with its one door for snug's own methods and stages and the
plug-ins' (registry.py). docs/extending.md describes the layers above it."""
