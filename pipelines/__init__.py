"""One module per DVC stage and CLI command: a thin ``add_arguments``/``run`` around library calls."""
