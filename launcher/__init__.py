"""tandem.launcher: the command line, `tandem serve`, the offline `LLM`, and deployments (local
processes; Ray) that start, supervise and stop workers."""
