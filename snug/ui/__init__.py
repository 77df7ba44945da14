"""`snug ui`: snug in the browser (the `snug[ui]` extra, on gradio), safe by default.

It listens on 127.0.0.1 unless --host says otherwise, and then only behind a token; it works
with no network: no tunnel, no analytics, system fonts, every script and style from its own
server. Every path it reads or writes is resolved inside --root (snug/ui/safety.py).
"""

import os

# gradio reads this when it is imported (snug/ui/app.py imports it, after this package's
# __init__): no usage reports and no version check go out.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
