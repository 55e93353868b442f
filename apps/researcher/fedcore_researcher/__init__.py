"""fedcore: the researcher command line (nodes, run, resume, history)."""
