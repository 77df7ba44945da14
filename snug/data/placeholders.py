"""`{{placeholders}}` left in data: LLaMA-Factory's identity.json ships with `{{name}}` and
`{{author}}`, which its users replace before training. Left in, the model learns the braces;
snug counts them (a warning and summary.json's data stats), it does not refuse them."""

from __future__ import annotations

import json
import re
from collections import Counter

from datasets import Dataset

from snug.data.tokenize import RAW_JSON, records_of

# A name in double braces, as the templates of LLaMA-Factory's demo data write them.
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.-]*)\s*\}\}")
# Records scanned per batch.
BATCH = 1000


def count_placeholders(raw: Dataset) -> Counter[str]:
    """How many records of `raw` hold each placeholder ("{{name}}": records), over all the
    text of each record (its JSON, where the braces are written as they are)."""
    found: Counter[str] = Counter()
    for batch in raw.iter(batch_size=BATCH):
        if RAW_JSON in batch:  # the records' own JSON text (data/sources.py)
            texts = batch[RAW_JSON]
        else:
            texts = [json.dumps(r, ensure_ascii=False, default=str) for r in records_of(batch)]
        for text in texts:
            if "{{" in text:
                found.update({f"{{{{{name}}}}}" for name in PLACEHOLDER.findall(text)})
    return found


def placeholder_warning(spec: str, found: Counter[str]) -> str:
    """One line telling what `count_placeholders` found in `spec`, and what to do."""
    each = ", ".join(f"{name} in {n:,}" for name, n in found.most_common())
    return (
        f"{spec}: placeholders left in the data ({each} records) are trained as written; "
        "replace them with your model's values first (README: Your data)."
    )
