"""snug's training stages, one module each; importing this package registers them (in this
order: the order of the train.stage choices). A stage of your own subclasses
`snug.stages.base.Stage` and registers itself likewise (docs/extending.md)."""

# isort: off
from snug.stages import sft, pt, cls, dpo, orpo, simpo, kto  # noqa: F401
# isort: on
