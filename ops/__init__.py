"""Operations: the local team stack (processes, pid files, health checks), its settings and
the generated schedules. May import ``core`` only; ``pipelines/team.py`` is its CLI."""
