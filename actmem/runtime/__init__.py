"""The training runtime: a run's life (lifecycle), its phases (session), what it sets up (setup), one epoch
(engine), the optimizer and schedule (optim), airbench94's lookahead, the run directory's one owner
(rundir), the loggers, and the data-parallel process group (distributed)."""
