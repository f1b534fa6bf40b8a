"""Prefect flows orchestrating the wsireg_flow library (which never imports Prefect).

Importing this package sets hermetic Prefect defaults before Prefect loads: no telemetry, and a
patient start for the temporary local server. Users' own settings take precedence.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
