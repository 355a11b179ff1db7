"""Environment variables forgelab processes pass to each other (kept import-free: read by light commands)."""

# Set by the process that creates a run directory; DDP children and sweep trials launched from it use that
# directory instead of making their own.
RUN_DIR_ENV = "FORGELAB_RUN_DIR"
