"""`tunelab ui`: a local web dashboard over run folders (needs the `ui` extra: pip install 'tunelab[ui]').

Every screen is a view of the run folders; everything it launches is an ordinary `tunelab` command that it
shows and records (see docs/architecture.md, "Web UI"). `tunelab.ui.app.create_app` builds the app.
"""

MAX_UPLOAD_MB = 512  # the largest dataset upload by default (streamed to disk); here so `--help` needs no fastapi
