"""``reverie bench e2e``: the agent daemon end to end over a real broker.

cli.py (the subcommand, plan, report and targets) drives phases.py (raw ceiling,
sustained ingest, latency, idle CPU), which starts the processes of procs.py (broker,
daemon) and load.py (publisher, subscriber).
"""

from agent.bench.e2e.cli import register

__all__ = ["register"]
