"""The shell every job runs in, and nothing of faceage's own model or tables: its errors and exit codes
(errors.py), its command line and error boundary, logging and redaction (cli.py), one I/O layer for local
paths and remote URIs (uri.py) and output safety: locks, staging, one commit per run (outputs.py).

Imports point down only: errors <- uri <- cli <- outputs; shell imports nothing else of the project.
"""
