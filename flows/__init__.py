"""Prefect flows orchestrating the wsireg_flow library (which never imports Prefect).

Importing this package sets hermetic Prefect defaults before Prefect loads: no telemetry, and a
patient start for the temporary local server. Users' own settings take precedence.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

# Prefect creates its home directory but not missing parents of it: do that here.
if os.environ.get("PREFECT_HOME"):
    os.makedirs(os.path.expanduser(os.environ["PREFECT_HOME"]), exist_ok=True)
