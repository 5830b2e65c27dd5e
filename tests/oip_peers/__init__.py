"""Code that runs inside the OIP peers' own virtualenvs (MLServer, tritonclient), never imported by
the project's tests: `echo_runtime` is loaded by MLServer, `triton_calls` is run by the
tritonclient venv's python. See tests/harness/oip_peers.py and scripts/oip_peers.sh."""
