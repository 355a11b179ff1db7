"""The experiment machinery: the `forgelab` command (cli, trainer_cli), run directories and loggers (runs),
sweeps (sweep), run comparison (compare) and what a run writes for people to read (reporting).

Kept apart from the ML parts of `common/` (data, backbones, metrics, tasks). Importing this package imports
nothing heavy: `forgelab --help` and the light commands start without Lightning.
"""
