"""snug's training stages, one module each, registering itself in one line
(`register_stage(...)`) when snug's plug-in module (snug/builtin.py) imports it through the
registry's door. A stage of your own subclasses `snug.stages.base.BaseStage` and registers itself
likewise (docs/extending.md)."""
